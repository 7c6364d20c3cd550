"""GradientFlowMonitor: per-layer mean and max |gradient|, vanishing/exploding warnings, the bar chart."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ...diagnostics import abs_stats
from ._args import finite_number
from ._base import DiagnosticCallback
from ._layers import LayerSelector, LayerSpec, has_weight, has_weight_matrix, layer_tensor
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["GradientFlowMonitor"]


class GradientFlowMonitor(DiagnosticCallback):
    """Per layer, the mean and the max of ``|∂L/∂w|`` of the gradient the optimizer steps with.

    Read right before the optimizer's update (an optimizer step hook, inside ``optimizer.step``): after
    Lightning has accumulated the gradients of every micro-batch, unscaled them under AMP, clipped them
    (``gradient_clip_val``) and DDP has averaged them across ranks, so the values are those of the actual
    update. A step that AMP's GradScaler skips (its gradients are not finite) is not recorded. Without
    normalization the first layers' gradients of deep sigmoid or badly initialized networks shrink towards
    zero ("vanishing"); BatchNorm keeps them alive.

    A layer whose mean ``|grad|`` falls below ``vanishing_threshold`` or whose max ``|grad|`` exceeds
    ``exploding_threshold`` (or is not finite) is listed in the record and warned about once per layer.

    Sampled steps: the first, every ``every_n_steps``-th (steps ``N-1, 2N-1, ...``) and the last one the
    trainer expects; ``every_n_steps=None`` (default) picks ``N`` for about 10 samples a run from
    ``trainer.estimated_stepping_batches`` (a multiple of ``log_every_n_steps`` once it is that large).

    Logged (``<name>`` defaults to ``gradient_flow``): ``<name>/mean_abs_first`` and
    ``<name>/mean_abs_last`` (first and last monitored layer), ``<name>/mean_abs_min``, ``<name>/max_abs``
    (over layers), ``<name>/vanishing`` and ``<name>/exploding`` (counts of layers); with
    ``log_per_layer=True`` also ``<name>/mean_abs/<layer>`` and ``<name>/max_abs/<layer>``. Records:
    ``{"step", "epoch", "layers": {layer: {"mean_abs", "max_abs"}}, "vanishing": [...], "exploding": [...]}``.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic, see above).
        layers: the layers (default: every layer with a weight matrix); any module with a ``weight``.
        include_bias: take ``(weight, bias)`` gradients together instead of the weight's alone.
        vanishing_threshold: mean ``|grad|`` below it flags a vanishing layer (default ``1e-7``).
        exploding_threshold: max ``|grad|`` above it flags an exploding layer (default ``1e3``).
        warn: warn (once per layer and kind) about vanishing or exploding layers.
        log_per_layer: also log every layer's values.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``.
    """

    default_name = "gradient_flow"
    schedule: SamplingSchedule
    selector: LayerSelector

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        layers: LayerSpec = None,
        include_bias: bool = False,
        vanishing_threshold: float = 1e-7,
        exploding_threshold: float = 1e3,
        warn: bool = True,
        log_per_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.schedule = SamplingSchedule(every_n_steps, samples=10, fallback=50, owner=owner)
        self.selector = LayerSelector(layers, default=has_weight_matrix, allowed=has_weight, owner=owner)
        self.include_bias = include_bias
        self.vanishing_threshold = finite_number(owner, "vanishing_threshold", vanishing_threshold, low=0.0)
        self.exploding_threshold = finite_number(owner, "exploding_threshold", exploding_threshold, low=0.0)
        self.warn = warn
        self.log_per_layer = log_per_layer
        self.selected: list[tuple[str, nn.Module]] = []
        self._trainer: pl.Trainer | None = None
        self._armed_step: int | None = None
        self._warned: set[str] = set()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warned": sorted(self._warned)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._warned = set(state_dict.get("warned", []))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # starts the schedule
        self._trainer = trainer
        if trainer.is_global_zero and self.selected:
            # Lightning clips after on_before_optimizer_step, inside optimizer.step; a step pre-hook runs
            # before the closure (backward, clipping). A post-hook sees `.grad` as the update used it.
            self._handles += [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Arm here, read after the update: clipping runs after this hook, inside the same step.
        armed = bool(self._handles) and self.schedule.arm(trainer.global_step)
        self._armed_step = trainer.global_step if armed else None

    def _grads(self) -> tuple[list[str], list[Tensor]]:
        pairs = [(name, layer_tensor(m, self.include_bias, grad=True)) for name, m in self.selected]
        return [n for n, g in pairs if g is not None], [g for _, g in pairs if g is not None]

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step, self._armed_step = self._armed_step, None
        trainer = self._trainer
        if step is None or trainer is None:
            return
        names, grads = self._grads()
        if not names:
            return
        means, maxes = abs_stats(grads)
        layers = {n: {"mean_abs": a, "max_abs": b} for n, a, b in zip(names, means, maxes, strict=True)}
        vanishing = [n for n, a in zip(names, means, strict=True) if a < self.vanishing_threshold]
        exploding = [
            n
            for n, b in zip(names, maxes, strict=True)
            if not math.isfinite(b) or b > self.exploding_threshold
        ]
        self._record(trainer, step, layers=layers, vanishing=vanishing, exploding=exploding)
        self._warn(step, vanishing, exploding, layers)
        metrics: dict[str, Any] = {
            "mean_abs_first": means[0],
            "mean_abs_last": means[-1],
            "mean_abs_min": min(means),
            "max_abs": max(maxes),
            "vanishing": len(vanishing),
            "exploding": len(exploding),
        }
        if self.log_per_layer:
            metrics.update({f"{k}/{layer}": v[k] for layer, v in layers.items() for k in v})
        self._log(trainer.lightning_module, metrics)

    def _warn(
        self, step: int, vanishing: list[str], exploding: list[str], layers: dict[str, dict[str, float]]
    ) -> None:
        if not self.warn:
            return
        for kind, names, key, limit in (
            ("vanishing", vanishing, "mean_abs", f"< {self.vanishing_threshold:g}"),
            ("exploding", exploding, "max_abs", f"> {self.exploding_threshold:g}"),
        ):
            for n in names:
                if f"{kind}:{n}" in self._warned:
                    continue
                self._warned.add(f"{kind}:{n}")
                rank_zero_warn(
                    f"{type(self).__name__}: {kind} gradient in layer {n!r} at step {step}: "
                    f"{key} |grad| = {layers[n][key]:.3g} {limit} (warned once per layer)."
                )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.selected, self._trainer, self._armed_step = [], None, None

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import gradient_flow_figure

        last = self.history[-1]["layers"]
        steps, series = self.series("mean_abs")
        return gradient_flow_figure(
            list(last),
            [v["mean_abs"] for v in last.values()],
            [v["max_abs"] for v in last.values()],
            steps,
            series,
        )
