"""WeightNormMonitor: per-layer weight norms and the update/weight ratio of each optimizer step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ...diagnostics import update_ratio
from ._base import LayerMonitor, has_weight, layer_tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["WeightNormMonitor"]


class WeightNormMonitor(LayerMonitor):
    """Per layer, the weight norm ``‖w‖`` and the size of one update relative to it, ``‖Δw‖ / ‖w‖``.

    BatchNorm makes a layer invariant to the scale of the weights before it, so the weight norms grow
    freely and the effective learning rate shrinks as they do; the update ratio is the cs231n rule of thumb
    (about ``1e-3``: far below, the learning rate is too small; far above, too large).

    On a sampled step the weights are copied in ``on_before_optimizer_step`` and compared with the updated
    ones in ``on_train_batch_end`` (the ratio is 0 when an AMP step is skipped).

    Logged (``<name>`` defaults to ``weight_norm``): ``<name>/total`` (``sqrt(Σ‖w‖²)`` over the layers),
    ``<name>/update_ratio_min`` and ``<name>/update_ratio_max``; with ``log_per_layer=True`` also
    ``<name>/norm/<layer>`` and ``<name>/update_ratio/<layer>``. Records in :attr:`history`:
    ``{"step", "epoch", "layers": {layer: {"norm", "update_ratio"}}}``.

    Args:
        every_n_steps: sample every N optimizer steps (default 50).
        layers: the layers (default: every layer with a weight matrix: linear, conv); any module with a
            ``weight`` parameter can be selected.
        include_bias: measure ``(weight, bias)`` together instead of the weight alone.
        **kwargs: ``log_per_layer``, ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``,
            ``figure_dpi`` (see :class:`~normzoo.lightning.callbacks._base.DiagnosticCallback`).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = WeightNormMonitor(every_n_steps=50, log_per_layer=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)  # doctest: +SKIP
    """

    default_name = "weight_norm"

    def __init__(self, *, every_n_steps: int = 50, include_bias: bool = False, **kwargs: Any) -> None:
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        self.include_bias = include_bias
        self._before: list[Tensor] | None = None
        self._before_step = -1

    def allowed_layer(self, name: str, module: nn.Module) -> bool:
        return has_weight(name, module)

    def _vectors(self) -> list[Tensor]:
        return [cast(Tensor, layer_tensor(m, self.include_bias)) for _, m in self.selected]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and self.selected and self._before is None and self.is_sample_step(step):
            self._before = [v.clone() for v in self._vectors()]
            self._before_step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before is None:
            return
        before, self._before = self._before, None
        norms, ratios = update_ratio(before, self._vectors())
        layers = {
            name: {"norm": n, "update_ratio": r}
            for (name, _), n, r in zip(self.selected, norms, ratios, strict=True)
        }
        self._record(trainer, self._before_step, layers=layers)
        finite = [r for r in ratios if math.isfinite(r)]
        metrics: dict[str, Any] = {
            "total": math.sqrt(sum(n * n for n in norms)),
            "update_ratio_min": min(finite, default=None),
            "update_ratio_max": max(finite, default=None),
        }
        metrics.update(self._layer_metrics(layers, ("norm", "update_ratio")))
        self._log(pl_module, metrics)

    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import weight_norm_figure

        steps, norms = self.series("norm")
        _, ratios = self.series("update_ratio")
        return weight_norm_figure(steps, norms, ratios)
