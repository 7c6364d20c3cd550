"""What every diagnostics callback is: a named history of records, logged scalars and a figure.

:class:`DiagnosticCallback` holds only that; what a monitor samples, which layers it looks at and how it
replays a batch are small helpers it composes (:mod:`._schedule`, :mod:`._layers`, :mod:`._replay`), and
figures go out through :class:`._figures.FigureWriter`.

Rank zero, declared here once: records, logged values and figures are rank zero's. A monitor measures on
rank zero only, unless its class sets :attr:`~DiagnosticCallback.measures_on_every_rank` (the probes,
whose replay must run on every rank so that a synchronized BatchNorm's collectives match).

Logged names: ``<name>/<metric>`` for the few aggregates every monitor always logs, and
``<name>/<metric>/<layer>`` per layer only with ``log_per_layer=True``. Values are logged with
``on_step=True`` from rank zero; Lightning writes step values to the loggers every ``log_every_n_steps``
optimizer steps. Every sampled value is kept in :attr:`~DiagnosticCallback.history` in any case.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from ..plotting import layer_series
from ._args import positive_int
from ._figures import FigureWriter
from ._layers import LayerSelector
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DiagnosticCallback", "Record"]

Record: TypeAlias = dict[str, Any]


class DiagnosticCallback(Callback):
    """Base of normzoo's diagnostics callbacks: history, logging, figures, resumable state.

    Args:
        name: prefix of the logged names and stem of the figure files.
        figure_dir: folder for the PNG figures; ``None``: ``<trainer.log_dir>/figures`` (or
            ``<default_root_dir>/figures`` without a logger). A folder that cannot be written is warned
            about; training goes on.
        save_figures: write the figure at the end of training (``on_train_end``), to ``figure_dir`` and to
            every logger that can take an image (TensorBoard's ``add_image``, else a ``log_image`` method).
        figure_every_n_epochs: also write ``<name>_epoch<NNN>.png`` every N epochs.
        figure_dpi: resolution of the PNG files.
    """

    default_name: ClassVar[str] = "diagnostic"
    #: Whether the measurement runs on every rank (records and logs stay rank zero's).
    measures_on_every_rank: ClassVar[bool] = False
    #: The steps a monitor samples; ``None`` for a callback that records on its own clock (EpochTimer).
    schedule: SamplingSchedule | None = None
    #: The layers a monitor measures, resolved into ``selected`` at ``setup``; ``None`` for whole-model
    #: measures.
    selector: LayerSelector | None = None
    #: What the selector picks, for messages ("layer", "module", "block").
    layer_noun: ClassVar[str] = "layer"
    #: The ``(name, module)`` pairs the selector resolved at ``setup``.
    selected: list[tuple[str, nn.Module]]

    def __init__(
        self,
        *,
        name: str | None = None,
        figure_dir: str | os.PathLike[str] | None = None,
        save_figures: bool = True,
        figure_every_n_epochs: int | None = None,
        figure_dpi: int = 90,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if figure_every_n_epochs is not None:
            positive_int(owner, "figure_every_n_epochs", figure_every_n_epochs)
        positive_int(owner, "figure_dpi", figure_dpi)
        self.name = name or self.default_name
        self.save_figures = save_figures
        self.figure_every_n_epochs = figure_every_n_epochs
        self.figures = FigureWriter(figure_dir, dpi=figure_dpi, owner=owner)
        #: One record (a dict of plain Python values) per sample, oldest first; saved in checkpoints.
        self.history: list[Record] = []
        self._handles: list[RemovableHandle] = []

    @property
    def figure_dir(self) -> Path | None:
        """The figure folder (``None``: ``<log_dir>/figures``); assignable."""
        return self.figures.folder

    @figure_dir.setter
    def figure_dir(self, folder: str | os.PathLike[str] | None) -> None:
        self.figures.folder = Path(folder) if folder is not None else None

    # -- identity and state ----------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def series(self, key: str) -> tuple[list[int], dict[str, list[float]]]:
        """``(steps, {layer: values})`` of the per-layer quantity ``key`` over :attr:`history` (``nan``
        where a record lacks it; empty for monitors whose records have no layers)."""
        return layer_series(self.history, key)

    # -- sampling and layers ----------------------------------------------------------------------------
    @property
    def every_n_steps(self) -> int | None:
        """The sampling interval: the one given, or the one chosen from the run's length once it starts."""
        return None if self.schedule is None else self.schedule.every_n_steps

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.schedule is None:
            return
        self.schedule.check_logging(trainer)
        if self.selector is not None:
            self.selected = self.selector.resolve(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule is not None:
            self.schedule.start(trainer)

    # -- rank zero ---------------------------------------------------------------------------------------
    def measures_here(self, trainer: pl.Trainer) -> bool:
        """Whether this process takes part in a measurement (rank zero, or every rank for the probes)."""
        return self.measures_on_every_rank or trainer.is_global_zero

    def _record(self, trainer: pl.Trainer, step: int, **values: Any) -> Record:
        """A record of ``values`` at ``step``, kept in :attr:`history` on rank zero."""
        record: Record = {"step": int(step), "epoch": int(trainer.current_epoch), **values}
        if trainer.is_global_zero:
            self.history.append(record)
        return record

    def _log(
        self, pl_module: pl.LightningModule, metrics: Mapping[str, float | None], *, epoch: bool = False
    ) -> None:
        """Log ``<name>/<key>`` from rank zero; ``None`` values are skipped."""
        if not pl_module.trainer.is_global_zero:
            return
        for key, value in metrics.items():
            if value is None:
                continue
            pl_module.log(
                f"{self.name}/{key}",
                float(value),
                on_step=not epoch,
                on_epoch=epoch,
                rank_zero_only=True,
                batch_size=1,
            )

    # -- hooks the callback registered on modules or optimizers ----------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if trainer.is_global_zero and not self.history:
            rank_zero_warn(f"{type(self).__name__}: recorded nothing in this fit{self._why_nothing()}.")

    def _why_nothing(self) -> str:
        """Why a fit may have left no record (appended to the end-of-fit warning)."""
        if self.selector is not None and not self.selected:
            return f": no {self.layer_noun} matches layers={self.selector.spec!r}"
        return ""

    # -- figures -----------------------------------------------------------------------------------------
    def make_figure(self) -> Figure | None:
        """This monitor's figure from :attr:`history` (``None`` while there is nothing to plot)."""
        return None

    def save_figure(self, path: str | os.PathLike[str]) -> Path | None:
        """Write :meth:`make_figure` as a PNG to ``path`` (folders created); the path, or ``None`` if empty."""
        from ..plotting import save_png

        fig = self.make_figure()
        if fig is None:
            return None
        return save_png(fig, path, dpi=self.figures.dpi)

    def _emit_figure(self, trainer: pl.Trainer, suffix: str = "") -> Path | None:
        if not trainer.is_global_zero:
            return None
        fig = self.make_figure()
        return None if fig is None else self.figures.emit(fig, trainer, self.name, suffix)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.figure_every_n_epochs
        if self.save_figures and n is not None and (trainer.current_epoch + 1) % n == 0:
            self._emit_figure(trainer, suffix=f"_epoch{trainer.current_epoch:03d}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_figures:
            self._emit_figure(trainer)
