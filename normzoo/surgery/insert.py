"""``insert_bn``: a normalization layer before every activation of any model.

How a model is read (see ``docs/surgery.md`` for the full rules):

* Activation **modules** (``nn.ReLU``, ``nn.GELU``, ... or the classes given in ``activations=``) are found
  by walking the module tree; each is replaced in its parent by a :class:`~normzoo.surgery.NormAct` that holds
  the new norm layer and the activation itself.
* Activation **calls** in a ``forward`` (``F.relu(x)``, ``torch.sigmoid(x)``, ``x.relu()``) are found in the
  torch.fx graph of the module whose forward makes them; that forward is regenerated with a call to a new
  ``NormAct`` (``act=None``) just before each activation call. A module activation called from several places
  (one ``nn.ReLU`` reused) is handled the same way: one norm layer per call.
* The tensor that reaches an activation is followed back through the graphs (across module boundaries) to
  the layer that produced it: a Linear (features in the last dimension, so ``(B, N, C)`` is normalized over
  ``C``), a convolution (channels in dimension 1, a 1d/2d/3d norm as the convolution), or a normalization
  layer (then the activation gets none: it already follows a norm, and so does an activation after a residual
  sum with a normalized branch, as in ResNet).
* Without ``example_input`` the norm layer is built at once where the producer gives its size, and is a
  :class:`~normzoo.surgery.LazyNorm` that sizes itself at the first forward elsewhere. With ``example_input``
  every new layer is sized from the real tensor of one forward pass.
"""

from __future__ import annotations

import inspect
import operator
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import NormSpec, get_norm_layer, is_batch_norm
from ._common import (
    check_model,
    copy_model,
    first_tensor,
    floating_dtype,
    is_norm_module,
    is_norm_output,
    producer_layout,
    set_submodule,
)
from ._graph import ModelGraph, TraceError, Value, install_graph_forward, trace_module
from ._modules import LazyNorm, NormAct

__all__ = [
    "DEFAULT_ACTIVATION_FUNCTIONS",
    "DEFAULT_ACTIVATION_METHODS",
    "DEFAULT_ACTIVATION_MODULES",
    "insert_bn",
]

#: Activation modules found by default (timm's own activation classes are added when timm is imported).
DEFAULT_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
)


def _existing(namespace: Any, names: Iterable[str]) -> tuple[Callable[..., Any], ...]:
    return tuple(getattr(namespace, name) for name in names if callable(getattr(namespace, name, None)))


_UNARY = ("relu", "relu6", "leaky_relu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid",
          "tanh", "softplus", "softsign", "hardswish", "hardsigmoid", "hardtanh", "logsigmoid", "tanhshrink",
          "threshold", "prelu")  # fmt: skip
_TORCH_ACTIVATIONS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "selu", "selu_", "celu", "celu_",
                      "rrelu", "rrelu_", "prelu", "hardtanh", "hardtanh_")  # fmt: skip

#: Activation functions found by default in a forward (``F.relu``, ``torch.relu``, their in-place forms, ...).
DEFAULT_ACTIVATION_FUNCTIONS: tuple[Callable[..., Any], ...] = tuple(
    dict.fromkeys(
        _existing(F, [*_UNARY, *(f"{name}_" for name in _UNARY)]) + _existing(torch, _TORCH_ACTIVATIONS)
    )
)

#: Tensor methods found by default in a forward (``x.relu()``, ``x.sigmoid_()``, ...).
DEFAULT_ACTIVATION_METHODS: tuple[str, ...] = tuple(
    name for name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_") if hasattr(Tensor, name)
)

_TIMM_ACTIVATIONS = {
    "timm.layers.activations": ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish",
                                "GELU", "GELUTanh", "QuickGELU", "PReLU"),
    "timm.layers.activations_me": ("SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe"),
}  # fmt: skip

_TRANSPARENT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_EXACT_METHODS = {"contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm} | (
    {F.rms_norm} if hasattr(F, "rms_norm") else set()
)
_TRANSPARENT_MODULE_NAMES = {"DropPath", "DropBlock2d"}


def _timm_activation_classes() -> tuple[type[nn.Module], ...]:
    """timm's activation classes, when timm is already imported (the model then likely uses them)."""
    classes: list[type[nn.Module]] = []
    for module_name, names in _TIMM_ACTIVATIONS.items():
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                classes.append(cls)
    return tuple(classes)


