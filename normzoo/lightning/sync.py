"""NormSync: Lightning's layer-synchronization plugin for normzoo, torch and timm batch-normalization layers.

``Trainer(sync_batchnorm=True)`` makes Lightning use its ``TorchSyncBatchNorm`` plugin, which calls
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Since normzoo wraps that converter when imported (see
:mod:`normzoo.integrations.sync_batchnorm`), normzoo's layers keep their kind there too; but torch's and
timm's layers become ``torch.nn.SyncBatchNorm``, which raises on CPU tensors in training (so DDP on CPU with
gloo fails) and, for timm's ``BatchNormAct2d``, silently skips the ``drop`` and ``act`` it still holds; and
Lightning's ``revert`` leaves normzoo's layers synchronized. :class:`NormSync` applies
:func:`normzoo.surgery.sync.convert_sync` instead, which synchronizes all of them in their own kind, on any
backend, and reverts with :func:`normzoo.surgery.sync.revert_sync` when fitting ends.

Use ``Trainer(strategy="ddp", plugins=[NormSync()])``. ``NormSync`` subclasses ``TorchSyncBatchNorm`` so
that a configuration that also sets ``sync_batchnorm=True`` is accepted (Lightning refuses any other
``LayerSync`` next to that flag) and ``NormSync`` is the plugin that runs.

Example:
    >>> import torch
    >>> from normzoo import BatchRenorm2d
    >>> sync = NormSync()
    >>> model = sync.apply(torch.nn.Sequential(torch.nn.BatchNorm2d(4), BatchRenorm2d(4)))
    >>> [type(m).__name__ for m in model], model[1].sync
    (['SyncedBatchNorm2d', 'BatchRenorm2d'], True)
    >>> [type(m).__name__ for m in sync.revert(model)], model[1].sync
    (['BatchNorm2d', 'BatchRenorm2d'], False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._imports import require_lightning

require_lightning("normzoo.lightning.sync")

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm  # noqa: E402
from torch.nn import Module  # noqa: E402

from ..surgery.sync import convert_sync, revert_sync  # noqa: E402

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["NormSync"]


class NormSync(TorchSyncBatchNorm):
    """Synchronize every batch-normalization layer of the model under DDP, keeping each layer's kind.

    Lightning's DDP and FSDP strategies call :meth:`apply` on the LightningModule in every process before
    wrapping it (when fitting), and :meth:`revert` at teardown. Both work in place, as Lightning expects.

    Args:
        process_group: the group to reduce over; ``None`` for the default (world) group.
    """

    def __init__(self, process_group: ProcessGroup | None = None) -> None:
        self.process_group = process_group

    def apply(self, model: Module) -> Module:
        """Synchronize the model's batch-normalization layers (see :func:`~normzoo.surgery.sync.convert_sync`)."""
        return convert_sync(model, self.process_group, inplace=True)

    def revert(self, model: Module) -> Module:
        """Undo :meth:`apply` (see :func:`~normzoo.surgery.sync.revert_sync`)."""
        return revert_sync(model, inplace=True)

    def __repr__(self) -> str:
        group = "default" if self.process_group is None else "custom"
        return f"{type(self).__name__}(process_group={group})"
