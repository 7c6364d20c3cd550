"""The shared base of normzoo's batch-normalization family.

Every normzoo layer is a torch BatchNorm: :class:`NormBase` is torch's ``_BatchNorm`` (parameters,
buffers, ``reset_*`` and the versioned ``_load_from_state_dict``, all torch's, so checkpoints move between
the two) with normzoo's argument checks and ``extra_repr``; :class:`BatchNormBase` adds normzoo's forward:
the training-mode bookkeeping (``num_batches_tracked``, cumulative ``momentum=None``), input checks that
name the layer and raise torch's exception types, and synchronization (:class:`SyncMixin`: ``sync``,
``process_group``, see ``docs/distributed.md``). A family implements :meth:`BatchNormBase._normalize`; a
concrete class mixes in a dimension (``Input1d``/``Input2d``/``Input3d``) and torch's ``BatchNorm{k}d``,
e.g. ``class BatchRenorm2d(Input2d, _BatchRenorm, nn.BatchNorm2d)``, so that
``isinstance(layer, nn.BatchNorm2d)`` holds while normzoo's ``forward`` comes first in the MRO.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.fx import Proxy, Tracer
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import functional as NF

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: Input dtypes that a float32 layer normalizes in mixed precision (torch's kernels accept them, autocast
#: produces them); any other dtype that differs from the layer's is a mistake.
_MIXED_PRECISION_INPUTS = (torch.float16, torch.bfloat16)

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


class NormBase(_TorchBatchNorm):
    """torch's ``_BatchNorm`` (parameters, buffers, ``reset_*``, versioned ``_load_from_state_dict``) with
    normzoo's argument checks and ``extra_repr``.

    The constructor is torch's, in torch's order: ``num_features, eps, momentum, affine,
    track_running_stats, device, dtype, *, bias`` (``bias=False``: a weight without a bias). Any integer-like
    ``num_features`` is accepted (``operator.index``); ``eps`` and ``momentum`` are checked where torch checks
    them, in ``forward`` (see :meth:`BatchNormBase._check_arguments`), so that a layer built with ``eps=0``
    evaluates like torch's.
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
    ) -> None:
        super().__init__(
            _channel_count(type(self).__name__, num_features),
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
        )

    def extra_repr(self) -> str:
        bias = ", bias=False" if self.affine and self.bias is None else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}{bias}, "
            f"track_running_stats={self.track_running_stats}"
        )


def _channel_count(name: str, num_features: Any) -> int:
    """``num_features`` as an ``int`` (numpy integers and other ``__index__`` types too), at least 0."""
    if isinstance(num_features, bool):
        raise TypeError(f"{name}: expected num_features to be an int, got {num_features!r}")
    try:
        count = operator.index(num_features)
    except TypeError:
        raise TypeError(
            f"{name}: expected num_features to be an int, got {type(num_features).__name__} {num_features!r}"
        ) from None
    if count < 0:
        raise ValueError(f"{name}: expected num_features >= 0, got {count}")
    return count


