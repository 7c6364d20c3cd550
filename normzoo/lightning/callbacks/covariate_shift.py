"""CovariateShiftMonitor: Santurkar et al. (2018)'s internal covariate shift, per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from ...diagnostics import internal_covariate_shift
from ._base import DiagnosticCallback
from ._layers import LayerSelector, LayerSpec, finite_mean, has_weight, has_weight_matrix
from ._replay import BatchReplay, LossFn, Randomness, lr_per_parameter, trainable_parameters
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CovariateShiftMonitor"]


class CovariateShiftMonitor(DiagnosticCallback):
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
    :class:`~normzoo.lightning.callbacks._replay.BatchReplay`): the module stays in training mode, so BN
    uses batch statistics as in training, but on copies of the buffers; the model, its gradients, BN running
    statistics, the optimizer and the random state are left exactly as they were. Under DDP every rank
    replays its own batch and rank zero logs.

    Random layers: with ``randomness="same"`` (default) every pass draws the same dropout masks and noise,
    so ``G − G'`` is the shift the earlier layers' update causes and nothing else. With ``"fresh"`` each
    ``G'`` pass draws new ones, as the next training step would: the shift a random layer adds from step to
    step counts too. That is the covariate shift of Santurkar et al.'s noisy BatchNorm, whose noise is
    redrawn at every step; with the same noise on both passes it would be measured away. Deterministic
    models give the same numbers either way.

    Sampled steps: the first, every ``every_n_steps``-th (steps ``N-1, 2N-1, ...``) and the last one the
    trainer expects, whatever the number of optimizers; ``every_n_steps=None`` (default) samples only
    the first and the last step (``N`` is the run's length, from
    ``trainer.estimated_stepping_batches``; 500 when the length is unknown): one sample costs a few
    training steps.

    Logged (``<name>`` defaults to ``ics``): ``<name>/l2_mean`` and ``<name>/cos_mean`` (over the layers
    after the first); with ``log_per_layer=True`` also ``<name>/l2/<layer>`` and ``<name>/cos/<layer>``.
    Records: ``{"step", "epoch", "layers": {layer: {"l2", "cos"}}}``.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic, see above; one sample costs
            about one training step per monitored layer).
        layers: the layers (default: every layer with a weight matrix); a layer's parameters are all of
            its module's trainable parameters.
        loss_fn: ``loss_fn(module, batch) -> loss`` (default: ``module.loss`` or cross entropy of
            ``module(batch[0])`` against ``batch[1]``); needed when a batch is not ``(input, target, ...)``.
        randomness: ``"same"`` or ``"fresh"`` random numbers for the ``G'`` passes (see above).
        log_per_layer: also log every layer's values.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``,
            ``figure_dpi``.
    """

    default_name = "ics"
    schedule: SamplingSchedule
    selector: LayerSelector
    measures_on_every_rank = True

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        layers: LayerSpec = None,
        loss_fn: LossFn | None = None,
        randomness: Randomness = "same",
        log_per_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if randomness not in ("same", "fresh"):
            raise ValueError(f"{owner}: expected randomness 'same' or 'fresh', got {randomness!r}")
        self.randomness: Randomness = randomness
        self.schedule = SamplingSchedule(every_n_steps, samples=1, fallback=500, owner=owner)
        self.selector = LayerSelector(layers, default=has_weight_matrix, allowed=has_weight, owner=owner)
        self.replay = BatchReplay(loss_fn, owner=owner)
        self.log_per_layer = log_per_layer
        self.selected: list[tuple[str, nn.Module]] = []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.selected and self.schedule.arm(trainer.global_step):
            self.replay.keep(batch, trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batch = self.replay.take(trainer.global_step)
        if batch is None:
            return
        params = trainable_parameters(pl_module)
        ids = {id(p): n for n, p in params.items()}
        groups = [[ids[id(p)] for p in m.parameters() if id(p) in ids] for _, m in self.selected]
        kept = [(name, g) for (name, _), g in zip(self.selected, groups, strict=True) if g]
        lrs = lr_per_parameter(trainer.optimizers, params)
        with self.replay.loss_at(pl_module, batch, randomness=self.randomness) as loss_of:
            values = internal_covariate_shift(loss_of, params, [g for _, g in kept], lrs)
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
        if self.log_per_layer:
            metrics.update({f"{k}/{layer}": v[k] for layer, v in layers.items() for k in v})
        self._log(pl_module, metrics)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.selected = []

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import ics_figure

        steps, l2 = self.series("l2")
        _, cos = self.series("cos")
        return ics_figure(steps, l2, cos)
