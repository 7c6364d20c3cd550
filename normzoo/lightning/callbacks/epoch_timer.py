"""EpochTimer: wall time per training epoch and per training step."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ._base import DiagnosticCallback

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["EpochTimer"]


class EpochTimer(DiagnosticCallback):
    """Wall time of each training epoch (validation excluded) and of its training steps.

    An epoch's time runs from ``on_train_epoch_start`` to ``on_train_epoch_end`` minus every validation run
    inside it; a step's from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward and, on
    a stepping micro-batch, the optimizer step). On CUDA the epoch boundaries synchronize the device, and
    with ``synchronize_steps=True`` every step does (exact step times, a little slower); without it the
    step times measure the host's view of asynchronous work. The seed study reads BatchNorm's cost off
    these numbers (15-20 % per epoch).

    Logged (``<name>`` defaults to ``time``), once per epoch: ``<name>/epoch_s``, ``<name>/step_s`` (mean
    step time), ``<name>/val_s``. Records: ``{"step", "epoch", "train_s", "val_s", "steps", "step_mean_s",
    "step_median_s"}``; :meth:`summary` aggregates them.

    Args:
        synchronize_steps: synchronize CUDA around each step.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``.
    """

    default_name = "time"

    def __init__(self, *, synchronize_steps: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.synchronize_steps = synchronize_steps
        self._epoch_start: float | None = None
        self._val_start: float | None = None
        self._val_s = 0.0
        self._step_start: float | None = None
        self._steps: list[float] = []
        self._resumed = False
        self._partial: dict[str, Any] | None = None  # the in-progress epoch of a loaded checkpoint

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._epoch_start is not None:  # a checkpoint taken mid-epoch: keep the epoch's time so far
            val = self._val_s + (
                time.perf_counter() - self._val_start if self._val_start is not None else 0.0
            )
            state["partial"] = {
                "elapsed_s": time.perf_counter() - self._epoch_start,
                "val_s": val,
                "steps": list(self._steps),
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._partial = state_dict.get("partial")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming mid-epoch, Lightning does not call on_train_epoch_start again: run the clock on.
        partial, self._partial = self._partial, None
        if partial is not None:
            self._sync(pl_module)
            self._epoch_start = time.perf_counter() - float(partial["elapsed_s"])
            self._val_s, self._steps = float(partial["val_s"]), list(partial["steps"])
            self._resumed = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._epoch_start, self._val_s, self._steps = time.perf_counter(), 0.0, []
        self._resumed = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.synchronize_steps:
            self._sync(pl_module)
        self._step_start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_start is not None:
            if self.synchronize_steps:
                self._sync(pl_module)
            self._steps.append(time.perf_counter() - self._step_start)
            self._step_start = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None and not trainer.sanity_checking:
            self._sync(pl_module)
            self._val_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._sync(pl_module)
            self._val_s += time.perf_counter() - self._val_start
            self._val_start = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is None:
            return
        self._sync(pl_module)
        total = time.perf_counter() - self._epoch_start
        self._epoch_start = None
        steps = self._steps
        record = self._record(
            trainer,
            trainer.global_step,
            train_s=total - self._val_s,
            val_s=self._val_s,
            steps=len(steps),
            step_mean_s=statistics.fmean(steps) if steps else None,
            step_median_s=statistics.median(steps) if steps else None,
            resumed=self._resumed,
        )
        self._log(
            pl_module,
            {"epoch_s": record["train_s"], "step_s": record["step_mean_s"], "val_s": record["val_s"]},
            epoch=True,
        )
        super().on_train_epoch_end(trainer, pl_module)

    def summary(self, skip_first: bool = True) -> dict[str, float | int | None]:
        """Totals and means over the recorded epochs; ``skip_first`` leaves the first epoch (warm-up:
        allocator, kernel selection, data loader start) out of the means when there are more than one.

        Keys: ``epochs``, ``train_s`` (total), ``epoch_mean_s``, ``epoch_median_s``, ``step_mean_s``
        (weighted by steps), ``val_mean_s``.
        """
        records = self.history[1:] if skip_first and len(self.history) > 1 else self.history
        if not records:
            return {"epochs": 0, "train_s": 0.0, "epoch_mean_s": None, "epoch_median_s": None,
                    "step_mean_s": None, "val_mean_s": None}  # fmt: skip
        train = [r["train_s"] for r in records]
        steps = sum(r["steps"] for r in records)
        step_total = sum(r["step_mean_s"] * r["steps"] for r in records if r["step_mean_s"] is not None)
        return {
            "epochs": len(self.history),
            "train_s": sum(r["train_s"] for r in self.history),
            "epoch_mean_s": statistics.fmean(train),
            "epoch_median_s": statistics.median(train),
            "step_mean_s": step_total / steps if steps else None,
            "val_mean_s": statistics.fmean(r["val_s"] for r in records),
        }

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import epoch_time_chart

        return epoch_time_chart(
            [r["epoch"] for r in self.history],
            [r["train_s"] for r in self.history],
            [r["val_s"] for r in self.history],
        )
