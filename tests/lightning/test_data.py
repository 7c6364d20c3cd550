"""normzoo.lightning data modules: digits, torchvision datasets from files in their real formats, the split
and the standardization."""

from __future__ import annotations

import hashlib
import pickle
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

from normzoo.lightning import (
    ClassificationDataModule,
    DigitsDataModule,
    TorchvisionDataModule,
    get_datamodule,
)
from normzoo.lightning._imports import import_optional, require_lightning
from normzoo.lightning.data import DATAMODULES, StandardizedTensorDataset, feature_stats

# -- digits ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def test_digits_attributes_and_sizes(digits: DigitsDataModule) -> None:
    assert (digits.num_classes, digits.input_shape, digits.in_channels, digits.num_features) == (
        10,
        (1, 8, 8),
        1,
        64,
    )
    assert digits.classes == [str(i) for i in range(10)]
    assert (len(digits.train_set), len(digits.val_set), len(digits.test_set)) == (1293, 144, 360)
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8)
    assert x.dtype == torch.float32
    assert y.dtype == torch.long
    flat = DigitsDataModule(flatten=True, batch_size=16)
    flat.setup("fit")
    assert flat.input_shape == (64,)
    assert flat.in_channels == 1
    assert flat.num_features == 64
    assert next(iter(flat.val_dataloader()))[0].shape == (16, 64)


