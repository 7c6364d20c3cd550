"""Proof that Batch Renormalization acted in a study run: how far its ``r`` and ``d`` corrected.

The study builds its Batch Renormalization layers with :class:`normzoo.PaperSchedule` scaled to the number
of steps each run will take (:func:`normzoo.study.runner.renorm_schedule`); with the paper's absolute
schedule a run of a few thousand steps never leaves the 5,000-step warm-up and is BatchNorm bit for bit.

:class:`RenormActivity` records what the correction did: at sampled training steps, for every Batch
Renormalization layer, ``r`` and ``d`` are recomputed from the layer's input with the public pieces
(:func:`normzoo.functional.renorm_correction`, the layer's ``clip_bounds()`` and its running statistics
*before* the step's update, in a forward pre-hook) and summarized: the fraction of channels whose ``r`` or
``d`` sits at a clip bound, and the mean ``|r - 1|`` and ``|d|`` (zero while the layer is BatchNorm).

Example:
    >>> import torch, normzoo
    >>> layer = normzoo.BatchRenorm1d(3, schedule=normzoo.PaperSchedule(total_steps=100))
    >>> probe = RenormActivity(every_n_steps=1)
    >>> handle = layer.register_forward_pre_hook(probe._hook("bn"))
    >>> probe._pending = {}
    >>> _ = layer(torch.randn(8, 3))
    >>> probe._pending["bn"]["r_max"], probe._pending["bn"]["mean_abs_d"]   # step 0: still BatchNorm
    (1.0, 0.0)
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from normzoo import functional as NF
from normzoo.layers import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

_RENORM = (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)

__all__ = ["RenormActivity", "summarize_activity"]


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
            if isinstance(module, _RENORM):
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
        def hook(module: BatchRenorm1d, args: tuple[Any, ...]) -> None:
            if self._pending is None or not module.training or module.running_mean is None:
                return
            if name in self._pending:
                # The step's own forward came first; later ones are probes replaying the batch (the
                # covariate-shift and landscape monitors) with this step's update already applied.
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
    """Per layer, the means of :class:`RenormActivity`'s measures over the samples after the warm-up's last step.

    Example:
        >>> h = [{"step": s, "layers": {"norm1": {"r_at_bound": 0.5, "d_at_bound": 0.0,
        ...       "mean_abs_r_minus_1": 0.2, "mean_abs_d": 0.1, "r_max": 2.0, "d_max": 1.0}}} for s in (0, 10)]
        >>> summarize_activity(h, warmup_steps=5)["norm1"]["mean_abs_d"]
        0.1
    """
    after = [h for h in history if h["step"] > warmup_steps]
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
