"""Small models, data, trainers and state snapshots for the callback tests: CPU, a few steps, deterministic data.

A module of its own (not conftest.py) with a unique name, so that the DDP test's spawned processes import
exactly this file whatever else is on sys.path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normzoo as nz


class TinyModule(pl.LightningModule):
    """A LightningModule around any classifier: cross entropy, SGD with momentum (or Adam)."""

    def __init__(
        self, model: nn.Module, lr: float = 0.1, optimizer: str = "sgd", weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


class TinyModuleWithVal(TinyModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), batch_size=len(y))


def mlp(
    norm: bool = True, act: type[nn.Module] = nn.ReLU, dropout: float = 0.0, width: int = 16
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, width)]
    if norm:
        layers.append(nz.BatchNorm1d(width))
    layers += [act(), nn.Dropout(dropout), nn.Linear(width, width)]
    if norm:
        layers.append(nn.BatchNorm1d(width))
    layers += [act(), nn.Linear(width, 3)]
    return nn.Sequential(*layers)


def cnn(norm: bool = True, channels: int = 4) -> nn.Sequential:
    def block(cin: int) -> list[nn.Module]:
        return (
            [nn.Conv2d(cin, channels, 3, padding=1, bias=not norm)]
            + ([nz.BatchNorm2d(channels)] if norm else [])
            + [nn.ReLU()]
        )

    return nn.Sequential(
        *block(1), *block(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)
    )


def loader(n: int = 64, shape: Sequence[int] = (8,), batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "default_root_dir": root,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Everything a probe must leave as it found: parameters, gradients, buffers, modes, RNG, optimizer."""
    import copy

    return {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()},
        "buffers": {n: b.clone() for n, b in module.named_buffers()},
        "training": [m.training for m in module.modules()],
        "rng": torch.get_rng_state(),
        "generators": [
            m.generator.get_state()
            for m in module.modules()
            if isinstance(getattr(m, "generator", None), torch.Generator)
        ],
        "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    def same(x: Any, y: Any) -> None:
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor)
            assert x.dtype == y.dtype
            assert torch.equal(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                same(x[k], y[k])
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                same(u, v)
        else:
            assert x == y

    same(a, b)


class Snapshot(pl.Callback):
    """The full state (see :func:`full_state`) at every ``on_before_optimizer_step``: put one before and
    one after a probing monitor in the callbacks list to see what the probe changed."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.states.append(full_state(pl_module, optimizer))


class GradCapture(pl.Callback):
    """The gradients the optimizer is about to use, captured by hand."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})
