"""ActivationMonitor: per-layer activation statistics, saturation and dead ReLU units."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ...diagnostics import activation_kind, activation_stats
from ._base import LayerMonitor, finite_mean

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ActivationMonitor"]


class ActivationMonitor(LayerMonitor):
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

    Logged (``<name>`` defaults to ``activations``): ``<name>/std_mean`` (mean over layers),
    ``<name>/dead_mean`` (over ReLU layers) and ``<name>/saturated_mean`` (over sigmoid/tanh layers); with
    ``log_per_layer=True`` also ``<name>/{mean,std,dead,saturated}/<layer>``. Records:
    ``{"step", "epoch", "layers": {layer: {"kind", "mean", "std", "p15", "p50", "p85", "saturated", "dead"}}}``.

    Args:
        every_n_steps: sample every N optimizer steps (default 50).
        layers: the modules whose outputs are measured (default: every activation module).
        saturation: the saturation threshold on the ``[-1, 1]`` scale (default 0.99).
        **kwargs: ``log_per_layer``, ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``,
            ``figure_dpi``.
    """

    default_name = "activations"

    def __init__(self, *, every_n_steps: int = 50, saturation: float = 0.99, **kwargs: Any) -> None:
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        if not 0.0 < saturation < 1.0:
            raise ValueError(f"ActivationMonitor: saturation must be in (0, 1), got {saturation}")
        self.saturation = saturation
        self._current: dict[str, dict[str, Any]] = {}
        self._step = -1

    def default_layer(self, name: str, module: nn.Module) -> bool:
        return activation_kind(module) is not None

    def _hook(self, name: str, kind: str | None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self._current or not isinstance(output, Tensor) or output.dim() == 0:
                return
            with torch.no_grad():
                stats = activation_stats(output, kind, saturation=self.saturation)
            self._current[name] = {"kind": kind or "none", **stats}

        return hook

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not (trainer.is_global_zero and self.selected and self._arm(trainer)):
            return
        self._current, self._step = {}, trainer.global_step
        for name, module in self.selected:
            self._handles.append(module.register_forward_hook(self._hook(name, activation_kind(module))))

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
        metrics.update(self._layer_metrics(layers, ("mean", "std", "dead", "saturated")))
        self._log(pl_module, metrics)

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
