"""Where ``insert_bn`` puts norm layers: the activation sites of a model and the tensor that reaches each.

A **site** is an activation module to wrap (called from one place, or from code torch.fx could not trace)
or an activation call in a traced ``forward`` (``F.relu(x)``, a module activation called from several
places, an in-place activation whose input is used again). Its **source** is where the tensor reaching the
activation comes from, found by walking the graphs back (:meth:`ModelGraph.walk_back`) through identities,
dropout, other activations and residual sums to a producer (a Linear or convolution, which gives the size and
layout) or a normalization (then the activation needs no new norm).
"""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .._activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, activation_modules
from ._graph import ModelGraph, Value, first_input
from ._kinds import is_norm_module, is_norm_output, producer_layout
from ._modules import NormAct

__all__ = [
    "UNKNOWN",
    "ActivationSpec",
    "Site",
    "Source",
    "activation_nodes",
    "find_sites",
    "sibling_source",
    "site_key",
    "trace_source",
]

_TRANSPARENT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_EXACT_METHODS = {"contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm} | (
    {F.rms_norm} if hasattr(F, "rms_norm") else set()
)
_TRANSPARENT_MODULE_NAMES = {"DropPath", "DropBlock2d"}  # timm's, matched by name so timm stays optional


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _calls(node: fx.Node, functions: Iterable[Any]) -> bool:
    return node.op == "call_function" and _hashable(node.target) and node.target in functions


@dataclass(frozen=True)
class ActivationSpec:
    """What counts as an activation: module classes, functions and tensor-method names."""

    modules: tuple[type[nn.Module], ...]
    functions: frozenset[Callable[..., Any]]
    methods: frozenset[str]

    @classmethod
    def parse(cls, activations: Iterable[Any] | None) -> ActivationSpec:
        """The spec of ``insert_bn``'s ``activations=``; ``None`` gives the catalogue's (timm's included)."""
        if activations is None:
            return cls(activation_modules(), frozenset(ACTIVATION_FUNCTIONS), frozenset(ACTIVATION_METHODS))
        if isinstance(activations, (str, type)) or callable(activations):
            activations = [activations]
        modules: list[type[nn.Module]] = []
        functions: list[Callable[..., Any]] = []
        methods: list[str] = []
        for item in activations:
            if isinstance(item, type):
                if not issubclass(item, nn.Module):
                    raise TypeError(
                        f"insert_bn: expected nn.Module classes in activations=, got the class {item.__name__}"
                    )
                modules.append(item)
            elif isinstance(item, str):
                if not callable(getattr(Tensor, item, None)):
                    raise ValueError(
                        f"insert_bn: expected torch.Tensor method names in activations=, got {item!r}, "
                        "which is not a torch.Tensor method"
                    )
                methods.append(item)
            elif callable(item):
                functions.append(item)
            else:
                raise TypeError(
                    "insert_bn: expected nn.Module classes, functions and Tensor method names in activations=, "
                    f"got {type(item).__name__}"
                )
        return cls(tuple(modules), frozenset(functions), frozenset(methods))

    def is_call(self, node: fx.Node) -> bool:
        """Whether ``node`` calls an activation function or method."""
        return _calls(node, self.functions) or (node.op == "call_method" and node.target in self.methods)


@dataclass
class Source:
    """Where the tensor reaching an activation comes from."""

    kind: str  # "norm", "producer" or "unknown"
    module: nn.Module | None = None
    layout: str | None = None
    features: int | None = None
    ndim: int | None = None
    direct: bool = False  # the producer's output feeds only this activation, through identities only


UNKNOWN = Source("unknown")


@dataclass
class Site:
    """One place that gets a norm layer: an activation module to wrap, or a node of an owner's graph."""

    label: str
    source: Source
    act: nn.Module | None = None  # the module wrapped (wrap sites)
    names: list[str] = field(default_factory=list)  # where the wrapped module is registered
    owner: str | None = None  # graph sites: the module whose forward is rewritten
    index: int = -1  # graph sites: position among the owner's activation nodes
    node_name: str = ""
    inplace: bool = False
    training: bool = True
    normact: NormAct | None = None
    traced_caller: bool = True


def _is_transparent_module(module: nn.Module) -> bool:
    """Identity and dropout: what they return is their input (up to a random mask)."""
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout)) or (
        type(module).__name__ in _TRANSPARENT_MODULE_NAMES
    )


def _operands(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args[:2] if isinstance(a, fx.Node)]


