"""Which modules a monitor looks at: the ``layers=`` argument, display names, the blocks of a Sequential.

:class:`LayerSelector` is what a monitor holds: it checks ``layers=`` when the monitor is built and resolves
it against the LightningModule in ``setup``. The small predicates and tensor helpers beside it are the
monitors' shared vocabulary for "a layer with a weight".
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

import torch
from torch import Tensor, nn

from ...diagnostics import activation_kind
from ...layers import is_batch_norm

__all__ = [
    "LayerSelector",
    "LayerSpec",
    "any_module",
    "find_blocks",
    "finite_mean",
    "has_weight",
    "has_weight_matrix",
    "is_bn_without_stats",
    "layer_tensor",
    "select_layers",
    "short_names",
]

#: How a monitor's ``layers`` argument picks modules: ``None`` (the monitor's default), glob patterns
#: matched against a module's dotted name or any dotted suffix of it (``"conv*"`` matches
#: ``model.conv1``), module classes, or a predicate ``(name, module) -> bool``.
LayerSpec: TypeAlias = (
    str
    | Sequence[str]
    | type[nn.Module]
    | tuple[type[nn.Module], ...]
    | Callable[[str, nn.Module], bool]
    | None
)
Predicate: TypeAlias = Callable[[str, nn.Module], bool]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def _is_classes(spec: object) -> bool:
    return isinstance(spec, type) or (
        isinstance(spec, tuple) and bool(spec) and all(isinstance(t, type) for t in spec)
    )


def _predicate(spec: LayerSpec, owner: str = "select_layers") -> Predicate | None:
    """``spec`` as a predicate (``None`` for ``None``); a TypeError for anything that is not a LayerSpec."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return lambda name, module: _matches(name, [spec])
    if _is_classes(spec):
        classes = spec
        return lambda name, module: isinstance(module, classes)  # type: ignore[arg-type]
    if callable(spec):
        return spec  # type: ignore[return-value]
    if isinstance(spec, Sequence) and spec and all(isinstance(p, str) for p in spec):
        patterns = [str(p) for p in spec]
        return lambda name, module: _matches(name, patterns)
    raise TypeError(
        f"{owner}: expected layers to be None, a glob pattern, a list of patterns, a module class (or a "
        f"tuple of them) or a predicate (name, module) -> bool, got {spec!r}"
    )


def any_module(name: str, module: nn.Module) -> bool:
    """Every module (a predicate that a process can pickle, unlike a lambda: ``ddp_spawn`` sends callbacks)."""
    return True


def select_layers(
    root: nn.Module, spec: LayerSpec, default: Predicate, allowed: Predicate = any_module
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``root`` (not ``root`` itself) that ``spec`` picks, in registration
    order; ``default`` decides when ``spec`` is ``None``, ``allowed`` always.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [n for n, _ in select_layers(net, nn.Linear, lambda n, m: False)]
        ['0', '2']
        >>> [n for n, _ in select_layers(net, "1", lambda n, m: False)]
        ['1']
    """
    pick = _predicate(spec) or default
    return [(n, m) for n, m in root.named_modules() if n and pick(n, m) and allowed(n, m)]


def short_names(names: Sequence[str]) -> list[str]:
    """``names`` without the dotted prefix they all share, as long as every name keeps one component.

    Example:
        >>> short_names(["model.conv1", "model.conv2"]), short_names(["model.conv1"])
        (['conv1', 'conv2'], ['conv1'])
    """
    if not names:
        return []
    split = [n.split(".") for n in names]
    common = 0
    while all(len(s) > common + 1 for s in split) and len({s[common] for s in split}) == 1:
        common += 1
    return [".".join(s[common:]) for s in split]


class LayerSelector:
    """A monitor's ``layers=`` argument, checked when the monitor is built and resolved in ``setup``.

    Args:
        spec: the user's :data:`LayerSpec`.
        default: which modules count when ``spec`` is ``None``.
        allowed: what a module must be for the monitor to look at it at all.
        owner: the monitor's class name, for messages.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> LayerSelector(None, default=has_weight_matrix).resolve(net)
        [('0', Linear(in_features=2, out_features=3, bias=True)), ('2', Linear(in_features=3, out_features=1, bias=True))]
    """

    def __init__(
        self,
        spec: LayerSpec,
        *,
        default: Predicate,
        allowed: Predicate = any_module,
        owner: str = "LayerSelector",
    ) -> None:
        _predicate(spec, owner)  # fail now, not in the middle of a fit
        self.spec = spec
        self.default = default
        self.allowed = allowed

    def resolve(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(display name, module)`` of the selected modules, names shortened by :func:`short_names`."""
        picked = select_layers(root, self.spec, self.default, self.allowed)
        return list(zip(short_names([n for n, _ in picked]), [m for _, m in picked], strict=True))


def finite_mean(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values, ``None`` when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def has_weight_matrix(name: str, module: nn.Module) -> bool:
    """Layers with a weight of two or more dimensions: linear, conv, embedding (not norms' scales)."""
    w = getattr(module, "weight", None)
    return isinstance(w, nn.Parameter) and w.dim() >= 2 and w.requires_grad


def has_weight(name: str, module: nn.Module) -> bool:
    """Modules with a ``weight`` parameter."""
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def is_bn_without_stats(module: nn.Module) -> bool:
    """A BatchNorm-family layer built with ``track_running_stats=False``."""
    return is_batch_norm(module) and getattr(module, "running_mean", None) is None


def layer_tensor(module: nn.Module, include_bias: bool, grad: bool = False) -> Tensor | None:
    """A layer's ``weight`` (flattened together with its ``bias`` when ``include_bias``), detached, or the
    gradient of the same with ``grad=True`` (``None`` while the weight has no gradient)."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    bias = getattr(module, "bias", None)
    w = weight.grad if grad else weight.detach()
    if w is None:
        return None
    b = (bias.grad if grad else bias.detach()) if include_bias and isinstance(bias, Tensor) else None
    return torch.cat([w.flatten(), b.flatten()]) if b is not None else w


def _contains_activation(module: nn.Module) -> bool:
    return any(activation_kind(m) is not None for m in module.modules())


def find_blocks(root: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """Split the outermost :class:`~torch.nn.Sequential` of ``root`` into blocks that end at an activation.

    Each block maps one activation's output to the next one's (``conv -> norm -> act``, with any pooling
    or flattening in between), which is the "layer" whose input-output Jacobian dynamical isometry talks
    about; trailing modules (the head) form a last block. Blocks are new ``Sequential`` views sharing the
    modules (nothing is copied or re-registered). Names are ``<first>-<last>`` child names (prefixed with
    the Sequential's name). Returns ``[]`` when ``root`` has no Sequential or no activation.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        >>> [name for name, _ in find_blocks(net)]
        ['0-2', '3']
    """
    seq_name, seq = next(
        ((n, m) for n, m in root.named_modules() if isinstance(m, nn.Sequential)), ("", None)
    )
    if seq is None or not _contains_activation(seq):
        return []
    prefix = f"{seq_name}." if seq_name else ""
    blocks: list[tuple[str, nn.Sequential]] = []
    current: list[tuple[str, nn.Module]] = []

    def close() -> None:
        if current and any(True for _, m in current for _ in m.parameters()):
            first, last = current[0][0], current[-1][0]
            name = first if first == last else f"{first}-{last}"
            blocks.append((prefix + name, nn.Sequential(*[m for _, m in current])))
            current.clear()

    for child_name, child in seq.named_children():
        current.append((child_name, child))
        if _contains_activation(child):
            close()
    close()
    return blocks
