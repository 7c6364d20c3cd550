"""The common base of normzoo's data modules: in-memory arrays, a seeded validation split, standardization.

The seed recipe ("global feature standardization, 10 % validation split") is the default: the training set
is split once into a training and a validation part with a fixed seed; one mean and one standard deviation
are computed over *all* features of the training part only (never the validation or test data); every
split is then standardized with them. A subclass only loads its arrays (:meth:`_load_arrays`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "STANDARDIZATIONS",
    "ClassSubsetBatchSampler",
    "ClassificationDataModule",
    "StandardizedTensorDataset",
    "feature_stats",
]

#: Accepted values of ``standardize``: one mean/std over everything, one per channel, or none.
STANDARDIZATIONS = ("global", "channel", None)


class StandardizedTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """Samples ``((data[i] - mean) / std, targets[i])`` as float32, reshaped to ``shape``.

    The raw data stays in its own dtype (uint8 images take a quarter of the memory of float32) and is
    converted when fetched; a batch is converted at once through ``__getitems__``, which torch's DataLoader
    uses when it is there.

    Args:
        data: raw samples ``(N, *sample_shape)``.
        targets: integer labels ``(N,)``.
        mean: broadcastable to a sample (a scalar for global standardization, ``(C, 1, ...)`` per channel).
        std: like ``mean``.
        shape: the shape of a returned sample (``(C·H·W,)`` to flatten), ``None`` to keep the raw one.
    """

    def __init__(
        self,
        data: Tensor,
        targets: Tensor,
        mean: Tensor | float = 0.0,
        std: Tensor | float = 1.0,
        shape: Sequence[int] | None = None,
    ) -> None:
        if len(data) != len(targets):
            raise ValueError(f"data and targets differ in length: {len(data)} vs {len(targets)}")
        self.data = data
        self.targets = targets.long()
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.shape = tuple(shape) if shape is not None else tuple(data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def _convert(self, raw: Tensor) -> Tensor:
        return ((raw.to(torch.float32) - self.mean) / self.std).reshape(len(raw), *self.shape)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._convert(self.data[index].unsqueeze(0))[0], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._convert(self.data[idx])
        return list(zip(x.unbind(0), self.targets[idx].unbind(0), strict=True))

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All samples at once: the standardized inputs ``(N, *shape)`` and the targets ``(N,)``."""
        return self._convert(self.data), self.targets


