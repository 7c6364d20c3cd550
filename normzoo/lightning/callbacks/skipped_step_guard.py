"""SkippedStepGuard: a BatchNorm statistics update whose optimizer step was skipped is undone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from ...layers import is_batch_norm

__all__ = ["SkippedStepGuard"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class SkippedStepGuard(Callback):
    """Undo the running-statistics update of every BatchNorm layer on an optimizer step that was skipped.

    Under mixed precision, AMP's :class:`~torch.amp.GradScaler` skips the optimizer step whose gradients
    are not finite (and lowers its scale), but the forward passes of that step have already moved every
    BatchNorm layer's ``running_mean``, ``running_var`` and ``num_batches_tracked``: a batch that overflows
    leaves its statistics in the model for good (pytorch #88474, #90342, #115500). This callback copies
    those buffers of every BatchNorm-family layer (torch's, timm's, normzoo's) when a step's first
    micro-batch starts and puts them back when the step's optimizer did not step: the statistics and the
    step count are then exactly what they were before the skipped step, as the weights are.

    A skipped step is one that reached ``on_before_optimizer_step`` but after which the optimizer's
    ``step`` did not run (an optimizer step hook tells), so it works with any precision plugin that skips
    steps that way (Lightning's ``MixedPrecision`` with a GradScaler on CUDA or CPU). With several
    optimizers the statistics are restored only when none of them stepped. :attr:`skipped_steps` lists
    the global steps undone (saved in checkpoints). It does not depend on the layers' own non-finite
    guards and composes with them.

    Example:
        >>> import lightning.pytorch as pl
        >>> guard = SkippedStepGuard()
        >>> trainer = pl.Trainer(precision="16-mixed", callbacks=[guard])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        #: The global steps whose BatchNorm statistics updates were undone, oldest first.
        self.skipped_steps: list[int] = []
        self._layers: list[nn.Module] = []
        self._saved: list[list[Tensor | None]] = []
        self._handles: list[RemovableHandle] = []
        self._open = False  # a step's micro-batches have started and its optimizer step has not come
        self._attempted = False
        self._stepped = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = list(state_dict.get("skipped_steps", []))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = [m for m in pl_module.modules() if is_batch_norm(m) and m.running_mean is not None]
        self._handles = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]
        self._open = False

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True

    def _save(self) -> None:
        # read the buffers anew each time: a callback such as SWA may have replaced the tensors
        self._saved = [
            [None if (b := getattr(m, name, None)) is None else b.detach().clone() for name in _STATS]
            for m in self._layers
        ]

    def _restore(self) -> None:
        with torch.no_grad():
            for m, saved in zip(self._layers, self._saved, strict=True):
                for name, value in zip(_STATS, saved, strict=True):
                    if value is not None:
                        getattr(m, name).copy_(value)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._open:
            self._save()
            self._open, self._attempted, self._stepped = True, False, False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._attempted = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not (self._open and self._attempted):
            return  # a micro-batch of a step still accumulating
        self._open = False
        if not self._stepped:
            self._restore()
            self.skipped_steps.append(trainer.global_step - 1)  # Lightning counts the skipped step too

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._saved = [], []

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._layers = []
