"""BatchNorm (Ioffe & Szegedy 2015) on torch's native kernel, in normzoo's layer hierarchy."""

from __future__ import annotations

from torch import Tensor, nn

from ._base import BatchNormBase, Input1d, Input2d, Input3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _PlainBatchNorm(BatchNormBase):
    def _normalize(self, input: Tensor) -> Tensor:
        return self._batch_norm(input, self._average_factor())

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sync_repr()


class BatchNorm1d(Input1d, _PlainBatchNorm, nn.BatchNorm1d):
    """BatchNorm over ``(N, C)`` or ``(N, C, L)`` inputs; a drop-in for :class:`torch.nn.BatchNorm1d`.

    Same constructor, parameters, buffers, ``state_dict`` keys and numbers as torch's (it runs torch's
    kernel), with normzoo's input checks and surgery support.

    Example:
        >>> import torch
        >>> bn = BatchNorm1d(3)
        >>> y = bn(torch.randn(8, 3))
        >>> bn
        BatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
        >>> torch.nn.BatchNorm1d(3).load_state_dict(bn.state_dict())
        <All keys matched successfully>
    """


class BatchNorm2d(Input2d, _PlainBatchNorm, nn.BatchNorm2d):
    """BatchNorm over ``(N, C, H, W)`` inputs; a drop-in for :class:`torch.nn.BatchNorm2d`.

    Example:
        >>> import torch
        >>> bn = BatchNorm2d(4)
        >>> bn(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """


class BatchNorm3d(Input3d, _PlainBatchNorm, nn.BatchNorm3d):
    """BatchNorm over ``(N, C, D, H, W)`` inputs; a drop-in for :class:`torch.nn.BatchNorm3d`.

    Example:
        >>> import torch
        >>> BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """
