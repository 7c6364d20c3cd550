"""GradientFlowMonitor: per-layer mean and max |gradient|, vanishing/exploding warnings, the bar chart."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ...diagnostics import abs_stats
from ._base import LayerMonitor, has_weight, layer_tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["GradientFlowMonitor"]


class GradientFlowMonitor(LayerMonitor):
    """Per layer, the mean and the max of ``|∂L/∂w|`` of the gradient the optimizer is about to use.

    Read in ``on_before_optimizer_step``, where Lightning has accumulated the gradients of every
    micro-batch and, under AMP, unscaled them (and DDP has averaged them across ranks), so the values are
    those of the actual update. Without normalization the first layers' gradients of deep sigmoid or badly
    initialized networks shrink towards zero ("vanishing"); BatchNorm keeps them alive.

    A layer whose mean ``|grad|`` falls below ``vanishing_threshold`` or whose max ``|grad|`` exceeds
    ``exploding_threshold`` (or is not finite) is listed in the record and warned about once per layer.

    Logged (``<name>`` defaults to ``gradient_flow``): ``<name>/mean_abs_first`` and
    ``<name>/mean_abs_last`` (first and last monitored layer), ``<name>/mean_abs_min``, ``<name>/max_abs``
    (over layers), ``<name>/vanishing`` and ``<name>/exploding`` (counts of layers); with
    ``log_per_layer=True`` also ``<name>/mean_abs/<layer>`` and ``<name>/max_abs/<layer>``. Records:
    ``{"step", "epoch", "layers": {layer: {"mean_abs", "max_abs"}}, "vanishing": [...], "exploding": [...]}``.

    Args:
        every_n_steps: sample every N optimizer steps (default 50).
        layers: the layers (default: every layer with a weight matrix); any module with a ``weight``.
        include_bias: take ``(weight, bias)`` gradients together instead of the weight's alone.
        vanishing_threshold: mean ``|grad|`` below it flags a vanishing layer (default ``1e-7``).
        exploding_threshold: max ``|grad|`` above it flags an exploding layer (default ``1e3``).
        warn: warn (once per layer and kind) about vanishing or exploding layers.
        **kwargs: ``log_per_layer``, ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``,
            ``figure_dpi``.
    """

    default_name = "gradient_flow"

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        include_bias: bool = False,
        vanishing_threshold: float = 1e-7,
        exploding_threshold: float = 1e3,
        warn: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        self.include_bias = include_bias
        self.vanishing_threshold = vanishing_threshold
        self.exploding_threshold = exploding_threshold
        self.warn = warn
        self._warned: set[str] = set()

    def allowed_layer(self, name: str, module: nn.Module) -> bool:
        return has_weight(name, module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warned": sorted(self._warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._warned = set(state_dict.get("warned", []))

    def _grads(self) -> tuple[list[str], list[Tensor]]:
        pairs = [(name, layer_tensor(m, self.include_bias, grad=True)) for name, m in self.selected]
        return [n for n, g in pairs if g is not None], [g for _, g in pairs if g is not None]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not (trainer.is_global_zero and self.selected and self._arm(trainer)):
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
        self._record(trainer, trainer.global_step, layers=layers, vanishing=vanishing, exploding=exploding)
        self._warn(trainer.global_step, vanishing, exploding, layers)
        metrics: dict[str, Any] = {
            "mean_abs_first": means[0],
            "mean_abs_last": means[-1],
            "mean_abs_min": min(means),
            "max_abs": max(maxes),
            "vanishing": len(vanishing),
            "exploding": len(exploding),
        }
        metrics.update(self._layer_metrics(layers, ("mean_abs", "max_abs")))
        self._log(pl_module, metrics)

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
