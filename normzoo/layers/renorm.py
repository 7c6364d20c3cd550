"""Batch Renormalization (Ioffe 2017)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import functional as NF
from ._base import BatchNormBase, Input1d, Input2d, Input3d

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "PaperSchedule", "RenormSchedule"]

#: ``step -> (r_max, d_max)``; the step is the number of training steps before the current one.
RenormSchedule = Callable[[Tensor], tuple[float | Tensor, float | Tensor]]

#: The run length that the paper's breakpoints are read against when a :class:`PaperSchedule` is scaled.
PAPER_RUN_STEPS = 100_000


@dataclass(frozen=True)
class PaperSchedule:
    """The paper's schedule of Batch Renormalization's clip bounds, optionally scaled to a run's length.

    ``PaperSchedule()`` is the paper's schedule in absolute steps (what ``schedule="paper"`` means): plain
    BatchNorm (``r_max = 1``, ``d_max = 0``) for 5k steps, then linear relaxation to the layer's ``d_max``
    at 25k steps and to its ``r_max`` at 40k steps. A run of a few thousand steps never leaves that
    warm-up, so ``PaperSchedule(total_steps)`` reads the breakpoints as fractions of a 100k-step run and
    scales them to ``total_steps``: the warm-up ends after 5 % of the run, ``d_max`` is reached at 25 % and
    ``r_max`` at 40 %, leaving the last 60 % of the run at the full bounds (in the paper's own runs the full
    bounds also held for most of training). Breakpoints are rounded down to whole steps.

    A frozen dataclass: hashable, picklable, comparable, with a readable ``repr`` and :meth:`as_dict`.

    Example:
        >>> import torch
        >>> schedule = PaperSchedule(total_steps=1_000)
        >>> schedule
        PaperSchedule(total_steps=1000)
        >>> schedule.as_dict()
        {'name': 'paper', 'total_steps': 1000, 'warmup_steps': 50, 'd_max_steps': 250, 'r_max_steps': 400}
        >>> schedule(250, r_max=3.0, d_max=5.0)
        (2.1428..., 5.0)
        >>> layer = BatchRenorm1d(4, schedule=schedule)
        >>> layer.clip_bounds()
        (1.0, 0.0)
    """

    #: Steps of the whole run, or ``None`` for the paper's absolute breakpoints.
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.total_steps is None:
            return
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, numbers.Integral):
            raise TypeError(
                f"PaperSchedule: expected total_steps to be an int or None, got {self.total_steps!r}"
            )
        if self.total_steps < 1:
            raise ValueError(f"PaperSchedule: expected total_steps >= 1, got {self.total_steps}")
        object.__setattr__(self, "total_steps", int(self.total_steps))

    @property
    def breakpoints(self) -> tuple[int, int, int]:
        """``(warmup_steps, d_max_steps, r_max_steps)``: where the warm-up ends and each bound is reached."""
        paper = (NF.PAPER_WARMUP_STEPS, NF.PAPER_D_MAX_STEPS, NF.PAPER_R_MAX_STEPS)
        if self.total_steps is None:
            return paper
        warmup, d_steps, r_steps = (steps * self.total_steps // PAPER_RUN_STEPS for steps in paper)
        return warmup, d_steps, r_steps

    def __call__(
        self, step: int | Tensor, r_max: float = 3.0, d_max: float = 5.0
    ) -> tuple[float, float] | tuple[Tensor, Tensor]:
        """The clip bounds at ``step`` for a layer relaxing to ``r_max`` and ``d_max``."""
        warmup, d_steps, r_steps = self.breakpoints
        return NF.paper_renorm_schedule(
            step, r_max, d_max, warmup_steps=warmup, r_max_steps=r_steps, d_max_steps=d_steps
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description (name, run length and the three breakpoints)."""
        warmup, d_steps, r_steps = self.breakpoints
        return {
            "name": "paper",
            "total_steps": self.total_steps,
            "warmup_steps": warmup,
            "d_max_steps": d_steps,
            "r_max_steps": r_steps,
        }