@dataclass(frozen=True)
class _Activations:
    """What counts as an activation: module classes, functions and tensor-method names."""

    modules: tuple[type[nn.Module], ...]
    functions: frozenset[Callable[..., Any]]
    methods: frozenset[str]

    @classmethod
    def parse(cls, activations: Iterable[Any] | None) -> _Activations:
        if activations is None:
            return cls(
                DEFAULT_ACTIVATION_MODULES + _timm_activation_classes(),
                frozenset(DEFAULT_ACTIVATION_FUNCTIONS),
                frozenset(DEFAULT_ACTIVATION_METHODS),
            )
        if isinstance(activations, (str, type)) or callable(activations):
            activations = [activations]
        modules: list[type[nn.Module]] = []
        functions: list[Callable[..., Any]] = []
        methods: list[str] = []
        for item in activations:
            if isinstance(item, type):
                if not issubclass(item, nn.Module):
                    raise TypeError(
                        f"insert_bn: activations= takes nn.Module classes, got the class {item.__name__}"
                    )
                modules.append(item)
            elif isinstance(item, str):
                if not callable(getattr(Tensor, item, None)):
                    raise ValueError(
                        f"insert_bn: activations= got {item!r}, which is not a torch.Tensor method"
                    )
                methods.append(item)
            elif callable(item):
                functions.append(item)
            else:
                raise TypeError(
                    "insert_bn: activations= takes nn.Module classes, functions and Tensor method names, "
                    f"got {type(item).__name__}"
                )
        return cls(tuple(modules), frozenset(functions), frozenset(methods))

    def is_call(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return _hashable(node.target) and node.target in self.functions
        return node.op == "call_method" and node.target in self.methods


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


@dataclass
class _Source:
    """Where the tensor reaching an activation comes from."""

    kind: str  # "norm", "producer" or "unknown"
    module: nn.Module | None = None
    layout: str | None = None
    features: int | None = None
    ndim: int | None = None
    direct: bool = False  # the producer's output feeds only this activation, through identities only


_UNKNOWN = _Source("unknown")


@dataclass
class _Site:
    """One place that gets a norm layer: an activation module to wrap, or a node of an owner's graph."""

    label: str
    source: _Source
    act: nn.Module | None = None  # the module wrapped (wrap sites)
    names: list[str] = field(default_factory=list)  # where the wrapped module is registered
    owner: str | None = None  # graph sites: the module whose forward is rewritten
    index: int = -1  # graph sites: position among the owner's activation nodes
    node_name: str = ""
    inplace: bool = False
    training: bool = True
    normact: NormAct | None = None
    traced_caller: bool = True


def _first_arg(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return arg if isinstance(arg, fx.Node) else None


def _is_transparent_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout)) or (
        type(module).__name__ in _TRANSPARENT_MODULE_NAMES
    )


