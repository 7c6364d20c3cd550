"""``fuse_bn``: fold BatchNorm layers into the Linear or convolution next to them, for inference.

In eval mode a BatchNorm layer is the per-channel affine map ``y = a·x + c`` with ``a = γ/sqrt(var + ε)`` and
``c = β − a·mean`` (running statistics). After a layer ``z = W∗x + b`` it folds into that layer's output
channels: ``W' = a·W`` and ``b' = a·b + c``. Before a layer it folds into the input channels:
``W' = W·a`` and ``b' = b + W∗c`` — exact for a Linear, and for a convolution only when nothing pads the
normalized input with zeros (with zero padding the border would see ``c`` where it saw 0), so a BN before a
zero-padded convolution stays. Adjacency is read from the per-module torch.fx graphs (a plain
``nn.Sequential`` needs no tracing); modules used in several places are not folded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import check_model, copy_model, hook_dict_names, set_submodule
from ._graph import ModelGraph, Value, first_input
from ._kinds import has_act, is_surgery_bn
from ._modules import NormAct
from .freeze import FrozenBatchNorm
from .remove import removal_replacement

__all__ = ["fuse_bn"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = (nn.Linear, *_CONV, *_CONV_T)
_PASS = (nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout)  # identities in eval mode


def _is_leaf(module: nn.Module) -> bool:
    return _is_bn(module) or isinstance(module, (*_FOLDABLE, *_PASS))


def _is_bn(module: nn.Module) -> bool:
    """What folds: BatchNorm of every kind (eval form), insert_bn's layers and frozen BatchNorm."""
    return is_surgery_bn(module) or isinstance(module, FrozenBatchNorm)


def _passes(graphs: ModelGraph) -> Callable[[Value], bool]:
    """What a fold sees through: identities and dropout, which are identities in eval mode."""
    return lambda value: value.node.op == "call_module" and isinstance(graphs.module_at(value), _PASS)


def _plain_type(module: nn.Module) -> type[nn.Module]:
    """The class of ``module`` before ``torch.nn.utils.parametrize`` subclassed it (``ParametrizedConv2d``)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, key, None) for key in hook_dict_names())


def _refusal(graphs: ModelGraph, layer: nn.Module) -> str | None:
    """Why ``layer`` cannot take a fold, or ``None`` if it can."""
    if not graphs.used_once(layer):
        return "is used in several places (folding would change every use)"
    if _has_hooks(layer):
        return "has hooks"
    if parametrize.is_parametrized(layer):
        return "has a parametrization"
    if not (isinstance(layer.weight, nn.Parameter) and layer.weight.is_floating_point()):
        return "has no floating-point weight"
    return None


class _Neighbour:
    """The layer next to a BN, and why it cannot be folded into (``None`` if it can)."""

    def __init__(self, layer: nn.Module, graphs: ModelGraph) -> None:
        self.layer = layer
        self.refusal = _refusal(graphs, layer)


def _producer(graphs: ModelGraph, call: Value) -> _Neighbour | None:
    """The Linear/convolution whose output reaches the BN at ``call`` and nothing else, through identities."""
    arg = first_input(call.node)
    if arg is None:
        return None
    passes = _passes(graphs)
    for value in graphs.walk_back(Value(call.owner, arg), passes):
        node = value.node
        if len(node.users) != 1:
            return None
        if node.op == "placeholder" or passes(value):
            continue
        if node.op != "call_module":
            return None
        module = graphs.module_at(value)
        if _plain_type(module) in _FOLDABLE:
            return _Neighbour(module, graphs)
        if graphs.call_count(module) != 1:
            return None
    return None


def _consumer(graphs: ModelGraph, call: Value) -> _Neighbour | None:
    """The Linear/convolution that alone receives the BN output at ``call``, through identities."""
    passes = _passes(graphs)
    for step in graphs.walk_forward(call, passes):
        node = step.node
        if node.op != "call_module" or len(node.args) + len(node.kwargs) != 1:
            return None
        module = graphs.module_at(step)
        if _plain_type(module) in _FOLDABLE:
            return _Neighbour(module, graphs)
        if not passes(step) and graphs.call_count(module) != 1:
            return None
    return None


def _norm_of(module: nn.Module) -> Any:
    return module.norm if isinstance(module, NormAct) else module


def _kind_of(module: nn.Module) -> nn.Module:
    """The layer whose class says the BN's dimension (a frozen layer's is that of the layer it froze)."""
    norm = _norm_of(module)
    return norm.original if isinstance(norm, FrozenBatchNorm) else norm


def _features_last(module: nn.Module) -> bool | None:
    """Whether the BN normalizes the last dimension (a Linear's features): True, False, or None if both fit."""
    if isinstance(module, NormAct):
        return bool(module.channels_last)
    norm = _kind_of(module)
    one_d = isinstance(norm, nn.BatchNorm1d) or 2 in getattr(type(norm), "_input_dims", ())
    return None if one_d else False


def _fits_after(bn: nn.Module, layer: Any) -> bool:
    features = _norm_of(bn).num_features
    last = _features_last(bn)
    if isinstance(layer, nn.Linear):
        # A 1d BatchNorm after a Linear: (N, F) is assumed, as torch.ao's fuse_modules does.
        return layer.out_features == features and last is not False
    return layer.out_channels == features and not last


def _fits_before(bn: nn.Module, layer: Any) -> bool:
    if has_act(bn) or not isinstance(bn._modules.get("drop", nn.Identity()), nn.Identity):
        return False
    if isinstance(bn, NormAct) and bn.act is not None:
        return False
    features = _norm_of(bn).num_features
    last = _features_last(bn)
    if isinstance(layer, nn.Linear):
        return layer.in_features == features and last is not False
    if last or layer.in_channels != features:
        return False
    if isinstance(layer, _CONV_T):  # only a pointwise transposed convolution sees every input value once
        return (
            all(k == 1 for k in layer.kernel_size)
            and all(s == 1 for s in layer.stride)
            and all(p == 0 for p in layer.padding)
            and all(p == 0 for p in layer.output_padding)
        )
    if (
        layer.padding_mode != "zeros"
    ):  # reflect, replicate and circular padding commute with a per-channel map
        return True
    padding = layer.padding
    if isinstance(padding, str):
        return padding == "valid" or all(
            d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)
        )
    return all(p == 0 for p in padding)


