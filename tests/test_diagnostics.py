"""normzoo.diagnostics against independent computations: numpy SVD of autograd Jacobians, loops by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normzoo import diagnostics as D


def _reference_svdvals(fn, x: torch.Tensor) -> np.ndarray:
    jac = torch.autograd.functional.jacobian(lambda v: fn(v[None]).reshape(-1), x.double()).reshape(
        -1, x.numel()
    )
    return np.linalg.svd(jac.numpy(), compute_uv=False)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 3)])
def test_exact_singular_values_match_numpy(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 5), nn.Tanh(), nn.Linear(5, 7)).double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    spec = D.jacobian_singular_values(net, x, method="exact")
    assert spec.exact
    assert spec.values.shape == (3, min(math.prod(shape), 7))
    for i in range(3):
        ref = _reference_svdvals(net, x[i])[: spec.values.shape[1]]
        np.testing.assert_allclose(spec.values[i].numpy(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(spec.rms[i].item(), np.sqrt((ref**2).sum() / len(ref)), rtol=1e-10)


def test_randomized_estimate_tracks_the_top_of_the_spectrum() -> None:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    s = 0.8 ** torch.arange(200, dtype=torch.float64) * 3.0  # decaying spectrum, like a trained layer
    a = u[:, :200] @ torch.diag(s) @ v.T

    def fn(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ a.T) * 0 + z @ a.T  # nonlinear graph, linear map: exact Jacobian a

    x = torch.randn(2, 200, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    est = D.jacobian_singular_values(fn, x, method="randomized", rank=10, power_iters=2, generator=gen)
    assert not est.exact
    assert est.values.shape == (2, 10)
    np.testing.assert_allclose(est.values[0].numpy(), s[:10].numpy(), rtol=1e-6)
    true_rms = math.sqrt((s**2).sum().item() / 200)
    assert 0.5 * true_rms < est.rms[0].item() < 1.5 * true_rms  # Hutchinson estimate from 18 probes


def test_auto_switches_on_the_dimension_budget() -> None:
    lin = nn.Linear(20, 20)
    x = torch.randn(1, 20)
    assert D.jacobian_singular_values(lin, x, max_exact_dim=20).exact
    assert not D.jacobian_singular_values(lin, x, max_exact_dim=19, rank=4).exact
    with pytest.raises(ValueError, match="method"):
        D.jacobian_singular_values(lin, x, method="svd")  # type: ignore[arg-type]


class _SoftplusNoJvp(torch.autograd.Function):
    """softplus with a hand-written, twice-differentiable backward and no ``jvp``: forward-mode AD refuses it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch.func.jvp's first use
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_spectra_need_no_forward_mode_support(method: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()

    def fn(v: torch.Tensor) -> torch.Tensor:
        return _SoftplusNoJvp.apply(lin(v))

    x = torch.randn(2, 12, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # what the spectra used to go through
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    spec = D.jacobian_singular_values(fn, x, method=method, rank=9, oversample=0, power_iters=2)
    for i in range(2):
        ref = _reference_svdvals(fn, x[i])
        np.testing.assert_allclose(spec.values[i].numpy(), ref[: spec.values.shape[1]], rtol=1e-8, atol=1e-12)


def test_conv_block_in_eval_mode_matches_its_autograd_jacobian() -> None:
    """A conv -> BN (running statistics) -> ReLU -> max-pool block, both methods, against numpy's SVD."""
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)
    ).double()
    block[1].running_mean.uniform_(-0.5, 0.5)
    block[1].running_var.uniform_(0.5, 2.0)
    block.eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    exact = D.jacobian_singular_values(block, x, method="exact")
    est = D.jacobian_singular_values(block, x, method="randomized", rank=4, oversample=8, power_iters=3)
    for i in range(3):
        ref = _reference_svdvals(block, x[i])
        np.testing.assert_allclose(
            exact.values[i].numpy(), ref[: exact.values.shape[1]], rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(est.values[i].numpy(), ref[:4], rtol=1e-6)


def test_sv_histogram_bins_are_fixed_and_clip() -> None:
    edges = np.array(D.SV_HISTOGRAM_EDGES)
    values = torch.tensor([0.0, 1e-3, 0.99, 1.01, 5.0, 1e9])
    counts = D.sv_histogram(values)
    ref, _ = np.histogram(np.clip(values.numpy(), edges[0], edges[-1] * (1 - 1e-12)), bins=edges)
    assert counts == ref.tolist()


def test_activation_stats_against_hand_computation() -> None:
    torch.manual_seed(0)
    pre = torch.randn(32, 4, 5, 5) * 3
    relu = F.relu(pre)
    relu[:, 1, 2, 2] = 0.0  # one unit dead on every sample
    s = D.activation_stats(relu, "relu")
    per_unit = relu.reshape(32, -1)
    assert s["dead"] == pytest.approx((per_unit == 0).all(0).float().mean().item())
    assert s["mean"] == pytest.approx(relu.mean().item(), rel=1e-6)
    assert s["std"] == pytest.approx(relu.std().item(), rel=1e-6)
    assert s["p50"] == pytest.approx(np.quantile(relu.numpy(), 0.5), abs=1e-6)
    assert s["saturated"] is None
    sig = torch.sigmoid(pre)
    s = D.activation_stats(sig, "sigmoid")
    assert s["saturated"] == pytest.approx(((sig > 0.995) | (sig < 0.005)).float().mean().item(), abs=1e-6)
    tanh = torch.tanh(pre)
    assert D.activation_stats(tanh, "tanh", saturation=0.9)["saturated"] == pytest.approx(
        (tanh.abs() >= 0.9).float().mean().item()
    )


def _named_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def loss_of(params):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return loss_of


def test_internal_covariate_shift_matches_a_manual_replay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = dict(model.named_parameters())
    layers = [["0.weight", "0.bias"], ["2.weight", "2.bias"], ["4.weight", "4.bias"]]
    got = D.internal_covariate_shift(_named_loss(model, x, y), params, layers, lr=0.5)

    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for i, names in enumerate(layers):
        stepped = copy.deepcopy(model)
        with torch.no_grad():
            for j, (n, p) in enumerate(stepped.named_parameters()):
                if j < 2 * i:  # the parameters of layers 0..i-1
                    p -= 0.5 * grads[n]
        F.cross_entropy(stepped(x), y).backward()
        g = torch.cat([grads[n].flatten() for n in names])
        g2 = torch.cat([dict(stepped.named_parameters())[n].grad.flatten() for n in names])
        assert got[i][0] == pytest.approx((g - g2).norm().item(), rel=1e-9, abs=1e-15)
        assert got[i][1] == pytest.approx(F.cosine_similarity(g, g2, dim=0).item(), rel=1e-9)
    assert got[0] == (0.0, 1.0)
    assert got[1][0] > 0


def test_loss_landscape_matches_a_manual_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    etas = [0.05, 0.1, 0.4]
    got = D.loss_landscape(_named_loss(model, x, y), dict(model.named_parameters()), etas)

    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    g = [p.grad.clone() for p in ref.parameters()]
    gflat = torch.cat([t.flatten() for t in g])
    losses, diffs = [], []
    for eta in etas:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, gi in zip(moved.parameters(), g, strict=True):
                p -= eta * gi
        loss = F.cross_entropy(moved(x), y)
        loss.backward()
        losses.append(loss.item())
        diffs.append((torch.cat([p.grad.flatten() for p in moved.parameters()]) - gflat).norm().item())
    np.testing.assert_allclose(got.losses, losses, rtol=1e-10)
    np.testing.assert_allclose(got.grad_diffs, diffs, rtol=1e-9)
    assert got.loss_range == pytest.approx(max(losses) - min(losses))
    assert got.grad_range == pytest.approx(max(diffs) - min(diffs))
    assert got.beta == pytest.approx(
        max(d / (e * gflat.norm().item()) for d, e in zip(diffs, etas, strict=True))
    )
    assert got.grad_norm == pytest.approx(gflat.norm().item())


def test_update_ratio_and_abs_stats() -> None:
    w0, w1 = torch.randn(4, 3), torch.randn(4, 3)
    norms, ratios = D.update_ratio([w0], [w1])
    assert norms[0] == pytest.approx(w1.norm().item(), rel=1e-6)
    assert ratios[0] == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-6)
    assert math.isnan(D.update_ratio([torch.zeros(2)], [torch.ones(2)])[1][0])
    means, maxes = D.abs_stats([w0])
    assert means[0] == pytest.approx(w0.abs().mean().item())
    assert maxes[0] == pytest.approx(w0.abs().max().item())
