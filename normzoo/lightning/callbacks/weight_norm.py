"""WeightNormMonitor: per-layer weight norms and the update/weight ratio of each optimizer step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from ...diagnostics import update_ratio
from ._base import DiagnosticCallback
from ._layers import LayerSelector, LayerSpec, has_weight, has_weight_matrix, layer_tensor
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["WeightNormMonitor"]


class WeightNormMonitor(DiagnosticCallback):
    """Per layer, the weight norm ``‖w‖`` and the size of one update relative to it, ``‖Δw‖ / ‖w‖``.

    BatchNorm makes a layer invariant to the scale of the weights before it, so the weight norms grow
    freely and the effective learning rate shrinks as they do; the update ratio is the cs231n rule of thumb
    (about ``1e-3``: far below, the learning rate is too small; far above, too large).

    On a sampled step the weights are copied in ``on_before_optimizer_step`` and compared with the updated
    ones right after the optimizer's ``step`` (an optimizer step hook), so the ratio is that of this one
    optimizer's update even with several optimizers; a step that AMP's GradScaler skips is not recorded.

    Sampled steps: the first, every ``every_n_steps``-th (steps ``N-1, 2N-1, ...``) and the last one the
    trainer expects; ``every_n_steps=None`` (default) picks ``N`` for about 10 samples a run from
    ``trainer.estimated_stepping_batches`` (a multiple of ``log_every_n_steps`` once it is that large).

    Logged (``<name>`` defaults to ``weight_norm``): ``<name>/total`` (``sqrt(Σ‖w‖²)`` over the layers),
    ``<name>/update_ratio_min`` and ``<name>/update_ratio_max``; with ``log_per_layer=True`` also
    ``<name>/norm/<layer>`` and ``<name>/update_ratio/<layer>``. Records in :attr:`history`:
    ``{"step", "epoch", "layers": {layer: {"norm", "update_ratio"}}}``.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic, see above).
        layers: the layers (default: every layer with a weight matrix: linear, conv); any module with a
            ``weight`` parameter can be selected.
        include_bias: measure ``(weight, bias)`` together instead of the weight alone.
        log_per_layer: also log every layer's values.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``
            (see :class:`~normzoo.lightning.callbacks.DiagnosticCallback`).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = WeightNormMonitor(every_n_steps=50, log_per_layer=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)  # doctest: +SKIP
    """

    default_name = "weight_norm"
    schedule: SamplingSchedule
    selector: LayerSelector

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        layers: LayerSpec = None,
        include_bias: bool = False,
        log_per_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.schedule = SamplingSchedule(every_n_steps, samples=10, fallback=50, owner=owner)
        self.selector = LayerSelector(layers, default=has_weight_matrix, allowed=has_weight, owner=owner)
        self.include_bias = include_bias
        self.log_per_layer = log_per_layer
        self.selected: list[tuple[str, nn.Module]] = []
        self._trainer: pl.Trainer | None = None
        self._before: list[Tensor] | None = None
        self._before_step = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # starts the schedule
        self._trainer = trainer
        if trainer.is_global_zero and self.selected:
            self._handles += [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]

    def _vectors(self) -> list[Tensor]:
        return [cast(Tensor, layer_tensor(m, self.include_bias)) for _, m in self.selected]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._before = None  # a copy left by a step that did not happen (skipped by AMP) is stale
        if self._handles and self.schedule.arm(trainer.global_step):
            self._before = [v.clone() for v in self._vectors()]
            self._before_step = trainer.global_step

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._before is None or self._trainer is None:
            return
        before, self._before = self._before, None
        trainer = self._trainer
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
        if self.log_per_layer:
            metrics.update({f"{k}/{layer}": v[k] for layer, v in layers.items() for k in v})
        self._log(trainer.lightning_module, metrics)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.selected, self._trainer, self._before = [], None, None

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import weight_norm_figure

        steps, norms = self.series("norm")
        _, ratios = self.series("update_ratio")
        return weight_norm_figure(steps, norms, ratios)
