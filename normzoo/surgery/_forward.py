"""Rewritten forwards: a module's ``forward`` regenerated from torch.fx graphs, and its undo.

``insert_bn`` puts a norm layer before an activation *call* (``F.relu(x)``) by editing the torch.fx graph of
the module whose ``forward`` makes the call; :func:`install_graph_forward` turns the edited graphs into code
and stores it as the module's **instance** attribute ``forward`` (a :class:`GraphForward`). The module keeps
its class, attributes, submodules and hooks: only ``forward`` is shadowed, so :func:`restore_forward` (what
``remove_bn`` calls once every inserted layer is gone) gives the class's own ``forward`` back by deleting the
attribute.

Tracing freezes Python-level decisions, ``self.training`` included: a module gets one graph per training
mode, and the generated forward dispatches on ``self.training``. The generated code is registered with
``linecache``, so tracebacks and ``inspect`` show it; a pickled module keeps the code (not the graphs).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import itertools
import linecache
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["GraphForward", "install_graph_forward", "restore_forward"]

_counter = itertools.count()


@dataclass(frozen=True)
class _ModuleRef:
    """A Python module in the globals of generated code, pickled by name."""

    name: str


def _compile(src: str, globals_: dict[str, Any], label: str) -> Callable[..., Any]:
    filename = f"<normzoo rewritten {label} #{next(_counter)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    namespace = dict(globals_)
    exec(compile(src, filename, "exec"), namespace)
    function: Callable[..., Any] = namespace["forward"]
    return function


class GraphForward:
    """The ``forward`` of a module, regenerated from its torch.fx graphs (one per training mode).

    It is stored as the module's instance attribute ``forward``, so the module keeps its class, its other
    methods and its hooks. It deep-copies and pickles with the module (a pickled copy keeps the code, not the
    graphs). ``inserted`` names the submodules that normzoo added and that the code calls.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> module = nn.Sequential(nn.ReLU())
        >>> graph = fx.symbolic_trace(module).graph
        >>> install_graph_forward(module, {True: graph, False: graph}, ())
        >>> module(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
        >>> restore_forward(module)
        >>> "forward" in module.__dict__
        False
    """

    def __init__(
        self,
        module: nn.Module,
        graphs: dict[bool, fx.Graph] | None,
        inserted: tuple[str, ...],
        sources: dict[bool, tuple[str, dict[str, Any]]] | None = None,
    ) -> None:
        self.module = module
        self.graphs = graphs
        self.inserted = inserted
        if sources is None:
            assert graphs is not None
            sources = {}
            for mode, graph in graphs.items():
                code = graph.python_code(root_module="self")
                sources[mode] = (code.src, dict(code.globals))
        self._sources = sources
        label = f"{type(module).__qualname__}.forward"
        self._functions = {mode: _compile(src, glb, label) for mode, (src, glb) in sources.items()}
        with contextlib.suppress(TypeError, ValueError):  # a forward without a signature keeps none
            self.__signature__ = inspect.signature(types.MethodType(type(module).forward, module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._functions[bool(self.module.training)](self.module, *args, **kwargs)

    def code(self, training: bool) -> str:
        """The generated source of the forward used in training (``True``) or eval (``False``) mode."""
        return self._sources[training][0]

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphForward:
        new = GraphForward.__new__(GraphForward)
        memo[id(self)] = new
        new.__dict__.update(self.__dict__)
        new.module = copy.deepcopy(self.module, memo)
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        sources = {
            mode: (
                src,
                {k: _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v for k, v in glb.items()},
            )
            for mode, (src, glb) in self._sources.items()
        }
        return (_restore_graph_forward, (self.module, sources, self.inserted))

    def __repr__(self) -> str:
        return f"<forward of {type(self.module).__name__} rewritten by normzoo (calls {', '.join(self.inserted)})>"


def _restore_graph_forward(
    module: nn.Module, sources: dict[bool, tuple[str, dict[str, Any]]], inserted: tuple[str, ...]
) -> GraphForward:
    restored = {
        mode: (
            src,
            {k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v for k, v in glb.items()},
        )
        for mode, (src, glb) in sources.items()
    }
    return GraphForward(module, None, inserted, restored)


def install_graph_forward(module: nn.Module, graphs: dict[bool, fx.Graph], inserted: tuple[str, ...]) -> None:
    """Give ``module`` the forward generated from ``graphs`` (``{True: training graph, False: eval graph}``).

    ``inserted`` names the submodules the new code calls that the class's own forward does not.
    """
    for graph in graphs.values():
        graph.lint()
    module.forward = GraphForward(module, graphs, inserted)


def restore_forward(module: nn.Module) -> None:
    """Drop a rewritten forward: the class's own ``forward`` applies again."""
    if isinstance(module.__dict__.get("forward"), GraphForward):
        del module.__dict__["forward"]


def undo_rewrite(module: nn.Module) -> bool:
    """Undo a rewrite whose inserted layers are all gone: ``remove_bn`` made each of them an ``nn.Identity``.

    Deletes those identities and gives the class's own ``forward`` back; returns whether it did. A rewrite
    that still calls a real layer is kept.
    """
    forward = module.__dict__.get("forward")
    if not isinstance(forward, GraphForward) or not forward.inserted:
        return False
    if not all(isinstance(module._modules.get(name), nn.Identity) for name in forward.inserted):
        return False
    restore_forward(module)
    for name in forward.inserted:
        delattr(module, name)
    return True
