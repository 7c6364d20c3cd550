"""The registry of synchronized classes behind ``convert_sync``: what it accepts, and import-order independence."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

import normzoo as nz
from normzoo.surgery import sync
from normzoo.surgery.sync import (
    SyncedTorchBatchNorm,
    convert_sync,
    register_synced_class,
    revert_sync,
    synced_class,
)

ROOT = Path(__file__).resolve().parents[2]


class MyBatchNorm(nn.BatchNorm2d):
    pass


class SyncedMyBatchNorm(SyncedTorchBatchNorm, MyBatchNorm):
    unsynced_class = MyBatchNorm


class Unrelated(SyncedTorchBatchNorm, nn.BatchNorm1d):
    unsynced_class = nn.BatchNorm1d


@pytest.fixture
def registry() -> Iterator[None]:
    """Registrations made by a test are forgotten after it."""
    saved = dict(sync._SYNCED_CLASSES)
    try:
        yield
    finally:
        sync._SYNCED_CLASSES.clear()
        sync._SYNCED_CLASSES.update(saved)


def test_registered_class_is_converted_and_reverted(registry: None) -> None:
    with pytest.warns(UserWarning, match="left these batch-normalization layers unsynchronized"):
        assert type(convert_sync(MyBatchNorm(3))) is MyBatchNorm
    register_synced_class(MyBatchNorm, SyncedMyBatchNorm)
    layer = convert_sync(MyBatchNorm(3))
    assert type(layer) is SyncedMyBatchNorm
    assert type(revert_sync(layer)) is MyBatchNorm


def test_register_rejects_classes_that_cannot_stand_for_the_unsynced_one(registry: None) -> None:
    with pytest.raises(TypeError, match=r"register_synced_class: MyBatchNorm: expected a subclass of Synced"):
        register_synced_class(nn.BatchNorm2d, MyBatchNorm)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"expected a subclass of MyBatchNorm with unsynced_class = MyBatchNorm"
    ):
        register_synced_class(MyBatchNorm, Unrelated)


def test_lazy_registration_imports_on_first_use_and_checks_identity(registry: None) -> None:
    register_synced_class(f"{__name__}.MyBatchNorm", f"{__name__}:SyncedMyBatchNorm")
    assert synced_class(MyBatchNorm) is SyncedMyBatchNorm
    assert sync._SYNCED_CLASSES[f"{__name__}.MyBatchNorm"] is SyncedMyBatchNorm  # resolved once

    class MyBatchNorm2(nn.BatchNorm2d):  # another class under a registered qualified name
        pass

    MyBatchNorm2.__qualname__ = "MyBatchNorm"
    assert synced_class(MyBatchNorm2) is None


def test_torch_classes_are_registered() -> None:
    assert [synced_class(c).__name__ for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)] == [  # type: ignore[union-attr]
        "SyncedBatchNorm1d",
        "SyncedBatchNorm2d",
        "SyncedBatchNorm3d",
    ]
    assert synced_class(nz.BatchRenorm2d) is None  # normzoo's layers synchronize themselves


#: Converts a model holding timm's, torch's and normzoo's layers with normzoo's and torch's converters,
#: printing what each layer became; the imports before it come from the test.
_PROBE = """
import json, torch
model = torch.nn.Sequential(
    timm.layers.BatchNormAct2d(3), torch.nn.BatchNorm2d(3), normzoo.BatchRenorm2d(3), normzoo.NoisyBatchNorm2d(3)
)
ours = normzoo.convert_sync(model)
torchs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
print(json.dumps([[type(m).__name__ + str(getattr(m, "sync", "")) for m in net] for net in (ours, torchs)]))
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import normzoo; import timm",
        "import timm; import normzoo",
    ],
)
def test_conversion_does_not_depend_on_import_order(imports: str) -> None:
    pytest.importorskip("timm")
    script = imports + "\n" + _PROBE
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        ["SyncedBatchNormAct2dTrue", "SyncedBatchNorm2dTrue", "BatchRenorm2dTrue", "NoisyBatchNorm2dTrue"],
        ["SyncBatchNorm", "SyncBatchNorm", "BatchRenorm2dTrue", "NoisyBatchNorm2dTrue"],
    ]


def test_importing_normzoo_does_not_import_timm() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, normzoo; print('timm' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
