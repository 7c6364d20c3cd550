"""PyTorch Lightning integration: the training module, the data modules, and (in ``.callbacks``) the monitors.

Needs the ``lightning`` extra: ``pip install "normzoo[lightning]"``, checked when a name of this package
is first used. :mod:`normzoo.lightning.plotting` needs matplotlib alone, so importing this package
imports nothing else.

Example:
    >>> from normzoo.lightning import ClassificationModule, DigitsDataModule
    >>> dm = DigitsDataModule(flatten=True)
    >>> module = ClassificationModule("mlp", dm.num_classes, norm="batchnorm",
    ...                               model_kwargs={"in_features": dm.num_features})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import (
        ClassificationDataModule,
        DigitsDataModule,
        TorchvisionDataModule,
        get_datamodule,
    )
    from .module import ClassificationModule
    from .sync import NormSync

#: Public name -> the submodule that defines it (imported on first use, after the Lightning check).
_EXPORTS = {
    "ClassificationDataModule": ".data",
    "ClassificationModule": ".module",
    "DigitsDataModule": ".data",
    "NormSync": ".sync",
    "TorchvisionDataModule": ".data",
    "get_datamodule": ".data",
}

__all__ = [
    "ClassificationDataModule",
    "ClassificationModule",
    "DigitsDataModule",
    "NormSync",
    "TorchvisionDataModule",
    "get_datamodule",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ._imports import require_lightning

    require_lightning()
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
