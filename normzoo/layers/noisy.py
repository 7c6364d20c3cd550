"""Noisy BatchNorm (Santurkar et al. 2018, "How does batch normalization help optimization?")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import functional as NF
from ._base import BatchNormBase, Input1d, Input2d, Input3d

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d", "NoisyBatchNorm3d"]

#: Default half-width of the uniform distribution of the per-step noise mean.
DEFAULT_MEAN_RANGE = 0.5
#: Default bounds of the uniform distribution of the per-step noise standard deviation.
DEFAULT_STD_RANGE = (0.1, 0.5)


class _NoisyBatchNorm(BatchNormBase):
    """BatchNorm whose training output is made deliberately unstable (Santurkar et al. 2018).

    In training, after normalization, every value of channel ``c`` of every sample gets i.i.d. noise
    ``ε ~ N(m_c, s_c²)``, and the distribution itself is re-drawn at every step:
    ``m_c ~ U(−mean_range, mean_range)`` and ``s_c ~ U(std_range[0], std_range[1])``. The layer's outputs
    thus have a non-zero mean and a non-unit variance that change from step to step — more internal
    covariate shift than no normalization at all — and yet such networks train about as well as with
    BatchNorm, which is the paper's evidence that reducing covariate shift is not why BatchNorm works.
    Eval is exactly BatchNorm's.

    The defaults (``mean_range=0.5``, ``std_range=(0.1, 0.5)``) move each channel's mean by up to half of
    its standard deviation at every step and make its variance ``1 + s_c²`` (1.01 to 1.25): a distribution
    that visibly jumps from step to step, while the per-value noise stays small enough not to drown the
    signal. Measured on the bundled digits (8 epochs, SGD, seed 0): the default CNN reached 0.965 test
    accuracy with these defaults vs 0.960 with BatchNorm, but 0.285 with ``mean_range=1,
    std_range=(0.5, 1.5)``, whose per-value noise as large as the signal compounds over six layers. The
    paper's exact constants are not reproduced.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.
        momentum: weight of the batch statistics in the running ones; ``None`` for a cumulative average.
        affine: learn ``γ`` and ``β``.
        track_running_stats: keep running statistics for eval (else eval uses batch statistics).
        device: where to create parameters and buffers.
        dtype: dtype of parameters and buffers.
        bias: with ``affine``, learn ``β`` too (``False``: a weight without a bias, as in torch).
        sync: reduce the batch statistics over ``process_group`` in data-parallel training, each process
            drawing its own noise (see
            ``docs/distributed.md``); unsynchronized when false or with a single process.
        process_group: the group to synchronize over, ``None`` for the default group; implies ``sync``.
        mean_range: half-width of the uniform distribution of each step's noise mean.
        std_range: bounds of the uniform distribution of each step's noise standard deviation.
        generator: the random generator for the noise (on the layer's device); ``None`` for torch's global one.
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
        mean_range: float = DEFAULT_MEAN_RANGE,
        std_range: tuple[float, float] = DEFAULT_STD_RANGE,
        generator: torch.Generator | None = None,
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
        try:
            low, high = (float(bound) for bound in std_range)
        except (TypeError, ValueError):
            raise TypeError(
                f"{name}: expected std_range to be a pair (low, high), got {std_range!r}"
            ) from None
        # Written so that NaN fails every comparison; infinite noise would make every output inf or NaN.
        if not (0.0 <= mean_range < math.inf and 0.0 <= low <= high < math.inf):
            raise ValueError(
                f"{name}: expected finite mean_range >= 0 and 0 <= std_range[0] <= std_range[1] < inf, "
                f"got mean_range={mean_range}, std_range={std_range}"
            )
        self.mean_range = float(mean_range)
        self.std_range = (low, high)
        self.generator = generator

    def _normalize(self, input: Tensor) -> Tensor:
        momentum = self._average_factor()
        if not self.training:
            return self._batch_norm(input, momentum)
        running_mean, running_var = self._running_stats_to_update()
        # Compare device types: torch.Generator("cuda") reports no index and serves every CUDA device.
        if self.generator is not None and self.generator.device.type != input.device.type:
            raise RuntimeError(
                f"{type(self).__name__} has its generator on {self.generator.device} but got input on "
                f"{input.device}; give it a generator on the input's device"
            )
        # The noise mean becomes the kernel's bias: it must share the dtype of the layer's other per-channel
        # tensors (float32 for mixed precision), or of the input when the layer has none.
        reference = next((t for t in (self.weight, self.running_mean) if t is not None), input)
        dtype = reference.dtype
        noise_mean, noise_std = NF.sample_noise_moments(
            self.num_features, self.mean_range, self.std_range,
            generator=self.generator, device=input.device, dtype=dtype,
        )  # fmt: skip
        return NF.noisy_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
            noise_mean, noise_std, self.generator,
            sync=self._sync_active(), process_group=self.process_group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mean_range={self.mean_range}, std_range={self.std_range}"
            f"{self._sync_repr()}"
        )


class NoisyBatchNorm1d(Input1d, _NoisyBatchNorm, nn.BatchNorm1d):
    """Noisy BatchNorm over ``(N, C)`` or ``(N, C, L)`` inputs; arguments and semantics as in :class:`_NoisyBatchNorm`.

    Example:
        >>> import torch
        >>> layer = NoisyBatchNorm1d(3, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(256, 3)
        >>> y = layer(x)  # training: each channel shifted by its drawn noise mean
        >>> bool((y.mean(0) - torch.nn.functional.batch_norm(x, None, None, training=True).mean(0)).abs().max() > 0.01)
        True
        >>> torch.equal(layer.eval()(x), torch.nn.functional.batch_norm(
        ...     x, layer.running_mean, layer.running_var, layer.weight, layer.bias))
        True
    """


class NoisyBatchNorm2d(Input2d, _NoisyBatchNorm, nn.BatchNorm2d):
    """Noisy BatchNorm over ``(N, C, H, W)`` inputs; arguments and semantics as in :class:`_NoisyBatchNorm`.

    Example:
        >>> import torch
        >>> NoisyBatchNorm2d(4)(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """


class NoisyBatchNorm3d(Input3d, _NoisyBatchNorm, nn.BatchNorm3d):
    """Noisy BatchNorm over ``(N, C, D, H, W)`` inputs; arguments and semantics as in :class:`_NoisyBatchNorm`.

    Example:
        >>> import torch
        >>> NoisyBatchNorm3d(2)(torch.randn(2, 2, 2, 2, 2)).shape
        torch.Size([2, 2, 2, 2, 2])
    """
