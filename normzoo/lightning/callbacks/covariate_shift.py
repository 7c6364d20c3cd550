"""CovariateShiftMonitor: Santurkar et al. (2018)'s internal covariate shift, per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn

from ...diagnostics import internal_covariate_shift
from ._base import ProbingMonitor, finite_mean, has_weight, lr_per_parameter

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CovariateShiftMonitor"]


class CovariateShiftMonitor(ProbingMonitor):
    """Internal covariate shift as Santurkar et al. (2018, section 2.2, Definition 2.1) measure it.

    For layer ``i``, ``G`` is the gradient of the loss w.r.t. the layer's parameters on a batch, and
    ``G'`` the gradient of the same loss on the *same* batch after every earlier layer (every trainable
    parameter registered before layer ``i``'s, i.e. earlier in the forward order of a sequential model)
    has taken its update; the monitor reports ``‖G − G'‖₂`` and ``cos(G, G')``. The update is a plain SGD
    step ``p ← p − lr·∂L/∂p`` with each parameter's current learning rate and the gradient of that batch,
    as in the paper; momentum, weight decay and adaptive rates of the real optimizer are *not* replayed,
    and the batch is the sampled step's first micro-batch (under accumulation), not the accumulated one.
    One forward and backward at ``w`` and one more per monitored layer after the first (whose ``G' = G``).

    Each pass is a replay through :func:`torch.func.functional_call` (see
    :class:`~normzoo.lightning.callbacks._base.ProbingMonitor`): the module stays in training mode, so BN
    uses batch statistics as in training, but on copies of the buffers, and with the same dropout masks
    and noise on every pass; the model, its gradients, BN running statistics, the optimizer and the random
    state are left exactly as they were. Under DDP every rank replays its own batch and rank zero logs.

    Logged (``<name>`` defaults to ``ics``): ``<name>/l2_mean`` and ``<name>/cos_mean`` (over the layers
    after the first); with ``log_per_layer=True`` also ``<name>/l2/<layer>`` and ``<name>/cos/<layer>``.
    Records: ``{"step", "epoch", "layers": {layer: {"l2", "cos"}}}``.

    Args:
        every_n_steps: sample every N optimizer steps (default 500: one sample costs about one training
            step per monitored layer).
        layers: the layers (default: every layer with a weight matrix); a layer's parameters are all of
            its module's trainable parameters.
        loss_fn: ``loss_fn(module, batch) -> loss`` (default: ``module.loss`` or cross entropy of
            ``module(batch[0])`` against ``batch[1]``).
        **kwargs: ``log_per_layer``, ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``,
            ``figure_dpi``.
    """

    default_name = "ics"

    def __init__(self, *, every_n_steps: int = 500, **kwargs: Any) -> None:
        super().__init__(every_n_steps=every_n_steps, **kwargs)

    def allowed_layer(self, name: str, module: nn.Module) -> bool:
        return has_weight(name, module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batch = self.take_batch(trainer)
        if batch is None:
            return
        params = self.trainable_parameters(pl_module)
        groups = self.layer_parameter_names(pl_module)
        kept = [(name, g) for (name, _), g in zip(self.selected, groups, strict=True) if g]
        lrs = lr_per_parameter(trainer.optimizers, params)
        with self.replay(pl_module, batch) as loss_of:
            values = internal_covariate_shift(loss_of, params, [g for _, g in kept], lrs)
        if not trainer.is_global_zero:
            return
        layers = {name: {"l2": l2, "cos": cos} for (name, _), (l2, cos) in zip(kept, values, strict=True)}
        self._record(trainer, trainer.global_step, layers=layers)
        # A layer that owns the model's first trainable parameter has no earlier layer: its G' is G.
        order = list(params)
        later = [
            value
            for (_, group), value in zip(kept, layers.values(), strict=True)
            if min(order.index(name) for name in group) > 0
        ]
        metrics: dict[str, Any] = {f"{k}_mean": finite_mean(v[k] for v in later) for k in ("l2", "cos")}
        metrics.update(self._layer_metrics(layers, ("l2", "cos")))
        self._log(pl_module, metrics)

    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import ics_figure

        steps, l2 = self.series("l2")
        _, cos = self.series("cos")
        return ics_figure(steps, l2, cos)
