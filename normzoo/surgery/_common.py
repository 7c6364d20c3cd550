"""Helpers every surgery pass shares: the model check, copies, module lookup and hooks."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "check_model",
    "copy_model",
    "first_tensor",
    "floating_dtype",
    "hook_dict_names",
    "set_submodule",
]


M = TypeVar("M", bound=nn.Module)


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