class BatchNormBase(SyncMixin, NormBase):
    """Training bookkeeping, input checks and synchronization shared by every normzoo BatchNorm-family layer.

    Subclasses implement :meth:`_normalize` (the family) and mix in an ``Input{k}d`` class (the dimension)
    together with torch's ``BatchNorm{k}d``, so that every layer is a torch BatchNorm of its dimension.
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
        bias: bool = True,
        sync: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.sync = bool(sync) or process_group is not None
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        # torch's hook for the dimension check (ValueError, as torch's), with the expected shapes named.
        if input.dim() not in self._input_dims:
            raise ValueError(
                f"{type(self).__name__} expected a {'D or '.join(map(str, self._input_dims))}D input of shape "
                f"{self._input_shapes}, got {input.dim()}D input of shape {tuple(input.shape)}"
            )

    def _check_arguments(self) -> None:
        """``eps`` and ``momentum`` checked where torch checks ``eps``: at the forward that would use them.

        torch accepts ``eps=0`` in eval and rejects it in training (ValueError); a non-finite ``eps`` or
        ``momentum`` (which torch turns into NaN outputs or statistics without a word) is rejected too.
        """
        name = type(self).__name__
        eps = self.eps
        if self._uses_batch_stats():
            if not (0.0 < eps < math.inf):
                raise ValueError(f"{name}: eps must be positive and finite in training, got {eps}")
        elif not (0.0 <= eps < math.inf):
            raise ValueError(f"{name}: eps must be non-negative and finite, got {eps}")
        momentum = self.momentum
        if (
            self.training
            and self.track_running_stats
            and momentum is not None
            and not (0.0 <= momentum <= 1.0)
        ):
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum}")

    def _check_input(self, input: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name} expected a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        self._check_arguments()
        # The exception types are torch's for the same input: RuntimeError for a channel count or a device
        # that does not match the layer's tensors, NotImplementedError for a non-floating-point input.
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"{name}({self.num_features}) expected {self.num_features} channels in dimension 1, "
                f"got input of shape {tuple(input.shape)} with {input.shape[1]}"
            )
        if not input.is_floating_point():
            raise NotImplementedError(f"{name} expected a floating-point input, got dtype {input.dtype}")
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
        if reference is not None:
            if reference.device != input.device:
                raise RuntimeError(
                    f"{name} has its parameters and buffers on {reference.device} but got input on "
                    f"{input.device}; move one of them with .to()"
                )
            if input.dtype != reference.dtype and not (
                input.dtype in _MIXED_PRECISION_INPUTS and reference.dtype == torch.float32
            ):
                raise RuntimeError(
                    f"{name} has its parameters and buffers in {reference.dtype} but got input in "
                    f"{input.dtype}; cast one of them (e.g. layer.to({input.dtype}) or input.to("
                    f"{reference.dtype})), or run under torch.autocast for mixed precision"
                )

    def _average_factor(self) -> float:
        """Counts this training step and returns the weight of its statistics in the running ones."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as torch
            if torch.jit.is_tracing():
                warnings.warn(
                    f"{type(self).__name__}: torch.jit.trace records momentum=None's cumulative-average "
                    "factor 1/num_batches_tracked as a constant of the traced step (torch's BatchNorm does the "
                    "same), so the traced module's running statistics are wrong at every other step; give "
                    "the layer a float momentum, or use torch.compile or torch.export",
                    stacklevel=2,
                )
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
        if isinstance(input, Proxy):
            return self._fx_leaf(input)
        self._check_input(input)
        return self._normalize(input)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling it.
        raise RuntimeError(
            f"{type(self).__name__}: torch.jit.script is not supported (TorchScript is deprecated in torch, and "
            "cannot express this layer's schedule, noise or synchronization); use torch.compile or "
            "torch.export, or torch.jit.trace. To script a model for inference, swap the layers for torch's "
            "first: normzoo.replace_bn(model, 'torch') keeps the eval outputs."
        )

    def _fx_leaf(self, input: Proxy) -> Proxy:
        """Under ``torch.fx`` symbolic tracing, record this layer as one ``call_module`` node (a leaf).

        fx treats torch's own modules as leaves (by their ``__module__``) and traces through any other;
        tracing through this ``forward`` would run its step counting and schedule once, at trace time, and
        bake the result into the graph. As a leaf, the traced ``GraphModule`` calls the layer itself, so it
        computes and updates exactly what the layer does, for every fx tracer.
        """
        tracer = input.tracer
        if not isinstance(tracer, Tracer):
            raise RuntimeError(
                f"{type(self).__name__}: traced by {type(tracer).__name__}, which is not a torch.fx.Tracer; "
                "normzoo layers are recorded as call_module leaves by torch.fx.Tracer and its subclasses"
            )
        path = tracer.path_of_module(self)
        if not path:
            raise RuntimeError(
                f"{type(self).__name__}: torch.fx cannot trace a normzoo layer as the root module (its "
                "forward updates state and is recorded as one call); trace a model that contains it, "
                "e.g. torch.fx.symbolic_trace(torch.nn.Sequential(layer))"
            )
        return tracer.create_proxy("call_module", path, (input,), {})

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
