"""The shared base of normzoo's batch-normalization family.

Modelled on ``torch.nn.modules.batchnorm``: :class:`NormBase` owns the parameters, buffers, state-dict
versioning and ``extra_repr`` (all named exactly as torch's, so checkpoints move between the two), and
:class:`BatchNormBase` adds the training-mode bookkeeping (``num_batches_tracked``, cumulative
``momentum=None``) and input checks. A family implements :meth:`BatchNormBase._normalize`; a dimension
(1d/2d/3d) sets only :attr:`BatchNormBase._input_dims`. :class:`SyncMixin` holds the synchronization
settings (``sync``, ``process_group``) that every layer of the family has, see ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as NF

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["BatchNormBase", "Input1d", "Input2d", "Input3d", "NormBase", "ProcessGroupRef", "SyncMixin"]


class ProcessGroupRef:
    """A layer's process group, held so that the layer can be deep-copied.

    A process group is a handle on this process's communicator: it cannot be copied or pickled, so a layer
    holding one directly (as torch's ``SyncBatchNorm`` does) breaks ``copy.deepcopy`` of the model. Through
    this reference a deep copy shares the group, and pickling fails with a message that says what to do.
    """

    __slots__ = ("group",)

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> ProcessGroupRef:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a normzoo layer synchronized over an explicit process group cannot be pickled: process groups "
            "exist only in the process that created them. Save the state_dict, or set the layer's "
            "process_group to None (the default group) or call normzoo.revert_sync(model) before pickling."
        )

    def __repr__(self) -> str:
        return f"ProcessGroupRef({self.group!r})"


class SyncMixin:
    """Synchronization settings of a batch-normalization layer (``sync`` and ``process_group``).

    With ``sync`` true, the layer reduces its batch statistics over ``process_group`` (``None``: the
    default group, as in torch's ``SyncBatchNorm``) when it is training, ``torch.distributed`` is
    initialized and the group has more than one process; otherwise it computes exactly what it computes
    unsynchronized. Neither setting is a parameter or buffer, so ``state_dict`` is unchanged, and a deep
    copy keeps both (sharing the group).
    """

    training: bool
    #: Reduce batch statistics over :attr:`process_group` in training.
    sync: bool = False
    _process_group_ref: ProcessGroupRef | None = None

    @property
    def process_group(self) -> ProcessGroup | None:
        """The group to synchronize over; ``None`` is the default (world) group."""
        ref = self._process_group_ref
        return None if ref is None else ref.group

    @process_group.setter
    def process_group(self, group: ProcessGroup | None) -> None:
        self._process_group_ref = None if group is None else ProcessGroupRef(group)

    def _sync_active(self) -> bool:
        """Whether this forward reduces its statistics over the group (more than one process)."""
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def _sync_repr(self) -> str:
        if not self.sync:
            return ""
        return ", sync=True" + ("" if self.process_group is None else ", process_group=<custom>")


class NormBase(nn.Module):
    """Parameters and running statistics of a batch-normalization layer, as torch lays them out."""

    _version = 2
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}"
            )
        if eps <= 0:
            raise ValueError(f"{type(self).__name__}: eps must be positive, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, got {momentum}")
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(
                    0, dtype=torch.long, **{k: v for k, v in factory_kwargs.items() if k != "dtype"}
                ),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, step count 0."""
        if self.track_running_stats:
            assert self.running_mean is not None
            assert self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset, weight 1, bias 0."""
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None
            assert self.bias is not None
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written before num_batches_tracked existed (torch's version < 2) lack it: start at 0,
        # as torch does, so that old torch BN checkpoints load too.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            assert self.num_batches_tracked is not None
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNormBase(SyncMixin, NormBase):
    """Training bookkeeping, input checks and synchronization shared by every normzoo BatchNorm-family layer.

    Subclasses implement :meth:`_normalize` (the family) and set :attr:`_input_dims` (the dimension).
    The keyword-only ``sync`` and ``process_group`` arguments (see :class:`SyncMixin`) make the layer
    reduce its batch statistics over a process group in data-parallel training; giving a
    ``process_group`` implies ``sync=True``.
    """

    #: Accepted ``input.dim()`` values, e.g. ``(2, 3)`` for 1d layers.
    _input_dims: ClassVar[tuple[int, ...]] = ()
    #: Human-readable expected shapes for error messages, e.g. ``"(N, C) or (N, C, L)"``.
    _input_shapes: ClassVar[str] = ""

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
        sync: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.sync = bool(sync) or process_group is not None
        self.process_group = process_group

    def _check_input(self, input: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name} expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in self._input_dims:
            raise ValueError(
                f"{name} expected a {'D or '.join(map(str, self._input_dims))}D input of shape "
                f"{self._input_shapes}, got {input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}({self.num_features}) expected {self.num_features} channels in dimension 1, "
                f"got input of shape {tuple(input.shape)} with {input.shape[1]}"
            )
        if not input.is_floating_point():
            raise TypeError(f"{name} expected a floating-point input, got dtype {input.dtype}")
        # One value per channel is fine when the statistics are reduced over several processes (torch's rule).
        if (
            self._uses_batch_stats()
            and input.numel() // max(input.shape[1], 1) == 1
            and not self._sync_active()
        ):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()} "
                f"in {name}({self.num_features})"
            )
        reference = self.weight if self.weight is not None else self.running_mean
        if reference is not None and reference.device != input.device:
            raise RuntimeError(
                f"{name} has its parameters and buffers on {reference.device} but got input on "
                f"{input.device}; move one of them with .to()"
            )

    def _average_factor(self) -> float:
        """Counts this training step and returns the weight of its statistics in the running ones."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as torch
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _running_stats_to_update(self) -> tuple[Tensor | None, Tensor | None]:
        # Batch statistics are used but the running ones are left alone when the layer is in eval mode
        # with running statistics tracked and yet is asked for batch statistics (torch's rule).
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        """The family's computation; calls :meth:`_average_factor` once per forward."""
        raise NotImplementedError

    def _batch_norm(self, input: Tensor, momentum: float) -> Tensor:
        """Plain BatchNorm with this layer's state, synchronized over the group when :meth:`_sync_active`."""
        running_mean, running_var = self._running_stats_to_update()
        if self._sync_active():
            return NF.sync_batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                momentum,
                self.eps,
                self.process_group,
            )
        return NF.batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            self._uses_batch_stats(),
            momentum,
            self.eps,
        )


class Input1d:
    """Dimension mixin: ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dims: ClassVar[tuple[int, ...]] = (2, 3)
    _input_shapes: ClassVar[str] = "(N, C) or (N, C, L)"


class Input2d:
    """Dimension mixin: ``(N, C, H, W)`` inputs."""

    _input_dims: ClassVar[tuple[int, ...]] = (4,)
    _input_shapes: ClassVar[str] = "(N, C, H, W)"


class Input3d:
    """Dimension mixin: ``(N, C, D, H, W)`` inputs."""

    _input_dims: ClassVar[tuple[int, ...]] = (5,)
    _input_shapes: ClassVar[str] = "(N, C, D, H, W)"
