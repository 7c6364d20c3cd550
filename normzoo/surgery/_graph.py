"""The dataflow of a model as torch.fx graphs, one per module, and the walks along it that surgery passes share.

Every module that is not a leaf (see :class:`ModelGraph`) is traced on its own, with *all* its submodules as
leaves, so a graph holds exactly the code of one ``forward``: a module whose forward has data-dependent control
flow costs only its own graph, and the rest of the model is still seen. :class:`ModelGraph` links the graphs:
a placeholder leads to the argument at the module's (single) call site in its parent, and a call of a traced
child leads to the child's output.

A pass says what it looks for and what it sees through; the walking is here. :meth:`ModelGraph.walk_back`
follows a tensor to where it came from and :meth:`ModelGraph.walk_forward` to its sole consumer, both across
module boundaries and through the nodes that the pass calls transparent (an identity, dropout, ...), as
torch's ``fx`` fuser rests on its shared ``matches_module_pattern``. Rewriting a forward from an edited graph
is :mod:`normzoo.surgery._forward`'s job.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ._forward import GraphForward

__all__ = [
    "ModelGraph",
    "TraceError",
    "Value",
    "first_input",
    "is_torch_layer",
    "optional_arguments",
    "trace_module",
]


class TraceError(Exception):
    """A module whose forward torch.fx could not turn into a graph; the message says why."""


class _LeafTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule call is a leaf ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def is_torch_layer(module: nn.Module) -> bool:
    """torch's own layers and containers, which no pass traces into (``nn.Sequential`` aside: it is code).

    Example:
        >>> is_torch_layer(nn.Conv2d(1, 1, 1)), is_torch_layer(nn.Sequential()), is_torch_layer(nn.ModuleList())
        (True, False, True)
    """
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return True
    cls = type(module)
    return (
        cls.__module__.startswith("torch.")
        and cls is not nn.Sequential
        and not isinstance(module, fx.GraphModule)
    )


def first_input(node: fx.Node) -> fx.Node | None:
    """The tensor a call works on: its first positional argument that is a node, else ``input``/``self``.

    ``x + 1`` and ``1 + x`` both give ``x``; so do ``F.relu(x, inplace=True)`` and ``x.relu()``.
    """
    for arg in node.args:
        if isinstance(arg, fx.Node):
            return arg
    arg = node.kwargs.get("input", node.kwargs.get("self"))
    return arg if isinstance(arg, fx.Node) else None


def _sequential_graph(module: nn.Sequential) -> fx.Graph:
    """The graph of a plain ``nn.Sequential``, built directly from its children (no tracing)."""
    graph = fx.Graph()
    value = graph.placeholder("input")
    for name in module._modules:
        value = graph.call_module(name, (value,))
    graph.output(value)
    return graph


def optional_arguments(module: nn.Module) -> tuple[str, ...]:
    """The arguments of ``module``'s forward that default to ``None`` (it may branch on ``x is None``)."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, GraphForward):
        return forward.optional
    try:
        parameters = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(
        p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is None
    )


