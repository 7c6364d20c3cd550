"""Figure delivery: a monitor's figure to a folder and to the loggers that take images, on rank zero.

A figure is a by-product of a run: a folder that cannot be written (a file in its place, no permission, a
full disk) is warned about and the fit goes on, instead of turning a finished run into an interrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = ["FigureWriter"]


class FigureWriter:
    """Writes figures as ``<folder>/<name>.png`` and to every logger that can take an image.

    Args:
        folder: the folder; ``None``: ``<trainer.log_dir>/figures`` (``<default_root_dir>/figures``
            without a logger).
        dpi: resolution of the PNG files.
        owner: the monitor's class name, for messages.
    """

    def __init__(
        self, folder: str | os.PathLike[str] | None, *, dpi: int = 90, owner: str = "monitor"
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.dpi = dpi
        self.owner = owner

    def folder_for(self, trainer: pl.Trainer) -> Path:
        """Where the figures of ``trainer``'s run go."""
        if self.folder is not None:
            return self.folder
        return Path(trainer.log_dir or trainer.default_root_dir) / "figures"

    def emit(self, fig: Figure, trainer: pl.Trainer, name: str, suffix: str = "") -> Path | None:
        """Rank zero: write ``fig`` as ``<name><suffix>.png`` and to the loggers under
        ``<name>/figure<suffix>``; the file's path, or ``None`` when it could not be written (warned) or
        on another rank."""
        if not trainer.is_global_zero:
            return None
        from ..plotting import figure_to_array, save_png

        target = self.folder_for(trainer) / f"{name}{suffix}.png"
        path: Path | None
        try:
            path = save_png(fig, target, dpi=self.dpi)
        except OSError as error:
            rank_zero_warn(
                f"{self.owner}: could not write its figure to {str(target)!r} ({error}); training goes on. "
                "Pass figure_dir= a writable folder, or save_figures=False."
            )
            path = None
        tag = f"{name}/figure{suffix}"
        for logger in trainer.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            log_image: Any = getattr(logger, "log_image", None)
            if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
                image = figure_to_array(fig, dpi=self.dpi)
                experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
            elif callable(log_image) and path is not None:  # e.g. WandbLogger
                log_image(key=tag, images=[str(path)], step=trainer.global_step)
        return path
