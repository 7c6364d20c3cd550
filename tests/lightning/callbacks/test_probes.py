"""CovariateShiftMonitor and LossLandscapeMonitor: values against a manual replay, and no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monitor_helpers import Snapshot, TinyModule, assert_same_state, loader, make_trainer, mlp
from torch import nn

import normzoo as nz
from normzoo.lightning.callbacks import CovariateShiftMonitor, LossLandscapeMonitor


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()  # batch statistics; the copy keeps the running ones untouched
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ics_against_a_manual_replay(tmp_path) -> None:
    module = TinyModule(mlp(), lr=0.2)
    init = copy.deepcopy(module.model)
    data = loader()
    monitor = CovariateShiftMonitor(every_n_steps=1, log_per_layer=True, save_figures=False)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    trainer.fit(module, data)
    x, y = next(iter(data))
    g = _grads(init, x, y)
    names = list(g)
    layers = monitor.history[0]["layers"]
    assert list(layers) == ["0", "4", "7"]
    for layer, v in layers.items():
        own = [n for n in names if n.startswith(f"{layer}.")]
        first = names.index(own[0])
        stepped = copy.deepcopy(init)
        with torch.no_grad():  # SGD step of every earlier parameter (Linear 0 and the BN after it, ...)
            for n, p in list(stepped.named_parameters())[:first]:
                p -= 0.2 * g[n]
        g2 = _grads(stepped, x, y)
        a = torch.cat([g[n].flatten() for n in own])
        b = torch.cat([g2[n].flatten() for n in own])
        assert v["l2"] == pytest.approx((a - b).norm().item(), rel=1e-4, abs=1e-7)
        assert v["cos"] == pytest.approx(F.cosine_similarity(a, b, dim=0).item(), rel=1e-5)
    assert layers["0"] == {"l2": 0.0, "cos": 1.0}
    assert layers["4"]["l2"] > 0
    assert trainer.callback_metrics["ics/l2/4"].item() == pytest.approx(layers["4"]["l2"], rel=1e-6)
    assert trainer.callback_metrics["ics/l2_mean"].item() == pytest.approx(
        (layers["4"]["l2"] + layers["7"]["l2"]) / 2, rel=1e-6
    )


def test_ics_means_keep_a_first_layer_that_has_earlier_parameters(tmp_path) -> None:
    """An input BatchNorm owns the first parameters: the first monitored Linear has a real G' != G."""
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    monitor = CovariateShiftMonitor(every_n_steps=1, save_figures=False)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    trainer.fit(TinyModule(model, lr=0.2), loader())
    layers = monitor.history[0]["layers"]
    assert set(layers) == {"1", "3"}
    assert all(v["l2"] > 0 for v in layers.values())
    expected = sum(v["l2"] for v in layers.values()) / len(layers)
    assert trainer.callback_metrics["ics/l2_mean"].item() == pytest.approx(expected, rel=1e-6)


def test_landscape_against_a_manual_loop(tmp_path) -> None:
    module = TinyModule(mlp(), lr=0.1)
    init = copy.deepcopy(module.model)
    data = loader()
    monitor = LossLandscapeMonitor(every_n_steps=1, step_sizes=(0.5, 2.0, 8.0), save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(module, data)
    x, y = next(iter(data))
    g = _grads(init, x, y)
    gnorm = torch.cat([t.flatten() for t in g.values()]).norm().item()
    losses, diffs = [], []
    for eta in (0.05, 0.2, 0.8):  # relative to lr = 0.1
        moved = copy.deepcopy(init)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p -= eta * g[n]
        losses.append(F.cross_entropy(copy.deepcopy(moved).train()(x), y).item())
        g2 = _grads(moved, x, y)
        diffs.append(torch.cat([(g2[n] - g[n]).flatten() for n in g]).norm().item())
    r = monitor.history[0]
    assert r["step_sizes"] == pytest.approx([0.05, 0.2, 0.8])
    assert r["losses"] == pytest.approx(losses, rel=1e-5)
    assert r["grad_diffs"] == pytest.approx(diffs, rel=1e-4)
    assert r["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
    assert r["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert r["beta"] == pytest.approx(
        max(d / (e * gnorm) for d, e in zip(diffs, (0.05, 0.2, 0.8), strict=True)), rel=1e-4
    )


def _noisy_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nz.NoisyBatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 16), nz.BatchRenorm1d(16, schedule=None), nn.Tanh(), nn.Linear(16, 3),
    )  # fmt: skip