def _affine(bn: Any) -> tuple[Tensor, Tensor]:
    """``(a, c)`` in float64 such that the BN in eval mode is ``a·x + c`` per channel."""
    norm = _norm_of(bn)
    var = norm.running_var.double()
    mean = norm.running_mean.double()
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _set(layer: Any, weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(
                bias.to(device=layer.weight.device, dtype=layer.weight.dtype),
                requires_grad=layer.weight.requires_grad,
            )
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def _current(layer: Any, out_features: int) -> tuple[Tensor, Tensor]:
    weight = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else weight.new_zeros(out_features)
    return weight, bias


def _fold_after(layer: Any, scale: Tensor, shift: Tensor) -> None:
    if isinstance(layer, _CONV_T):
        out = layer.out_channels
        weight, bias = _current(layer, out)
        groups = layer.groups
        shape = weight.shape  # (in, out / groups, *kernel)
        grouped = weight.reshape(groups, shape[0] // groups, shape[1], *shape[2:])
        factor = scale.reshape(groups, 1, shape[1], *([1] * (weight.dim() - 2)))
        weight = (grouped * factor).reshape(shape)
    else:
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        weight, bias = _current(layer, out)
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    _set(layer, weight, bias * scale + shift)


def _fold_before(layer: Any, scale: Tensor, shift: Tensor) -> None:
    if isinstance(layer, nn.Linear):
        weight, bias = _current(layer, layer.out_features)
        _set(layer, weight * scale, bias + weight @ shift)
        return
    if isinstance(layer, _CONV_T):  # pointwise: weight (in, out / groups, 1, ...)
        weight, bias = _current(layer, layer.out_channels)
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1])
        bias = bias + torch.einsum("gio,gi->go", grouped, shift.reshape(groups, -1)).reshape(-1)
        _set(layer, weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), bias)
        return
    weight, bias = _current(layer, layer.out_channels)  # (out, in / groups, *kernel)
    groups = int(layer.groups)
    out, per_group = int(weight.shape[0]), int(weight.shape[1])
    spatial = [1] * (weight.dim() - 2)
    scale_out = (
        scale.reshape(groups, per_group)
        .repeat_interleave(out // groups, dim=0)
        .reshape(out, per_group, *spatial)
    )
    shift_out = (
        shift.reshape(groups, per_group)
        .repeat_interleave(out // groups, dim=0)
        .reshape(out, per_group, *spatial)
    )
    bias = bias + (weight * shift_out).flatten(1).sum(1)
    _set(layer, weight * scale_out, bias)


def fuse_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm-family layer into the Linear or convolution next to it, for inference.

    A BN right after a ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` (identities and dropout in
    between are fine) is folded into that layer's weight and bias; a BN right before one is folded into it
    where that is exact (a Linear; a convolution that does not zero-pad; a pointwise transposed convolution).
    The BN then becomes an identity (timm's ``BatchNormAct2d`` and ``insert_bn``'s ``NormAct``: their
    activation). A BN with no such neighbour stays, as does one whose neighbour is used in several places, has
    hooks or a parametrization (a warning names them). BN layers use their running statistics, as in eval
    mode; one without running statistics stays too.

    A ``Linear`` next to a ``BatchNorm1d`` is assumed to see ``(N, F)`` tensors, where BatchNorm1d's channel is
    the Linear's feature (as torch.ao's ``fuse_modules`` assumes); ``insert_bn``'s channels-last layers are
    folded for any shape.

    Args:
        model: any module.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fused model, in eval mode; its outputs match the eval outputs of ``model`` within float tolerance.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a layer of ``insert_bn`` is still pending (run one forward pass first).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> fused = fuse_bn(net)
        >>> fused
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(fused(x), net(x), atol=1e-6)
        True
    """
    check_model(model, "fuse_bn")
    model = copy_model(model, inplace, "fuse_bn")
    for name, module in model.named_modules():
        if isinstance(module, NormAct) and module.pending:
            raise ValueError(
                f"fuse_bn: expected every norm layer of insert_bn to be sized, got {name!r} still pending "
                "(insert_bn without example_input sizes it at the first forward); run one forward pass first"
            )
    graphs = ModelGraph(model, _is_leaf)
    after: list[tuple[nn.Module, nn.Module]] = []
    before: list[tuple[nn.Module, nn.Module]] = []
    skipped: list[str] = []
    seen: set[int] = set()
    for name, bn in model.named_modules():
        if not _is_bn(bn) or id(bn) in seen:
            continue
        seen.add(id(bn))
        norm = _norm_of(bn)
        calls = graphs.calls.get(id(bn), [])
        if len(calls) > 1 or len(graphs.names[id(bn)]) > 1:
            skipped.append(f"{name}: used in several places")
            continue
        if len(calls) != 1:
            continue
        if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
            skipped.append(f"{name}: no running statistics (it normalizes with batch statistics in eval)")
            continue
        if _has_hooks(bn) or _has_hooks(norm):
            skipped.append(f"{name}: it has hooks")
            continue
        call = Value(*calls[0])
        producer, consumer = _producer(graphs, call), _consumer(graphs, call)
        if producer is not None and producer.refusal is None and _fits_after(bn, producer.layer):
            after.append((bn, producer.layer))
        elif consumer is not None and consumer.refusal is None and _fits_before(bn, consumer.layer):
            before.append((bn, consumer.layer))
        else:
            for neighbour in (producer, consumer):
                if neighbour is not None and neighbour.refusal is not None:
                    layer_name = graphs.names[id(neighbour.layer)][0]
                    skipped.append(f"{name}: its neighbour {layer_name} {neighbour.refusal}")
                    break
    names = {id(module): name for name, module in model.named_modules()}
    for (bn, layer), fold in [
        *((pair, _fold_after) for pair in after),
        *((pair, _fold_before) for pair in before),
    ]:
        scale, shift = _affine(bn)
        fold(layer, scale, shift)
        replacement = removal_replacement(bn)
        assert replacement is not None
        set_submodule(model, names[id(bn)], replacement)
    if skipped:
        warnings.warn(
            "fuse_bn: these BatchNorm layers stay unfused: " + "; ".join(skipped), UserWarning, stacklevel=2
        )
    return model.eval()