def test_digits_partition_the_whole_dataset(digits: DigitsDataModule) -> None:
    """Train, validation and test are disjoint and together are exactly sklearn's 1,797 digits."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    expected = Counter(
        img.astype(np.uint8).tobytes() + bytes([t]) for img, t in zip(raw.images, raw.target, strict=True)
    )
    got: Counter[bytes] = Counter()
    for split in (digits.train_set, digits.val_set, digits.test_set):
        assert split is not None
        got.update(
            x.numpy().tobytes() + bytes([int(t)]) for x, t in zip(split.data, split.targets, strict=True)
        )
    assert got == expected
    per_class = Counter(raw.target.tolist())
    for label, count in Counter(digits.test_set.targets.tolist()).items():  # stratified: 20 % of each class
        assert abs(count - 0.2 * per_class[label]) <= 1


def test_standardization_uses_the_training_split_only(digits: DigitsDataModule) -> None:
    train_raw = digits.train_set.data.numpy().astype(np.float64)
    assert digits.mean.item() == pytest.approx(train_raw.mean(), rel=1e-6)
    assert digits.std.item() == pytest.approx(train_raw.std(), rel=1e-6)
    dev_raw = np.concatenate([train_raw, digits.val_set.data.numpy()])
    assert digits.mean.item() != pytest.approx(dev_raw.mean(), rel=1e-6)  # the validation split is left out
    x, _ = digits.train_set.tensors()
    assert x.double().mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    xt, _ = digits.test_set.tensors()
    expected = (digits.test_set.data.double() - train_raw.mean()) / train_raw.std()
    torch.testing.assert_close(xt.double(), expected, rtol=1e-5, atol=1e-5)


def test_standardization_choices() -> None:
    dm = DigitsDataModule(standardize=None)
    dm.setup()
    x, _ = dm.train_set.tensors()
    assert torch.equal(x, dm.train_set.data.float())
    dm = DigitsDataModule(standardize="channel")
    dm.setup()
    assert dm.mean.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="standardize"):
        DigitsDataModule(standardize="pixel")


def test_validation_split_is_seeded_disjoint_and_sized() -> None:
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.val_indices, b.val_indices)
    assert torch.equal(a.train_indices, b.train_indices)
    assert not torch.equal(a.val_indices, c.val_indices)
    n = len(a.train_indices) + len(a.val_indices)
    assert set(a.train_indices.tolist()).isdisjoint(a.val_indices.tolist())
    assert sorted(a.train_indices.tolist() + a.val_indices.tolist()) == list(range(n))
    assert len(a.val_indices) == round(0.1 * n)
    assert torch.equal(a.test_set.data, c.test_set.data)  # the test split does not depend on the seed
    d = DigitsDataModule(val_fraction=0.25)
    d.setup()
    assert len(d.val_set) == round(0.25 * n)


def test_no_validation_split() -> None:
    dm = DigitsDataModule(val_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 1437
    assert dm.val_dataloader() == []


def test_dataset_fetching_is_consistent() -> None:
    data = torch.randint(0, 255, (10, 3, 4, 4), dtype=torch.uint8)
    ds = StandardizedTensorDataset(data, torch.arange(10), mean=100.0, std=50.0)
    batch = ds.__getitems__([7, 2, 9])
    for (x, y), i in zip(batch, [7, 2, 9], strict=True):
        x1, y1 = ds[i]
        torch.testing.assert_close(x, x1)
        torch.testing.assert_close(x, (data[i].float() - 100) / 50)
        assert int(y) == int(y1) == i
    flat = StandardizedTensorDataset(data, torch.arange(10), shape=(48,))
    assert flat[-1][0].shape == (48,)
    with pytest.raises(ValueError, match="length"):
        StandardizedTensorDataset(data, torch.arange(3))


def test_feature_stats_of_mnist_sized_uint8_data() -> None:
    """n·Σx² and (Σx)² exceed int64 for MNIST-sized byte data: the moments must not wrap."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (54_000, 1, 28, 28), dtype=torch.uint8, generator=g)  # MNIST train
    mean, std = feature_stats(data)
    flat = data.double().flatten()
    assert float(mean) == pytest.approx(float(flat.mean()), rel=1e-12)
    assert float(std) == pytest.approx(float(flat.std(correction=0)), rel=1e-9)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_feature_stats_match_numpy(per_channel: bool, dtype: torch.dtype) -> None:
    data = (torch.rand(1000, 3, 5, 5) * 255).to(dtype)
    mean, std = feature_stats(data, per_channel=per_channel, chunk=128)
    arr = data.double().numpy()
    axes = (0, 2, 3) if per_channel else None
    np.testing.assert_allclose(mean.squeeze().numpy(), arr.mean(axis=axes), rtol=1e-9)
    np.testing.assert_allclose(std.squeeze().numpy(), arr.std(axis=axes), rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        feature_stats(data[:0])


def test_state_dict_round_trip(digits: DigitsDataModule) -> None:
    state = digits.state_dict()
    other = DigitsDataModule(seed=99)
    other.load_state_dict(state)
    other.setup()
    assert torch.equal(other.val_indices, digits.val_indices)
    assert torch.equal(other.mean, digits.mean)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch sizes"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=0.0)
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_get_datamodule() -> None:
    assert DATAMODULES == ("mnist1d", "digits", "mnist", "fashion_mnist", "svhn", "cifar10", "cifar100")
    assert isinstance(get_datamodule("Digits", batch_size=8), DigitsDataModule)
    assert get_datamodule("digits", root="unused", download=False).batch_size == 64  # no files to find
    dm = get_datamodule("cifar100", root="somewhere", batch_size=8)
    assert isinstance(dm, TorchvisionDataModule)
    assert dm.num_classes == 100
    assert dm.batch_size == 8
    assert isinstance(dm, ClassificationDataModule)
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*'digits'.*'cifar100'"):
        get_datamodule("imagenet")
    with pytest.raises(ValueError, match="unknown torchvision dataset"):
        TorchvisionDataModule("stl10")


def test_missing_optional_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(ImportError, match=r"'torchmetrics'.*pip install \"normzoo\[lightning\]\""):
        require_lightning()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"DigitsDataModule needs the 'sklearn' package.*normzoo\[study\]"):
        DigitsDataModule().setup()
    with pytest.raises(ImportError, match="a feature needs the 'nothing_here_xyz' package"):
        import_optional("nothing_here_xyz", extra="study", feature="a feature")


# -- torchvision datasets, from small files in their real on-disk formats --------------------------------

N_TRAIN, N_TEST = 30, 12
Arrays = tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray
]  # train x (N, C, H, W), train y, test x, test y


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...], num_classes: int) -> tuple[Any, Any]:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.int64)


