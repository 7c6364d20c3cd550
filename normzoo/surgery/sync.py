"""Synchronized batch statistics for data-parallel training: :func:`convert_sync` and :func:`revert_sync`.

Under data parallelism every process normalizes its own share of the batch; with small per-process batches
the statistics get noisy and BatchNorm degrades. A synchronized layer reduces its batch statistics over a
process group instead, so that W processes with n samples each compute exactly what one process computes
on the W·n samples (see :func:`normzoo.functional.sync_batch_norm` and ``docs/distributed.md``).

:func:`convert_sync` synchronizes every batch-normalization layer of a model *in its own kind*:

- normzoo layers (BatchNorm, BatchRenorm, NoisyBatchNorm, and the surgery modules built on them) stay what
  they are, with ``sync=True`` and the group set: a BatchRenorm keeps its schedule step, bounds, weights,
  statistics and flags.
- torch's ``nn.BatchNorm1d/2d/3d`` become :class:`SyncedBatchNorm1d` / ``2d`` / ``3d``: subclasses of the
  same torch classes, obtained by switching the instance's class in place, so the object (its parameters,
  buffers, hooks and every attribute) is unchanged, ``isinstance(layer, nn.BatchNorm2d)`` still holds, and
  eval and single-process training run torch's own ``forward`` untouched. Unlike ``torch.nn.SyncBatchNorm``
  (whose ``forward`` raises on CPU tensors once ``torch.distributed`` is initialized), they synchronize on
  any backend: gloo on CPU as well as NCCL on GPU.
- Any other BatchNorm class with a synchronized counterpart in the registry (:func:`register_synced_class`)
  switches the same way. The timm integration registers timm's ``BatchNormAct2d`` (its synchronized class,
  in :mod:`normzoo.integrations.timm`, keeps ``drop`` and ``act``; torch's converter turns it into a plain
  ``SyncBatchNorm`` that silently skips its activation). That registration is by name and imports the
  integration the first time a model holding the timm class is converted, so the result never depends on
  what was imported before.
- Other subclasses of torch's ``_BatchNorm`` (their ``forward`` is their own, so no generic change can
  synchronize it) are left as they are, with a warning that names them; ``nn.SyncBatchNorm`` is left as it
  is (it synchronizes already, on CUDA).

:func:`revert_sync` undoes it. The ``state_dict`` never changes. :func:`all_reduce_stat_sums` sums
accumulated statistics over the processes in one collective, for population statistics under DDP.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .. import functional as NF
from ..layers import BatchNormBase
from ..layers._base import SyncMixin
from ._common import check_model, copy_model

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SyncedBatchNorm1d",
    "SyncedBatchNorm2d",
    "SyncedBatchNorm3d",
    "all_reduce_stat_sums",
    "convert_sync",
    "is_synced",
    "register_synced_class",
    "revert_sync",
    "synced_class",
]

M = TypeVar("M", bound=nn.Module)


class SyncedTorchBatchNorm(SyncMixin, _BatchNorm):
    """Base of torch BatchNorm classes that :func:`convert_sync` switches an instance to.

    ``forward`` is the torch class's own unless the statistics are synchronized (training, ``sync``,
    ``torch.distributed`` initialized, more than one process in the group): then the same bookkeeping
    (``num_batches_tracked``, cumulative ``momentum=None``) runs and the normalization is
    :func:`normzoo.functional.sync_batch_norm`, followed by :meth:`_after_norm`.
    """

    #: The torch (or timm) class that :func:`revert_sync` switches the instance back to.
    unsynced_class: ClassVar[type[nn.Module]]
    sync: bool = True

    def forward(self, input: Tensor) -> Tensor:
        if not self._sync_active():
            return super().forward(input)
        self._check_input_dim(input)
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels in "
                f"dimension 1, got input of shape {tuple(input.shape)}"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:  # training: _sync_active() says so
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        out = NF.sync_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, factor, self.eps, self.process_group
        )
        return self._after_norm(out)

    def _after_norm(self, output: Tensor) -> Tensor:
        """What the layer does after normalizing (nothing for torch's BatchNorm)."""
        return output

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sync_repr()


class SyncedBatchNorm1d(SyncedTorchBatchNorm, nn.BatchNorm1d):
    """A ``torch.nn.BatchNorm1d`` whose batch statistics :func:`convert_sync` synchronized.

    Example:
        >>> layer = convert_sync(nn.BatchNorm1d(3))
        >>> type(layer).__name__, isinstance(layer, nn.BatchNorm1d)
        ('SyncedBatchNorm1d', True)
    """

    unsynced_class = nn.BatchNorm1d


class SyncedBatchNorm2d(SyncedTorchBatchNorm, nn.BatchNorm2d):
    """A ``torch.nn.BatchNorm2d`` whose batch statistics :func:`convert_sync` synchronized."""

    unsynced_class = nn.BatchNorm2d


class SyncedBatchNorm3d(SyncedTorchBatchNorm, nn.BatchNorm3d):
    """A ``torch.nn.BatchNorm3d`` whose batch statistics :func:`convert_sync` synchronized."""

    unsynced_class = nn.BatchNorm3d


#: The synchronized class of each torch (or third-party) BatchNorm class, keyed by the class's qualified name;
#: a value is the class or, for an integration not imported yet, the ``"module:Class"`` path to import it from.
_SYNCED_CLASSES: dict[str, type[SyncedTorchBatchNorm] | str] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_synced_class(unsynced: type[nn.Module] | str, synced: type[SyncedTorchBatchNorm] | str) -> None:
    """Tell :func:`convert_sync` which synchronized class a BatchNorm class becomes.

    ``synced`` must subclass both :class:`SyncedTorchBatchNorm` and ``unsynced``, and name ``unsynced`` as its
    :attr:`~SyncedTorchBatchNorm.unsynced_class` (what :func:`revert_sync` switches back to). Either may be
    given as a path instead, so that an integration can register a package's class without importing that
    package: ``unsynced`` as the class's qualified name (``"timm.layers.norm_act.BatchNormAct2d"``) and
    ``synced`` as ``"module:Class"``, imported the first time :func:`convert_sync` meets an ``unsynced``
    (whose package is then imported already). Registering a class again replaces its entry.

    Example:
        >>> class MyBatchNorm(nn.BatchNorm1d):
        ...     pass
        >>> class SyncedMyBatchNorm(SyncedTorchBatchNorm, MyBatchNorm):
        ...     unsynced_class = MyBatchNorm
        >>> register_synced_class(MyBatchNorm, SyncedMyBatchNorm)
        >>> type(convert_sync(MyBatchNorm(3))).__name__
        'SyncedMyBatchNorm'
    """
    if isinstance(synced, type):
        _check_synced_class(synced, unsynced if isinstance(unsynced, type) else None)
    key = unsynced if isinstance(unsynced, str) else _qualified_name(unsynced)
    _SYNCED_CLASSES[key] = synced


def _check_synced_class(synced: type, unsynced: type | None) -> None:
    name = f"register_synced_class: {synced.__qualname__}"
    if not issubclass(synced, SyncedTorchBatchNorm):
        raise TypeError(f"{name}: expected a subclass of SyncedTorchBatchNorm, got bases {synced.__bases__}")
    if unsynced is not None and not (issubclass(synced, unsynced) and synced.unsynced_class is unsynced):
        raise TypeError(
            f"{name}: expected a subclass of {unsynced.__qualname__} with unsynced_class = "
            f"{unsynced.__qualname__}, got unsynced_class = {getattr(synced, 'unsynced_class', None)!r}"
        )


def synced_class(cls: type[nn.Module]) -> type[SyncedTorchBatchNorm] | None:
    """The synchronized class that :func:`convert_sync` switches an instance of exactly ``cls`` to, or ``None``.

    Example:
        >>> synced_class(nn.BatchNorm2d).__name__, synced_class(nn.LayerNorm)
        ('SyncedBatchNorm2d', None)
    """
    entry = _SYNCED_CLASSES.get(_qualified_name(cls))
    if entry is None:
        return None
    if isinstance(entry, str):  # a lazy registration: import the integration that defines the class
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
        assert isinstance(entry, type)
        _check_synced_class(entry, None)
        _SYNCED_CLASSES[_qualified_name(cls)] = entry
    # The same qualified name may belong to another class (a reloaded module, a local class): not ours.
    return entry if entry.unsynced_class is cls else None


for _torch_class, _synced in (
    (nn.BatchNorm1d, SyncedBatchNorm1d),
    (nn.BatchNorm2d, SyncedBatchNorm2d),
    (nn.BatchNorm3d, SyncedBatchNorm3d),
):
    register_synced_class(_torch_class, _synced)


def is_synced(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-normalization layer set to synchronize its statistics.

    Example:
        >>> from normzoo import BatchRenorm2d
        >>> is_synced(BatchRenorm2d(4)), is_synced(BatchRenorm2d(4, sync=True))
        (False, True)
    """
    return isinstance(module, SyncMixin) and bool(module.sync)


def convert_sync(model: M, process_group: ProcessGroup | None = None, *, inplace: bool = False) -> M:
    """Synchronize the batch statistics of every batch-normalization layer of ``model`` over a group.

    Each layer keeps its kind (see the module docstring): normzoo layers get ``sync=True`` and the group;
    torch's ``BatchNorm1d/2d/3d`` and timm's ``BatchNormAct2d`` switch in place to the synchronized subclass
    of their own class. Parameters, buffers, ``state_dict``, hooks, training flags and ``requires_grad`` are
    untouched. Synchronization happens only in training, with ``torch.distributed`` initialized and more
    than one process in the group; otherwise each layer computes exactly what it did before, so the model
    can be converted before the process group exists (as Lightning does).

    Args:
        model: the model (or a single layer).
        process_group: the group to reduce over; ``None`` for the default (world) group, resolved at each
            forward.
        inplace: change ``model`` itself; by default a deep copy is converted and returned.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Example:
        >>> from normzoo import BatchRenorm2d
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), BatchRenorm2d(8))
        >>> synced = convert_sync(model)
        >>> [type(m).__name__ for m in synced], is_synced(synced[2])
        (['Conv2d', 'SyncedBatchNorm2d', 'BatchRenorm2d'], True)
        >>> [type(m).__name__ for m in revert_sync(synced)]
        ['Conv2d', 'BatchNorm2d', 'BatchRenorm2d']
    """
    check_model(model, "convert_sync")
    model = copy_model(model, inplace, "convert_sync")
    skipped: list[str] = []
    lazy = False
    for name, module in model.named_modules(remove_duplicate=True):
        lazy = lazy or any(is_lazy(p) for p in module.parameters(recurse=False))
        if isinstance(module, BatchNormBase):
            module.sync = True
            module.process_group = process_group
        elif isinstance(module, SyncedTorchBatchNorm):
            module.process_group = process_group
        elif (synced := synced_class(type(module))) is not None:
            module.__class__ = synced
            assert isinstance(module, SyncedTorchBatchNorm)
            module.process_group = process_group
        elif isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            skipped.append(f"{name or '<model>'} ({type(module).__module__}.{type(module).__qualname__})")
    if skipped:
        warnings.warn(
            "convert_sync left these batch-normalization layers unsynchronized because their forward is "
            f"their own and cannot be synchronized generically: {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    if lazy:
        warnings.warn(
            "convert_sync: the model has uninitialized (lazy) parameters; normalization layers created at "
            "the first forward are not synchronized. Run a forward (or insert_bn with example_input) first.",
            UserWarning,
            stacklevel=2,
        )
    return model


def revert_sync(model: M, *, inplace: bool = False) -> M:
    """Undo :func:`convert_sync`: every layer stops synchronizing and torch/timm layers get their class back.

    normzoo layers keep their kind with ``sync=False`` and no group (also those built with ``sync=True``);
    :class:`SyncedBatchNorm2d` and friends switch back in place to the torch or timm class they came from.

    Args:
        model: the model (or a single layer).
        inplace: change ``model`` itself; by default a deep copy is reverted and returned.

    Example:
        >>> layer = revert_sync(convert_sync(nn.BatchNorm3d(2)))
        >>> type(layer) is nn.BatchNorm3d
        True
    """
    check_model(model, "revert_sync")
    model = copy_model(model, inplace, "revert_sync")
    for module in model.modules():
        if isinstance(module, BatchNormBase):
            module.sync = False
            module.process_group = None
        elif isinstance(module, SyncedTorchBatchNorm):
            module.__dict__.pop("_process_group_ref", None)
            module.__dict__.pop("sync", None)
            module.__class__ = module.unsynced_class  # type: ignore[assignment]
    return model


class _HasTensors(Protocol):
    def tensors(self) -> list[Tensor]: ...


def all_reduce_stat_sums(
    sums: Sequence[Tensor] | Mapping[str, _HasTensors], process_group: ProcessGroup | None = None
) -> None:
    """Sum accumulated statistics over the processes of ``process_group``, in place and in one collective.

    For statistics that every process accumulates on its own data and that all must combine identically:
    ``recompute_bn_stats`` under DDP passes the ``{layer name: BatchStatSums}`` of
    :func:`~normzoo.surgery.stats.collect_bn_stat_sums` (every object's ``tensors()``, in sorted name
    order), and any sequence of tensors works too. The tensors are flattened into one float64 buffer (exact
    for integer counts below 2⁵³, no float32 rounding of the sums), all-reduced once, and written back in
    their own dtypes. A no-op without an initialized ``torch.distributed`` or with a single process. Every
    process must pass the same names and shapes; the buffer lives on the first tensor's device (a CUDA
    device for NCCL).

    Example:
        >>> sums = [torch.tensor([1.0, 2.0]), torch.tensor(3)]
        >>> all_reduce_stat_sums(sums)  # no process group: nothing to combine
        >>> sums
        [tensor([1., 2.]), tensor(3)]
    """
    if isinstance(sums, Mapping):
        tensors = [t for name in sorted(sums) for t in sums[name].tensors()]
    else:
        tensors = list(sums)
    if not tensors or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size(process_group) <= 1:
        return
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))
            offset += n
