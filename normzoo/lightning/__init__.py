"""PyTorch Lightning integration: the training module, the data modules, and (in ``.callbacks``) the monitors.

Needs the ``lightning`` extra: ``pip install "normzoo[lightning]"``.

Example:
    >>> from normzoo.lightning import ClassificationModule, DigitsDataModule
    >>> dm = DigitsDataModule(flatten=True)
    >>> module = ClassificationModule("mlp", dm.num_classes, norm="batchnorm",
    ...                               model_kwargs={"in_features": dm.num_features})
"""

from ._imports import require_lightning

require_lightning()

from .data import (  # noqa: E402
    ClassificationDataModule,
    DigitsDataModule,
    TorchvisionDataModule,
    get_datamodule,
)
from .module import ClassificationModule  # noqa: E402
from .sync import NormSync  # noqa: E402

__all__ = [
    "ClassificationDataModule",
    "ClassificationModule",
    "DigitsDataModule",
    "NormSync",
    "TorchvisionDataModule",
    "get_datamodule",
]
