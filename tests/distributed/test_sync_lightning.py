"""NormSync in a real Lightning DDP run on the CPU: 2 processes, gloo, normzoo layers and monitors.

The run uses ``strategy="ddp_fork"``, Lightning's DDP strategy with forked processes: identical to
``"ddp_spawn"`` except that the children start from the test process instead of importing torch and
Lightning again (about 1.5 s instead of 10-45 s here). The ``ddp_spawn`` run is there too, marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pl = pytest.importorskip("lightning.pytorch")

from _sync_lightning import SyncedZoo  # noqa: E402
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

import normzoo as nz  # noqa: E402
from normzoo.lightning.sync import NormSync  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.timeout(300),
]


def _data(n: int = 32) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 6, 6, generator=gen) * 2 + 1
    y = torch.randint(0, 2, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _callbacks() -> list[pl.Callback]:
    callbacks = pytest.importorskip("normzoo.lightning.callbacks")
    return [
        callbacks.WeightNormMonitor(every_n_steps=1, save_figures=False),
        callbacks.EpochTimer(save_figures=False),
    ]


STRATEGIES = [
    pytest.param(
        "ddp_fork",
        marks=pytest.mark.skipif(
            "fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork"
        ),
    ),
    pytest.param("ddp_spawn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_normsync_in_a_ddp_run_keeps_normzoo_layers_and_agrees_across_ranks(
    tmp_path: Path, strategy: str
) -> None:
    if strategy == "ddp_fork" and torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process has initialized CUDA, so Lightning cannot fork it (ddp_spawn runs instead)")
    module = SyncedZoo(str(tmp_path))
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        plugins=[NormSync()],
        callbacks=_callbacks(),
        max_epochs=1,
        limit_train_batches=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, _data())
    results = [torch.load(tmp_path / f"lightning-rank{r}.pt", weights_only=False) for r in range(2)]
    for r in results:
        assert r["kinds"] == [
            "BatchRenorm2d",
            "BatchNorm2d",
            "SyncedBatchNorm2d",
            "NoisyBatchNorm2d",
        ]
        assert r["synced"] == [True, True, True, True]
        assert r["steps"] == [3, 3, 3, 3]
        assert {"WeightNormMonitor", "EpochTimer"} <= set(r["callbacks"])
        stats0, stats1 = r["stats"]
        # each rank saw different data, yet every running statistic is the same on both ranks
        torch.testing.assert_close(stats0, stats1, rtol=0, atol=0)
        assert not torch.equal(stats0[:4], torch.zeros(4))
    # the test process's module never was converted; the trained weights came back from rank 0
    assert type(module.model[4]) is torch.nn.BatchNorm2d
    assert not module.model[1].sync
    assert os.path.exists(tmp_path / "lightning-rank0.pt")


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork")
def test_sync_batchnorm_flag_keeps_normzoo_kinds_in_a_ddp_run(tmp_path: Path) -> None:
    """``sync_batchnorm=True`` (Lightning's TorchSyncBatchNorm, torch's converter as normzoo wraps it)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process has initialized CUDA, so Lightning cannot fork it")
    trainer = pl.Trainer(
        strategy="ddp_fork",
        accelerator="cpu",
        devices=2,
        sync_batchnorm=True,
        max_epochs=1,
        limit_train_batches=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    assert type(trainer.strategy._layer_sync) is TorchSyncBatchNorm
    trainer.fit(SyncedZoo(str(tmp_path), torch_bn=False), _data())
    for r in [torch.load(tmp_path / f"lightning-rank{r}.pt", weights_only=False) for r in range(2)]:
        assert r["kinds"] == ["BatchRenorm2d", "BatchNorm2d", "NoisyBatchNorm2d"]
        assert r["synced"] == [True, True, True]
        stats0, stats1 = r["stats"]
        torch.testing.assert_close(stats0, stats1, rtol=0, atol=0)  # synchronized: equal on both ranks


def test_normsync_is_the_layer_sync_lightning_uses(tmp_path: Path) -> None:
    plugin = NormSync()
    assert isinstance(plugin, LayerSync)
    for sync_batchnorm in (False, True):  # NormSync is a TorchSyncBatchNorm: the flag is accepted beside it
        trainer = pl.Trainer(
            strategy="ddp",
            accelerator="cpu",
            devices=2,
            plugins=[plugin],
            sync_batchnorm=sync_batchnorm,
            logger=False,
            default_root_dir=tmp_path,
        )
        assert trainer.strategy._layer_sync is plugin


def test_lightning_refuses_another_layer_sync_beside_sync_batchnorm(tmp_path: Path) -> None:
    class Other(LayerSync):
        def apply(self, model: torch.nn.Module) -> torch.nn.Module:
            return model

        def revert(self, model: torch.nn.Module) -> torch.nn.Module:
            return model

    with pytest.raises(MisconfigurationException, match="Choose one or the other"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[Other()], sync_batchnorm=True)
    assert issubclass(NormSync, TorchSyncBatchNorm)


def test_normsync_apply_and_revert_work_in_place() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), nz.BatchRenorm1d(3), nz.NoisyBatchNorm1d(3))
    plugin = NormSync()
    assert plugin.apply(model) is model
    assert type(model[0]).__name__ == "SyncedBatchNorm1d"
    assert model[1].sync
    assert model[2].sync
    assert plugin.revert(model) is model
    assert type(model[0]) is torch.nn.BatchNorm1d
    assert not model[1].sync
    assert repr(plugin) == "NormSync(process_group=default)"
