"""normzoo in timm: every normzoo kind as the ``norm_layer`` of timm's models, and timm's norm+act under DDP.

Needs timm. timm builds a model's normalization from its ``norm_layer`` argument in one of two ways: families
such as ResNet call it (``norm_layer(num_features)``), so any normzoo 2d class works there as it is; the
norm+act families (EfficientNet, MobileNetV3, RegNet, DenseNet, DPN, ByobNet, ...) first turn it into a
normalization+activation layer with ``timm.layers.get_norm_act_layer``, which knows only timm's own classes
("No equivalent norm_act layer for batchrenorm2d"). Importing this module:

- defines :class:`BatchNormAct2d`, :class:`BatchRenormAct2d` and :class:`NoisyBatchNormAct2d`: normzoo's
  layers followed by ``drop`` and ``act``, with timm's ``BatchNormAct2d`` constructor and ``state_dict``
  layout (timm's pretrained weights load), and enters them in timm's norm+act tables, so that each one is a
  ``norm_layer`` for *every* timm family::

      from normzoo.integrations.timm import BatchRenormAct2d
      model = timm.create_model("efficientnet_b0", norm_layer=BatchRenormAct2d)
      model = timm.create_model("resnet18", norm_layer=BatchRenormAct2d)  # no activation: act_layer=None
      model = timm.create_model("efficientnet_b0", norm_layer=functools.partial(BatchRenormAct2d, r_max=2.0))

  It also maps the names of ``normzoo.BatchRenorm2d`` and ``normzoo.NoisyBatchNorm2d`` (timm looks a plain
  norm class up by its lowercased name), so those two work as ``norm_layer`` of the norm+act families too.
  ``normzoo.BatchNorm2d`` cannot be mapped: its name is torch's, which timm maps to its own layer; pass
  :class:`BatchNormAct2d` for normzoo's BatchNorm;
- registers every normzoo layer and these classes as leaves of timm's fx feature extraction, as timm does for
  its own ``BatchNormAct2d``; the three classes are also ``timm.layers.BatchNormAct2d`` instances, so timm's
  ``freeze_batch_norm_2d`` keeps their activation (eval is BatchNorm's for every kind, so freezing is right);
- wraps timm's ``convert_sync_batchnorm`` (timm's ``train.py --sync-bn``) as normzoo wraps torch's: normzoo
  layers keep their kind, everything else is converted by timm as before;
- defines :class:`SyncedBatchNormAct2d`, the form :func:`normzoo.convert_sync` gives timm's
  ``BatchNormAct2d`` (``normzoo.integrations`` registers it by name, so this module is imported on demand).

Models without a ``norm_layer`` argument (DLA, HRNet, GhostNet, ...) hard-code ``nn.BatchNorm2d``: convert
them with ``normzoo.replace_bn(model, "renorm")``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import timm
import timm.layers
from timm.layers import create_act_layer, register_notrace_module
from timm.layers import create_norm_act as _timm_norm_act
from timm.layers import norm_act as timm_norm_act
from timm.layers.norm_act import BatchNormAct2d as TimmBatchNormAct2d
from torch import Tensor, nn

from .. import layers
from ..surgery import _modules
from ..surgery._kinds import after_norm
from ..surgery.sync import SyncedTorchBatchNorm, convert_sync

__all__ = ["BatchNormAct2d", "BatchRenormAct2d", "NoisyBatchNormAct2d", "SyncedBatchNormAct2d"]


class _TimmConstructor(nn.Module):
    """timm's ``BatchNormAct2d`` arguments for a normzoo norm+act layer; the family's own go by keyword.

    Unlike timm's, ``act_layer`` defaults to ``None`` (no activation), so that a family which calls its
    ``norm_layer`` directly (ResNet) gets a plain normalization; the norm+act families always pass theirs.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = None,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            **kwargs,
        )
        if drop_layer is not None:
            self.drop = drop_layer()
        act = create_act_layer(act_layer, inplace=inplace, **(act_kwargs or {})) if apply_act else None
        if act is not None:
            self.act = act


