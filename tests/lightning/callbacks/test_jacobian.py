"""JacobianSpectrumMonitor in a real Trainer: against svdvals of jacrev of the block, built by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monitor_helpers import Snapshot, TinyModule, assert_same_state, cnn, loader, make_trainer, mlp

from normzoo.lightning.callbacks import JacobianSpectrumMonitor


def _svdvals(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(
        torch.func.jacrev(lambda v: fn(v.reshape(x.shape)).reshape(-1))(x.reshape(-1))
    )


class _KeepValues(Snapshot):
    def __init__(self, monitor: JacobianSpectrumMonitor) -> None:
        super().__init__()
        self.monitor = monitor
        self.values: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.values.append(dict(self.monitor.last_values))


def test_vanilla_blocks_against_jacrev(tmp_path) -> None:
    module = TinyModule(mlp(norm=False))
    init = copy.deepcopy(module.model).eval()
    data = loader()
    monitor = JacobianSpectrumMonitor(every_n_steps=1, max_samples=3, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1, accumulate_grad_batches=2).fit(module, data)
    x, _ = next(iter(data))
    assert list(monitor.last_values) == ["0-1", "2-4", "5"]  # linear->relu, dropout->linear->relu, head
    blocks = {"0-1": init[0:2], "2-4": init[2:5], "5": init[5:]}
    inputs = {"0-1": x, "2-4": init[0:2](x), "5": init[0:5](x)}
    for name, block in blocks.items():
        got = monitor.last_values[name]
        assert got.shape[0] == 3
        for i in range(3):
            torch.testing.assert_close(
                got[i], _svdvals(block, inputs[name][i].detach()), rtol=1e-5, atol=1e-6
            )
    record = monitor.history[0]["layers"]["0-1"]
    assert record["exact"]
    assert record["n"] == 3
    assert sum(record["hist"]) == monitor.last_values["0-1"].numel()
    assert record["max"] == pytest.approx(monitor.last_values["0-1"][:, 0].mean().item(), rel=1e-6)


def test_bn_blocks_use_the_batch_statistics(tmp_path) -> None:
    module = TinyModule(mlp(norm=True))  # Linear, nz.BatchNorm1d, ReLU, Dropout, Linear, nn.BatchNorm1d, ...
    init = copy.deepcopy(module.model)
    data = loader()
    monitor = JacobianSpectrumMonitor(every_n_steps=1, max_samples=2, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(module, data)
    x, _ = next(iter(data))
    assert list(monitor.last_values) == ["0-2", "3-6", "7"]

    def bn_by_hand(lin, bn, v, h_batch):  # the batch's statistics, treated as constants
        mean, var = h_batch.mean(0), h_batch.var(0, unbiased=False)
        return F.relu((lin(v) - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)

    h1 = init[0](x).detach()
    a1 = bn_by_hand(init[0], init[1], x, h1).detach()
    h2 = init[4](a1).detach()
    for i in range(2):
        ref1 = _svdvals(lambda v: bn_by_hand(init[0], init[1], v, h1), x[i])
        ref2 = _svdvals(lambda v: bn_by_hand(init[4], init[5], v, h2), a1[i])
        torch.testing.assert_close(monitor.last_values["0-2"][i], ref1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(monitor.last_values["3-6"][i], ref2, rtol=1e-4, atol=1e-6)


def test_randomized_estimate_on_a_conv_block_and_no_side_effects(tmp_path) -> None:
    module = TinyModule(cnn(channels=6))
    init = copy.deepcopy(module.model).eval()
    data = loader(shape=(1, 5, 5))
    before = Snapshot()
    monitor = JacobianSpectrumMonitor(
        every_n_steps=1, max_samples=1, max_exact_dim=100, rank=6, power_iters=4, bn_stats="running",
        save_figures=False,
    )  # fmt: skip
    after = _KeepValues(monitor)
    make_trainer(tmp_path, [before, monitor, after], max_steps=2).fit(module, data)
    assert len(before.states) == 2
    for a, b in zip(before.states, after.states, strict=True):
        assert_same_state(a, b)  # weights, grads, BN statistics, modes, RNG, optimizer
    assert not monitor.history[0]["layers"]["0-2"]["exact"]  # 25 -> 150 values: randomized
    x, _ = next(iter(data))
    init.train()(x)  # the training forward of step 0 updates the running statistics before the probe
    init.eval()
    ref = _svdvals(lambda v: init[0:3](v.unsqueeze(0)), x[0])
    torch.testing.assert_close(after.values[0]["0-2"][0], ref[:6], rtol=1e-3, atol=1e-5)
