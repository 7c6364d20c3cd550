"""TrainEvalDriftMonitor in a real Trainer: the pure function's numbers at the sampled steps, the warning
with its advice, the figure, and a model left as it was."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from monitor_helpers import TinyModule, assert_same_state, full_state, loader, make_trainer, mlp

from normzoo.diagnostics import train_eval_drift
from normzoo.lightning.callbacks import TrainEvalDriftMonitor


class _Copies(Callback):
    """A copy of the module and the full state at the end of every training batch."""

    def __init__(self) -> None:
        self.models: list[torch.nn.Module] = []
        self.states: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.models.append(copy.deepcopy(pl_module.model))
        self.states.append(full_state(pl_module))


def test_values_warning_figure_and_no_side_effects(tmp_path) -> None:
    before, after = _Copies(), _Copies()
    monitor = TrainEvalDriftMonitor(
        every_n_steps=2, warmup_steps=3, figure_dir=tmp_path / "figs", log_per_layer=True
    )
    trainer = make_trainer(tmp_path, [before, monitor, after], max_steps=5)
    data = loader(n=10, batch_size=2)  # batches of two: their statistics are far from the running ones
    with pytest.warns(
        UserWarning, match=r"TrainEvalDriftMonitor: at step 3 .*PreciseBN.*Batch Renormalization"
    ):
        trainer.fit(TinyModule(mlp(dropout=0.5)), data)
    assert [r["step"] for r in monitor.history] == [0, 1, 3, 4]
    held = next(iter(data))[0]
    for record in monitor.history:
        expected = train_eval_drift(before.models[record["step"]], held)
        assert record["output_gap"] == pytest.approx(expected.output_gap, rel=1e-6)
        assert set(record["layers"]) == {"1", "5"} == set(expected.summary())
        for layer, values in expected.summary().items():
            assert record["layers"][layer] == pytest.approx(values, rel=1e-6)
    for b, a in zip(before.states, after.states, strict=True):
        assert_same_state(b, a)
    assert {"drift/output_gap", "drift/distance_mean", "drift/distance/1"} <= set(trainer.callback_metrics)
    assert (tmp_path / "figs" / "drift.png").stat().st_size > 0


def test_held_batch_given_and_batches_it_cannot_read(tmp_path) -> None:
    held = torch.randn(6, 8)
    monitor = TrainEvalDriftMonitor(batch=held, warn=False, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(TinyModule(mlp()), loader())
    assert len(monitor.history) == 2
    with pytest.raises(TypeError, match="expected batch to be a tensor or a tuple"):
        TrainEvalDriftMonitor(batch=[held])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gap_threshold to be a finite number > 0"):
        TrainEvalDriftMonitor(gap_threshold=-1.0)
    with pytest.raises(ValueError, match="warmup_steps to be an int >= 0"):
        TrainEvalDriftMonitor(warmup_steps=-1)


def test_no_warning_while_the_running_averages_settle(tmp_path) -> None:
    import warnings

    monitor = TrainEvalDriftMonitor(every_n_steps=1, save_figures=False)
    with warnings.catch_warnings(record=True) as caught:  # momentum 0.1: initial values < 1 % after 44 steps
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=5).fit(TinyModule(mlp()), loader(n=10, batch_size=2))
    assert not [w for w in caught if "TrainEvalDriftMonitor" in str(w.message)]
    assert max(r["output_gap"] for r in monitor.history) > monitor.gap_threshold

    class DictBatches(TinyModule):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    data = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in loader().dataset], batch_size=16)
    with pytest.raises(TypeError, match=r"got a dict with keys \['x', 'y'\]; pass batch="):
        make_trainer(tmp_path, [TrainEvalDriftMonitor()], max_steps=1).fit(DictBatches(mlp()), data)