class _TimmNormActBase(TimmBatchNormAct2d):
    """Makes ``isinstance(layer, timm.layers.BatchNormAct2d)`` hold, so that timm's own tools treat normzoo's
    norm+act layers as norm+act (``freeze_batch_norm_2d`` keeps their ``drop`` and ``act``); construction
    and ``forward`` stay normzoo's, which come first in the method resolution order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.BatchNorm2d.__init__(self, *args, **kwargs)  # timm's __init__ would build its own drop and act


class BatchNormAct2d(_TimmConstructor, _modules.BatchNormAct2d, _TimmNormActBase):
    """normzoo's :class:`~normzoo.BatchNorm2d`, then ``drop`` and ``act``, built as timm's ``BatchNormAct2d``.

    Example:
        >>> import torch
        >>> layer = BatchNormAct2d(4, act_layer="relu")
        >>> bool((layer(torch.randn(2, 4, 3, 3)) >= 0).all()), isinstance(layer, torch.nn.BatchNorm2d)
        (True, True)
    """


class BatchRenormAct2d(_TimmConstructor, _modules.BatchRenormAct2d, _TimmNormActBase):
    """:class:`~normzoo.BatchRenorm2d`, then ``drop`` and ``act``, built as timm's ``BatchNormAct2d``.

    Example:
        >>> import timm
        >>> model = timm.create_model("tinynet_e", norm_layer=BatchRenormAct2d)  # an EfficientNet
        >>> type(model.bn1).__name__, type(model.bn1.act).__name__
        ('BatchRenormAct2d', 'SiLU')
    """


class NoisyBatchNormAct2d(_TimmConstructor, _modules.NoisyBatchNormAct2d, _TimmNormActBase):
    """:class:`~normzoo.NoisyBatchNorm2d`, then ``drop`` and ``act``, built as timm's ``BatchNormAct2d``."""


class SyncedBatchNormAct2d(SyncedTorchBatchNorm, TimmBatchNormAct2d):
    """timm's ``BatchNormAct2d`` whose batch statistics :func:`normzoo.convert_sync` synchronized.

    Normalizes, then applies ``drop`` and ``act``; timm's own ``forward`` runs whenever nothing is
    synchronized (eval, one process).
    """

    unsynced_class = TimmBatchNormAct2d

    def _after_norm(self, output: Tensor) -> Tensor:
        return after_norm(self, output)


NORM_ACT_LAYERS: tuple[type[nn.Module], ...] = (BatchNormAct2d, BatchRenormAct2d, NoisyBatchNormAct2d)

#: timm's lookup key (the lowercased class name) of each plain normzoo class it can be given, and the
#: norm+act class it stands for; ``batchnorm2d`` is torch's name, which timm keeps for its own layer.
_NORM_NAMES = {
    layers.BatchRenorm2d.__name__.lower(): BatchRenormAct2d,
    layers.NoisyBatchNorm2d.__name__.lower(): NoisyBatchNormAct2d,
}


def _keep_kind_in_timm_converter() -> None:
    """Wrap timm's ``convert_sync_batchnorm`` (what timm's ``train.py --sync-bn`` calls) as torch's is wrapped.

    timm's converter turns every ``_BatchNorm`` into ``torch.nn.SyncBatchNorm`` (or its ``SyncBatchNormAct``):
    a BatchRenorm or NoisyBatchNorm would silently become plain BatchNorm. It recurses through the module's
    global name, so replacing that name reaches every layer below the model, however the caller imported it.
    """
    timm_converter = timm_norm_act.convert_sync_batchnorm
    if getattr(timm_converter, "_normzoo_keeps_kind", False):
        return

    @functools.wraps(timm_converter)
    def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
        if isinstance(module, layers.BatchNormBase):
            return convert_sync(module, process_group, inplace=True)
        return timm_converter(module, process_group)

    convert_sync_batchnorm._normzoo_keeps_kind = True  # type: ignore[attr-defined]
    timm_norm_act.convert_sync_batchnorm = convert_sync_batchnorm
    timm.layers.convert_sync_batchnorm = convert_sync_batchnorm


def _register_with_timm() -> None:
    tables = ("_NORM_ACT_TYPES", "_NORM_ACT_REQUIRES_ARG", "_NORM_TO_NORM_ACT_MAP")
    if not all(hasattr(_timm_norm_act, table) for table in tables):
        warnings.warn(
            f"normzoo.integrations.timm: timm {timm.__version__} has no {', '.join(tables)} in "
            "timm.layers.create_norm_act, so its norm+act models cannot be given normzoo's classes as "
            "norm_layer; build them with timm's layers and convert with normzoo.replace_bn(model, 'renorm')",
            UserWarning,
            stacklevel=3,
        )
    else:
        _timm_norm_act._NORM_ACT_TYPES.update(NORM_ACT_LAYERS)
        _timm_norm_act._NORM_ACT_REQUIRES_ARG.update(NORM_ACT_LAYERS)  # timm passes the model's act_layer
        _timm_norm_act._NORM_TO_NORM_ACT_MAP.update(_NORM_NAMES)
    for family in layers.NORM_FAMILIES.values():
        for cls in family:
            register_notrace_module(cls)
    for cls in NORM_ACT_LAYERS:
        register_notrace_module(cls)
    _keep_kind_in_timm_converter()


_register_with_timm()
