"""When a monitor samples: the first optimizer step, every N-th, and the last one the trainer expects.

:class:`SamplingSchedule` counts optimizer steps (``trainer.global_step``). A monitor asks it once per
optimizer step (:meth:`~SamplingSchedule.arm`), from a hook that sees every step or from one that sees
every training batch; when a batch takes several optimizer steps (manual optimization with several
optimizers), the batch covers all of them and is sampled when any of them is due, so no step count or
optimizer count can make a monitor skip its schedule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn

from ._args import positive_int

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SamplingSchedule", "auto_interval"]


def auto_interval(total_steps: float, samples: int, log_every_n_steps: int, fallback: int) -> int:
    """An interval that gives about ``samples`` samples over ``total_steps`` optimizer steps, rounded
    down to a multiple of ``log_every_n_steps`` when it is at least that (so the samples reach the
    loggers), except for a single sample (then the interval is the run: the first and the last step
    alone); ``fallback`` when the run length is unknown (infinite).

    Example:
        >>> auto_interval(1008, 20, 50, 50), auto_interval(32, 20, 50, 50), auto_interval(float("inf"), 5, 50, 500)
        (50, 1, 500)
        >>> auto_interval(1008, 1, 50, 500)
        1008
    """
    if not math.isfinite(total_steps) or total_steps < 1:
        return fallback
    raw = max(1, int(total_steps) // samples)
    if samples > 1 and log_every_n_steps > 0 and raw >= log_every_n_steps:
        raw -= raw % log_every_n_steps  # (one sample: the first and last step alone, no sample in between)
    return raw


class SamplingSchedule:
    """Optimizer steps ``0``, ``N-1, 2N-1, ...`` and the last one (0-based, counted by ``global_step``).

    Args:
        every_n_steps: the interval ``N``; ``None``: chosen in :meth:`start` so that a run gives about
            ``samples`` samples (see :func:`auto_interval`).
        samples: the number of samples an automatic interval aims at.
        fallback: the interval when ``every_n_steps`` is ``None`` and the run length is unknown.
        owner: the monitor's class name, for messages.

    Example:
        >>> schedule = SamplingSchedule(4)
        >>> schedule.last_step = 9
        >>> [s for s in range(10) if schedule.is_due(s)]
        [0, 3, 7, 9]
    """

    def __init__(
        self, every_n_steps: int | None, *, samples: int = 20, fallback: int = 50, owner: str = "monitor"
    ) -> None:
        if every_n_steps is not None:
            positive_int(owner, "every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.samples = samples
        self.fallback = fallback
        self.owner = owner
        #: The interval in use (``every_n_steps``, or the automatic one once :meth:`start` has run).
        self.interval = every_n_steps or fallback
        #: The last optimizer step the trainer expects (``estimated_stepping_batches - 1``), if known.
        self.last_step: int | None = None
        self._armed = -1  # the last step value armed (micro-batches of one step arm once)
        self._covered = -1  # every step up to here has been considered
        self._seen = -1  # the step value at the previous distinct batch
        self._width = 1  # optimizer steps per batch, from the last two distinct step values

    def check_logging(self, trainer: pl.Trainer) -> None:
        """Warn when a user-given interval is not a multiple of ``log_every_n_steps``."""
        n = int(getattr(trainer, "log_every_n_steps", 0))
        every = self.every_n_steps
        if every is not None and trainer.loggers and n > 0 and every % n != 0:
            rank_zero_warn(
                f"{self.owner}(every_n_steps={every}) is not a multiple of the trainer's "
                f"log_every_n_steps={n}: Lightning writes step metrics to the loggers only every {n} steps, "
                "so some samples reach only the callback's history."
            )

    def start(self, trainer: pl.Trainer) -> None:
        """Read the run's length (``on_train_start``: the data is set up) and start counting from the
        current step (a resumed run does not re-sample the steps before it)."""
        total = float(trainer.estimated_stepping_batches)  # inf when the length is unknown
        self.last_step = int(total) - 1 if math.isfinite(total) and total >= 1 else None
        if self.every_n_steps is None:
            self.interval = auto_interval(
                total, self.samples, int(getattr(trainer, "log_every_n_steps", 0) or 0), self.fallback
            )
        step = trainer.global_step
        self._armed = self._covered = self._seen = step - 1
        self._width = 1

    def is_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is on the schedule."""
        return step == 0 or (step + 1) % self.interval == 0 or step == self.last_step

    def arm(self, step: int) -> bool:
        """True once for each due step, at the first call whose batch covers it.

        ``step`` is ``trainer.global_step`` at the call; the calls of one step (micro-batches under
        gradient accumulation) arm at most once, and a batch is taken to cover as many optimizer steps as
        the previous one did (one, under automatic optimization).
        """
        if step <= self._armed:
            return False
        if self._seen >= 0 and step > self._seen:
            self._width = step - self._seen
        self._seen = step
        self._armed = step
        end = step + self._width - 1
        due = any(self.is_due(s) for s in range(max(self._covered + 1, 0), end + 1))
        self._covered = max(self._covered, end)
        return due
