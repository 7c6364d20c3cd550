"""Batch Renormalization in a study-length run: the paper's schedule scaled to the run, and proof that it acted.

Ioffe (2017) trains with plain BatchNorm for 5,000 steps, then relaxes ``r_max`` linearly to 3 (reached at
40,000 steps) and ``d_max`` to 5 (reached at 25,000). A study run takes a few thousand steps, so with those
numbers Batch Renormalization never leaves its warm-up and is BatchNorm bit for bit. :class:`ScaledPaperSchedule`
keeps the paper's anchors in ratio (5 : 25 : 40) and puts the 40k-step point at half of the run, so that the
second half trains at the full bounds.

:class:`RenormActivity` records what the correction did: at sampled training steps, for every Batch
Renormalization layer, ``r`` and ``d`` are recomputed from the layer's input with the public pieces
(:func:`normzoo.functional.renorm_correction`, the layer's ``clip_bounds()`` and its running statistics
*before* the step's update, in a forward pre-hook) and summarized: the fraction of channels whose ``r`` or
``d`` sits at a clip bound, and the mean ``|r - 1|`` and ``|d|`` (zero while the layer is BatchNorm).

Example:
    >>> schedule = ScaledPaperSchedule(total_steps=8_000)
    >>> schedule.warmup_steps, schedule.d_max_steps, schedule.r_max_steps
    (500, 2500, 4000)
    >>> [tuple(round(float(v), 2) for v in schedule(step)) for step in (0, 500, 2_500, 4_000, 8_000)]
    [(1.0, 0.0), (1.0, 0.0), (2.14, 5.0), (3.0, 5.0), (3.0, 5.0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from normzoo import functional as NF
from normzoo.layers.renorm import _BatchRenorm

__all__ = ["PAPER_ANCHORS", "RenormActivity", "ScaledPaperSchedule", "summarize_activity"]

#: The paper's schedule in steps: warm-up ends, d_max reached, r_max reached (Ioffe 2017, section 5).
PAPER_ANCHORS = (NF.PAPER_WARMUP_STEPS, NF.PAPER_D_MAX_STEPS, NF.PAPER_R_MAX_STEPS)


@dataclass(frozen=True)
class ScaledPaperSchedule:
    """The paper's schedule with its 40k-step point at half of a run of ``total_steps`` optimizer steps.

    A callable ``step -> (r_max, d_max)`` for ``BatchRenorm*d(schedule=...)``; picklable, so a model built
    with it can be sent to a worker process.
    """

    total_steps: int
    r_max: float = 3.0
    d_max: float = 5.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"ScaledPaperSchedule: expected total_steps >= 1, got {self.total_steps}")

    @property
    def _scale(self) -> float:
        return self.total_steps / 2 / PAPER_ANCHORS[2]

    @property
    def warmup_steps(self) -> int:
        return round(PAPER_ANCHORS[0] * self._scale)

    @property
    def d_max_steps(self) -> int:
        return round(PAPER_ANCHORS[1] * self._scale)

    @property
    def r_max_steps(self) -> int:
        return round(PAPER_ANCHORS[2] * self._scale)

    def __call__(self, step: int | Tensor) -> tuple[Any, Any]:
        return NF.paper_renorm_schedule(
            step, self.r_max, self.d_max, self.warmup_steps, self.r_max_steps, self.d_max_steps
        )

    def as_dict(self) -> dict[str, Any]:
        """The schedule as ``results.json`` records it."""
        return {
            "kind": "paper, scaled to the run (anchors 5k : 25k : 40k kept in ratio, 40k at half the run)",
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "d_max_steps": self.d_max_steps,
            "r_max_steps": self.r_max_steps,
            "r_max": self.r_max,
            "d_max": self.d_max,
        }


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.detach(), dim=dims, unbiased=False)
    return mean, var


class RenormActivity(L.Callback):
    """Record, every ``every_n_steps`` training steps, how far each Batch Renormalization layer corrected.

    ``history`` holds one entry per sample: ``{"step", "layers": {name: {"r_max", "d_max", "r_at_bound",
    "d_at_bound", "mean_abs_r_minus_1", "mean_abs_d"}}}``. A bound counts as reached within a relative
    tolerance of 1e-6; during the warm-up (``r_max = 1``, ``d_max = 0``) every channel is at its bounds.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"RenormActivity: expected every_n_steps >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._pending: dict[str, dict[str, float]] | None = None

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        model = getattr(
            pl_module, "model", pl_module
        )  # names as the network has them: norm1, not model.norm1
        for name, module in model.named_modules():
            if isinstance(module, _BatchRenorm):
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        self._pending = {} if step % self.every_n_steps == 0 else None
        self._step = step

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending:
            self.history.append({"step": self._step, "layers": self._pending})
        self._pending = None

    def _hook(self, name: str) -> Any:
        def hook(module: _BatchRenorm, args: tuple[Any, ...]) -> None:
            if self._pending is None or not module.training or module.running_mean is None:
                return
            assert module.running_var is not None
            mean, var = _batch_moments(args[0])
            r_max, d_max = (float(b) for b in module.clip_bounds())
            r, d = NF.renorm_correction(
                mean, var, module.running_mean, module.running_var, r_max, d_max, module.eps
            )
            tol = 1e-6
            r_at = (r >= r_max * (1 - tol)) | (r <= (1 / r_max) * (1 + tol))
            d_at = d.abs() >= d_max * (1 - tol)
            self._pending[name] = {
                "r_max": r_max,
                "d_max": d_max,
                "r_at_bound": float(r_at.float().mean()),
                "d_at_bound": float(d_at.float().mean()),
                "mean_abs_r_minus_1": float((r - 1).abs().mean()),
                "mean_abs_d": float(d.abs().mean()),
            }

        return hook


def summarize_activity(history: list[dict[str, Any]], warmup_steps: int) -> dict[str, dict[str, float]]:
    """Per layer, the means over the samples taken after the warm-up of :class:`RenormActivity`'s measures.

    Example:
        >>> h = [{"step": s, "layers": {"norm1": {"r_at_bound": 0.5, "d_at_bound": 0.0,
        ...       "mean_abs_r_minus_1": 0.2, "mean_abs_d": 0.1, "r_max": 2.0, "d_max": 1.0}}} for s in (0, 10)]
        >>> summarize_activity(h, warmup_steps=5)["norm1"]["mean_abs_d"]
        0.1
    """
    after = [h for h in history if h["step"] >= warmup_steps]
    out: dict[str, dict[str, float]] = {}
    for entry in after:
        for layer, values in entry["layers"].items():
            acc = out.setdefault(layer, {"samples": 0.0})
            acc["samples"] += 1
            for key in ("r_at_bound", "d_at_bound", "mean_abs_r_minus_1", "mean_abs_d"):
                acc[key] = acc.get(key, 0.0) + float(values[key])
    for acc in out.values():
        n = acc.pop("samples")
        for key in acc:
            acc[key] = acc[key] / n if n else math.nan
        acc["samples"] = n
    return out
