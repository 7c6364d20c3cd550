"""``remove_bn``: every BatchNorm-family layer becomes an identity, giving the vanilla baseline of a model."""

from __future__ import annotations

from torch import nn

from ..layers import is_batch_norm
from ._common import check_model, copy_model
from ._forward import undo_rewrite
from ._kinds import is_surgery_bn, without_act
from ._modules import NormAct
from .freeze import FrozenBatchNorm

__all__ = ["removal_replacement", "remove_bn"]


def removal_replacement(module: nn.Module) -> nn.Module | None:
    """What a BatchNorm-family module becomes without its normalization, or ``None`` for other modules.

    A plain BN layer becomes ``nn.Identity``; a norm+activation layer (timm's ``BatchNormAct2d``, normzoo's
    ``BatchRenormAct2d``, ...) its activation (with its ``drop`` in front when that is not an identity); a
    :class:`~normzoo.surgery.NormAct` from ``insert_bn`` the activation it wrapped.
    """
    if isinstance(module, NormAct):
        if not is_surgery_bn(module):
            return None
        replacement = module.act if module.act is not None else nn.Identity()
    elif is_batch_norm(module) or isinstance(module, FrozenBatchNorm):
        replacement = without_act(module)
    else:
        return None
    if replacement is not module._modules.get("act"):  # a new Identity or Sequential: the module's own mode
        replacement.training = module.training
    return replacement


def remove_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every BatchNorm-family layer by an identity: the same network without normalization.

    Covers torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, normzoo's layers, timm's ``BatchNormAct2d``
    (which becomes its activation, with its ``drop`` when that is not an identity) and the
    :class:`~normzoo.surgery.NormAct` layers of :func:`~normzoo.insert_bn`, which give back the activation
    they wrapped; a forward that ``insert_bn`` rewrote gets its original back once all its new layers are
    gone. ``remove_bn(insert_bn(model, remove_bias=False))`` is thus ``model`` again, module for module.
    Other normalizations (LayerNorm, GroupNorm, timm's ``FrozenBatchNorm2d``) are kept.

    Args:
        model: any module.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The model without BatchNorm; a BatchNorm ``model`` itself gives ``nn.Identity()``.

    Raises:
        TypeError: ``model`` is not a module.

    Example:
        >>> from torch import nn
        >>> remove_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
    """
    check_model(model, "remove_bn")
    model = copy_model(model, inplace, "remove_bn")
    root = removal_replacement(model)
    if root is not None:
        return root
    memo: dict[int, nn.Module | None] = {}
    _remove_children(model, memo)
    for module in model.modules():
        undo_rewrite(module)
    return model


def _remove_children(parent: nn.Module, memo: dict[int, nn.Module | None]) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if id(child) not in memo:
            memo[id(child)] = removal_replacement(child)
            if memo[id(child)] is None:
                _remove_children(child, memo)
        replacement = memo[id(child)]
        if replacement is not None:
            setattr(parent, name, replacement)
