"""The one activation catalogue: names, module classes, functional forms, init gains and diagnostic kinds.

Everything in normzoo that needs to know about activations reads :data:`ACTIVATION_TABLE`: the model
builders (:func:`get_activation`, :func:`kaiming_nonlinearity`), ``insert_bn`` (which modules, functions and
tensor methods are activations) and the diagnostics (:func:`activation_kind`: dead ReLUs, saturated
sigmoid/tanh). It needs torch alone and sits below the layers, like timm's ``layers/create_act.py``.

Example:
    >>> get_activation("lrelu")
    <class 'torch.nn.modules.activation.LeakyReLU'>
    >>> activation_kind(nn.ReLU6()), kaiming_nonlinearity("tanh")
    ('relu', ('tanh', 0.0))
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "ACTIVATION_MODULES",
    "ACTIVATION_TABLE",
    "Activation",
    "ActivationKind",
    "activation_kind",
    "activation_modules",
    "get_activation",
    "kaiming_nonlinearity",
]

#: How the diagnostics treat an activation's output: ``"relu"`` counts dead units, ``"sigmoid"`` and
#: ``"tanh"`` count saturated outputs, ``"other"`` neither.
ActivationKind = Literal["relu", "sigmoid", "tanh", "other"]


@dataclass(frozen=True)
class Activation:
    """One activation of the catalogue.

    Attributes:
        module: its ``nn.Module`` class.
        names: the names :func:`get_activation` accepts for it (none for an activation that needs
            constructor arguments).
        functional: the name of its function in ``torch.nn.functional`` (its in-place ``name_`` form too,
            where torch has one), or ``""``.
        in_torch: whether ``torch.<functional>`` (and ``torch.<functional>_``) are forms of it too.
        method: whether ``Tensor.<functional>()`` (and ``Tensor.<functional>_()``) are forms of it too.
        gain: the ``nonlinearity`` that Kaiming initialization uses before it (``torch.nn.init`` names).
            Smooth ReLU-like units get ReLU's (their slope is about 1 for positive and 0 for negative
            inputs); SELU and the identity the linear gain, which torch documents for self-normalizing nets.
        kind: how the diagnostics treat its output, or ``None`` for the identity (not a nonlinearity).
    """

    module: type[nn.Module]
    names: tuple[str, ...] = ()
    functional: str = ""
    in_torch: bool = False
    method: bool = False
    gain: str = "relu"
    kind: ActivationKind | None = "other"


#: The catalogue, one entry per activation class.
ACTIVATION_TABLE: tuple[Activation, ...] = (
    Activation(nn.ReLU, ("relu",), "relu", in_torch=True, method=True, kind="relu"),
    Activation(nn.ReLU6, ("relu6",), "relu6", kind="relu"),
    Activation(nn.LeakyReLU, ("leaky_relu", "lrelu"), "leaky_relu", gain="leaky_relu"),
    Activation(nn.PReLU, ("prelu",), "prelu", in_torch=True, gain="leaky_relu"),
    Activation(nn.RReLU, (), "rrelu", in_torch=True),
    Activation(nn.ELU, ("elu",), "elu"),
    Activation(nn.SELU, ("selu",), "selu", in_torch=True, gain="linear"),
    Activation(nn.CELU, ("celu",), "celu", in_torch=True),
    Activation(nn.GELU, ("gelu",), "gelu"),
    Activation(nn.SiLU, ("silu", "swish"), "silu"),
    Activation(nn.Mish, ("mish",), "mish"),
    Activation(
        nn.Sigmoid, ("sigmoid",), "sigmoid", in_torch=True, method=True, gain="sigmoid", kind="sigmoid"
    ),
    Activation(nn.Tanh, ("tanh",), "tanh", in_torch=True, method=True, gain="tanh", kind="tanh"),
    Activation(nn.Softplus, ("softplus",), "softplus"),
    Activation(nn.Softsign, (), "softsign"),
    Activation(nn.Hardswish, (), "hardswish"),
    Activation(nn.Hardsigmoid, (), "hardsigmoid"),
    Activation(nn.Hardtanh, (), "hardtanh", in_torch=True, kind="tanh"),
    Activation(nn.LogSigmoid, (), "logsigmoid"),
    Activation(nn.Tanhshrink, (), "tanhshrink"),
    Activation(nn.Threshold, (), "threshold"),
    Activation(nn.Identity, ("identity", "linear"), gain="linear", kind=None),
)

_BY_CLASS: dict[type[nn.Module], Activation] = {entry.module: entry for entry in ACTIVATION_TABLE}

#: Activation names accepted by :func:`get_activation`, with the class each one gives.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    name: entry.module for entry in ACTIVATION_TABLE for name in entry.names
}

#: The activation module classes (the identity excluded); timm's are added by :func:`activation_modules`.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(
    entry.module for entry in ACTIVATION_TABLE if entry.kind is not None
)


def _forms(namespace: Any, name: str) -> list[Callable[..., Any]]:
    forms = (getattr(namespace, name, None), getattr(namespace, f"{name}_", None))
    return [form for form in forms if callable(form)]


#: The activation functions of a ``forward`` (``F.relu``, ``F.relu_``, ``torch.sigmoid``, ...).
ACTIVATION_FUNCTIONS: tuple[Callable[..., Any], ...] = tuple(
    dict.fromkeys(
        [form for entry in ACTIVATION_TABLE if entry.functional for form in _forms(F, entry.functional)]
        + [form for entry in ACTIVATION_TABLE if entry.in_torch for form in _forms(torch, entry.functional)]
    )
)

#: The tensor methods that are activations (``x.relu()``, ``x.sigmoid_()``, ...).
ACTIVATION_METHODS: tuple[str, ...] = tuple(
    name
    for entry in ACTIVATION_TABLE
    if entry.method
    for name in (entry.functional, f"{entry.functional}_")
    if hasattr(Tensor, name)
)

_TIMM_ACTIVATIONS = {
    "timm.layers.activations": ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish",
                                "GELU", "GELUTanh", "QuickGELU", "PReLU"),
    "timm.layers.activations_me": ("SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe"),
}  # fmt: skip


def activation_modules() -> tuple[type[nn.Module], ...]:
    """:data:`ACTIVATION_MODULES` and, when timm is imported, timm's own activation classes.

    timm is looked up, not imported: a model can hold timm's classes only once timm is imported, and
    importing it would cost ``import normzoo`` a second.

    Example:
        >>> nn.GELU in activation_modules()
        True
    """
    classes = list(ACTIVATION_MODULES)
    for module_name, names in _TIMM_ACTIVATIONS.items():
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                classes.append(cls)
    return tuple(classes)


def _entry(cls: type[nn.Module]) -> Activation | None:
    """The entry of ``cls`` or of its nearest catalogued base class (``nn.ReLU6`` is a ``Hardtanh``)."""
    for base in cls.__mro__:
        entry = _BY_CLASS.get(base)
        if entry is not None:
            return entry
    return None


def get_activation(name: str | type[nn.Module]) -> type[nn.Module]:
    """The activation class that ``name`` names (case-insensitive); a module class is returned as it is.

    Example:
        >>> get_activation("swishy")
        Traceback (most recent call last):
        ...
        ValueError: get_activation: expected one of 'celu', 'elu', 'gelu', 'identity', ..., or an nn.Module class, got 'swishy'
    """
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"get_activation: expected an activation name or an nn.Module class, got {type(name).__name__}"
        )
    key = name.lower().replace("-", "_")
    if key not in ACTIVATIONS:
        valid = ", ".join(repr(k) for k in sorted(ACTIVATIONS))
        raise ValueError(f"get_activation: expected one of {valid}, or an nn.Module class, got {name!r}")
    return ACTIVATIONS[key]


def kaiming_nonlinearity(activation: str | type[nn.Module] | nn.Module | None) -> tuple[str, float]:
    """The ``(nonlinearity, negative_slope)`` that Kaiming initialization should use before ``activation``.

    ``None`` or an activation outside the catalogue gives ReLU's, the usual default.

    Example:
        >>> kaiming_nonlinearity(nn.LeakyReLU(0.2)), kaiming_nonlinearity(None)
        (('leaky_relu', 0.2), ('relu', 0.0))
    """
    if activation is None:
        return "relu", 0.0
    module = activation if isinstance(activation, nn.Module) else None
    cls = type(activation) if isinstance(activation, nn.Module) else get_activation(activation)
    entry = _BY_CLASS.get(cls)
    gain = entry.gain if entry is not None else "relu"
    if gain != "leaky_relu":
        return gain, 0.0
    if isinstance(module, nn.LeakyReLU):
        return gain, float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        return gain, float(module.weight.detach().mean())
    return gain, 0.25 if cls is nn.PReLU else 0.01


def activation_kind(module: nn.Module) -> ActivationKind | None:
    """How the diagnostics treat a module's output: ``"relu"`` (dead units counted), ``"sigmoid"`` or
    ``"tanh"`` (saturation counted), ``"other"`` activation (timm's included), or ``None`` (no activation).

    Example:
        >>> activation_kind(nn.ReLU()), activation_kind(nn.Sigmoid()), activation_kind(nn.Linear(2, 2))
        ('relu', 'sigmoid', None)
    """
    entry = _entry(type(module))
    if entry is not None:
        return entry.kind
    return "other" if isinstance(module, activation_modules()) else None
