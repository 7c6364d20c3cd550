"""LossLandscapeMonitor: Santurkar et al. (2018)'s loss and gradient variation along the gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn

from ...diagnostics import loss_landscape
from ._base import ProbingMonitor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LossLandscapeMonitor"]


class LossLandscapeMonitor(ProbingMonitor):
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
    current learning rate, ``(0.25, 0.5, 1, 2, 4)`` by default, so the probe looks from a quarter of the
    optimizer's actual step to four times it, whatever the learning rate; with ``relative=False`` they
    are absolute.

    Logged (``<name>`` defaults to ``landscape``): ``<name>/loss_range``, ``<name>/grad_range``,
    ``<name>/beta``. Records: ``{"step", "epoch", "loss", "grad_norm", "step_sizes", "losses",
    "grad_diffs", "loss_range", "grad_range", "beta"}``.

    Args:
        every_n_steps: sample every N optimizer steps (default 500: one sample costs about one training
            step per step size, plus one).
        step_sizes: the step sizes (multiples of the learning rate when ``relative``).
        relative: whether ``step_sizes`` are relative to the current learning rate.
        loss_fn: ``loss_fn(module, batch) -> loss`` (default: ``module.loss`` or cross entropy).
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``, ``figure_dpi``.
    """

    default_name = "landscape"

    def __init__(
        self,
        *,
        every_n_steps: int = 500,
        step_sizes: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        relative: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        if not step_sizes or any(s <= 0 for s in step_sizes):
            raise ValueError(f"LossLandscapeMonitor: step_sizes must be positive, got {tuple(step_sizes)}")
        self.step_sizes = tuple(float(s) for s in step_sizes)
        self.relative = relative

    def resolve_layers(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("model", pl_module)]  # the whole model: g is the gradient of every trainable parameter

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batch = self.take_batch(trainer)
        if batch is None:
            return
        scale = float(optimizer.param_groups[0]["lr"]) if self.relative else 1.0
        etas = [s * scale for s in self.step_sizes]
        with self.replay(pl_module, batch) as loss_of:
            result = loss_landscape(loss_of, self.trainable_parameters(pl_module), etas)
        if not trainer.is_global_zero:
            return
        self._record(trainer, trainer.global_step, **result._asdict())
        self._log(
            pl_module, {"loss_range": result.loss_range, "grad_range": result.grad_range, "beta": result.beta}
        )

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
