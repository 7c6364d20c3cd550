"""torch's ``SyncBatchNorm.convert_sync_batchnorm``, made to keep normzoo's layers what they are.

torch's converter replaces every ``_BatchNorm`` in a model by a ``torch.nn.SyncBatchNorm`` built from the
layer's arguments. normzoo's layers are ``_BatchNorm`` subclasses, so a BatchRenorm or a NoisyBatchNorm would
silently become plain (synchronized) BatchNorm, losing its own computation; torch offers no hook to prevent
it, and Lightning's ``Trainer(sync_batchnorm=True)`` calls the same converter (its ``TorchSyncBatchNorm``
plugin). :func:`install` therefore wraps the converter once, when normzoo is imported:

- a normzoo layer is synchronized *in its own kind* by :func:`normzoo.convert_sync`: the same object, with
  ``sync=True`` and the process group set, its weights, statistics and BatchRenorm schedule untouched;
- every other module goes to torch's converter unchanged (torch's and timm's layers still become
  ``torch.nn.SyncBatchNorm``, exactly as without normzoo).

torch's converter recurses through ``cls.convert_sync_batchnorm``, so normzoo layers are reached anywhere in
a model. The wrapper keeps torch's name, docstring and signature, and torch's own function stays available as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm.__wrapped__``. See ``docs/ecosystem.md``.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ..layers import BatchNormBase
from ..surgery.sync import convert_sync

__all__ = ["install", "is_installed"]

#: Marks the wrapper, so that installing twice (a reloaded normzoo) does not wrap it again.
_MARK = "_normzoo_keeps_kind"


def is_installed() -> bool:
    """Whether ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` is normzoo's wrapper.

    Example:
        >>> import normzoo
        >>> is_installed()
        True
    """
    return bool(getattr(nn.SyncBatchNorm.convert_sync_batchnorm, _MARK, False))


def install() -> None:
    """Wrap ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` so that it keeps normzoo layers' kind (once).

    Example:
        >>> import torch, normzoo as nz
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), nz.BatchRenorm2d(4))
        >>> model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> [type(m).__name__ for m in model], model[1].sync
        (['SyncBatchNorm', 'BatchRenorm2d'], True)
    """
    if is_installed():
        return
    torch_converter = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"].__func__

    @functools.wraps(torch_converter)
    def convert_sync_batchnorm(
        cls: type[nn.SyncBatchNorm], module: nn.Module, process_group: Any = None
    ) -> Any:
        if isinstance(module, BatchNormBase):
            return convert_sync(module, process_group, inplace=True)
        return torch_converter(cls, module, process_group)

    setattr(convert_sync_batchnorm, _MARK, True)
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)  # type: ignore[method-assign,assignment]
