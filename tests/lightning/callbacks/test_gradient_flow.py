"""GradientFlowMonitor in a real Trainer: values against gradients computed by hand."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from monitor_helpers import GradCapture, TinyModule, cnn, loader, make_trainer, mlp

from normzoo.lightning.callbacks import GradientFlowMonitor


def test_values_are_the_gradients_the_optimizer_uses(tmp_path) -> None:
    module = TinyModule(cnn())
    capture = GradCapture()
    monitor = GradientFlowMonitor(every_n_steps=1, save_figures=False)
    make_trainer(tmp_path, [capture, monitor], max_steps=3).fit(module, loader(shape=(1, 6, 6)))
    assert [r["step"] for r in monitor.history] == [0, 1, 2]
    assert list(monitor.history[0]["layers"]) == ["0", "3", "8"]  # the conv and linear weights
    for record, grads in zip(monitor.history, capture.grads, strict=True):
        for layer, v in record["layers"].items():
            g = grads[f"model.{layer}.weight"]
            assert v["mean_abs"] == pytest.approx(g.abs().mean().item(), rel=1e-6)
            assert v["max_abs"] == pytest.approx(g.abs().max().item(), rel=1e-6)


def test_accumulated_gradient_against_a_manual_backward(tmp_path) -> None:
    module = TinyModule(mlp())
    init = copy.deepcopy(module.model)
    data = loader(batch_size=8)
    monitor = GradientFlowMonitor(every_n_steps=1, include_bias=True, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1, accumulate_grad_batches=2).fit(module, data)
    (x1, y1), (x2, y2) = list(data)[:2]
    (F.cross_entropy(init(x1), y1) / 2 + F.cross_entropy(init(x2), y2) / 2).backward()
    for layer, v in monitor.history[0]["layers"].items():
        m = init.get_submodule(layer)
        g = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()])
        assert v["mean_abs"] == pytest.approx(g.abs().mean().item(), rel=1e-5)
        assert v["max_abs"] == pytest.approx(g.abs().max().item(), rel=1e-5)


def test_amp_gradients_are_unscaled(tmp_path) -> None:
    module = TinyModule(mlp(norm=False))
    init = copy.deepcopy(module.model)
    data = loader(batch_size=16)
    monitor = GradientFlowMonitor(every_n_steps=1, save_figures=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    make_trainer(tmp_path, [monitor], max_steps=1, plugins=[amp]).fit(module, data)
    x, y = next(iter(data))
    F.cross_entropy(init(x), y).backward()
    for layer, v in monitor.history[0]["layers"].items():
        ref = init.get_submodule(layer).weight.grad.abs()
        assert v["mean_abs"] == pytest.approx(ref.mean().item(), rel=3e-2)  # fp16 compute, not 4096x off
        assert v["max_abs"] == pytest.approx(ref.max().item(), rel=3e-2)


def test_vanishing_and_exploding_layers_are_flagged_and_warned_once(tmp_path) -> None:
    monitor = GradientFlowMonitor(
        every_n_steps=1, vanishing_threshold=1.0, exploding_threshold=1e-9, save_figures=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=3).fit(TinyModule(mlp()), loader())
    messages = [str(w.message) for w in caught if "GradientFlowMonitor" in str(w.message)]
    assert len([m for m in messages if "vanishing" in m]) == 3  # three layers, once each
    assert len([m for m in messages if "exploding" in m]) == 3
    assert monitor.history[-1]["vanishing"] == ["0", "4", "7"]
    assert monitor.state_dict()["warned"]