class _BatchRenorm(BatchNormBase):
    """Batch Renormalization: BatchNorm whose training output is corrected towards the running statistics.

    Training computes ``y = γ·((x − μ_B)/σ_B · r + d) + β`` where ``r = clip(σ_B/σ, 1/r_max, r_max)`` and
    ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` come from the running statistics before this step's update and
    are constants for backprop. Running statistics are updated and used in eval exactly as in torch's
    BatchNorm, so a torch BatchNorm checkpoint loads unchanged, and with ``r_max=1, d_max=0`` this layer is
    BatchNorm in outputs, gradients and statistics.

    With ``track_running_stats=False`` there are no running statistics to renormalize towards: the layer is
    then exactly torch's BatchNorm with ``track_running_stats=False`` (batch statistics in training and in
    eval), and its ``r_max``, ``d_max`` and ``schedule`` have no effect.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances (batch and running) before the square root.
        momentum: weight of the batch statistics in the running ones; ``None`` for a cumulative average.
        affine: learn ``γ`` and ``β``.
        track_running_stats: keep running statistics (without them the layer is BatchNorm, see above).
        device: where to create parameters and buffers.
        dtype: dtype of parameters and buffers.
        bias: with ``affine``, learn ``β`` too (``False``: a weight without a bias, as in torch).
        sync: reduce the batch statistics over ``process_group`` in data-parallel training (see
            ``docs/distributed.md``); unsynchronized when false or with a single process.
        process_group: the group to synchronize over, ``None`` for the default group; implies ``sync``.
        r_max: the largest ``r`` (at least 1) that the schedule relaxes to.
        d_max: the largest ``|d|`` (at least 0) that the schedule relaxes to.
        schedule: ``"paper"`` (plain BatchNorm for 5k steps, then ``r_max`` reached linearly at 40k steps and
            ``d_max`` at 25k), a :class:`PaperSchedule` (the same, possibly scaled to a run's length),
            ``None`` (constant ``r_max`` and ``d_max``), or a callable ``step -> (r_max, d_max)`` receiving
            ``num_batches_tracked`` before this step (a 0-dim tensor).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        sync: bool = False,
        process_group: ProcessGroup | None = None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        schedule: str | PaperSchedule | RenormSchedule | None = "paper",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            sync=sync,
            process_group=process_group,
        )
        name = type(self).__name__
        if not (r_max >= 1.0 and d_max >= 0.0):  # NaN fails both
            raise ValueError(f"{name}: expected r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if not (schedule is None or schedule == "paper" or callable(schedule)):
            raise ValueError(
                f"{name}: schedule must be 'paper', a PaperSchedule, None or a callable step -> (r_max, d_max), "
                f"got {schedule!r}"
            )
        paper = schedule == "paper" or isinstance(schedule, PaperSchedule)
        if paper and not (math.isfinite(r_max) and math.isfinite(d_max)):
            raise ValueError(
                f"{name}: the paper schedule relaxes to finite bounds, got r_max={r_max}, d_max={d_max}; "
                "use schedule=None for constant infinite bounds (no clipping)"
            )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.schedule = schedule

    def clip_bounds(self) -> tuple[float | Tensor, float | Tensor]:
        """The ``(r_max, d_max)`` that the next training step will use.

        ``(1.0, 0.0)`` (BatchNorm) without running statistics, whatever the schedule.
        """
        schedule = self.schedule
        if schedule is None:
            return self.r_max, self.d_max
        step = self.num_batches_tracked
        if step is None:
            return 1.0, 0.0
        if schedule == "paper" or isinstance(schedule, PaperSchedule):
            paper = PAPER_SCHEDULE if isinstance(schedule, str) else schedule
            if step.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
                # Reading a CPU step costs nothing; float bounds let the warm-up take BatchNorm's own kernel.
                return paper(int(step), self.r_max, self.d_max)
            # Elsewhere bounds stay tensors computed from the step: no host synchronization, no graph break,
            # and a torch.jit.trace records the schedule instead of freezing the bounds of the traced step.
            return paper(step, self.r_max, self.d_max)
        assert callable(schedule)
        return self._checked_bounds(schedule(step))

    def _checked_bounds(self, bounds: Any) -> tuple[float | Tensor, float | Tensor]:
        """A callable schedule's ``(r_max, d_max)``, refused loudly when it is not a pair in the domain."""
        name = type(self).__name__
        if not isinstance(bounds, tuple | list) or len(bounds) != 2:
            raise TypeError(f"{name}: expected the schedule to return a pair (r_max, d_max), got {bounds!r}")
        r_max, d_max = bounds
        values = []
        for value in (r_max, d_max):
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"{name}: expected the schedule's bounds to be numbers or 1-element tensors, got a "
                        f"tensor of shape {tuple(value.shape)}"
                    )
                # Device bounds are left unchecked (reading them would synchronize with the device at each
                # step), and so are bounds being captured by torch.compile or torch.jit.trace.
                readable = value.device.type == "cpu" and not (
                    torch.compiler.is_compiling() or torch.jit.is_tracing()
                )
                values.append(float(value) if readable else None)
            else:
                values.append(float(value))
        r, d = values
        if (r is not None and not r >= 1.0) or (d is not None and not d >= 0.0):
            raise ValueError(
                f"{name}: expected the schedule to return r_max >= 1 and d_max >= 0, got r_max={r_max}, "
                f"d_max={d_max} at step {int(self.num_batches_tracked or 0)}"
            )
        return r_max, d_max

    def _normalize(self, input: Tensor) -> Tensor:
        r_max, d_max = self.clip_bounds() if self.training else (1.0, 0.0)
        momentum = self._average_factor()
        return NF.batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self._uses_batch_stats(),
            momentum,
            self.eps,
            r_max,
            d_max,
            sync=self._sync_active(),
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        schedule = self.schedule
        if not (schedule is None or isinstance(schedule, str | PaperSchedule)):
            schedule = "custom"
        bias = ", bias=False" if self.affine and self.bias is None else ""
        tracking = "" if self.track_running_stats else ", track_running_stats=False"
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}{bias}"
            f"{tracking}, r_max={self.r_max}, d_max={self.d_max}, schedule={schedule!r}{self._sync_repr()}"
        )


