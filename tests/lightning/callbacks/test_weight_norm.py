"""WeightNormMonitor in a real Trainer: norms and update ratios against the weights before and after."""

from __future__ import annotations

import copy

import pytest
import torch
from monitor_helpers import TinyModule, loader, make_trainer, mlp

from normzoo.lightning.callbacks import WeightNormMonitor


def test_norm_and_update_ratio_of_the_first_step(tmp_path) -> None:
    module = TinyModule(mlp())
    init = copy.deepcopy(module.model)
    monitor = WeightNormMonitor(every_n_steps=1, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(module, loader())
    (record,) = monitor.history
    assert record["step"] == 0
    assert list(record["layers"]) == ["0", "4", "7"]
    for layer, v in record["layers"].items():
        w0, w1 = init.get_submodule(layer).weight, module.model.get_submodule(layer).weight.detach()
        assert v["norm"] == pytest.approx(w1.norm().item(), rel=1e-6)
        assert v["update_ratio"] == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-5)


def test_sampling_schedule_and_selection(tmp_path) -> None:
    monitor = WeightNormMonitor(every_n_steps=3, layers=["4", "2"], include_bias=True, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=7, accumulate_grad_batches=2).fit(
        TinyModule(mlp()), loader(n=112)
    )
    # the first, the 3rd and 6th optimizer steps, and the last
    assert [r["step"] for r in monitor.history] == [0, 2, 5, 6]
    # "2" is a ReLU: no weight, not monitored; "4" is the second linear layer (weight and bias together)
    assert list(monitor.history[0]["layers"]) == ["4"]
    assert all(0 < r["layers"]["4"]["update_ratio"] < 1 for r in monitor.history)


def test_log_names(tmp_path) -> None:
    monitor = WeightNormMonitor(every_n_steps=1, log_per_layer=True, save_figures=False)
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(TinyModule(mlp()), loader())
    keys = {k for k in trainer.callback_metrics if k.startswith("weight_norm/")}
    assert keys == {
        "weight_norm/total",
        "weight_norm/update_ratio_min",
        "weight_norm/update_ratio_max",
        *(f"weight_norm/{m}/{layer}" for m in ("norm", "update_ratio") for layer in ("0", "4", "7")),
    }
    total = torch.sqrt(sum(torch.tensor(v["norm"]) ** 2 for v in monitor.history[-1]["layers"].values()))
    assert trainer.callback_metrics["weight_norm/total"].item() == pytest.approx(total.item(), rel=1e-5)
