"""TrainEvalDriftMonitor: how far BatchNorm's running statistics are from its batches, and what it costs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ...diagnostics import train_eval_drift
from ...layers import is_batch_norm
from ._args import finite_number, non_negative_int
from ._base import DiagnosticCallback
from ._layers import short_names
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["TrainEvalDriftMonitor"]


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _settling_steps(module: nn.Module) -> int:
    """Steps after which the initial running statistics weigh less than 1 % in every BN layer's average."""
    steps = [0]
    for m in module.modules():
        if not (is_batch_norm(m) and isinstance(getattr(m, "running_mean", None), Tensor)):
            continue
        momentum: float | None = getattr(m, "momentum", None)
        if momentum is None:  # a cumulative average: the initial values weigh 1/n
            steps.append(100)
        elif 0.0 < momentum < 1.0:
            steps.append(math.ceil(math.log(0.01) / math.log1p(-momentum)))
    return max(steps)


class TrainEvalDriftMonitor(DiagnosticCallback):
    """BatchNorm behaves differently in training and in inference; this monitor measures by how much.

    On one batch held for the whole run, at sampled steps: per BatchNorm layer, the distance between the
    batch statistics and the running statistics (per channel, the 2-Wasserstein distance between the two
    Gaussians in units of the running standard deviation; its mean and max over channels), and the gap
    between the model's training-mode and eval-mode outputs (``‖f_train − f_eval‖ / ‖f_eval‖``, and for
    classifiers the fraction of samples whose predicted class differs). See
    :func:`normzoo.diagnostics.train_eval_drift`: only the BatchNorm layers switch mode (dropout stays off),
    and nothing of the model, its running statistics or the random state changes.

    When the output gap exceeds ``gap_threshold`` after ``warmup_steps`` the monitor warns once, with the
    usual remedies:
    recompute precise statistics (:class:`~normzoo.lightning.callbacks.PreciseBN`,
    :func:`normzoo.recompute_bn_stats`), Batch Renormalization (``normzoo.replace_bn(model, "renorm")``),
    or a larger batch.

    The held batch is ``batch`` when given (a tensor, or a tuple of the model's positional arguments), else
    the input of the first training batch of the fit (``batch[0]`` of an ``(input, target, ...)`` batch,
    or a tensor batch itself); it is measured after that step's update. Sampled steps: the first, every
    ``every_n_steps``-th and the last; ``every_n_steps=None`` (default) picks about 10 samples a run. Under
    DDP every rank measures its own held batch (a synchronized BatchNorm's collectives need all of them)
    and rank zero records.

    Logged (``<name>`` defaults to ``drift``): ``<name>/distance_mean`` (mean over layers and channels),
    ``<name>/distance_max``, ``<name>/output_gap``, ``<name>/disagreement``; with ``log_per_layer=True``
    also ``<name>/distance/<layer>``. Records: ``{"step", "epoch", "layers": {layer: {"mean", "max"}},
    "output_gap", "disagreement"}``.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic).
        batch: the held batch (default: the first training batch's input).
        gap_threshold: the output gap above which the monitor warns (default 0.1: outputs off by 10 %).
        warmup_steps: no warning before this step; ``None`` (default): once the running averages have
            forgotten their initial values (``(1 − momentum)^steps < 1 %`` for the BN layer with the smallest
            momentum, 100 steps for a cumulative average), since until then a gap says nothing.
        warn: whether to warn.
        log_per_layer: also log every layer's mean distance.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``.

    Example:
        >>> monitor = TrainEvalDriftMonitor(gap_threshold=0.05)
        >>> monitor.name
        'drift'
    """

    default_name = "drift"
    schedule: SamplingSchedule
    measures_on_every_rank = True

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        batch: Tensor | tuple[Any, ...] | None = None,
        gap_threshold: float = 0.1,
        warmup_steps: int | None = None,
        warn: bool = True,
        log_per_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if batch is not None and not isinstance(batch, (Tensor, tuple)):
            raise TypeError(
                f"{owner}: expected batch to be a tensor or a tuple of the model's positional arguments, "
                f"got {type(batch).__name__}"
            )
        self.schedule = SamplingSchedule(every_n_steps, samples=10, fallback=50, owner=owner)
        self.batch = batch
        self.gap_threshold = finite_number(owner, "gap_threshold", gap_threshold, low=0.0)
        self.warmup_steps = (
            None if warmup_steps is None else non_negative_int(owner, "warmup_steps", warmup_steps)
        )
        self._warn_from = 0
        self.warn = warn
        self.log_per_layer = log_per_layer
        self._held: Tensor | tuple[Any, ...] | None = None
        self._step: int | None = None
        self._warned = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warned": self._warned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._warned = bool(state_dict.get("warned", False))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # starts the schedule
        self._held = None if self.batch is None else _move(self.batch, pl_module.device)
        self._warn_from = self.warmup_steps if self.warmup_steps is not None else _settling_steps(pl_module)

    def _hold(self, batch: Any) -> Tensor | tuple[Any, ...]:
        if isinstance(batch, Tensor):
            return batch.detach().clone()
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return batch[0].detach().clone()
        shape = f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(
            f"{type(self).__name__}: expected a training batch that is a tensor or (input, target, ...), got "
            f"{shape}; pass batch= the input to hold (a tensor or a tuple of the model's positional arguments)"
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._held is None:
            self._held = self._hold(batch)
        self._step = trainer.global_step if self.schedule.arm(trainer.global_step) else None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, self._step = self._step, None
        if step is None or self._held is None:
            return
        drift = train_eval_drift(pl_module, self._held)
        summary = drift.summary()
        layers = dict(zip(short_names(list(summary)), summary.values(), strict=True))
        record = self._record(
            trainer, step, layers=layers, output_gap=drift.output_gap, disagreement=drift.disagreement
        )
        means = [v["mean"] for v in layers.values()]
        metrics: dict[str, Any] = {
            "distance_mean": sum(means) / len(means) if means else None,
            "distance_max": max((v["max"] for v in layers.values()), default=None),
            "output_gap": drift.output_gap,
            "disagreement": drift.disagreement,
        }
        if self.log_per_layer:
            metrics.update({f"distance/{layer}": v["mean"] for layer, v in layers.items()})
        self._log(pl_module, metrics)
        if (
            self.warn
            and not self._warned
            and step >= self._warn_from
            and drift.output_gap > self.gap_threshold
        ):
            self._warned = True
            worst = max(layers, key=lambda k: layers[k]["mean"], default=None)
            rank_zero_warn(
                f"{type(self).__name__}: at step {record['step']} the model's training-mode and eval-mode "
                f"outputs differ by {drift.output_gap:.1%} (> {self.gap_threshold:.1%})"
                + (f", most in layer {worst!r}" if worst is not None else "")
                + ": evaluation will not behave like training. Recompute precise statistics (PreciseBN, "
                "normzoo.recompute_bn_stats), use Batch Renormalization (normzoo.replace_bn(model, 'renorm')), "
                "or train with larger batches. (Warned once.)"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._held, self._step = None, None

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import drift_figure

        steps, distance = self.series("mean")
        return drift_figure(
            steps, distance, [float(r["output_gap"]) for r in self.history], gap_threshold=self.gap_threshold
        )