def _walk_back(graphs: ModelGraph, start: Value, acts: _Activations, act_ids: set[int]) -> _Source:
    """Follow the tensor at ``start`` back to the layer that produced it.

    Identities, dropout and residual sums are passed; so are other activations, for the size only (what
    comes out of an activation is not normalized, whatever went in).
    """
    direct = True
    after_activation = False
    value = start
    for _ in range(100_000):
        node = value.node
        if len(node.users) != 1:
            direct = False
        if node.op == "call_module":
            module = graphs.module_at(value)
            if is_norm_output(module):
                return _UNKNOWN if after_activation else _Source("norm")
            arg = _first_arg(node)
            if id(module) in act_ids or (isinstance(module, NormAct) and module.act is not None):
                if arg is None:
                    return _UNKNOWN
                direct, after_activation = False, True
                value = Value(value.owner, arg)
                continue
            if _is_transparent_module(module):
                if arg is None:
                    return _UNKNOWN
                direct = direct and isinstance(module, nn.Identity)
                value = Value(value.owner, arg)
                continue
            layout = producer_layout(module)
            if layout is not None:
                return _Source("producer", module, *layout, direct=direct and graphs.used_once(module))
            inner = graphs.inner_output(value)
            if inner is None:
                return _UNKNOWN
            direct = direct and graphs.call_count(module) == 1
            value = inner
            continue
        if node.op in ("call_function", "call_method"):
            target = node.target
            if node.op == "call_function" and _hashable(target) and target in _NORM_FUNCTIONS:
                return _UNKNOWN if after_activation else _Source("norm")
            arg = _first_arg(node)
            if acts.is_call(node):
                if arg is None:
                    return _UNKNOWN
                direct, after_activation = False, True
                value = Value(value.owner, arg)
                continue
            exact = node.op == "call_method" and target in _EXACT_METHODS
            if exact or (
                node.op == "call_function" and _hashable(target) and target in _TRANSPARENT_FUNCTIONS
            ):
                if arg is None:
                    return _UNKNOWN
                direct = direct and exact
                value = Value(value.owner, arg)
                continue
            is_add = (node.op == "call_function" and _hashable(target) and target in _ADD) or (
                node.op == "call_method" and target in _ADD_METHODS
            )
            if is_add:
                operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
                if len(operands) == 1:  # x + constant
                    direct = False
                    value = Value(value.owner, operands[0])
                    continue
                if len(operands) == 2:
                    sources = [_walk_back(graphs, Value(value.owner, a), acts, act_ids) for a in operands]
                    if not after_activation and any(s.kind == "norm" for s in sources):
                        return _Source("norm")  # a residual sum with a normalized branch (ResNet)
                    producers = [s for s in sources if s.kind == "producer"]
                    if producers:
                        producers[0].direct = False
                        return producers[0]
            return _UNKNOWN
        if node.op == "placeholder":
            outer = graphs.caller_value(value)
            if outer is None:
                return _UNKNOWN
            value = outer
            continue
        return _UNKNOWN
    return _UNKNOWN  # pragma: no cover - graphs are finite


def _sibling_source(model: nn.Module, name: str) -> _Source:
    """Without a traced caller: guess from the module registered just before the activation in its parent."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    keys = list(parent._modules)
    for key in reversed(keys[: keys.index(attr)]):
        previous = parent._modules[key]
        if previous is None or _is_transparent_module(previous):
            continue
        if is_norm_output(previous):
            return _Source("norm")
        layout = producer_layout(previous)
        return _Source("producer", previous, *layout) if layout else _UNKNOWN
    return _UNKNOWN


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


_SOURCE_CALL = re.compile(r"(?:\b(F|torch|functional)\.([a-z_0-9]+)|\.([a-z_0-9]+))\s*\(")


def _functional_calls_in_source(module: nn.Module, acts: _Activations) -> list[str]:
    """The activation calls written in the source of ``module.forward`` (best effort, for messages)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return []
    function_names = {getattr(f, "__name__", "") for f in acts.functions}
    found: dict[str, None] = {}
    for match in _SOURCE_CALL.finditer(source):
        prefix, function, method = match.groups()
        if function and function in function_names:
            found[f"{prefix}.{function}"] = None
        elif method and method in acts.methods:
            found[f"x.{method}()"] = None
    return list(found)


def _is_atomic(module: nn.Module, acts: _Activations) -> bool:
    """Modules that are not traced: their calls are leaves (their insides are torch's or a norm's)."""
    if isinstance(module, acts.modules) or is_norm_module(module):
        return True
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return True
    if producer_layout(module) is not None and not module._modules:
        return True
    cls = type(module)
    return (
        cls.__module__.startswith("torch.")
        and cls is not nn.Sequential
        and not isinstance(module, fx.GraphModule)
    )