def _step(graphs: ModelGraph, value: Value, acts: ActivationSpec, act_ids: set[int]) -> str:
    """What the node at ``value`` does to the tensor, as the walk back from an activation sees it.

    ``"norm"`` normalizes it, ``"producer"`` makes it (Linear, convolution), ``"activation"``, ``"identity"``
    (the very tensor), ``"dropout"`` (a masked copy), ``"offset"`` (plus a constant) and ``"placeholder"``
    pass it on, ``"sum"`` adds two tensors, ``"module"`` is another module's call, ``"opaque"`` anything else.
    """
    node = value.node
    if node.op == "placeholder":
        return "placeholder"
    if node.op == "call_module":
        module = graphs.module_at(value)
        if is_norm_output(module):
            return "norm"
        if id(module) in act_ids or (isinstance(module, NormAct) and module.act is not None):
            return "activation"
        if isinstance(module, nn.Identity):
            return "identity"
        if _is_transparent_module(module):
            return "dropout"
        return "producer" if producer_layout(module) is not None else "module"
    if _calls(node, _NORM_FUNCTIONS):
        return "norm"
    if acts.is_call(node):
        return "activation"
    if node.op == "call_method" and node.target in _EXACT_METHODS:
        return "identity"
    if _calls(node, _TRANSPARENT_FUNCTIONS):
        return "dropout"
    if _calls(node, _ADD) or (node.op == "call_method" and node.target in _ADD_METHODS):
        return {1: "offset", 2: "sum"}.get(len(_operands(node)), "opaque")
    return "opaque"


_PASSED = {"activation", "identity", "dropout", "offset"}


def trace_source(graphs: ModelGraph, start: Value, acts: ActivationSpec, act_ids: set[int]) -> Source:
    """Follow the tensor at ``start`` back to the layer that produced it.

    Identities, dropout and residual sums are passed; so are other activations, for the size only (what
    comes out of an activation is not normalized, whatever went in).
    """

    def passed(value: Value) -> bool:
        return _step(graphs, value, acts, act_ids) in _PASSED

    direct = True
    after_activation = False
    for value in graphs.walk_back(start, passed):
        step = _step(graphs, value, acts, act_ids)
        if len(value.node.users) != 1:
            direct = False
        if step == "norm":
            return UNKNOWN if after_activation else Source("norm")
        if step == "producer":
            module = graphs.module_at(value)
            layout = producer_layout(module)
            assert layout is not None
            return Source("producer", module, *layout, direct=direct and graphs.used_once(module))
        if step == "sum":
            sources = [
                trace_source(graphs, Value(value.owner, a), acts, act_ids) for a in _operands(value.node)
            ]
            if not after_activation and any(s.kind == "norm" for s in sources):
                return Source("norm")  # a residual sum with a normalized branch (ResNet)
            producers = [s for s in sources if s.kind == "producer"]
            if producers:
                producers[0].direct = False
                return producers[0]
            return UNKNOWN
        if step == "activation":
            after_activation = True
        if step == "module":  # the walk enters its graph, or ends here
            direct = direct and graphs.call_count(graphs.module_at(value)) == 1
        elif step != "placeholder":
            direct = direct and step == "identity"
    return UNKNOWN


def sibling_source(model: nn.Module, name: str) -> Source:
    """Without a traced caller: guess from the module registered just before the activation in its parent."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    keys = list(parent._modules)
    for key in reversed(keys[: keys.index(attr)]):
        previous = parent._modules[key]
        if previous is None or _is_transparent_module(previous):
            continue
        if is_norm_output(previous):
            return Source("norm")
        layout = producer_layout(previous)
        return Source("producer", previous, *layout) if layout else UNKNOWN
    return UNKNOWN


def _is_inplace_call(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    name = getattr(node.target, "__name__", node.target)
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        return True
    return bool(node.kwargs.get("inplace", False)) or any(a is True for a in node.args[1:])


def _used_after(node: fx.Node, arg: fx.Node) -> bool:
    """Whether ``arg`` is consumed by a node after ``node`` (it sees what an in-place activation did)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[user] > order[node] for user in arg.users if user is not node)


