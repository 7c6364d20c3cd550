"""SkippedStepGuard: a step whose gradients are not finite leaves no trace in the BatchNorm statistics,
against a plain loop that never saw the batch, with a GradScaler-like plugin and with AMP's on the CPU."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from monitor_helpers import TinyModule, loader, make_trainer
from torch import nn

import normzoo as nz
from normzoo.lightning.callbacks import SkippedStepGuard

BAD = 2  # the batch whose loss is not finite


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nz.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


class Poisoned(TinyModule):
    """Plain SGD; batch BAD's loss is multiplied by inf after its forward (its statistics look normal)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, lr=0.1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        return loss * float("inf") if batch_idx == BAD else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SkipNonFinite(Precision):
    """What a GradScaler does, in float32: no optimizer step when a gradient is not finite."""

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        result = self._wrap_closure(model, optimizer, closure)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            optimizer.step(**kwargs)
        return result


class Stats(Callback):
    """The BN buffers at the end of every training batch."""

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append([b.clone() for n, b in pl_module.named_buffers()])


def _reference(steps: int) -> nn.Module:
    """The same training in a plain loop that skips batch BAD altogether."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (x, y) in enumerate(loader(n=16 * steps)):
        if i == BAD:
            continue
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_the_skipped_step_leaves_the_statistics_of_a_run_that_never_saw_the_batch(tmp_path) -> None:
    guard, stats = SkippedStepGuard(), Stats()
    module = Poisoned(_model())
    make_trainer(tmp_path, [guard, stats], max_steps=5, plugins=[SkipNonFinite()]).fit(module, loader(n=80))
    assert guard.skipped_steps == [BAD]
    assert all(torch.equal(a, b) for a, b in zip(stats.seen[BAD - 1], stats.seen[BAD], strict=True))
    reference = _reference(5)
    for (name, got), want in zip(
        module.model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)

    unguarded = Poisoned(_model())  # without the guard the batch stays in the statistics
    make_trainer(tmp_path, [], max_steps=5, plugins=[SkipNonFinite()]).fit(unguarded, loader(n=80))
    assert int(unguarded.model[1].num_batches_tracked) == 5
    assert int(module.model[1].num_batches_tracked) == 4
    assert not torch.allclose(unguarded.model[1].running_mean, module.model[1].running_mean)


def test_amp_grad_scaler_on_the_cpu(tmp_path) -> None:
    guard, stats = SkippedStepGuard(), Stats()
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = Poisoned(_model())
    make_trainer(tmp_path, [guard, stats], max_steps=4, plugins=[amp]).fit(module, loader(n=64))
    assert guard.skipped_steps == [BAD]
    assert amp.scaler.get_scale() < 2.0**16  # the scaler did skip (and lowered its scale)
    assert all(torch.equal(a, b) for a, b in zip(stats.seen[BAD - 1], stats.seen[BAD], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(stats.seen[BAD], stats.seen[BAD + 1], strict=True))


def test_accumulated_micro_batches_are_undone_together(tmp_path) -> None:
    guard, stats = SkippedStepGuard(), Stats()
    module = Poisoned(_model())  # BAD = 2 is the first micro-batch of the second step
    trainer = make_trainer(
        tmp_path, [guard, stats], max_steps=3, accumulate_grad_batches=2, plugins=[SkipNonFinite()]
    )
    trainer.fit(module, loader(n=96))
    assert guard.skipped_steps == [1]
    # after micro-batch 3 (the end of the skipped step) the statistics are those after micro-batch 1
    assert all(torch.equal(a, b) for a, b in zip(stats.seen[1], stats.seen[3], strict=True))
    assert copy.deepcopy(guard.state_dict()) == {"skipped_steps": [1]}
