"""scikit-learn's bundled handwritten digits: normzoo's built-in dataset, no network needed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._imports import import_optional
from .base import ClassificationDataModule

__all__ = ["DigitsDataModule"]

#: The seed of the fixed train/test split of the digits: the same test set for every run and every ``seed``.
DIGITS_TEST_SEED = 0


class DigitsDataModule(ClassificationDataModule):
    """The 1,797 8x8 grey-level digits of ``sklearn.datasets.load_digits`` (UCI optdigits), 10 classes.

    The data ships inside scikit-learn, so it loads offline in milliseconds: the default dataset of
    ``normzoo study`` and of the tests. A fixed, stratified 20 % of it is the test set (the same for every
    ``seed``); 10 % of the rest is the validation split (seeded by ``seed``), the remaining 1,293 samples
    train. Pixel values are 0..16; the standardization statistics come from the training split only.

    Args:
        test_fraction: the held-out test fraction (fixed split, stratified by class).
        **kwargs: see :class:`ClassificationDataModule` (``batch_size``, ``val_fraction``, ``seed``,
            ``standardize``, ``flatten``, ``num_workers``, ...).

    Example:
        >>> dm = DigitsDataModule(flatten=True)
        >>> dm.num_classes, dm.input_shape, dm.in_channels, dm.num_features
        (10, (64,), 1, 64)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (1293, 144, 360)
    """

    num_classes = 10
    sample_shape = (1, 8, 8)

    def __init__(self, *, test_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        self.classes = [str(d) for d in range(10)]

    def _load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        datasets = import_optional("sklearn.datasets", extra="study", feature="DigitsDataModule")
        selection = import_optional("sklearn.model_selection", extra="study", feature="DigitsDataModule")
        digits = datasets.load_digits()
        images = np.asarray(digits.images, dtype=np.uint8)[:, None]  # (N, 1, 8, 8), exact: values are 0..16
        targets = np.asarray(digits.target, dtype=np.int64)
        train_idx, test_idx = selection.train_test_split(
            np.arange(len(targets)),
            test_size=self.test_fraction,
            random_state=DIGITS_TEST_SEED,
            stratify=targets,
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        return (
            torch.from_numpy(images[train_idx]),
            torch.from_numpy(targets[train_idx]),
            torch.from_numpy(images[test_idx]),
            torch.from_numpy(targets[test_idx]),
        )
