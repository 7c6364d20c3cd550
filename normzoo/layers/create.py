"""Resolve a ``norm=`` specification to a layer class (``get_norm_layer``) and build it (``create_norm_layer``).

A specification is one of the family names in :data:`NORM_FAMILIES` (``"batchnorm"``, ``"renorm"``,
``"noisy"``, ``"torch"``), a class of one of those families (its family is used at the dimension asked for,
so ``BatchRenorm2d`` also gives ``BatchRenorm1d`` where a 1d layer is needed), any other module class, or a
factory callable ``num_features -> nn.Module`` (a ``functools.partial`` of a class, for instance).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["NORM_FAMILIES", "NormSpec", "create_norm_layer", "get_norm_layer", "is_batch_norm", "norm_family"]

NormSpec = str | type[nn.Module] | Callable[..., nn.Module]

#: The 1d, 2d and 3d classes of each family, by name.
NORM_FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "batchnorm": (BatchNorm1d, BatchNorm2d, BatchNorm3d),
    "renorm": (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
    "noisy": (NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}


def norm_family(cls: type[nn.Module]) -> str | None:
    """The name of the family that ``cls`` belongs to, or ``None``.

    Example:
        >>> norm_family(BatchRenorm2d), norm_family(nn.LayerNorm)
        ('renorm', None)
    """
    for name, classes in NORM_FAMILIES.items():
        if cls in classes:
            return name
    return None


def get_norm_layer(norm: NormSpec, ndim: int = 2) -> Callable[..., nn.Module]:
    """Resolve ``norm`` to a class or factory that builds a ``ndim``-d layer from ``num_features``.

    Args:
        norm: a family name, a class or a factory (see the module docstring).
        ndim: 1, 2 or 3: the layer's spatial kind (1 for ``(N, C)`` and ``(N, C, L)`` inputs).

    Example:
        >>> get_norm_layer("renorm", 1)
        <class 'normzoo.layers.renorm.BatchRenorm1d'>
        >>> get_norm_layer(BatchNorm2d, 3)
        <class 'normzoo.layers.batchnorm.BatchNorm3d'>
        >>> get_norm_layer("layernorm")
        Traceback (most recent call last):
        ...
        ValueError: unknown norm 'layernorm'; expected one of 'batchnorm', 'renorm', 'noisy', 'torch', a class or a factory callable
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
    if isinstance(norm, str):
        key = norm.lower()
        if key not in NORM_FAMILIES:
            valid = ", ".join(repr(name) for name in NORM_FAMILIES)
            raise ValueError(f"unknown norm {norm!r}; expected one of {valid}, a class or a factory callable")
        return NORM_FAMILIES[key][ndim - 1]
    if isinstance(norm, type):
        family = norm_family(norm)
        return NORM_FAMILIES[family][ndim - 1] if family is not None else norm
    if isinstance(norm, functools.partial) and isinstance(norm.func, type) and norm_family(norm.func):
        cls = get_norm_layer(norm.func, ndim)
        return functools.partial(cls, *norm.args, **norm.keywords)
    if callable(norm):
        return norm
    raise TypeError(f"norm must be a string, a class or a callable, got {type(norm).__name__}")


def create_norm_layer(norm: NormSpec, num_features: int, ndim: int = 2, **kwargs: Any) -> nn.Module:
    """Build the layer that ``norm`` names for ``num_features`` channels.

    Example:
        >>> create_norm_layer("noisy", 16, ndim=1)
        NoisyBatchNorm1d(16, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, mean_range=0.5, std_range=(0.1, 0.5))
    """
    return get_norm_layer(norm, ndim)(num_features, **kwargs)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-normalization layer: torch's (SyncBatchNorm and timm's too) or normzoo's.

    Every normzoo layer is a subclass of torch's ``_BatchNorm``, so this is that ``isinstance`` check.

    Example:
        >>> is_batch_norm(nn.BatchNorm2d(3)), is_batch_norm(BatchRenorm1d(3)), is_batch_norm(nn.LayerNorm(3))
        (True, True, False)
    """
    return isinstance(module, _BatchNorm)