#: What ``schedule="paper"`` means.
PAPER_SCHEDULE = PaperSchedule()


class BatchRenorm1d(Input1d, _BatchRenorm, nn.BatchNorm1d):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` inputs; arguments and semantics as in :class:`_BatchRenorm`.

    Example:
        >>> import torch
        >>> layer = BatchRenorm1d(3)
        >>> layer(torch.randn(16, 3)).shape
        torch.Size([16, 3])
        >>> layer.clip_bounds()  # still in the paper's 5k-step warm-up (floats: the step lives on the CPU)
        (1.0, 0.0)
    """


class BatchRenorm2d(Input2d, _BatchRenorm, nn.BatchNorm2d):
    """Batch Renormalization over ``(N, C, H, W)`` inputs; arguments and semantics as in :class:`_BatchRenorm`.

    Example:
        >>> import torch
        >>> layer = BatchRenorm2d(4, schedule=None)
        >>> layer.load_state_dict(torch.nn.BatchNorm2d(4).state_dict())
        <All keys matched successfully>
        >>> layer(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """


class BatchRenorm3d(Input3d, _BatchRenorm, nn.BatchNorm3d):
    """Batch Renormalization over ``(N, C, D, H, W)`` inputs; arguments and semantics as in :class:`_BatchRenorm`.

    Example:
        >>> import torch
        >>> BatchRenorm3d(2, r_max=1.0, d_max=0.0)(torch.randn(2, 2, 2, 2, 2)).shape
        torch.Size([2, 2, 2, 2, 2])
    """
