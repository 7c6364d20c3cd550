"""``replace_bn``: swap every BatchNorm-family layer for another kind, carrying weights and statistics."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layers import BatchNormBase, NormSpec, get_norm_layer, is_batch_norm, norm_family
from ._common import check_model, copy_model, hook_dict_names
from ._kinds import bn_act_parts
from ._modules import BatchNormAct2d, BatchRenormAct2d, LazyNorm, NoisyBatchNormAct2d

__all__ = ["replace_bn"]

#: The norm+activation class (timm's layout) of each family, for timm's BatchNormAct2d layers.
_ACT_CLASSES: dict[str, type[nn.Module]] = {
    "batchnorm": BatchNormAct2d,
    "renorm": BatchRenormAct2d,
    "noisy": NoisyBatchNormAct2d,
}

_CARRIED = ("eps", "momentum", "affine", "track_running_stats")


def _ndim(module: nn.Module, name: str) -> int:
    """1, 2 or 3: the spatial kind of a BatchNorm-family layer."""
    if isinstance(module, BatchNormBase):
        dims = type(module)._input_dims
        return 1 if 2 in dims else dims[0] - 2
    if isinstance(module, nn.modules.batchnorm._LazyNormBase) and module.has_uninitialized_params():
        raise ValueError(
            f"replace_bn: expected {name} ({type(module).__name__}) to be initialized, got uninitialized "
            "parameters; run a forward pass first"
        )
    for ndim, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(module, cls):
            return ndim
    return 2  # SyncBatchNorm and other dimension-agnostic layers: the common 2d case


def _accepted(factory: Callable[..., nn.Module]) -> set[str] | None:
    """The keyword arguments that ``factory`` accepts; ``None`` when it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _is_timm_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's norm+act layers (timm is imported once such a layer exists)."""
    timm_layers = sys.modules.get("timm.layers")
    timm_class = getattr(timm_layers, "BatchNormAct2d", None)
    return isinstance(timm_class, type) and isinstance(module, timm_class)


def _act_factory(
    factory: Callable[..., nn.Module], ndim: int, timm_layout: bool
) -> Callable[..., nn.Module] | None:
    """The norm+activation variant of ``factory`` (timm's layout), if there is one.

    With ``timm_layout`` (the layer replaced is timm's ``BatchNormAct2d``) the variant is also a timm
    ``BatchNormAct2d``, from :mod:`normzoo.integrations.timm`, so that timm's own tools (``freeze``,
    ``freeze_batch_norm_2d``) keep treating the layer as norm+act and do not drop its activation.
    """
    base = factory.func if isinstance(factory, functools.partial) else factory
    family = norm_family(base) if isinstance(base, type) else None
    if family is None or ndim != 2:
        return None
    if family == "torch":
        try:
            from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
        except ImportError:
            return None
        cls: type[nn.Module] = TimmBatchNormAct2d
    elif timm_layout:
        # Imported by name: the integration imports surgery, so a module-level import would be a cycle.
        integration = importlib.import_module("normzoo.integrations.timm")
        cls = {
            "batchnorm": integration.BatchNormAct2d,
            "renorm": integration.BatchRenormAct2d,
            "noisy": integration.NoisyBatchNormAct2d,
        }[family]
    else:
        cls = _ACT_CLASSES[family]
    if isinstance(factory, functools.partial):
        return functools.partial(cls, *factory.args, **factory.keywords)
    return cls


def _convert(old: Any, norm: NormSpec, name: str) -> nn.Module:
    ndim = _ndim(old, name)
    factory = get_norm_layer(norm, ndim)
    drop, act = bn_act_parts(old)
    with_act = act is not None or drop is not None
    act_factory = _act_factory(factory, ndim, _is_timm_norm_act(old)) if with_act else None
    accepted = _accepted(factory)  # the act variants take the arguments of their norm class
    reference = old.weight if isinstance(getattr(old, "weight", None), Tensor) else old.running_mean
    fixed = set(factory.keywords) if isinstance(factory, functools.partial) else set()  # the user's choice
    kwargs: dict[str, Any] = {}
    for key in _CARRIED:
        if hasattr(old, key) and key not in fixed and (accepted is None or key in accepted):
            kwargs[key] = getattr(old, key)
    if isinstance(reference, Tensor) and (accepted is None or {"device", "dtype"} <= accepted):
        kwargs.update(device=reference.device, dtype=reference.dtype)
    new = (act_factory or factory)(int(old.num_features), **kwargs)
    if getattr(old, "track_running_stats", True) is False and getattr(new, "running_mean", None) is not None:
        raise ValueError(
            f"replace_bn: expected a layer that {type(new).__name__} can stand for, got {name} "
            f"({type(old).__name__}) with track_running_stats=False (it normalizes with batch statistics in eval "
            f"too), which {type(new).__name__} cannot do: it always tracks running statistics, so eval outputs "
            "would change"
        )
    if getattr(old, "affine", False) and getattr(new, "weight", None) is None:
        raise ValueError(
            f"replace_bn: expected a kind with a learned weight and bias for {name} ({type(old).__name__}), "
            f"got {type(new).__name__}, which lacks them (affine=False)"
        )
    for key in ("eps", "momentum"):
        if hasattr(old, key) and hasattr(new, key) and key not in kwargs and key not in fixed:
            setattr(new, key, getattr(old, key))
    if isinstance(reference, Tensor):
        new.to(device=reference.device, dtype=reference.dtype)
    _carry_state(old, new)
    _carry_parametrizations(old, new, name)
    new.train(old.training)
    for key in hook_dict_names():  # the user's hook handles keep working on the new layer
        setattr(new, key, getattr(old, key))
    if not with_act:
        return new
    drop = drop if drop is not None else nn.Identity()
    act = act if act is not None else nn.Identity()
    if act_factory is not None:
        new.drop, new.act = drop, act
        return new
    wrapper = nn.Sequential(OrderedDict(bn=new, drop=drop, act=act))
    wrapper.training = old.training
    return wrapper


