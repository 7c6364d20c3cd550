"""EpochTimer: per-epoch and per-step wall time, validation excluded, a summary."""

from __future__ import annotations

import time

import pytest
from monitor_helpers import TinyModuleWithVal, loader, make_trainer, mlp

from normzoo.lightning.callbacks import EpochTimer


class _Slow(TinyModuleWithVal):
    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        time.sleep(0.05)
        return super().validation_step(batch, batch_idx)


def test_epoch_and_step_times(tmp_path) -> None:
    timer = EpochTimer(save_figures=False)
    trainer = make_trainer(tmp_path, [timer], max_epochs=3, max_steps=-1, num_sanity_val_steps=1)
    started = time.perf_counter()
    trainer.fit(_Slow(mlp()), loader(n=48), loader(n=32))  # 3 training steps, 2 validation steps an epoch
    elapsed = time.perf_counter() - started
    assert [r["epoch"] for r in timer.history] == [0, 1, 2]
    for r in timer.history:
        assert r["steps"] == 3
        assert 3 * 0.02 <= r["step_mean_s"] * 3 <= r["train_s"]
        assert r["val_s"] >= 2 * 0.05  # the sanity check's validation is not counted in epoch 0 ...
        assert r["train_s"] < r["train_s"] + r["val_s"] < elapsed
    assert timer.history[0]["val_s"] < 2 * 0.05 + 0.5  # ... (it would add another 0.05 s)
    summary = timer.summary()
    assert summary["epochs"] == 3
    assert summary["epoch_mean_s"] == pytest.approx(
        (timer.history[1]["train_s"] + timer.history[2]["train_s"]) / 2
    )
    assert summary["train_s"] == pytest.approx(sum(r["train_s"] for r in timer.history))
    assert set(trainer.callback_metrics) >= {"time/epoch_s", "time/step_s", "time/val_s"}
    assert EpochTimer().summary()["epochs"] == 0
