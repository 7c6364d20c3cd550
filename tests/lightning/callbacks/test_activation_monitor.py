"""ActivationMonitor in a real Trainer: statistics against a manual forward, hooks removed."""

from __future__ import annotations

import copy

import pytest
import torch
from monitor_helpers import TinyModule, loader, make_trainer, mlp
from torch import nn

from normzoo.lightning.callbacks import ActivationMonitor


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Tanh])
def test_stats_of_the_first_step_against_a_manual_forward(tmp_path, act: type[nn.Module]) -> None:
    module = TinyModule(mlp(act=act, norm=act is nn.ReLU))
    with torch.no_grad():  # push the first layer into saturation / dead units
        module.model[0].weight.mul_(6.0)
        module.model[0].bias.add_(-3.0)
    init = copy.deepcopy(module.model)
    data = loader()
    monitor = ActivationMonitor(every_n_steps=1, saturation=0.95, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(module, data)
    assert _hooks(module) == 0
    record = monitor.history[0]
    x, _ = next(iter(data))
    outputs: dict[str, torch.Tensor] = {}
    h = x
    for name, child in init.named_children():  # train mode: batch statistics, as in the training step
        h = child(h)
        outputs[name] = h.detach()
    acts = [n for n, m in init.named_children() if isinstance(m, act)]
    assert list(record["layers"]) == acts
    for name in acts:
        y, v = outputs[name], record["layers"][name]
        assert v["mean"] == pytest.approx(y.mean().item(), rel=1e-5, abs=1e-7)
        assert v["std"] == pytest.approx(y.std().item(), rel=1e-5)
        assert v["p50"] == pytest.approx(y.quantile(0.5).item(), rel=1e-5, abs=1e-7)
        if act is nn.ReLU:
            assert v["dead"] == pytest.approx((y == 0).all(0).float().mean().item())
            assert v["saturated"] is None
        else:
            scale = 2 * y - 1 if act is nn.Sigmoid else y
            assert v["saturated"] == pytest.approx((scale.abs() >= 0.95).float().mean().item())
            assert v["dead"] is None
    if act is not nn.ReLU:
        assert record["layers"][acts[0]]["saturated"] > 0.3


class _Boom(TinyModule):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            self.model(batch[0])  # the hooks fire ...
            raise RuntimeError("boom")  # ... and training dies mid-step
        return super().training_step(batch, batch_idx)


def test_hooks_only_on_sampled_steps_and_removed_on_exception(tmp_path) -> None:
    module = _Boom(mlp())
    counts: list[int] = []

    class Count(ActivationMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counts.append(_hooks(pl_module))
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    monitor = Count(every_n_steps=4, save_figures=False)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [monitor], max_steps=8).fit(module, loader(n=128))
    # step 0 is sampled (the first), 1 and 2 are not, 3 is and dies with its hooks registered
    assert counts == [2, 0, 0]
    assert _hooks(module) == 0
    assert [r["step"] for r in monitor.history] == [0]