def _carry_state(old: nn.Module, new: Any) -> None:
    """Copy parameters and buffers that both have (same name and shape), with their ``requires_grad``."""
    old_state = {**dict(old.named_parameters(recurse=False)), **dict(old.named_buffers(recurse=False))}
    with torch.no_grad():
        for key, target in [*new.named_parameters(recurse=False), *new.named_buffers(recurse=False)]:
            value = old_state.get(key)
            if value is not None and value.shape == target.shape:
                target.copy_(value)
                if isinstance(target, nn.Parameter):
                    target.requires_grad_(value.requires_grad)
        if not getattr(old, "affine", True) and getattr(new, "weight", None) is not None:
            new.weight.fill_(1.0)  # an affine layer replacing a non-affine one: start as the identity map
            new.bias.zero_()


def _carry_parametrizations(old: nn.Module, new: nn.Module, name: str) -> None:
    """Register the parametrizations of ``old`` (the same modules) on ``new``, with ``old``'s original tensors."""
    if not parametrize.is_parametrized(old):
        return
    for tensor_name, parametrizations in old.get_submodule("parametrizations").named_children():
        if not isinstance(getattr(new, tensor_name, None), Tensor):
            raise ValueError(
                f"replace_bn: expected {type(new).__name__} to have the parametrized {tensor_name!r} of {name} "
                f"({type(old).__name__}), got none; remove the parametrization first"
            )
        for parametrization in parametrizations.children():
            parametrize.register_parametrization(new, tensor_name, parametrization, unsafe=True)
        carried = new.get_submodule(f"parametrizations.{tensor_name}")
        carried.load_state_dict(parametrizations.state_dict())
        for key, tensor in parametrizations.named_parameters(recurse=False):
            carried.get_parameter(key).requires_grad_(tensor.requires_grad)


def replace_bn(model: nn.Module, norm: NormSpec = "renorm", *, inplace: bool = False) -> nn.Module:
    """Swap every BatchNorm-family layer for the ``norm`` kind, keeping what it learned.

    Each layer is rebuilt at its dimension (``get_norm_layer(norm, ndim)``) with the same ``num_features``,
    ``eps``, ``momentum`` and ``affine`` (except those that a ``functools.partial`` given as ``norm`` sets:
    ``partial(BatchRenorm2d, momentum=0.01)`` means that momentum); its weight, bias, running statistics and ``num_batches_tracked`` are
    copied, as are the device, dtype, training flag, ``requires_grad`` and the hooks registered on it. Eval
    outputs therefore do not change; training outputs do not change either when the new kind computes
    BatchNorm in training (``"batchnorm"``, ``"torch"``, ``"renorm"`` during its warm-up). timm's
    ``BatchNormAct2d`` keeps its ``drop`` and ``act``: it becomes ``BatchRenormAct2d`` (and so on), with
    timm's ``state_dict`` layout, or a ``Sequential(bn, drop, act)`` for a norm that has no such variant.

    ``num_batches_tracked`` is carried: a well-trained BatchNorm that becomes ``BatchRenorm`` with the paper's
    schedule is past the warm-up at once (its running statistics are trustworthy, which is what the warm-up
    waits for).

    Args:
        model: any module.
        norm: ``"batchnorm"``, ``"renorm"``, ``"noisy"``, ``"torch"``, a class or a factory.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The model with the new layers (a BatchNorm ``model`` itself gives the new layer).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``norm`` is unknown, or a layer's settings cannot be kept (``track_running_stats=False``
            into BatchRenorm, an affine layer into a non-affine kind).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> renormed = replace_bn(net, "renorm")
        >>> renormed[1]
        BatchRenorm2d(4, eps=1e-05, momentum=0.1, affine=True, r_max=3.0, d_max=5.0, schedule='paper')
        >>> torch.equal(renormed(x), net(x))
        True
    """
    check_model(model, "replace_bn")
    get_norm_layer(norm, 2)  # an unknown name fails here, listing the valid ones
    model = copy_model(model, inplace, "replace_bn")
    if is_batch_norm(model):
        return _convert(model, norm, type(model).__name__)
    memo: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, LazyNorm):
            module.spec = norm  # a pending layer from insert_bn: it will be built as the new kind
    _replace_children(model, norm, memo, "")
    return model


def _replace_children(parent: nn.Module, norm: NormSpec, memo: dict[int, nn.Module], prefix: str) -> None:
    for key, child in list(parent._modules.items()):
        if child is None:
            continue
        name = f"{prefix}{key}"
        if id(child) in memo:
            setattr(parent, key, memo[id(child)])
        elif is_batch_norm(child):
            memo[id(child)] = _convert(child, norm, name)
            setattr(parent, key, memo[id(child)])
        else:
            _replace_children(child, norm, memo, f"{name}.")