def test_probes_leave_every_state_as_they_found_it(tmp_path) -> None:
    torch.manual_seed(1)
    model = _noisy_model()
    reference = TinyModule(copy.deepcopy(model))
    trainer = make_trainer(tmp_path, [], max_steps=3)
    torch.manual_seed(2)
    trainer.fit(reference, loader())

    before, after = Snapshot(), Snapshot()
    probes = [
        CovariateShiftMonitor(every_n_steps=1, save_figures=False),
        LossLandscapeMonitor(every_n_steps=1, save_figures=False),
    ]
    probed = TinyModule(copy.deepcopy(model))
    trainer = make_trainer(tmp_path, [before, *probes, after], max_steps=3)
    torch.manual_seed(2)
    trainer.fit(probed, loader())
    assert len(before.states) == 3
    assert all(len(p.history) == 3 for p in probes)
    for a, b in zip(
        before.states, after.states, strict=True
    ):  # weights, grads, BN statistics, RNG, momentum buffers
        assert_same_state(a, b)
    # and so the whole run is bit for bit the run without the probes (same dropout masks, same noise)
    for (n, p), q in zip(reference.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_custom_loss_fn_and_generator_owned_by_a_layer(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nz.NoisyBatchNorm1d(8, generator=gen), nn.ReLU(), nn.Linear(8, 3))
    calls: list[int] = []

    def loss_fn(module: nn.Module, batch) -> torch.Tensor:
        calls.append(1)
        return F.cross_entropy(module(batch[0]), batch[1], label_smoothing=0.1)

    monitor = LossLandscapeMonitor(every_n_steps=1, step_sizes=(1.0,), loss_fn=loss_fn, save_figures=False)
    state = gen.get_state()
    before, after = Snapshot(), Snapshot()
    make_trainer(tmp_path, [before, monitor, after], max_steps=1).fit(TinyModule(model), loader())
    assert len(calls) == 2  # at w and at one step size
    assert not torch.equal(gen.get_state(), state)  # the training step drew noise ...
    assert_same_state(before.states[0], after.states[0])


@pytest.mark.parametrize("noisy", [True, False])
def test_ics_with_fresh_randomness_counts_the_noise_redrawn_between_steps(tmp_path, noisy: bool) -> None:
    """At lr 0 the earlier layers do not move: with the same noise G' = G exactly; with fresh noise a layer
    after a noisy BN sees the shift the redrawn noise causes, and a deterministic model still sees none."""
    torch.manual_seed(0)
    norm = nz.NoisyBatchNorm1d(16) if noisy else nz.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(8, 16), norm, nn.ReLU(), nn.Linear(16, 3))
    runs = {}
    for randomness in ("same", "fresh"):
        monitor = CovariateShiftMonitor(every_n_steps=1, randomness=randomness, save_figures=False)
        before, after = Snapshot(), Snapshot()
        trainer = make_trainer(tmp_path, [before, monitor, after], max_steps=2)
        torch.manual_seed(1)
        trainer.fit(TinyModule(copy.deepcopy(model), lr=0.0), loader())
        assert len(monitor.history) == 2
        for a, b in zip(before.states, after.states, strict=True):  # RNG, weights, statistics untouched
            assert_same_state(a, b)
        runs[randomness] = [h["layers"]["3"]["l2"] for h in monitor.history]
    assert runs["same"] == [0.0, 0.0]
    if noisy:
        assert all(v > 1e-3 for v in runs["fresh"])
    else:
        assert runs["fresh"] == [0.0, 0.0]


def test_ics_refuses_an_unknown_randomness() -> None:
    with pytest.raises(ValueError, match="CovariateShiftMonitor: expected randomness 'same' or 'fresh'"):
        CovariateShiftMonitor(randomness="new")  # type: ignore[arg-type]
