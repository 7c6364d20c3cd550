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

import itertools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from ..layers import NormSpec, get_norm_layer, is_batch_norm
from ._common import check_model, copy_model, first_tensor, floating_dtype, set_submodule
from ._forward import Variant, install_graph_forward
from ._graph import ModelGraph, TraceError, first_input, optional_arguments, trace_module
from ._inputs import run_forward
from ._kinds import is_norm_module, producer_layout
from ._modules import LazyNorm, NormAct
from ._sites import ActivationSpec, Site, Source, activation_nodes, find_sites, site_key

__all__ = ["insert_bn"]

#: A forward with more arguments that default to None is not rewritten (each doubles the graphs traced).
_MAX_OPTIONAL = 4


def _is_leaf(module: nn.Module, acts: ActivationSpec) -> bool:
    """Modules that are not traced: their calls are leaves (their insides are an activation's or a norm's)."""
    if isinstance(module, acts.modules) or is_norm_module(module):
        return True
    return producer_layout(module) is not None and not module._modules


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
    acts = ActivationSpec.parse(activations)
    model = copy_model(model, inplace, "insert_bn")
    calls: dict[int, int] = {}
    if example_input is not None:
        calls = run_forward(model, example_input, "insert_bn", "example_input")

    graphs = ModelGraph(model, lambda m: _is_leaf(m, acts))
    act_ids = {id(m) for m in model.modules() if isinstance(m, acts.modules)}
    # A parameter-free module without children whose forward calls an activation is an activation itself
    # (a hand-written Swish): it is wrapped, not rewritten inside.
    for owner, module in graphs.owners.items():
        bare = owner and not module._modules and not list(module.parameters()) and not list(module.buffers())
        if bare and any(acts.is_call(node) for node in graphs.graphs[owner].nodes):
            act_ids.add(id(module))

    sites, unreachable = find_sites(model, graphs, acts, act_ids)
    todo = [site for site in sites if site.source.kind != "norm"]
    for site in todo:
        count = calls.get(id(site.act), 0)
        if not site.traced_caller and count > 1:  # seen in the example pass: one layer cannot serve each call
            unreachable.append(
                f"activation module {site.label!r} is called {count} times per forward from code torch.fx could "
                "not trace, so its calls cannot get separate norm layers"
            )
    todo = [site for site in todo if site.traced_caller or calls.get(id(site.act), 0) <= 1]
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
        run_forward(model, example_input, "insert_bn", "example_input (with the new layers)")
    if remove_bias:
        for site in applied:
            _drop_bias(site)
    return model


def _apply(
    model: nn.Module, graphs: ModelGraph, sites: Sequence[Site], acts: ActivationSpec, act_ids: set[int]
) -> list[str]:
    """Wrap the activation modules and rewrite the forwards; returns messages for the sites that failed."""
    failures: list[str] = []
    by_owner: dict[str, list[Site]] = {}
    for site in sites:
        if site.owner is not None:
            by_owner.setdefault(site.owner, []).append(site)
    for owner, owner_sites in by_owner.items():
        module = graphs.owners[owner]
        taken = set(module.__dict__) | set(module._modules) | set(module._parameters) | set(module._buffers)
        planned: list[tuple[Site, str]] = []
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
    planned: list[tuple[Site, str]],
    acts: ActivationSpec,
    act_ids: set[int],
) -> None:
    reference = [site_key(n) for n in activation_nodes(reference_graph, module, acts, act_ids)]
    optional = optional_arguments(module)
    if len(optional) > _MAX_OPTIONAL:
        raise TraceError(f"its forward has more than {_MAX_OPTIONAL} arguments that default to None")
    graphs: dict[Variant, fx.Graph | None] = {}
    for mode, none in itertools.product(
        (True, False), itertools.product((False, True), repeat=len(optional))
    ):
        try:
            graph = trace_module(module, training=mode, none=none)
        except TraceError:
            if not any(none):
                raise
            graphs[(mode, none)] = None  # called so, the rewritten forward raises a clear error
            continue
        nodes = activation_nodes(graph, module, acts, act_ids)
        if [site_key(n) for n in nodes] != reference:
            raise TraceError(
                "its forward calls different activations in training and in eval mode, or when an optional "
                "argument is None"
            )
        for site, name in planned:
            node = nodes[site.index]
            arg = first_input(node)
            assert arg is not None
            with graph.inserting_before(node):
                normed = graph.call_module(name, (arg,))
            node.replace_input_with(arg, normed)
            if site.inplace:  # later uses of the tensor saw the activation's in-place result: keep it so
                order = {n: i for i, n in enumerate(graph.nodes)}
                for user in list(arg.users):
                    if user is not normed and order[user] > order[node]:
                        user.replace_input_with(arg, node)
        graphs[(mode, none)] = graph
    previous = module.__dict__.get("forward")
    inserted = tuple(getattr(previous, "inserted", ())) + tuple(name for _, name in planned)
    for site, name in planned:
        assert site.normact is not None
        module.add_module(name, site.normact)
    install_graph_forward(module, graphs, inserted, optional)


def _new_norm(norm: NormSpec, source: Source, eager: bool, model: nn.Module) -> tuple[nn.Module, bool | None]:
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


def _drop_bias(site: Site) -> bool:
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
