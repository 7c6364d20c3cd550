"""Rewritten forwards: a module's ``forward`` regenerated from torch.fx graphs, and its undo.

``insert_bn`` puts a norm layer before an activation *call* (``F.relu(x)``) by editing the torch.fx graph of
the module whose ``forward`` makes the call; :func:`install_graph_forward` turns the edited graphs into code
and stores it as the module's **instance** attribute ``forward`` (a :class:`GraphForward`). The module keeps
its class, attributes, submodules and hooks: only ``forward`` is shadowed, so :func:`restore_forward` (what
``remove_bn`` calls once every inserted layer is gone) gives the class's own ``forward`` back by deleting the
attribute.

Tracing freezes Python-level decisions: ``self.training``, and ``if shortcut is None:`` on an argument that
defaults to ``None`` (a traced argument is never ``None``). A module therefore gets one graph per
:data:`Variant`: per training mode and per pattern of which of those optional arguments are ``None``
(timm's DLA blocks take ``shortcut=None``), and the generated forward dispatches on both. The generated code is registered with
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

__all__ = ["GraphForward", "Variant", "install_graph_forward", "restore_forward", "undo_rewrite"]

#: What a traced graph is specialized to: ``(training, which optional arguments are None)``, the second in
#: the order of :attr:`GraphForward.optional`.
Variant = tuple[bool, tuple[bool, ...]]

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
    """The ``forward`` of a module, regenerated from its torch.fx graphs (one per :data:`Variant`).

    It is stored as the module's instance attribute ``forward``, so the module keeps its class, its other
    methods and its hooks. It deep-copies and pickles with the module (a pickled copy keeps the code, not the
    graphs). ``inserted`` names the submodules that normzoo added and that the code calls; ``optional`` the
    arguments that default to ``None``, whose ``None``-ness selects the graph.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> module = nn.Sequential(nn.ReLU())
        >>> graph = fx.symbolic_trace(module).graph
        >>> install_graph_forward(module, {(True, ()): graph, (False, ()): graph}, (), ())
        >>> module(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
        >>> restore_forward(module)
        >>> "forward" in module.__dict__
        False
    """

    def __init__(
        self,
        module: nn.Module,
        graphs: dict[Variant, fx.Graph | None] | None,
        inserted: tuple[str, ...],
        optional: tuple[str, ...],
        sources: dict[Variant, tuple[str, dict[str, Any]] | None] | None = None,
    ) -> None:
        self.module = module
        self.graphs = graphs
        self.inserted = inserted
        self.optional = optional
        if sources is None:
            assert graphs is not None
            sources = {}
            for variant, graph in graphs.items():
                code = graph.python_code(root_module="self") if graph is not None else None
                sources[variant] = (code.src, dict(code.globals)) if code is not None else None
        self._sources = sources
        label = f"{type(module).__qualname__}.forward"
        self._functions = {
            variant: _compile(*source, label) if source is not None else None
            for variant, source in sources.items()
        }
        self._signature: inspect.Signature | None = None
        with contextlib.suppress(TypeError, ValueError):  # a forward without a signature keeps none
            self._signature = inspect.signature(types.MethodType(type(module).forward, module))
            self.__signature__ = self._signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        training = bool(self.module.training)
        if not self.optional:
            return self._functions[(training, ())](self.module, *args, **kwargs)  # type: ignore[misc]
        assert self._signature is not None
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        pattern = tuple(bound.arguments[name] is None for name in self.optional)
        function = self._functions.get((training, pattern))
        if function is None:
            given = ", ".join(
                f"{name}={'None' if none else 'a value'}"
                for name, none in zip(self.optional, pattern, strict=True)
            )
            raise RuntimeError(
                f"{type(self.module).__name__}.forward (rewritten by normzoo.insert_bn): expected arguments that "
                f"torch.fx could trace, got {given}, which it could not; call normzoo.remove_bn to undo the rewrite"
            )
        # Positionally: tracing renames an argument specialized to None (``shortcut`` -> ``shortcut_1``).
        return function(self.module, *bound.args, **bound.kwargs)

    def code(self, training: bool, none: tuple[bool, ...] | None = None) -> str:
        """The generated source of the forward used in training (``True``) or eval (``False``) mode.

        ``none`` selects the variant for optional arguments that are ``None`` (default: none of them is).
        """
        source = self._sources[(training, none if none is not None else (False,) * len(self.optional))]
        assert source is not None
        return source[0]

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphForward:
        new = GraphForward.__new__(GraphForward)
        memo[id(self)] = new
        new.__dict__.update(self.__dict__)
        new.module = copy.deepcopy(self.module, memo)
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        sources = {
            variant: (
                source[0],
                {
                    k: _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v
                    for k, v in source[1].items()
                },
            )
            if source is not None
            else None
            for variant, source in self._sources.items()
        }
        return (_restore_graph_forward, (self.module, sources, self.inserted, self.optional))

    def __repr__(self) -> str:
        return f"<forward of {type(self.module).__name__} rewritten by normzoo (calls {', '.join(self.inserted)})>"


def _restore_graph_forward(
    module: nn.Module,
    sources: dict[Any, tuple[str, dict[str, Any]] | None],
    inserted: tuple[str, ...],
    optional: tuple[str, ...] = (),  # pickles of normzoo 0.1 had one source per training mode, keyed by it
) -> GraphForward:
    restored = {
        variant if isinstance(variant, tuple) else (bool(variant), ()): (
            source[0],
            {
                k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v
                for k, v in source[1].items()
            },
        )
        if source is not None
        else None
        for variant, source in sources.items()
    }
    return GraphForward(module, None, inserted, optional, restored)


def install_graph_forward(
    module: nn.Module,
    graphs: dict[Variant, fx.Graph | None],
    inserted: tuple[str, ...],
    optional: tuple[str, ...],
) -> None:
    """Give ``module`` the forward generated from ``graphs``, one per :data:`Variant` (``None``: untraceable).

    ``inserted`` names the submodules the new code calls that the class's own forward does not; ``optional``
    the arguments that default to ``None``, in the order of the variants' patterns.
    """
    for graph in graphs.values():
        if graph is not None:
            graph.lint()
    module.forward = GraphForward(module, graphs, inserted, optional)


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
