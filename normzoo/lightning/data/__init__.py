"""Lightning data modules with the seed recipe: a seeded 10 % validation split and global standardization.

One dataset family per file: :mod:`.mnist1d` (MNIST-1D generated locally: the study's default),
:mod:`.digits` (scikit-learn's bundled 8x8 digits) and
:mod:`.vision` (MNIST, Fashion-MNIST, SVHN, CIFAR-10/100 through torchvision from a local folder), both on
the common base :mod:`.base`.
"""

from __future__ import annotations

from typing import Any

from .base import (
    STANDARDIZATIONS,
    ClassificationDataModule,
    ClassSubsetBatchSampler,
    StandardizedTensorDataset,
    feature_stats,
)
from .digits import DigitsDataModule
from .mnist1d import MNIST1D_BASELINES, MNIST1DDataModule
from .vision import VISION_DATASETS, TorchvisionDataModule

__all__ = [
    "DATAMODULES",
    "MNIST1D_BASELINES",
    "STANDARDIZATIONS",
    "VISION_DATASETS",
    "ClassSubsetBatchSampler",
    "ClassificationDataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "StandardizedTensorDataset",
    "TorchvisionDataModule",
    "feature_stats",
    "get_datamodule",
]

#: The names :func:`get_datamodule` resolves.
DATAMODULES = ("mnist1d", "digits", *VISION_DATASETS)


def get_datamodule(name: str, **kwargs: Any) -> ClassificationDataModule:
    """The data module called ``name`` (``"mnist1d"``, ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, ``"svhn"``,
    ``"cifar10"``, ``"cifar100"``), built with ``kwargs``.

    ``root`` and ``download`` may be passed for every name, so one call serves them all; MNIST-1D (generated
    on this machine) and the digits (which ship inside scikit-learn) ignore them.

    Example:
        >>> get_datamodule("digits", batch_size=32)
        DigitsDataModule(batch_size=32, val_fraction=0.1, seed=0, standardize='global', input_shape=(1, 8, 8), num_classes=10)
        >>> get_datamodule("imagenet")
        Traceback (most recent call last):
        ...
        ValueError: unknown dataset 'imagenet'; expected one of 'mnist1d', 'digits', 'mnist', 'fashion_mnist', 'svhn', 'cifar10', 'cifar100'
    """
    key = name.lower().replace("-", "_")
    if key in ("digits", "mnist1d"):
        kwargs.pop("root", None)
        kwargs.pop("download", None)
        return DigitsDataModule(**kwargs) if key == "digits" else MNIST1DDataModule(**kwargs)
    if key in VISION_DATASETS:
        return TorchvisionDataModule(key, **kwargs)
    valid = ", ".join(repr(n) for n in DATAMODULES)
    raise ValueError(f"unknown dataset {name!r}; expected one of {valid}")
