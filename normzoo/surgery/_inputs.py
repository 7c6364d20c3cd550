"""What a model is called with: the one convention that surgery's example inputs and data batches share.

An **input** is what ``forward`` receives: a tuple or list is its positional arguments, a dict its keyword
arguments, anything else (a tensor) its one argument (:func:`call_args`). A **batch** from a data loader is
turned into an input by an ``input_fn``; the default, :func:`batch_input`, takes a tensor as it is, the first
element of a tuple or list (``(x, y)`` gives ``x``) and, from a dict, the entries that name parameters of
``forward``.

Example:
    >>> import torch
    >>> call_args(torch.zeros(2))
    ((tensor([0., 0.]),), {})
    >>> call_args((1, 2)), call_args({"x": 1})
    (((1, 2), {}), ((), {'x': 1}))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["batch_input", "call_args", "describe", "move_to", "run_forward"]


def call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` that the model is called with for ``inputs``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def batch_input(model: nn.Module, fname: str) -> Callable[[Any], Any]:
    """The default ``input_fn``: the model's input in a batch (see the module docstring)."""

    def forward_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return dict(batch)
        kwargs = {k: v for k, v in batch.items() if k in parameters}
        if not kwargs:
            raise TypeError(
                f"{fname}: expected a batch dict keyed by parameters of {type(model).__name__}.forward"
                f"{inspect.signature(model.forward)}, got the keys {sorted(batch)}; yield tensors, "
                "(input, target) pairs or such dicts, or pass input_fn="
            )
        return kwargs

    def input_of(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return forward_kwargs(batch)
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise TypeError(
                    f"{fname}: expected a batch holding the input, got an empty {type(batch).__name__}"
                )
            first = batch[0]
            return forward_kwargs(first) if isinstance(first, Mapping) else first
        return batch

    return input_of


def move_to(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor in it (in tuples, lists and dicts too) moved to ``device``."""
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def describe(inputs: Any) -> str:
    """A short description of ``inputs`` for messages: shapes of tensors, types of the rest."""
    if isinstance(inputs, Tensor):
        return f"of shape {tuple(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__


def run_forward(model: nn.Module, inputs: Any, fname: str, label: str) -> dict[int, int]:
    """One forward pass of ``model`` on ``inputs`` in eval mode without gradients, flags restored after.

    Modules that the pass creates (a layer sized at its first forward) take the training flag of their
    parent. On failure a ``ValueError`` names the module where the pass failed. Returns how many times each
    module (by ``id``) was called.

    Args:
        model: the model.
        inputs: its input (see :func:`call_args`).
        fname: the public function that runs the pass, for the message.
        label: what ``inputs`` are, for the message (``"example_input"``).
    """
    args, kwargs = call_args(inputs)
    modes = {module: module.training for module in model.modules()}
    stack: list[str] = []
    calls: dict[int, int] = {}
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, _: Any) -> None:
            stack.append(name)
            calls[id(module)] = calls.get(id(module), 0) + 1

        return hook

    def leave(*_: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:
        where = stack[-1] if stack else ""
        inner = model.get_submodule(where) if where else model
        place = f"module {where!r} ({type(inner).__name__})" if where else f"{type(model).__name__}.forward"
        raise ValueError(
            f"{fname}: expected {label} {describe(inputs)} to run through {type(model).__name__}, got "
            f"{type(error).__name__} in {place}: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        for parent in model.modules():
            for child in parent.children():
                if child not in modes:
                    child.train(parent.training)
    return calls