def trace_module(module: nn.Module, training: bool | None = None, none: tuple[bool, ...] = ()) -> fx.Graph:
    """The graph of ``module``'s own forward with its submodules as leaves.

    Args:
        module: the module to trace.
        training: trace as if ``module.training`` were this (only the module's own flag is changed, and
            restored); ``None`` traces in the current mode.
        none: which of :func:`optional_arguments` to specialize to ``None`` (the graph then asserts they are);
            the others are traced as tensors. Empty: none of them.

    Raises:
        TraceError: when torch.fx cannot trace it, with the reason.
    """
    mode = module.training if training is None else training
    instance_forward = module.__dict__.get("forward")
    if isinstance(instance_forward, GraphForward):
        variant = (mode, none or (False,) * len(instance_forward.optional))
        graph = instance_forward.graphs.get(variant) if instance_forward.graphs else None
        if graph is None:
            raise TraceError(
                "its forward was rewritten by normzoo and then unpickled, which drops the graphs"
                if not instance_forward.graphs
                else "its rewritten forward has no graph for these arguments"
            )
        return copy.deepcopy(graph)
    if instance_forward is not None:
        raise TraceError("it has an instance-level forward attribute, which torch.fx does not trace")
    if type(module) is nn.Sequential:
        return _sequential_graph(module)
    before = set(module.__dict__)
    old_mode = module.training
    module.training = mode
    concrete = {
        name: None for name, is_none in zip(optional_arguments(module), none, strict=False) if is_none
    }
    try:
        graph = _LeafTracer().trace(module, concrete_args=concrete or None)
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
        is_leaf: modules that the pass does not look into, besides torch's own layers (see
            :func:`is_torch_layer`), which are always leaves; their calls are leaves in their parents' graphs.

    Attributes:
        graphs: owner name -> graph of that module's forward.
        failures: owner name -> why torch.fx could not trace it.
        calls: ``id(module)`` -> every ``(owner, node)`` that calls it in a traced graph.
        names: ``id(module)`` -> every name it is registered under.
    """

    def __init__(self, model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> None:
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
            if is_torch_layer(module) or is_leaf(module):
                continue
            try:
                graph = trace_module(module)
            except TraceError as failure:
                self.failures[name] = str(failure)
                continue
            self.graphs[name] = graph
            self.owners[name] = module
        for name in self._inlined():
            del self.graphs[name], self.owners[name]
        for name, graph in self.graphs.items():
            module = self.owners[name]
            self._graph_name[id(module)] = name
            for node in graph.nodes:
                if node.op == "call_module":
                    target = module.get_submodule(str(node.target))
                    self.calls.setdefault(id(target), []).append((name, node))

    def _inlined(self) -> set[str]:
        """Traced modules whose ``forward`` a caller runs as ``child.forward(x)``, which skips ``__call__``.

        The caller's graph then calls the child's own children (``down.0.relu`` from the root), and the
        child's graph describes code that never runs from there: it is dropped, so its children count as
        called once, from the caller, and get wrapped rather than rewritten into a forward nobody calls.
        """
        inlined: set[str] = set()
        for owner, graph in self.graphs.items():
            for node in graph.nodes:
                if node.op != "call_module":
                    continue
                parts = str(node.target).split(".")
                for end in range(1, len(parts)):
                    through = ".".join(filter(None, (owner, *parts[:end])))
                    if through in self.graphs:
                        inlined.add(through)
        return inlined

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

    # -- walks --------------------------------------------------------------------------------------------

    def walk_back(self, start: Value, transparent: Callable[[Value], bool]) -> Iterator[Value]:
        """The values that the tensor at ``start`` passed through, from ``start`` back towards its origin.

        Yields ``start``, then steps back: from a placeholder to the argument at the module's single call
        site, from a node for which ``transparent`` holds to the tensor it works on (:func:`first_input`),
        from a call of a traced module to the value its graph returns. The walk ends after the first value
        that allows none of these; a pass that finds what it looks for leaves the loop.
        """
        value: Value | None = start
        seen: set[Value] = set()
        while value is not None and value not in seen:
            seen.add(value)
            yield value
            node = value.node
            if node.op == "placeholder":
                value = self.caller_value(value)
            elif transparent(value):
                arg = first_input(node)
                value = Value(value.owner, arg) if arg is not None else None
            elif node.op == "call_module":
                value = self.inner_output(value)
            else:
                value = None

    def walk_forward(self, start: Value, transparent: Callable[[Value], bool]) -> Iterator[Value]:
        """The nodes that alone consume the tensor at ``start``, one after the other.

        Yields the sole user of the tensor (a returned tensor continues at the module's single call site),
        then, if that user is ``transparent``, the sole user of its result; a call of a traced module
        continues at the matching placeholder of its graph. The walk ends where a tensor has several users or
        reaches anything else.
        """
        value = start
        seen: set[Value] = set()
        while value not in seen:
            seen.add(value)
            users = list(value.node.users)
            if len(users) != 1:
                return
            user = users[0]
            if user.op == "output":
                sites = self.calls.get(id(self.owners[value.owner]), [])
                if user.args[0] is not value.node or len(sites) != 1:
                    return
                value = Value(*sites[0])
                continue
            step = Value(value.owner, user)
            yield step
            if transparent(step):
                value = step
            elif user.op == "call_module":
                inner = self.inner_input(step, value.node)
                if inner is None:
                    return
                value = inner
            else:
                return
