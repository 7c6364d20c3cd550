"""ActivationMonitor: per-layer activation statistics, saturation and dead ReLU units."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from ...diagnostics import activation_kind, activation_stats
from ._base import DiagnosticCallback
from ._layers import LayerSelector, LayerSpec, finite_mean
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ActivationMonitor"]


def _is_activation(name: str, module: nn.Module) -> bool:
    return activation_kind(module) is not None


class ActivationMonitor(DiagnosticCallback):
    """Per layer, statistics of its output on the training batch of a sampled step.

    ``mean``, ``std``, the 15th/50th/85th percentiles (Ioffe & Szegedy 2015, Figure 1, follow them over
    training to see the input distribution of a sigmoid drift without BN), and by kind of activation:
    ``saturated``, the fraction of sigmoid outputs with ``|2y − 1| ≥ saturation`` or tanh outputs with
    ``|y| ≥ saturation`` (default 0.99), and ``dead``, the fraction of ReLU units that output zero for every
    sample of the batch (a unit is one element of the per-sample output). See
    :func:`normzoo.diagnostics.activation_stats`.

    Forward hooks are registered in ``on_train_batch_start`` of a sampled step (its first micro-batch
    under accumulation, on rank zero only) and removed in ``on_train_batch_end``, and in any case at the
    end of fit, on teardown and on an exception: between samples the model runs without hooks. Only
    modules are seen: an activation called as a function (``F.relu``) inside ``forward`` is not.

    Sampled steps: the first, every ``every_n_steps``-th (steps ``N-1, 2N-1, ...``) and the last one the
    trainer expects, whatever the number of optimizers; ``every_n_steps=None`` (default) picks ``N`` for
    about 10 samples a run from ``trainer.estimated_stepping_batches``.

    Logged (``<name>`` defaults to ``activations``): ``<name>/std_mean`` (mean over layers),
    ``<name>/dead_mean`` (over ReLU layers) and ``<name>/saturated_mean`` (over sigmoid/tanh layers); with
    ``log_per_layer=True`` also ``<name>/{mean,std,dead,saturated}/<layer>``. Records:
    ``{"step", "epoch", "layers": {layer: {"kind", "mean", "std", "p15", "p50", "p85", "saturated", "dead"}}}``.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic, see above).
        layers: the modules whose outputs are measured (default: every activation module).
        saturation: the saturation threshold on the ``[-1, 1]`` scale (default 0.99).
        log_per_layer: also log every layer's values.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``.
    """

    default_name = "activations"
    layer_noun = "module"
    schedule: SamplingSchedule
    selector: LayerSelector

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        layers: LayerSpec = None,
        saturation: float = 0.99,
        log_per_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not (isinstance(saturation, (int, float)) and 0.0 < saturation < 1.0):
            raise ValueError(f"{owner}: expected saturation in (0, 1), got {saturation!r}")
        self.schedule = SamplingSchedule(every_n_steps, samples=10, fallback=50, owner=owner)
        self.selector = LayerSelector(layers, default=_is_activation, owner=owner)
        self.saturation = float(saturation)
        self.log_per_layer = log_per_layer
        self.selected: list[tuple[str, nn.Module]] = []
        self._current: dict[str, dict[str, Any]] = {}
        self._step = -1

    def _hook(self, name: str, kind: str | None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self._current or not isinstance(output, Tensor) or output.dim() == 0:
                return
            with torch.no_grad():
                stats = activation_stats(output, kind, saturation=self.saturation)
            self._current[name] = {"kind": kind or "none", **stats}

        return hook

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not (self.selected and self.schedule.arm(trainer.global_step) and self.measures_here(trainer)):
            return
        self._current, self._step = {}, trainer.global_step
        for name, module in self.selected:
            self._handles.append(module.register_forward_hook(self._hook(name, activation_kind(module))))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        layers = {name: self._current[name] for name, _ in self.selected if name in self._current}
        self._current = {}
        if not layers:
            return
        self._record(trainer, self._step, layers=layers)
        metrics: dict[str, Any] = {
            f"{k}_mean": finite_mean(v[k] for v in layers.values()) for k in ("std", "dead", "saturated")
        }
        if self.log_per_layer:
            keys = ("mean", "std", "dead", "saturated")
            metrics.update({f"{k}/{layer}": v[k] for layer, v in layers.items() for k in keys if k in v})
        self._log(pl_module, metrics)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.selected, self._current = [], {}

    def _why_nothing(self) -> str:
        return super()._why_nothing() or ": no monitored module returned a tensor on a sampled step"

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import activation_figure

        steps: list[int] = []
        stats: dict[str, dict[str, list[float]]] = {}
        for key in ("p15", "p50", "p85", "std", "dead", "saturated"):
            steps, series = self.series(key)
            for layer, values in series.items():
                stats.setdefault(layer, {})[key] = values
        return activation_figure(steps, stats)
