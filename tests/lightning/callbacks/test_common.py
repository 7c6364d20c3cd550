"""What every monitor shares: logged names, figures to a folder and to TensorBoard, checkpoint resume."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from monitor_helpers import TinyModule, loader, make_trainer, mlp
from torch import nn

from normzoo.lightning.callbacks import (
    ActivationMonitor,
    CovariateShiftMonitor,
    EpochTimer,
    GradientFlowMonitor,
    JacobianSpectrumMonitor,
    LossLandscapeMonitor,
    WeightNormMonitor,
    all_monitors,
    find_blocks,
)

AGGREGATES = {
    "weight_norm": {"total", "update_ratio_min", "update_ratio_max"},
    "gradient_flow": {"mean_abs_first", "mean_abs_last", "mean_abs_min", "max_abs", "vanishing", "exploding"},
    "activations": {"std_mean", "dead_mean"},
    "jacobian": {"sv_max", "sv_rms_mean"},
    "ics": {"l2_mean", "cos_mean"},
    "landscape": {"loss_range", "grad_range", "beta"},
    "time": {"epoch_s", "step_s", "val_s"},
}


def _monitors(every: int, **kwargs) -> list:
    return [
        WeightNormMonitor(every_n_steps=every, **kwargs),
        GradientFlowMonitor(every_n_steps=every, **kwargs),
        ActivationMonitor(every_n_steps=every, **kwargs),
        JacobianSpectrumMonitor(every_n_steps=every, max_samples=1, **kwargs),
        CovariateShiftMonitor(every_n_steps=every, **kwargs),
        LossLandscapeMonitor(every_n_steps=every, **kwargs),
        EpochTimer(**kwargs),
    ]


def test_tensorboard_and_csv_get_grouped_scalars_and_figures(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    monitors = _monitors(2)
    drawn = [m for m in monitors if m.name in ("gradient_flow", "jacobian")]  # figures are slow to render
    for m in monitors:
        m.save_figures = m in drawn
    trainer = make_trainer(tmp_path, monitors, max_steps=4, logger=[tb, csv_logger], log_every_n_steps=2)
    trainer.fit(TinyModule(mlp()), loader())
    figures = tb.log_dir + "/figures"
    for m in drawn:
        png = f"{figures}/{m.name}.png"
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert set(events.Tags()["images"]) == {f"{m.name}/figure" for m in drawn}
    scalars = set(events.Tags()["scalars"])
    expected = {f"{prefix}/{key}" for prefix, keys in AGGREGATES.items() for key in keys}
    assert expected <= scalars
    assert not any(k.count("/") > 1 for k in scalars)  # no per-layer keys unless asked
    assert [e.step for e in events.Scalars("gradient_flow/mean_abs_first")] == [1, 3]
    with open(f"{csv_logger.log_dir}/metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert expected <= columns


def test_every_n_steps_not_a_multiple_of_log_every_n_steps_warns(tmp_path) -> None:
    monitor = GradientFlowMonitor(every_n_steps=3, save_figures=False)
    with pytest.warns(UserWarning, match="log_every_n_steps=2"):
        make_trainer(tmp_path, [monitor], max_steps=1, logger=CSVLogger(tmp_path), log_every_n_steps=2).fit(
            TinyModule(mlp()), loader()
        )


def test_checkpoint_resume_restores_every_history(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)  # at the end of the (4-step) epoch
    first = [
        *_monitors(2, save_figures=False),
        GradientFlowMonitor(every_n_steps=1, name="grad_all", save_figures=False),
    ]
    make_trainer(tmp_path, [*first, ckpt], max_steps=4, enable_checkpointing=True).fit(
        TinyModule(mlp()), loader()
    )
    assert all(m.history for m in first)
    second = [
        *_monitors(2, save_figures=False),
        GradientFlowMonitor(every_n_steps=1, name="grad_all", save_figures=False),
    ]
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)
    make_trainer(tmp_path, [*second, again], max_steps=8, enable_checkpointing=True).fit(
        TinyModule(mlp()), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    for old, new in zip(first, second, strict=True):
        assert new.history[: len(old.history)] == old.history, old.name
        assert len(new.history) > len(old.history), old.name
    # the first step, every second one and the last: the resumed run does not sample step 4 again
    assert [r["step"] for r in first[1].history] == [0, 1, 3]
    assert [r["step"] for r in second[1].history] == [0, 1, 3, 5, 7]
    assert [r["step"] for r in second[-1].history] == list(range(8))
    assert [r["epoch"] for r in second[6].history] == [0, 1]  # EpochTimer: one record per epoch


def test_save_figure_anywhere_and_empty_history(tmp_path) -> None:
    monitor = WeightNormMonitor(every_n_steps=1)
    assert monitor.make_figure() is None
    assert monitor.save_figure(tmp_path / "none.png") is None
    make_trainer(tmp_path, [monitor], max_steps=2).fit(TinyModule(mlp()), loader())
    path = monitor.save_figure(tmp_path / "sub" / "w.png")
    assert path is not None
    assert path.stat().st_size < 100_000
    assert (tmp_path / "figures" / "weight_norm.png").exists()  # no logger: <default_root_dir>/figures


def test_figure_every_n_epochs(tmp_path) -> None:
    monitor = GradientFlowMonitor(every_n_steps=1, figure_every_n_epochs=1, figure_dir=tmp_path / "figs")
    make_trainer(tmp_path, [monitor], max_steps=8).fit(TinyModule(mlp()), loader())  # 4 steps an epoch
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["gradient_flow.png", "gradient_flow_epoch000.png", "gradient_flow_epoch001.png"]


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        WeightNormMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="bn_stats"):
        JacobianSpectrumMonitor(bn_stats="eval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_sizes"):
        LossLandscapeMonitor(step_sizes=())
    with pytest.raises(ValueError, match="saturation"):
        ActivationMonitor(saturation=1.5)


def test_all_monitors_and_state_keys() -> None:
    monitors = all_monitors(save_figures=False)
    assert len({m.state_key for m in monitors}) == 7
    assert GradientFlowMonitor(name="a").state_key != GradientFlowMonitor(name="b").state_key


def test_find_blocks_on_nested_and_flat_models() -> None:
    flat = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3), nn.ReLU()
    )
    assert [n for n, _ in find_blocks(flat)] == ["0-2", "3-5"]
    nested = nn.Sequential(
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1)
    )
    assert [n for n, _ in find_blocks(nested)] == ["0", "1", "2"]
    assert find_blocks(nn.Linear(2, 2)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block = find_blocks(flat)[0][1]
        assert block(torch.randn(1, 1, 5, 5)).shape == (1, 2, 3, 3)
