"""torch.fx helpers: one graph per module, values followed across module boundaries, rewritten forwards.

Every module that is not atomic (see :class:`ModelGraph`) is traced on its own, with *all* its submodules as
leaves, so a graph holds exactly the code of one ``forward``: a module whose forward has data-dependent control
flow costs only its own graph, and the rest of the model is still seen. :class:`ModelGraph` links the graphs:
a placeholder leads to the argument at the module's (single) call site in its parent, and a call of a traced
child leads to the child's output.

A module whose forward must change (to call a new norm layer before ``F.relu(x)``) gets its forward
regenerated from its graph by :class:`GraphForward`. The module keeps its class, attributes, submodules and
hooks; only its ``forward`` attribute is replaced. Tracing freezes Python-level decisions, including
``self.training``; the forward is therefore traced twice, in training and in eval mode, and the generated
forward dispatches on ``self.training``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import linecache
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["GraphForward", "ModelGraph", "TraceError", "Value", "install_graph_forward", "trace_module"]


class TraceError(Exception):
    """A module whose forward torch.fx could not turn into a graph; the message says why."""


class _LeafTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule call is a leaf ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _sequential_graph(module: nn.Sequential) -> fx.Graph:
    """The graph of a plain ``nn.Sequential``, built directly from its children (no tracing)."""
    graph = fx.Graph()
    value = graph.placeholder("input")
    for name in module._modules:
        value = graph.call_module(name, (value,))
    graph.output(value)
    return graph


def trace_module(module: nn.Module, training: bool | None = None) -> fx.Graph:
    """The graph of ``module``'s own forward with its submodules as leaves.

    Args:
        module: the module to trace.
        training: trace as if ``module.training`` were this (only the module's own flag is changed, and
            restored); ``None`` traces in the current mode.

    Raises:
        TraceError: when torch.fx cannot trace it, with the reason.
    """
    mode = module.training if training is None else training
    instance_forward = module.__dict__.get("forward")
    if isinstance(instance_forward, GraphForward):
        graph = instance_forward.graphs.get(mode) if instance_forward.graphs else None
        if graph is None:
            raise TraceError(
                "its forward was rewritten by normzoo and then unpickled, which drops the graphs"
            )
        return copy.deepcopy(graph)
    if instance_forward is not None:
        raise TraceError("it has an instance-level forward attribute, which torch.fx does not trace")
    if type(module) is nn.Sequential:
        return _sequential_graph(module)
    before = set(module.__dict__)
    old_mode = module.training
    module.training = mode
    try:
        graph = _LeafTracer().trace(module)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TraceError(f"{type(error).__name__}: {reason}") from error
    finally:
        module.training = old_mode
        added = sorted(set(module.__dict__) - before)
        for name in added:  # tensor constants that the tracer attached to the module
            del module.__dict__[name]
    if added:
        raise TraceError(
            f"tracing it creates tensor constants ({', '.join(added)}), which a rewrite would freeze"
        )
    return graph


@dataclass(frozen=True)
class Value:
    """A node of the graph of the module named ``owner`` (a dotted name, ``""`` for the root)."""

    owner: str
    node: fx.Node


class ModelGraph:
    """The per-module graphs of a model and the call sites that link them.

    Args:
        model: the root module.
        is_atomic: modules that are not traced (activations, norms, torch's built-in layers, ...); their
            calls are leaves in their parents' graphs.

    Attributes:
        graphs: owner name -> graph of that module's forward.
        failures: owner name -> why torch.fx could not trace it.
        calls: ``id(module)`` -> every ``(owner, node)`` that calls it in a traced graph.
        names: ``id(module)`` -> every name it is registered under.
    """

    def __init__(self, model: nn.Module, is_atomic: Callable[[nn.Module], bool]) -> None:
        self.model = model
        self.graphs: dict[str, fx.Graph] = {}
        self.owners: dict[str, nn.Module] = {}
        self.failures: dict[str, str] = {}
        self.calls: dict[int, list[tuple[str, fx.Node]]] = {}
        self.names: dict[int, list[str]] = {}
        self._graph_name: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), []).append(name)
        for name, module in model.named_modules():
            if is_atomic(module):
                continue
            try:
                graph = trace_module(module)
            except TraceError as failure:
                self.failures[name] = str(failure)
                continue
            self.graphs[name] = graph
            self.owners[name] = module
            self._graph_name[id(module)] = name
            for node in graph.nodes:
                if node.op == "call_module":
                    target = module.get_submodule(str(node.target))
                    self.calls.setdefault(id(target), []).append((name, node))

    # -- lookups ---------------------------------------------------------------------------------------------

    def module_at(self, value: Value) -> nn.Module:
        """The module that a ``call_module`` node calls."""
        return self.owners[value.owner].get_submodule(str(value.node.target))

    def call_count(self, module: nn.Module) -> int:
        """How many call sites of ``module`` the traced graphs hold."""
        return len(self.calls.get(id(module), ()))

    def used_once(self, module: nn.Module) -> bool:
        """Registered under one name and called from exactly one place in the traced graphs."""
        return self.call_count(module) == 1 and len(self.names.get(id(module), ())) == 1

    def graph_name(self, module: nn.Module) -> str | None:
        """The owner name under which ``module``'s own graph is stored, if it was traced."""
        return self._graph_name.get(id(module))

    def nodes(self) -> Iterator[Value]:
        """Every node of every graph."""
        for owner, graph in self.graphs.items():
            for node in graph.nodes:
                yield Value(owner, node)

    # -- crossing module boundaries --------------------------------------------------------------------------

    def caller_value(self, value: Value) -> Value | None:
        """For a placeholder: the value passed to it at the module's single call site, else ``None``."""
        owner = self.owners[value.owner]
        sites = self.calls.get(id(owner), [])
        if len(sites) != 1 or str(value.node.target).startswith("*"):
            return None
        parent, call = sites[0]
        placeholders = [n for n in self.graphs[value.owner].nodes if n.op == "placeholder"]
        index = placeholders.index(value.node)
        arg = call.args[index] if index < len(call.args) else call.kwargs.get(str(value.node.target))
        return Value(parent, arg) if isinstance(arg, fx.Node) else None

    def inner_output(self, call: Value) -> Value | None:
        """For a call of a traced module: the value its graph returns, else ``None``."""
        name = self.graph_name(self.module_at(call))
        if name is None:
            return None
        output = next(n for n in reversed(self.graphs[name].nodes) if n.op == "output")
        result = output.args[0]
        return Value(name, result) if isinstance(result, fx.Node) else None

    def inner_input(self, call: Value, arg: fx.Node) -> Value | None:
        """For a call of a traced module that receives ``arg``: the matching placeholder in its graph."""
        name = self.graph_name(self.module_at(call))
        if name is None:
            return None
        placeholders = [n for n in self.graphs[name].nodes if n.op == "placeholder"]
        positions = [i for i, a in enumerate(call.node.args) if a is arg]
        keywords = [k for k, a in call.node.kwargs.items() if a is arg]
        if len(positions) + len(keywords) != 1:
            return None
        if positions:
            index = positions[0]
            if index >= len(placeholders) or str(placeholders[index].target).startswith("*"):
                return None
            return Value(name, placeholders[index])
        matches = [p for p in placeholders if p.target == keywords[0]]
        return Value(name, matches[0]) if matches else None

    def users(self, value: Value) -> list[Value] | None:
        """The nodes that consume ``value``, following a returned value to the caller; ``None`` if unknown."""
        result: list[Value] = []
        for user in value.node.users:
            if user.op != "output":
                result.append(Value(value.owner, user))
                continue
            sites = self.calls.get(id(self.owners[value.owner]), [])
            if len(sites) != 1 or user.args[0] is not value.node:
                return None
            outer = self.users(Value(*sites[0]))
            if outer is None:
                return None
            result.extend(outer)
        return result


# -- rewritten forwards ------------------------------------------------------------------------------------------

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
    import importlib

    restored = {
        mode: (
            src,
            {k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v for k, v in glb.items()},
        )
        for mode, (src, glb) in sources.items()
    }
    return GraphForward(module, None, inserted, restored)


def install_graph_forward(module: nn.Module, graphs: dict[bool, fx.Graph], inserted: tuple[str, ...]) -> None:
    """Give ``module`` the forward generated from ``graphs`` (``{True: training graph, False: eval graph}``)."""
    for graph in graphs.values():
        graph.lint()
    module.forward = GraphForward(module, graphs, inserted)


def restore_forward(module: nn.Module) -> None:
    """Drop a rewritten forward: the class's own ``forward`` applies again."""
    if isinstance(module.__dict__.get("forward"), GraphForward):
        del module.__dict__["forward"]