def feature_stats(data: Tensor, per_channel: bool = False, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and (population, ``ddof=0``) standard deviation of ``data`` ``(N, C, ...)``, in float64.

    Over every value when ``per_channel`` is false (the seed's global feature standardization), else per
    channel ``C`` with shape ``(C, 1, ...)`` to broadcast over a sample. Integer data is summed exactly in
    int64, floats in float64, chunk by chunk so a large dataset needs no float copy.

    Example:
        >>> mean, std = feature_stats(torch.tensor([[0, 2], [4, 6]], dtype=torch.uint8))
        >>> float(mean), float(std)
        (3.0, 2.23606797749979)
    """
    if len(data) == 0:
        raise ValueError("cannot standardize an empty training split")
    exact = not data.is_floating_point()
    acc = torch.int64 if exact else torch.float64
    dims = [d for d in range(data.dim()) if not (per_channel and d == 1)]
    total = torch.zeros((), dtype=acc)
    total_sq = torch.zeros((), dtype=acc)
    for start in range(0, len(data), chunk):
        part = data[start : start + chunk].to(acc)
        total = total + part.sum(dim=dims)
        total_sq = total_sq + (part * part).sum(dim=dims)
    count = data.numel() // (data.shape[1] if per_channel else 1)
    mean = total.to(torch.float64) / count
    if exact:  # exact integer moments: var = (n·Σx² − (Σx)²) / n², in Python ints (beyond int64 for MNIST)
        sums, squares = total.reshape(-1).tolist(), total_sq.reshape(-1).tolist()
        moments = [(count * b - a * a) / count**2 for a, b in zip(sums, squares, strict=True)]
        var = torch.tensor(moments, dtype=torch.float64).reshape(total.shape)
    else:
        var = total_sq / count - mean * mean
    std = var.clamp_min(0).sqrt()
    if per_channel:
        shape = (-1,) + (1,) * (data.dim() - 2)
        mean, std = mean.reshape(shape), std.reshape(shape)
    return mean, std


class ClassSubsetBatchSampler(Sampler[list[int]]):
    """Non-i.i.d. minibatches: every batch drawn from ``classes_per_batch`` classes only (Ioffe 2017, 4.3).

    Each batch picks ``classes_per_batch`` distinct classes at random and takes an equal share of
    ``batch_size`` from each (the first classes take one more when it does not divide), walking through a
    shuffled list of each class's samples and reshuffling it when it runs out. An epoch has as many batches
    as a plain shuffled epoch (``ceil(len(targets) / batch_size)``), all of them full. The randomness comes
    from a generator seeded from torch's global one at the start of every epoch (as torch's
    ``RandomSampler`` does), so ``seed_everything`` makes it reproducible.

    Example:
        >>> targets = torch.arange(40) % 4
        >>> _ = torch.manual_seed(0)
        >>> batches = list(ClassSubsetBatchSampler(targets, batch_size=6, classes_per_batch=2))
        >>> len(batches), {len(b) for b in batches}, {len(set(targets[b].tolist())) for b in batches}
        (7, {6}, {2})
    """

    def __init__(self, targets: Tensor, batch_size: int, classes_per_batch: int = 2) -> None:
        self.targets = torch.as_tensor(targets).long()
        classes = self.targets.unique().tolist()
        if not 1 <= classes_per_batch <= len(classes):
            raise ValueError(
                f"ClassSubsetBatchSampler: expected 1 <= classes_per_batch <= {len(classes)} (the classes "
                f"present), got {classes_per_batch}"
            )
        if batch_size < classes_per_batch:
            raise ValueError(
                f"ClassSubsetBatchSampler: expected batch_size >= classes_per_batch ({classes_per_batch}), "
                f"got {batch_size}"
            )
        self.batch_size = batch_size
        self.classes_per_batch = classes_per_batch
        self.pools = {int(c): self.targets.eq(c).nonzero().flatten() for c in classes}

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Any:
        gen = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        classes = list(self.pools)
        order = {c: pool[torch.randperm(len(pool), generator=gen)] for c, pool in self.pools.items()}
        cursor = dict.fromkeys(classes, 0)
        k = self.classes_per_batch
        shares = [self.batch_size // k + (1 if i < self.batch_size % k else 0) for i in range(k)]
        for _ in range(len(self)):
            chosen = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:k].tolist()]
            batch: list[int] = []
            for c, share in zip(chosen, shares, strict=True):
                pool = order[c]
                for _ in range(share):
                    if cursor[c] == len(pool):
                        order[c] = pool = pool[torch.randperm(len(pool), generator=gen)]
                        cursor[c] = 0
                    batch.append(int(pool[cursor[c]]))
                    cursor[c] += 1
            yield batch


class ClassificationDataModule(L.LightningDataModule):
    """A LightningDataModule over in-memory arrays with the seed's split and standardization.

    Subclasses set :attr:`num_classes`, :attr:`sample_shape` (the raw ``(C, H, W)`` or ``(C, L)``) and
    implement :meth:`_load_arrays`; everything else is here.

    Args:
        batch_size: training batch size (64 in the seed recipe).
        eval_batch_size: batch size of validation, test and predict loaders (``batch_size`` when ``None``).
        val_fraction: fraction of the training set held out for validation (0.1 in the seed recipe; 0 for
            no validation set).
        seed: seed of the validation split (the same seed gives the same split on every machine).
        standardize: ``"global"`` (one mean and one std over all features of the training split: the seed
            recipe), ``"channel"`` (one per channel, as torchvision's usual ``Normalize``) or ``None``.
        flatten: give samples as vectors ``(C·H·W,)`` (for MLPs) instead of ``(C, H, W)``.
        num_workers: DataLoader workers (0 loads in the main process: fastest for these small datasets).
        pin_memory: pin host memory in the loaders (for GPU training).
        drop_last: drop the last incomplete training batch (BatchNorm dislikes a batch of one).
        classes_per_batch: ``None`` for shuffled (i.i.d.) training batches, or the number of classes each
            training batch is drawn from (:class:`ClassSubsetBatchSampler`: non-i.i.d. batches, Ioffe 2017,
            section 4.3). Validation and test batches are never affected.

    Attributes:
        num_classes: number of classes.
        input_shape: the shape of one sample as the model sees it: ``(C, H, W)``, ``(C, L)`` or ``(F,)``.
        in_channels: channels ``C`` of the raw samples (also when flattened).
        num_features: features per sample, ``prod(input_shape)`` (the ``in_features`` of an MLP).
        mean, std: the standardization statistics (tensors) after :meth:`setup`.
        train_indices, val_indices: which samples of the training set form each split, after :meth:`setup`.
    """

    num_classes: int
    sample_shape: tuple[int, ...]
    classes: list[str]

    def __init__(
        self,
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        standardize: str | None = "global",
        flatten: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        classes_per_batch: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be positive, got {batch_size}, {eval_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if standardize not in STANDARDIZATIONS:
            raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, got {standardize!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.standardize = standardize
        self.flatten = flatten
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.classes_per_batch = classes_per_batch
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self.train_set: StandardizedTensorDataset | None = None
        self.val_set: StandardizedTensorDataset | None = None
        self.test_set: StandardizedTensorDataset | None = None
        self._arrays: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    # -- what a subclass provides ------------------------------------------------------------------------

    def _load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train_data, train_targets, test_data, test_targets)``, data as ``(N, *sample_shape)``."""
        raise NotImplementedError

    # -- shapes ------------------------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (math.prod(self.sample_shape),) if self.flatten else tuple(self.sample_shape)

    @property
    def in_channels(self) -> int:
        return self.sample_shape[0]

    @property
    def num_features(self) -> int:
        return math.prod(self.sample_shape)

    # -- Lightning hooks ---------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the arrays (once), split off validation, compute the statistics on the training split."""
        if self._arrays is None:
            arrays = self._load_arrays()
            if tuple(arrays[0].shape[1:]) != tuple(self.sample_shape):
                raise ValueError(
                    f"{type(self).__name__}: samples have shape {tuple(arrays[0].shape[1:])}, "
                    f"expected {self.sample_shape}"
                )
            self._arrays = arrays
        data, targets, test_data, test_targets = self._arrays
        if self.train_indices is None or self.val_indices is None:
            self.train_indices, self.val_indices = self.split_indices(len(data))
        if self.mean is None or self.std is None:
            train_data = data[self.train_indices]
            if self.standardize is None:
                self.mean, self.std = torch.zeros(()), torch.ones(())
            else:
                mean, std = feature_stats(train_data, per_channel=self.standardize == "channel")
                self.mean, self.std = mean.float(), std.clamp_min(1e-12).float()
        shape = self.input_shape
        self.train_set = StandardizedTensorDataset(
            data[self.train_indices], targets[self.train_indices], self.mean, self.std, shape
        )
        self.val_set = StandardizedTensorDataset(
            data[self.val_indices], targets[self.val_indices], self.mean, self.std, shape
        )
        self.test_set = StandardizedTensorDataset(test_data, test_targets, self.mean, self.std, shape)

    def split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """Sorted ``(train, val)`` indices of a training set of ``n`` samples: a permutation seeded by ``seed``.

        Example:
            >>> dm = ClassificationDataModule(val_fraction=0.2, seed=0)
            >>> train, val = dm.split_indices(10)
            >>> len(train), len(val), sorted(train.tolist() + val.tolist()) == list(range(10))
            (8, 2, True)
        """
        n_val = round(self.val_fraction * n)
        if self.val_fraction > 0 and n_val == 0:
            n_val = 1
        if n_val >= n:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training sample out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def _loader(self, dataset: StandardizedTensorDataset | None, train: bool) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        if train and self.classes_per_batch is not None:
            return DataLoader(
                dataset,
                batch_sampler=ClassSubsetBatchSampler(
                    dataset.targets, self.batch_size, self.classes_per_batch
                ),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        if self.val_set is not None and len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, train=False)

    def state_dict(self) -> dict[str, Any]:
        """The standardization statistics and split, saved in Lightning checkpoints for inference."""
        return {
            "mean": self.mean,
            "std": self.std,
            "train_indices": self.train_indices,
            "val_indices": self.val_indices,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (Lightning calls it after :meth:`setup` when resuming)."""
        self.mean, self.std = state_dict.get("mean"), state_dict.get("std")
        self.train_indices, self.val_indices = state_dict.get("train_indices"), state_dict.get("val_indices")
        if self._arrays is not None:
            self.setup()

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, val_fraction={self.val_fraction}, seed={self.seed}, "
            f"standardize={self.standardize!r}, input_shape={self.input_shape}, num_classes={self.num_classes}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