def _untraced_calls(module: nn.Module, acts: ActivationSpec) -> list[str]:
    """The activation calls written in the source of ``module``'s forward, which torch.fx could not trace."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward)))
    except (OSError, TypeError, SyntaxError):
        return []
    function_names = {getattr(f, "__name__", "") for f in acts.functions}
    calls = sorted(
        (
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        ),
        key=lambda node: (node.lineno, node.col_offset),
    )
    found: dict[str, None] = {}
    for call in calls:
        assert isinstance(call.func, ast.Attribute)
        owner, name = call.func.value, call.func.attr
        if isinstance(owner, ast.Name) and owner.id in ("F", "torch", "functional"):
            if name in function_names:
                found[f"{owner.id}.{name}"] = None
        elif name in acts.methods:
            found[f"x.{name}()"] = None
    return list(found)


def activation_nodes(
    graph: fx.Graph, owner: nn.Module, acts: ActivationSpec, act_ids: set[int]
) -> list[fx.Node]:
    """The activation call sites of one graph, in order: calls of activation modules and functions."""
    nodes = []
    for node in graph.nodes:
        if node.op == "call_module":
            if id(owner.get_submodule(str(node.target))) in act_ids:
                nodes.append(node)
        elif acts.is_call(node):
            nodes.append(node)
    return nodes


def site_key(node: fx.Node) -> tuple[str, str]:
    """What identifies an activation node across two traces of one forward."""
    return node.op, str(node.target) if isinstance(node.target, str) else repr(node.target)


def _call_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"x.{node.target}()"
    target = node.target
    module = getattr(target, "__module__", "") or ""
    prefix = "F." if module.endswith("functional") else "torch." if module.startswith("torch") else ""
    return f"{prefix}{getattr(target, '__name__', target)}"


def _graph_site(
    graphs: ModelGraph, owner: str, node: fx.Node, acts: ActivationSpec, act_ids: set[int], label: str
) -> Site:
    owner_module = graphs.owners[owner]
    index = activation_nodes(graphs.graphs[owner], owner_module, acts, act_ids).index(node)
    arg = first_input(node)
    source = trace_source(graphs, Value(owner, arg), acts, act_ids) if arg is not None else UNKNOWN
    module = owner_module.get_submodule(str(node.target)) if node.op == "call_module" else None
    return Site(
        label, source, owner=owner, index=index, node_name=node.name,
        inplace=arg is not None and _is_inplace_call(node, module) and _used_after(node, arg),
        training=owner_module.training,
    )  # fmt: skip


def find_sites(
    model: nn.Module, graphs: ModelGraph, acts: ActivationSpec, act_ids: set[int]
) -> tuple[list[Site], list[str]]:
    """Every activation site, with its source; and messages about activations out of reach."""
    sites: list[Site] = []
    unreachable: list[str] = []
    names_of = graphs.names
    inside_norm: set[int] = set()
    for module in model.modules():
        if is_norm_module(module) or id(module) in act_ids:  # an act inside a norm+act layer or an activation
            inside_norm.update(id(m) for m in module.modules() if m is not module)
    parents_traced = set(graphs.graphs)

    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) not in act_ids or id(module) in inside_norm or id(module) in seen or not name:
            continue
        seen.add(id(module))
        calls = graphs.calls.get(id(module), [])
        names = names_of[id(module)]
        if not calls:
            parent = name.rpartition(".")[0]
            if parent in parents_traced:
                continue  # its traced parent never calls it: an unused module
            sites.append(
                Site(name, sibling_source(model, name), act=module, names=names, training=module.training,
                     traced_caller=False)
            )  # fmt: skip
            continue
        rewrite = len(calls) > 1
        if len(calls) == 1:
            owner, node = calls[0]
            arg = first_input(node)
            rewrite = arg is not None and _is_inplace_call(node, module) and _used_after(node, arg)
            if not rewrite:
                source = (
                    trace_source(graphs, Value(owner, arg), acts, act_ids) if arg is not None else UNKNOWN
                )
                sites.append(Site(name, source, act=module, names=names, training=module.training))
                continue
        for owner, node in calls:
            sites.append(
                _graph_site(graphs, owner, node, acts, act_ids, f"{name} (called in {owner or 'the root'})")
            )

    for owner, graph in graphs.graphs.items():
        for node in graph.nodes:
            if acts.is_call(node) and id(graphs.owners[owner]) not in act_ids:
                label = f"{_call_name(node)} in {owner or 'the root'} ({type(graphs.owners[owner]).__name__})"
                sites.append(_graph_site(graphs, owner, node, acts, act_ids, label))

    for name, module in model.named_modules():
        activation = getattr(module, "activation", None)
        builtin = type(module).__module__.startswith("torch.nn")
        if builtin and callable(activation) and not isinstance(activation, nn.Module):
            unreachable.append(
                f"the activation of {type(module).__name__} ({name or 'the root'}) runs inside torch's "
                "implementation, which is not traced"
            )
    for owner, reason in graphs.failures.items():
        module = graphs.owners.get(owner) or model.get_submodule(owner)
        calls_in_source = _untraced_calls(module, acts)
        if calls_in_source:
            unreachable.append(
                f"{', '.join(calls_in_source)} in {type(module).__name__}.forward ({owner or 'the root'}): torch.fx "
                f"could not trace it ({reason}); its activation modules are still handled"
            )
    return sites, unreachable
