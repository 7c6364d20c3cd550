"""LossLandscapeMonitor: Santurkar et al. (2018)'s loss and gradient variation along the gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ...diagnostics import loss_landscape
from ._args import positive_floats
from ._base import DiagnosticCallback
from ._replay import BatchReplay, LossFn, trainable_parameters
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LossLandscapeMonitor"]


class LossLandscapeMonitor(DiagnosticCallback):
    """The smoothness of the loss along the gradient, as Santurkar et al. (2018, section 3.1, Figure 4).

    At the weights ``w`` of a sampled step, with ``g = ∇L(w)`` on that step's batch, for each step size
    ``η``: the loss ``L(w − ηg)`` ("loss landscape": its range over ``η``), the gradient change
    ``‖∇L(w − ηg) − ∇L(w)‖`` ("gradient predictiveness": its range), and the effective β-smoothness
    ``max_η ‖∇L(w − ηg) − ∇L(w)‖ / ‖ηg‖``. See :func:`normzoo.diagnostics.loss_landscape`. One forward and
    backward per step size plus one at ``w``, all on the same batch (the sampled step's first micro-batch)
    with the same dropout masks and noise, replayed through :func:`torch.func.functional_call` in training
    mode on copies of the parameters and buffers: the model, its gradients, BN running statistics, the
    optimizer and the random state are left exactly as they were. ``g`` covers every trainable parameter.

    Step sizes: with ``relative=True`` (default) ``step_sizes`` are multiples of the first param group's
    current learning rate, ``(0.5, 1, 2)`` by default, so the probe looks from half the optimizer's actual
    step to twice it, whatever the learning rate; with ``relative=False`` they
    are absolute.

    Sampled steps: the first, every ``every_n_steps``-th (steps ``N-1, 2N-1, ...``) and the last one the
    trainer expects, whatever the number of optimizers; ``every_n_steps=None`` (default) samples only
    the first and the last step (``N`` is the run's length, from
    ``trainer.estimated_stepping_batches``; 500 when the length is unknown): one sample costs a few
    training steps.

    Logged (``<name>`` defaults to ``landscape``): ``<name>/loss_range``, ``<name>/grad_range``,
    ``<name>/beta``. Records: ``{"step", "epoch", "loss", "grad_norm", "step_sizes", "losses",
    "grad_diffs", "loss_range", "grad_range", "beta"}``.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic, see above; one sample costs
            about one training step per step size, plus one).
        step_sizes: the step sizes (multiples of the learning rate when ``relative``).
        relative: whether ``step_sizes`` are relative to the current learning rate.
        loss_fn: ``loss_fn(module, batch) -> loss`` (default: ``module.loss`` or cross entropy of
            ``module(batch[0])`` against ``batch[1]``); needed when a batch is not ``(input, target, ...)``.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``.
    """

    default_name = "landscape"
    schedule: SamplingSchedule
    measures_on_every_rank = True

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        step_sizes: Sequence[float] = (0.5, 1.0, 2.0),
        relative: bool = True,
        loss_fn: LossFn | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.schedule = SamplingSchedule(every_n_steps, samples=1, fallback=500, owner=owner)
        self.replay = BatchReplay(loss_fn, owner=owner)
        self.step_sizes = positive_floats(owner, "step_sizes", step_sizes)
        self.relative = relative

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule.arm(trainer.global_step):
            self.replay.keep(batch, trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batch = self.replay.take(trainer.global_step)
        if batch is None:
            return
        scale = float(optimizer.param_groups[0]["lr"]) if self.relative else 1.0
        etas = [s * scale for s in self.step_sizes]
        with self.replay.loss_at(pl_module, batch) as loss_of:
            result = loss_landscape(loss_of, trainable_parameters(pl_module), etas)
        self._record(trainer, trainer.global_step, **result._asdict())
        self._log(
            pl_module, {"loss_range": result.loss_range, "grad_range": result.grad_range, "beta": result.beta}
        )

    @override
    def make_figure(self) -> Figure | None:
        if not self.history:
            return None
        from ..plotting import landscape_figure

        h = self.history
        return landscape_figure(
            [r["step"] for r in h],
            [min(r["losses"]) for r in h],
            [max(r["losses"]) for r in h],
            [min(r["grad_diffs"]) for r in h],
            [max(r["grad_diffs"]) for r in h],
            [r["beta"] for r in h],
        )
