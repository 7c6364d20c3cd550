"""MNIST, Fashion-MNIST, SVHN, CIFAR-10 and CIFAR-100 through torchvision, from a local folder.

The files are read by torchvision's own dataset classes, in torchvision's folder layout, so a folder that
torchvision downloaded once works here as it is. Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._imports import import_optional
from .base import ClassificationDataModule

__all__ = ["VISION_DATASETS", "TorchvisionDataModule", "VisionDatasetInfo"]


@dataclass(frozen=True)
class VisionDatasetInfo:
    """What normzoo needs to know about one torchvision dataset."""

    torchvision_class: str
    sample_shape: tuple[int, int, int]
    num_classes: int
    files: tuple[str, ...]  # the files torchvision reads, relative to ``root``
    split_kwarg: bool = False  # SVHN takes ``split="train"|"test"`` instead of ``train=True|False``


def _mnist_files(folder: str) -> tuple[str, ...]:
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    return tuple(f"{folder}/raw/{name}" for name in names)


#: The datasets :class:`TorchvisionDataModule` reads, by name.
VISION_DATASETS: dict[str, VisionDatasetInfo] = {
    "mnist": VisionDatasetInfo("MNIST", (1, 28, 28), 10, _mnist_files("MNIST")),
    "fashion_mnist": VisionDatasetInfo("FashionMNIST", (1, 28, 28), 10, _mnist_files("FashionMNIST")),
    "svhn": VisionDatasetInfo(
        "SVHN", (3, 32, 32), 10, ("train_32x32.mat", "test_32x32.mat"), split_kwarg=True
    ),
    "cifar10": VisionDatasetInfo(
        "CIFAR10",
        (3, 32, 32),
        10,
        tuple(
            f"cifar-10-batches-py/{f}"
            for f in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
        ),
    ),
    "cifar100": VisionDatasetInfo(
        "CIFAR100", (3, 32, 32), 100, tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta"))
    ),
}


class TorchvisionDataModule(ClassificationDataModule):
    """A torchvision image-classification dataset with the seed's split and standardization.

    Args:
        name: ``"mnist"``, ``"fashion_mnist"``, ``"svhn"``, ``"cifar10"`` or ``"cifar100"``.
        root: the folder holding the data in torchvision's layout: ``MNIST/raw/train-images-idx3-ubyte``...,
            ``train_32x32.mat`` and ``test_32x32.mat`` for SVHN, ``cifar-10-batches-py/`` and
            ``cifar-100-python/`` for CIFAR (what ``torchvision.datasets.X(root, download=True)`` leaves).
        download: let torchvision download the files into ``root`` when they are missing (in
            :meth:`prepare_data`, on one process only). Off by default: nothing touches the network.
        **kwargs: see :class:`ClassificationDataModule` (``batch_size``, ``val_fraction``, ``seed``,
            ``standardize``, ``flatten``, ``num_workers``, ...).

    The 10 % validation split is taken from torchvision's training split; its test split is the test set.

    Example:
        >>> dm = TorchvisionDataModule("cifar100", root="/data")
        >>> dm.num_classes, dm.input_shape, dm.in_channels
        (100, (3, 32, 32), 3)
    """

    def __init__(
        self, name: str, root: str | Path = "data", *, download: bool = False, **kwargs: Any
    ) -> None:
        key = name.lower().replace("-", "_")
        if key not in VISION_DATASETS:
            valid = ", ".join(repr(k) for k in VISION_DATASETS)
            raise ValueError(f"unknown torchvision dataset {name!r}; expected one of {valid}")
        super().__init__(**kwargs)
        self.name = key
        self.info = VISION_DATASETS[key]
        self.root = Path(root).expanduser()
        self.download = download
        self.num_classes = self.info.num_classes
        self.sample_shape = self.info.sample_shape
        self.classes: list[str] = []

    @property
    def expected_files(self) -> list[Path]:
        """The files torchvision reads, under ``root``."""
        return [self.root / f for f in self.info.files]

    def _dataset_class(self) -> Any:
        datasets = import_optional("torchvision.datasets", extra="study", feature="TorchvisionDataModule")
        return getattr(datasets, self.info.torchvision_class)

    def _open(self, train: bool, download: bool) -> Any:
        cls = self._dataset_class()
        split: dict[str, Any] = (
            {"split": "train" if train else "test"} if self.info.split_kwarg else {"train": train}
        )
        try:
            return cls(str(self.root), download=download, **split)
        except RuntimeError as error:
            missing = [str(p) for p in self.expected_files if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.info.torchvision_class} was not found under {self.root}: missing "
                    f"{', '.join(missing)}. Pass download=True (TorchvisionDataModule({self.name!r}, "
                    f"root={str(self.root)!r}, download=True)) to let torchvision download it, or point "
                    f"root= at a folder in torchvision's layout."
                ) from error
            raise RuntimeError(
                f"{self.info.torchvision_class} under {self.root} failed torchvision's check: {error}. The files "
                f"are there but do not match torchvision's MD5 checksums (a partial or corrupted download?): "
                f"delete them and download again (download=True)."
            ) from error

    def prepare_data(self) -> None:
        """Download the training and test files when ``download=True`` (Lightning runs it on one process)."""
        if self.download:
            self._open(train=True, download=True)
            self._open(train=False, download=True)

    def _load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train, test = self._open(train=True, download=False), self._open(train=False, download=False)
        self.classes = [str(c) for c in getattr(train, "classes", [])] or [
            str(c) for c in range(self.num_classes)
        ]
        return (*self._arrays_of(train), *self._arrays_of(test))

    def _arrays_of(self, dataset: Any) -> tuple[Tensor, Tensor]:
        data = dataset.data
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = dataset.labels  # SVHN
        data = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
        if data.dim() == 3:  # MNIST: (N, H, W)
            data = data.unsqueeze(1)
        elif data.shape[-1] == 3 and data.shape[1] != 3:  # CIFAR: (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        return data.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.long)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, root={str(self.root)!r}, download={self.download}, {super().extra_repr()}"
        )
