"""train_eval_drift against statistics and outputs computed by hand; nothing of the model changes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normzoo as nz
from normzoo.diagnostics import train_eval_drift


@settings(max_examples=20, deadline=None)
@given(shift=st.floats(-3, 3), scale=st.floats(0.2, 5), batch=st.integers(2, 16), seed=st.integers(0, 1000))
def test_distance_and_gap_of_one_layer_by_hand(shift: float, scale: float, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(batch, 3, generator=g) * scale + shift
    drift = train_eval_drift(nn.Sequential(bn), x)
    mean, var = x.mean(0), x.var(0, correction=0)
    expected = []
    for c in range(3):  # the 2-Wasserstein distance of two Gaussians, over the running standard deviation
        sigma = math.sqrt(bn.running_var[c].item() + bn.eps)
        sigma_b = math.sqrt(var[c].item() + bn.eps)
        expected.append(math.hypot(mean[c].item() - bn.running_mean[c].item(), sigma_b - sigma) / sigma)
    torch.testing.assert_close(drift.distance["0"], torch.tensor(expected), rtol=1e-4, atol=1e-5)
    train = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    eval_ = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert drift.output_gap == pytest.approx(((train - eval_).norm() / eval_.norm()).item(), rel=1e-4)
    assert drift.disagreement == pytest.approx((train.argmax(1) != eval_.argmax(1)).float().mean().item())
    assert drift.summary()["0"] == pytest.approx({"mean": sum(expected) / 3, "max": max(expected)}, rel=1e-4)


def test_running_statistics_that_match_the_batch_give_no_drift_and_dropout_is_off() -> None:
    x = torch.randn(64, 5) * 2 + 1
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_mean.copy_(x.mean(0))
        bn.running_var.copy_(x.var(0, correction=0))
    drift = train_eval_drift(nn.Sequential(bn, nn.Dropout(0.9), nn.Linear(5, 4)), x)
    assert drift.distance["0"].abs().max() < 1e-5
    assert drift.output_gap < 1e-5
    assert drift.disagreement == 0.0


@pytest.mark.parametrize("kind", [nn.BatchNorm2d, nz.BatchNorm2d, nz.BatchRenorm2d, nz.NoisyBatchNorm2d])
def test_every_kind_and_nothing_is_changed(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), kind(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(4, 2, 6, 6))  # materialize the lazy layer
    model.train()
    model[3].eval()  # a mixed state, to see it restored
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flags = [m.training for m in model.modules()]
    x = torch.randn(8, 2, 6, 6) * 4 + 3
    rng = torch.get_rng_state()
    drift = train_eval_drift(model, x)
    assert set(drift.distance) == {"1"}
    assert drift.distance["1"].shape == (4,)
    assert drift.summary()["1"]["mean"] > 0.5
    assert drift.output_gap > 0
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_model_that_does_not_return_a_tensor() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.bn(x), x

    with pytest.raises(TypeError, match="train_eval_drift: expected the model to return a tensor, got tuple"):
        train_eval_drift(Pair(), torch.randn(4, 2))