def _write_mnist(root: Path, folder: str, rng: np.random.Generator) -> Arrays:
    """The four idx-ubyte files (big-endian magic 2051/2049, sizes, then raw bytes), as LeCun's site has them."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = []
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        x, y = _images(rng, n, (1, 28, 28), 10)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">ii", 2049, n) + y.astype(np.uint8).tobytes()
        )
        arrays += [x, y]
    return tuple(arrays)  # type: ignore[return-value]


def _pickle(path: Path, obj: Any) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(root: Path, rng: np.random.Generator) -> Arrays:
    """Five training batches, a test batch and batches.meta: pickled dicts, rows of 3,072 bytes (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    x, y = _images(rng, N_TRAIN, (3, 32, 32), 10)
    for i, part in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
        _pickle(
            folder / f"data_batch_{i}", {"data": x[part].reshape(len(part), -1), "labels": y[part].tolist()}
        )
    xt, yt = _images(rng, N_TEST, (3, 32, 32), 10)
    _pickle(folder / "test_batch", {"data": xt.reshape(N_TEST, -1), "labels": yt.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return x, y, xt, yt


def _write_cifar100(root: Path, rng: np.random.Generator) -> Arrays:
    folder = root / "cifar-100-python"
    folder.mkdir()
    x, y = _images(rng, N_TRAIN, (3, 32, 32), 100)
    xt, yt = _images(rng, N_TEST, (3, 32, 32), 100)
    for name, xs, ys in (("train", x, y), ("test", xt, yt)):
        _pickle(
            folder / name,
            {
                "data": xs.reshape(len(xs), -1),
                "fine_labels": ys.tolist(),
                "coarse_labels": (ys // 5).tolist(),
            },
        )
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": []})
    return x, y, xt, yt


def _write_svhn(root: Path, rng: np.random.Generator) -> Arrays:
    """train_32x32.mat and test_32x32.mat: X is (32, 32, 3, N) uint8 and y is (N, 1) with 10 standing for 0."""
    from scipy.io import savemat

    arrays = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = _images(rng, n, (3, 32, 32), 10)
        labels = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        savemat(str(root / f"{split}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": labels})
        arrays += [x, y]
    return tuple(arrays)  # type: ignore[return-value]


def _trust_written_files(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's MD5 lists name our small files.

    CIFAR10/100 and SVHN check every file against the MD5 of the real download before loading (MNIST only
    checks that the files exist). torchvision's own tests switch those checks off while they build a dataset
    from fake files; we keep them on and patch the class's checksum lists to the checksums of the files this
    test wrote, so the real check still runs and a corrupted file still fails it.
    """
    from torchvision import datasets

    for cls, folder in ((datasets.CIFAR10, "cifar-10-batches-py"), (datasets.CIFAR100, "cifar-100-python")):
        for attr in ("train_list", "test_list"):
            files = [[name, _md5(root / folder / name)] for name, _ in getattr(cls, attr)]
            monkeypatch.setattr(cls, attr, files)
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(root / folder / cls.meta["filename"])})
    svhn = {
        split: [url, name, _md5(root / name)]
        for split, (url, name, _) in datasets.SVHN.split_list.items()
        if split != "extra"
    }
    monkeypatch.setattr(datasets.SVHN, "split_list", {**datasets.SVHN.split_list, **svhn})


@pytest.fixture
def vision_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Arrays]]:
    pytest.importorskip("torchvision")
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    written = {
        "mnist": _write_mnist(tmp_path, "MNIST", rng),
        "fashion_mnist": _write_mnist(tmp_path, "FashionMNIST", rng),
        "cifar10": _write_cifar10(tmp_path, rng),
        "cifar100": _write_cifar100(tmp_path, rng),
        "svhn": _write_svhn(tmp_path, rng),
    }
    _trust_written_files(monkeypatch, tmp_path)
    return tmp_path, written


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [
        ("mnist", (1, 28, 28), 10),
        ("fashion_mnist", (1, 28, 28), 10),
        ("svhn", (3, 32, 32), 10),
        ("cifar10", (3, 32, 32), 10),
        ("cifar100", (3, 32, 32), 100),
    ],
)
def test_torchvision_datamodules_load_the_files(
    vision_root: tuple[Path, dict[str, Arrays]], name: str, shape: tuple[int, ...], num_classes: int
) -> None:
    root, written = vision_root
    x, y, xt, yt = written[name]
    dm = get_datamodule(name, root=root, batch_size=8, val_fraction=0.2, seed=1)
    assert (dm.num_classes, dm.input_shape, dm.in_channels) == (num_classes, shape, shape[0])
    dm.setup("fit")
    train_idx, val_idx = dm.train_indices.numpy(), dm.val_indices.numpy()
    assert len(val_idx) == round(0.2 * N_TRAIN)
    # the raw samples are the written ones, in (C, H, W) order, with their labels
    np.testing.assert_array_equal(dm.train_set.data.numpy(), x[train_idx])
    np.testing.assert_array_equal(dm.val_set.data.numpy(), x[val_idx])
    np.testing.assert_array_equal(dm.train_set.targets.numpy(), y[train_idx])
    np.testing.assert_array_equal(dm.test_set.data.numpy(), xt)
    np.testing.assert_array_equal(dm.test_set.targets.numpy(), yt)
    # global standardization from the training split only
    mean, std = x[train_idx].astype(np.float64).mean(), x[train_idx].astype(np.float64).std()
    assert (dm.mean.item(), dm.std.item()) == (pytest.approx(mean, rel=1e-6), pytest.approx(std, rel=1e-6))
    xb, yb = next(iter(dm.test_dataloader()))
    np.testing.assert_allclose(xb.numpy(), (xt[:8] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(yb.numpy(), yt[:8])
    assert len(dm.classes) == num_classes


def test_torchvision_class_names_come_from_the_files(vision_root: tuple[Path, dict[str, Arrays]]) -> None:
    dm = TorchvisionDataModule("cifar10", vision_root[0])
    dm.setup()
    assert dm.classes == [f"class{i}" for i in range(10)]


def test_missing_files_say_where_and_how_to_download(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    dm = TorchvisionDataModule("cifar10", tmp_path / "nowhere")
    dm.prepare_data()  # download=False: nothing happens
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py" / "data_batch_1") in message
    assert "download=True" in message


def test_corrupted_files_fail_the_md5_check(vision_root: tuple[Path, dict[str, Arrays]]) -> None:
    root, _ = vision_root
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\x00")
    with pytest.raises(RuntimeError, match="MD5"):
        TorchvisionDataModule("cifar10", root).setup()


def test_download_happens_in_prepare_data_only_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torchvision = pytest.importorskip("torchvision")
    calls: list[bool] = []

    def fake_download(
        self: Any,
    ) -> None:  # stands in for the network: writes the files torchvision would fetch
        calls.append(self.train)
        if not (Path(self.root) / "MNIST").exists():
            _write_mnist(Path(self.root), "MNIST", np.random.default_rng(0))

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    dm = TorchvisionDataModule("mnist", tmp_path, download=True)
    dm.prepare_data()
    assert calls == [True, False]
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN
    assert len(dm.test_set) == N_TEST
    assert calls == [True, False]  # setup never downloads


# --- MNIST-1D and non-i.i.d. batches ---------------------------------------------------------------------


def test_mnist1d_is_the_packages_dataset_built_locally() -> None:
    mnist1d_data = pytest.importorskip("mnist1d.data")
    from normzoo.lightning.data import MNIST1DDataModule

    np_state = np.random.get_state()
    dm = MNIST1DDataModule(batch_size=32)
    dm.setup("fit")
    # the generator's global seeding does not leak into the caller's numpy state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    reference = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    train_raw, _train_y, test_raw, test_y = dm._arrays  # type: ignore[misc]
    assert train_raw.shape == (4000, 1, 40)
    assert test_raw.shape == (1000, 1, 40)
    assert torch.equal(train_raw[:, 0], torch.tensor(reference["x"], dtype=torch.float32))
    assert torch.equal(test_y, torch.tensor(reference["y_test"]))
    assert len(dm.train_set) == 3600
    assert len(dm.val_set) == 400
    x, y = dm.train_set.tensors()
    assert x.shape == (3600, 1, 40)
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std(unbiased=False)) - 1) < 1e-4
    assert Counter(y.tolist()).keys() == set(range(10))


def test_class_subset_batches_draw_each_batch_from_two_classes() -> None:
    from normzoo.lightning.data import ClassSubsetBatchSampler

    targets = torch.arange(103) % 10
    sampler = ClassSubsetBatchSampler(targets, batch_size=9, classes_per_batch=2)
    torch.manual_seed(1)
    epoch = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == epoch  # reproducible from torch's global seed
    assert len(epoch) == len(sampler) == 12
    for batch in epoch:
        counts = sorted(Counter(targets[batch].tolist()).values())
        assert counts == [4, 5]
    # each class's samples are visited before any repeats
    for c in range(10):
        drawn = [i for b in epoch for i in b if targets[i] == c][:10]
        assert len(set(drawn)) == len(drawn)
    with pytest.raises(ValueError, match="classes_per_batch"):
        ClassSubsetBatchSampler(targets, batch_size=9, classes_per_batch=11)


def test_datamodule_uses_class_subset_batches_for_training_only() -> None:
    dm = DigitsDataModule(batch_size=8, classes_per_batch=2)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[0] == 8
    assert len(set(y.tolist())) == 2
    _, y_val = next(iter(dm.val_dataloader()))
    assert len(set(y_val.tolist())) > 2