def _activation_nodes(
    graph: fx.Graph, owner: nn.Module, acts: _Activations, act_ids: set[int]
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


def _site_key(node: fx.Node) -> tuple[str, str]:
    return node.op, str(node.target) if isinstance(node.target, str) else repr(node.target)


def _call_args(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


def _describe(example_input: Any) -> str:
    if isinstance(example_input, Tensor):
        return f"of shape {tuple(example_input.shape)}"
    if isinstance(example_input, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in example_input.items()) + "}"
    if isinstance(example_input, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in example_input) + ")"
    return type(example_input).__name__


def _run_example(model: nn.Module, example_input: Any, what: str) -> None:
    """One forward pass in eval mode without gradients; on failure a ValueError names the module that failed."""
    args, kwargs = _call_args(example_input)
    modes = {m: m.training for m in model.modules()}
    stack: list[str] = []
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(name)

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
        place = (
            f"in module {where!r} ({type(inner).__name__})" if where else f"in {type(model).__name__}.forward"
        )
        raise ValueError(
            f"insert_bn: the forward pass on example_input {_describe(example_input)}{what} failed {place}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        for module in model.modules():
            if isinstance(module, NormAct):
                module.norm.train(module.training)


def _new_norm(
    norm: NormSpec, source: _Source, eager: bool, model: nn.Module
) -> tuple[nn.Module, bool | None]:
    """The norm layer for a site and whether it is channels-last (``None``: decided at the first forward)."""
    producer = source.module if source.kind == "producer" else None
    reference = producer if producer is not None and first_tensor(producer) is not None else model
    ref = first_tensor(reference)
    device = ref.device if ref is not None else None
    dtype = floating_dtype(reference)
    if eager and producer is not None and source.features is not None and source.ndim is not None:
        layer = get_norm_layer(norm, source.ndim)(source.features)
        layer.to(device=device, dtype=dtype)
        return layer, source.layout == "last"
    layout = source.layout if producer is not None else None
    features = source.features if producer is not None else None
    return LazyNorm(norm, layout=layout, features=features, device=device, dtype=dtype), None


def _drop_bias(site: _Site) -> bool:
    """Drop the bias of the producer that feeds only this site's norm layer, if the norm cancels it."""
    source, normact = site.source, site.normact
    producer = source.module
    if normact is None or producer is None or not source.direct:
        return False
    bias = getattr(producer, "bias", None)
    if not isinstance(bias, nn.Parameter) or not is_batch_norm(normact.norm):
        return False
    features = getattr(normact.norm, "num_features", None)
    if features != source.features or normact.channels_last != (source.layout == "last"):
        return False
    producer.bias = None  # type: ignore[assignment]
    return True


def insert_bn(
    model: nn.Module,
    norm: NormSpec = "batchnorm",
    *,
    example_input: Any = None,
    activations: Iterable[Any] | None = None,
    remove_bias: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Put a normalization layer before every activation of ``model``.

    Activation modules are wrapped in a :class:`~normzoo.surgery.NormAct` (``norm`` then the activation);
    activation calls in a ``forward`` (``F.relu``, ``torch.sigmoid``, ``x.relu()``, ...) get one through a
    regenerated forward (torch.fx). An activation that already follows a normalization layer gets none. The
    size and the 1d/2d/3d kind come from the tensor that reaches the activation: the Linear or convolution
    that produced it, the ``example_input`` forward pass, or the first forward (a pending
    :class:`~normzoo.surgery.LazyNorm`). Features in the last dimension (a transformer's ``(B, N, C)``, from a
    Linear) are normalized over ``C``.

    Args:
        model: any module.
        norm: ``"batchnorm"``, ``"renorm"``, ``"noisy"``, ``"torch"``, a norm class or a factory
            ``num_features -> module`` (see :func:`normzoo.get_norm_layer`).
        example_input: an input for one forward pass (a tensor, a tuple of positional arguments or a dict of
            keyword arguments), run in eval mode under ``torch.no_grad()``, that sizes every new layer; without
            it, layers whose producer is unknown size themselves at the first forward.
        activations: what counts as an activation, replacing the defaults: ``nn.Module`` subclasses, functions
            (``F.relu``) and tensor-method names (``"relu"``).
        remove_bias: drop the bias of a Linear or convolution whose output feeds only a new BatchNorm-family
            layer: the layer subtracts the batch mean, which cancels it, so training outputs do not change.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The model with its norm layers, in the training mode it had.

    Raises:
        TypeError: ``model`` is not a module, or ``activations`` holds something else.
        ValueError: ``norm`` is unknown (the message lists the valid names), or the forward pass on
            ``example_input`` fails (the message names the module where it failed).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = insert_bn(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> net
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=False)
          (1): NormAct(
            channels_last=True
            (norm): BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
            (act): ReLU()
          )
          (2): Linear(in_features=8, out_features=2, bias=True)
        )
        >>> net(torch.randn(16, 4)).shape
        torch.Size([16, 2])
    """
    check_model(model, "insert_bn")
    get_norm_layer(norm, 1)  # an unknown name fails here, listing the valid ones
    acts = _Activations.parse(activations)
    model = copy_model(model, inplace, "insert_bn")
    if example_input is not None:
        _run_example(model, example_input, "")

    graphs = ModelGraph(model, lambda m: _is_atomic(m, acts))
    act_ids = {id(m) for m in model.modules() if isinstance(m, acts.modules)}
    # A parameter-free module without children whose forward calls an activation is an activation itself
    # (a hand-written Swish): it is wrapped, not rewritten inside.
    for owner, module in graphs.owners.items():
        bare = owner and not module._modules and not list(module.parameters()) and not list(module.buffers())
        if bare and any(acts.is_call(node) for node in graphs.graphs[owner].nodes):
            act_ids.add(id(module))

    sites, unreachable = _find_sites(model, graphs, acts, act_ids)
    todo = [site for site in sites if site.source.kind != "norm"]
    if not sites:
        if not unreachable:
            warnings.warn(
                f"insert_bn: found no activation in {type(model).__name__} (no activation module and no "
                "activation call that torch.fx could reach); the model is returned unchanged",
                UserWarning,
                stacklevel=2,
            )
    elif not todo:
        warnings.warn(
            f"insert_bn: each of the {len(sites)} activations of {type(model).__name__} already follows a "
            "normalization layer; nothing was inserted",
            UserWarning,
            stacklevel=2,
        )

    eager = example_input is None
    for site in todo:  # a producer guessed from the registration order is only a hint: size at the forward
        layer, channels_last = _new_norm(norm, site.source, eager and site.traced_caller, model)
        site.normact = NormAct(layer, site.act, channels_last=channels_last)
        site.normact.train(site.training)

    failed = _apply(model, graphs, todo, acts, act_ids)
    unreachable.extend(failed)
    if unreachable:
        warnings.warn(
            "insert_bn: some activations get no norm layer:\n"
            + "\n".join(f"  - {line}" for line in unreachable),
            UserWarning,
            stacklevel=2,
        )
    applied = [site for site in todo if site.normact is not None]

    if example_input is not None and applied:
        counts = _count_calls_during(
            model, example_input, [s.normact for s in applied if not s.traced_caller]
        )
        for site in applied:
            if not site.traced_caller and counts.get(id(site.normact), 0) > 1:
                assert site.act is not None
                for name in site.names:
                    set_submodule(model, name, site.act)
                warnings.warn(
                    f"insert_bn: activation module {site.label!r} is called {counts[id(site.normact)]} times per "
                    "forward from code torch.fx could not trace, so its calls cannot get separate norm layers; it "
                    "gets none",
                    UserWarning,
                    stacklevel=2,
                )
                site.normact = None
    if remove_bias:
        for site in applied:
            _drop_bias(site)
    return model


def _find_sites(
    model: nn.Module, graphs: ModelGraph, acts: _Activations, act_ids: set[int]
) -> tuple[list[_Site], list[str]]:
    """Every activation site, with its source; and messages about activations out of reach."""
    sites: list[_Site] = []
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
                _Site(name, _sibling_source(model, name), act=module, names=names, training=module.training,
                      traced_caller=False)
            )  # fmt: skip
            continue
        rewrite = len(calls) > 1
        if len(calls) == 1:
            owner, node = calls[0]
            arg = _first_arg(node)
            rewrite = arg is not None and _is_inplace_call(node, module) and _used_after(node, arg)
            if not rewrite:
                source = _walk_back(graphs, Value(owner, arg), acts, act_ids) if arg is not None else _UNKNOWN
                sites.append(_Site(name, source, act=module, names=names, training=module.training))
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
        calls_in_source = _functional_calls_in_source(module, acts)
        if calls_in_source:
            unreachable.append(
                f"{', '.join(calls_in_source)} in {type(module).__name__}.forward ({owner or 'the root'}): torch.fx "
                f"could not trace it ({reason}); its activation modules are still handled"
            )
    return sites, unreachable


def _call_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"x.{node.target}()"
    target = node.target
    module = getattr(target, "__module__", "") or ""
    prefix = "F." if module.endswith("functional") else "torch." if module.startswith("torch") else ""
    return f"{prefix}{getattr(target, '__name__', target)}"


def _graph_site(
    graphs: ModelGraph, owner: str, node: fx.Node, acts: _Activations, act_ids: set[int], label: str
) -> _Site:
    owner_module = graphs.owners[owner]
    index = _activation_nodes(graphs.graphs[owner], owner_module, acts, act_ids).index(node)
    arg = _first_arg(node)
    source = _walk_back(graphs, Value(owner, arg), acts, act_ids) if arg is not None else _UNKNOWN
    module = owner_module.get_submodule(str(node.target)) if node.op == "call_module" else None
    return _Site(
        label, source, owner=owner, index=index, node_name=node.name,
        inplace=arg is not None and _is_inplace_call(node, module) and _used_after(node, arg),
        training=owner_module.training,
    )  # fmt: skip


def _apply(
    model: nn.Module, graphs: ModelGraph, sites: Sequence[_Site], acts: _Activations, act_ids: set[int]
) -> list[str]:
    """Wrap the activation modules and rewrite the forwards; returns messages for the sites that failed."""
    failures: list[str] = []
    by_owner: dict[str, list[_Site]] = {}
    for site in sites:
        if site.owner is not None:
            by_owner.setdefault(site.owner, []).append(site)
    for owner, owner_sites in by_owner.items():
        module = graphs.owners[owner]
        taken = set(module.__dict__) | set(module._modules) | set(module._parameters) | set(module._buffers)
        planned: list[tuple[_Site, str]] = []
        for site in owner_sites:
            base = f"norm_{site.node_name}"
            name = base
            for k in range(1, 10_000):
                if name not in taken and not hasattr(module, name):
                    break
                name = f"{base}_{k}"
            taken.add(name)
            planned.append((site, name))
        try:
            _rewrite(module, graphs.graphs[owner], planned, acts, act_ids)
        except TraceError as failure:
            labels = ", ".join(site.label for site in owner_sites)
            failures.append(
                f"{labels}: the forward of {type(module).__name__} cannot be rewritten ({failure})"
            )
            for site in owner_sites:
                site.normact = None
    for site in sites:  # after the rewrites, which find activation modules by what they are
        if site.owner is None:
            assert site.normact is not None
            for name in site.names:
                set_submodule(model, name, site.normact)
    return failures


def _rewrite(
    module: nn.Module,
    reference_graph: fx.Graph,
    planned: list[tuple[_Site, str]],
    acts: _Activations,
    act_ids: set[int],
) -> None:
    reference = [_site_key(n) for n in _activation_nodes(reference_graph, module, acts, act_ids)]
    graphs: dict[bool, fx.Graph] = {}
    for mode in (True, False):
        graph = trace_module(module, training=mode)
        nodes = _activation_nodes(graph, module, acts, act_ids)
        if [_site_key(n) for n in nodes] != reference:
            raise TraceError("its forward calls different activations in training and in eval mode")
        for site, name in planned:
            node = nodes[site.index]
            arg = _first_arg(node)
            assert arg is not None
            with graph.inserting_before(node):
                normed = graph.call_module(name, (arg,))
            node.replace_input_with(arg, normed)
            if site.inplace:  # later uses of the tensor saw the activation's in-place result: keep it so
                order = {n: i for i, n in enumerate(graph.nodes)}
                for user in list(arg.users):
                    if user is not normed and order[user] > order[node]:
                        user.replace_input_with(arg, node)
        graphs[mode] = graph
    previous = module.__dict__.get("forward")
    inserted = tuple(getattr(previous, "inserted", ())) + tuple(name for _, name in planned)
    for site, name in planned:
        assert site.normact is not None
        module.add_module(name, site.normact)
    install_graph_forward(module, graphs, inserted)


def _count_calls_during(
    model: nn.Module, example_input: Any, watched: list[NormAct | None]
) -> dict[int, int]:
    """Run the sizing forward pass on ``example_input``, counting the calls of the ``watched`` modules."""
    counts: dict[int, int] = {}
    handles = []

    def count(module: nn.Module, _: Any) -> None:
        counts[id(module)] = counts.get(id(module), 0) + 1

    for module in watched:
        if module is not None:
            handles.append(module.register_forward_pre_hook(count))
    try:
        _run_example(model, example_input, " (with the new layers)")
    finally:
        for handle in handles:
            handle.remove()
    return counts
