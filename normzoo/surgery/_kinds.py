"""What a module is to surgery: a normalization, a BatchNorm-family layer, a norm+activation, a producer."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..layers import is_batch_norm
from ._modules import LazyNorm, NormAct

__all__ = [
    "after_norm",
    "bn_act_parts",
    "has_act",
    "is_norm_module",
    "is_norm_output",
    "is_surgery_bn",
    "producer_layout",
    "without_act",
]


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def has_act(module: nn.Module) -> bool:
    """Whether a normalization module applies an activation after normalizing (timm's ``BatchNormAct2d``, ours)."""
    act = getattr(module, "act", None)
    return isinstance(act, nn.Module) and not isinstance(act, nn.Identity)


def bn_act_parts(module: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The ``(drop, act)`` children of a normalization+activation module such as timm's ``BatchNormAct2d``."""
    drop = module._modules.get("drop")
    act = module._modules.get("act")
    return drop, act


def after_norm(module: nn.Module, output: Tensor) -> Tensor:
    """``act(drop(output))`` with the ``drop`` and ``act`` that a norm+activation module has (none: ``output``)."""
    drop, act = bn_act_parts(module)
    if drop is not None:
        output = drop(output)
    return act(output) if act is not None else output


def without_act(module: nn.Module) -> nn.Module:
    """What remains of a norm+act module when its normalization is dropped: its drop and act, or Identity."""
    drop, act = bn_act_parts(module)
    has_drop = drop is not None and not isinstance(drop, nn.Identity)
    if not has_drop:
        return act if act is not None else nn.Identity()
    assert drop is not None
    parts: OrderedDict[str, nn.Module] = OrderedDict(drop=drop)
    if act is not None:
        parts["act"] = act
    return nn.Sequential(parts)


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` normalizes: BatchNorm family (any), LayerNorm, GroupNorm, InstanceNorm, timm's norms."""
    if is_batch_norm(module) or isinstance(module, (*_NORM_TYPES, NormAct, LazyNorm)):
        return True
    return (
        type(module).__module__.rpartition(".")[2] in ("norm", "norm_act") and "Norm" in type(module).__name__
    )


def is_norm_output(module: nn.Module) -> bool:
    """Whether the output of ``module`` is a normalized tensor (a norm without an activation after it)."""
    if isinstance(module, NormAct):
        return module.act is None
    return is_norm_module(module) and not has_act(module)


def is_surgery_bn(module: nn.Module) -> bool:
    """A BatchNorm-family layer, or a :class:`NormAct` whose (possibly pending) norm is one."""
    if is_batch_norm(module):
        return True
    if isinstance(module, NormAct):
        norm = module.norm
        return is_batch_norm(norm) or (isinstance(norm, LazyNorm) and norm.is_batch_norm)
    return False


def producer_layout(module: nn.Module) -> tuple[str, int, int] | None:
    """``(layout, features, ndim)`` of what a producer module outputs, or ``None`` for other modules.

    ``layout`` is ``"first"`` for convolutions (channels in dimension 1, ``ndim`` spatial dimensions) and
    ``"last"`` for Linear, Bilinear and Embedding (features in the last dimension).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return "first", int(module.out_channels), len(module.kernel_size)
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return "last", int(module.out_features), 1
    if isinstance(module, nn.Embedding):
        return "last", int(module.embedding_dim), 1
    return None
