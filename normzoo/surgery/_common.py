"""Helpers shared by the surgery functions: argument checks, copies, module lookup and classification."""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..layers import is_batch_norm
from ._modules import LazyNorm, NormAct

__all__ = [
    "PRODUCER_TYPES",
    "after_norm",
    "bn_act_parts",
    "check_model",
    "copy_model",
    "first_tensor",
    "has_act",
    "hook_dict_names",
    "is_norm_module",
    "is_norm_output",
    "is_surgery_bn",
    "module_names",
    "producer_layout",
    "set_submodule",
    "without_act",
]

M = TypeVar("M", bound=nn.Module)

#: Modules whose output channels are known from their attributes: the "producers" that feed activations.
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding)

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

#: The attributes of ``nn.Module`` that hold hooks run around ``forward`` and ``backward``.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_dict_names() -> tuple[str, ...]:
    """The names of the hook dictionaries that this torch's ``nn.Module`` has."""
    probe = nn.Module()
    return tuple(name for name in _HOOK_DICTS if hasattr(probe, name))


def _imported_class(module_name: str, name: str) -> type | None:
    """A class of a module that is already imported, or ``None``: an instance of it exists only if it is.

    Looked up rather than imported because importing ``torch._dynamo`` or FSDP costs seconds.
    """
    cls = getattr(sys.modules.get(module_name), name, None)
    return cls if isinstance(cls, type) else None


def _wrapper_advice(module: nn.Module) -> str | None:
    """What to pass instead of ``module`` when surgery cannot change it correctly, else ``None``."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return (
            "surgery on the wrapper would change one replica or none; pass the wrapped model (model.module) "
            "and wrap the result again"
        )
    if isinstance(module, torch.jit.ScriptModule):
        return (
            "TorchScript code does not see Python changes; apply surgery to the eager module before "
            "torch.jit.script or torch.jit.trace"
        )
    optimized = _imported_class("torch._dynamo.eval_frame", "OptimizedModule")
    if optimized is not None and isinstance(module, optimized):
        return (
            "the compiled code does not see the changes; pass the original module (compiled._orig_mod) and "
            "torch.compile the result again"
        )
    for name in ("FullyShardedDataParallel", "FSDPModule"):
        fsdp = _imported_class("torch.distributed.fsdp", name)
        if fsdp is not None and isinstance(module, fsdp):
            return "its parameters are sharded; apply surgery to the model before FSDP wraps it"
    return None


def check_model(model: Any, fname: str) -> None:
    """Raise ``TypeError`` unless ``model`` is a plain ``nn.Module`` that surgery can change correctly.

    Refused, anywhere in the model, with what to pass instead: DDP and DataParallel wrappers, FSDP (1 and 2),
    TorchScript modules (scripted or traced) and ``torch.compile``'s ``OptimizedModule``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fname}: expected a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        advice = _wrapper_advice(module)
        if advice is not None:
            where = f" at {name!r}" if name else ""
            raise TypeError(
                f"{fname}: expected a plain torch.nn.Module, got {type(module).__name__}{where}: {advice}"
            )


def copy_model(model: M, inplace: bool, fname: str) -> M:
    """``model`` itself when ``inplace``, else a deep copy (hooks, flags and devices included)."""
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as error:  # a model holding something that cannot be copied (a lock, a file, ...)
        raise RuntimeError(
            f"{fname}: expected a model that copy.deepcopy can copy, got {type(error).__name__}: {error}; "
            "pass inplace=True to modify it in place"
        ) from error


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` under ``root`` (keeping its place in ``Sequential`` and friends)."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def module_names(root: nn.Module) -> dict[int, list[str]]:
    """Every dotted name under which each module (by ``id``) is registered; shared modules have several."""
    names: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


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


def first_tensor(module: nn.Module) -> Tensor | None:
    """The first parameter or buffer of ``module`` (recursively), or ``None``."""
    for tensor in _tensors(module):
        return tensor
    return None


def _tensors(module: nn.Module) -> Iterator[Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter or buffer of ``module``."""
    for tensor in _tensors(module):
        if tensor.is_floating_point():
            return tensor.dtype
    return None
