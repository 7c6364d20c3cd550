"""The LightningModule of the Lightning DDP tests, importable by spawned processes (it needs Lightning)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

import normzoo as nz


class SyncedZoo(pl.LightningModule):
    """normzoo layers of every kind and a torch BatchNorm2d; at the end of training each rank saves the
    layers' kinds, flags and running statistics (those of every rank, gathered) to ``out_dir``.

    ``torch_bn=False`` replaces the torch BatchNorm2d by an identity, for runs with torch's converter
    (``sync_batchnorm=True``), whose ``SyncBatchNorm`` refuses CPU tensors."""

    def __init__(self, out_dir: str, torch_bn: bool = True) -> None:
        super().__init__()
        self.out_dir = out_dir
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nz.BatchRenorm2d(4, r_max=1.5, d_max=0.5, schedule=None),
            nn.ReLU(),
            nz.BatchNorm2d(4),
            nn.BatchNorm2d(4) if torch_bn else nn.Identity(),
            nz.NoisyBatchNorm2d(4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        # Still inside fit: NormSync has converted the layers, and teardown has not reverted them yet.
        norms = [m for m in self.model if nz.is_batch_norm(m)]
        stats = torch.cat([torch.cat([m.running_mean, m.running_var]) for m in norms])
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, stats)
        result = {
            "kinds": [type(m).__name__ for m in norms],
            "synced": [bool(getattr(m, "sync", False)) for m in norms],
            "stats": gathered,
            "steps": [int(m.num_batches_tracked) for m in norms],
            "callbacks": [type(c).__name__ for c in self.trainer.callbacks],
        }
        torch.save(result, os.path.join(self.out_dir, f"lightning-rank{dist.get_rank()}.pt"))
