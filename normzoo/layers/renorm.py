"""Batch Renormalization (Ioffe 2017)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import functional as NF
from ._base import BatchNormBase, Input1d, Input2d, Input3d

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule"]

#: ``step -> (r_max, d_max)``; the step is the number of training steps before the current one.
RenormSchedule = Callable[[Tensor], tuple[float | Tensor, float | Tensor]]


class _BatchRenorm(BatchNormBase):
    """Batch Renormalization: BatchNorm whose training output is corrected towards the running statistics.

    Training computes ``y = γ·((x − μ_B)/σ_B · r + d) + β`` where ``r = clip(σ_B/σ, 1/r_max, r_max)`` and
    ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` come from the running statistics before this step's update and
    are constants for backprop. Running statistics are updated and used in eval exactly as in torch's
    BatchNorm, so a torch BatchNorm checkpoint loads unchanged, and with ``r_max=1, d_max=0`` this layer is
    BatchNorm in outputs, gradients and statistics.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances (batch and running) before the square root.
        momentum: weight of the batch statistics in the running ones; ``None`` for a cumulative average.
        affine: learn ``γ`` and ``β``.
        r_max: the largest ``r`` (at least 1) that the schedule relaxes to.
        d_max: the largest ``|d|`` (at least 0) that the schedule relaxes to.
        schedule: ``"paper"`` (plain BatchNorm for 5k steps, then ``r_max`` reached linearly at 40k steps and
            ``d_max`` at 25k), ``None`` (constant ``r_max`` and ``d_max``), or a callable
            ``step -> (r_max, d_max)`` receiving ``num_batches_tracked`` before this step (a 0-dim tensor).
        device: where to create parameters and buffers.
        dtype: dtype of parameters and buffers.
        sync: reduce the batch statistics over ``process_group`` in data-parallel training (see
            ``docs/distributed.md``); unsynchronized when false or with a single process.
        process_group: the group to synchronize over, ``None`` for the default group; implies ``sync``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        schedule: str | RenormSchedule | None = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        sync: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, True, device, dtype, sync=sync, process_group=process_group
        )
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(
                f"{type(self).__name__}: expected r_max >= 1 and d_max >= 0, got {r_max}, {d_max}"
            )
        if not (schedule is None or schedule == "paper" or callable(schedule)):
            raise ValueError(
                f"{type(self).__name__}: schedule must be 'paper', None or a callable step -> (r_max, d_max), "
                f"got {schedule!r}"
            )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.schedule = schedule

    def clip_bounds(self) -> tuple[float | Tensor, float | Tensor]:
        """The ``(r_max, d_max)`` that the next training step will use."""
        if self.schedule is None:
            return self.r_max, self.d_max
        assert self.num_batches_tracked is not None
        if self.schedule == "paper":
            step = self.num_batches_tracked
            if step.device.type == "cpu" and not torch.compiler.is_compiling():
                # Reading a CPU step costs nothing; float bounds let the warm-up take BatchNorm's own kernel.
                return NF.paper_renorm_schedule(int(step), self.r_max, self.d_max)
            # Elsewhere bounds stay on the device: no host synchronization, no graph break.
            return NF.paper_renorm_schedule(step, self.r_max, self.d_max)
        assert callable(self.schedule)
        return self.schedule(self.num_batches_tracked)

    def _normalize(self, input: Tensor) -> Tensor:
        r_max, d_max = self.clip_bounds() if self.training else (1.0, 0.0)
        momentum = self._average_factor()
        return NF.batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            momentum,
            self.eps,
            r_max,
            d_max,
            sync=self._sync_active(),
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        schedule = self.schedule if self.schedule is None or isinstance(self.schedule, str) else "custom"
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={self.r_max}, d_max={self.d_max}, schedule={schedule!r}{self._sync_repr()}"
        )


class BatchRenorm1d(Input1d, _BatchRenorm):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` inputs; arguments and semantics as in :class:`_BatchRenorm`.

    Example:
        >>> import torch
        >>> layer = BatchRenorm1d(3)
        >>> layer(torch.randn(16, 3)).shape
        torch.Size([16, 3])
        >>> layer.clip_bounds()  # still in the paper's 5k-step warm-up (floats: the step lives on the CPU)
        (1.0, 0.0)
    """


class BatchRenorm2d(Input2d, _BatchRenorm):
    """Batch Renormalization over ``(N, C, H, W)`` inputs; arguments and semantics as in :class:`_BatchRenorm`.

    Example:
        >>> import torch
        >>> layer = BatchRenorm2d(4, schedule=None)
        >>> layer.load_state_dict(torch.nn.BatchNorm2d(4).state_dict())
        <All keys matched successfully>
        >>> layer(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """


class BatchRenorm3d(Input3d, _BatchRenorm):
    """Batch Renormalization over ``(N, C, D, H, W)`` inputs; arguments and semantics as in :class:`_BatchRenorm`.

    Example:
        >>> import torch
        >>> BatchRenorm3d(2, r_max=1.0, d_max=0.0)(torch.randn(2, 2, 2, 2, 2)).shape
        torch.Size([2, 2, 2, 2, 2])
    """
