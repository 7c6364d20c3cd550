"""normzoo.functional on its own: every function against torch or numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from normzoo import functional as NF


def _x(
    *shape: int, dtype: torch.dtype = torch.float64, seed: int = 0, scale: float = 2.0, shift: float = 1.0
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# --- batch_norm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 2)])
def test_batch_norm_is_torch_batch_norm(training: bool, shape: tuple[int, ...]) -> None:
    x = _x(*shape, dtype=torch.float32)
    w, b = torch.rand(3) + 0.5, torch.rand(3)
    rm_a, rv_a = torch.rand(3), torch.rand(3) + 0.5
    rm_b, rv_b = rm_a.clone(), rv_a.clone()
    a = NF.batch_norm(x, rm_a, rv_a, w, b, training, 0.3, 1e-3)
    b_ = F.batch_norm(x, rm_b, rv_b, w, b, training, 0.3, 1e-3)
    assert torch.equal(a, b_)
    assert torch.equal(rm_a, rm_b)
    assert torch.equal(rv_a, rv_b)


# --- batch_norm_stats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 2)])
def test_batch_norm_stats_per_channel(shape: tuple[int, ...]) -> None:
    x = _x(*shape)
    mean, var = NF.batch_norm_stats(x)
    per_channel = x.transpose(0, 1).reshape(3, -1)  # every value of a channel, over batch and space
    n = per_channel.shape[1]
    expected_mean = per_channel.sum(1) / n
    expected_var = ((per_channel - expected_mean[:, None]) ** 2).sum(1) / n  # biased
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-12, atol=1e-12)
    assert mean.dtype == var.dtype == torch.float64


def test_batch_norm_stats_hand_computed() -> None:
    mean, var = NF.batch_norm_stats(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    assert mean.tolist() == [2.0, 4.0]
    assert var.tolist() == [1.0, 4.0]


def test_batch_norm_stats_channels_last_equals_contiguous() -> None:
    x = _x(2, 3, 4, 5)
    a = NF.batch_norm_stats(x)
    b = NF.batch_norm_stats(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_norm_stats_half_inputs(dtype: torch.dtype) -> None:
    """Low-precision inputs: float32 results, no overflow, the precision of torch's half-input kernel.

    The running update that comes with the statistics is checked bit for bit against torch's BatchNorm in
    tests/layers/test_renorm.py; here, the values against a float64 computation.
    """
    x = _x(64, 3, 4, 4, scale=3.0, shift=200.0).to(dtype)  # sum of squares far beyond float16's range
    mean, var = NF.batch_norm_stats(x)
    assert mean.dtype == var.dtype == torch.float32
    assert bool(torch.isfinite(var).all())
    exact_mean, exact_var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-3, atol=0)
    torch.testing.assert_close(var.double(), exact_var, rtol=0.05, atol=0)


# --- renorm_correction --------------------------------------------------------------------------------------


def test_renorm_correction_hand_computed() -> None:
    t = torch.tensor
    r, d = NF.renorm_correction(t([2.0]), t([4.0]), t([0.0]), t([1.0]), 3.0, 5.0, eps=0.0)
    assert (r.item(), d.item()) == (2.0, 2.0)
    # eps under both square roots: r = sqrt(4 + 1)/sqrt(1 + 1), d = 2/sqrt(1 + 1)
    r, d = NF.renorm_correction(t([2.0]), t([4.0]), t([0.0]), t([1.0]), 3.0, 5.0, eps=1.0)
    assert r.item() == pytest.approx(math.sqrt(5 / 2))
    assert d.item() == pytest.approx(2 / math.sqrt(2))


def test_renorm_correction_clips_both_ways() -> None:
    batch_mean = torch.tensor([10.0, -10.0, 0.5, 0.0], dtype=torch.float64)
    batch_var = torch.tensor([100.0, 0.01, 1.44, 1.0], dtype=torch.float64)
    zeros, ones = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    r, d = NF.renorm_correction(batch_mean, batch_var, zeros, ones, 2.0, 1.0, eps=0.0)
    assert r.tolist() == pytest.approx([2.0, 0.5, 1.2, 1.0])
    assert d.tolist() == pytest.approx([1.0, -1.0, 0.5, 0.0])
    assert r.dtype == d.dtype == torch.float64


def test_renorm_correction_uses_running_statistics() -> None:
    r, d = NF.renorm_correction(
        torch.tensor([3.0]),
        torch.tensor([16.0]),
        torch.tensor([1.0]),
        torch.tensor([4.0]),
        10.0,
        10.0,
        eps=0.0,
    )
    assert (r.item(), d.item()) == (2.0, 1.0)  # 4/2 and (3 − 1)/2


def test_renorm_correction_tensor_bounds_and_no_gradient() -> None:
    batch_mean = torch.tensor([10.0, 0.2], requires_grad=True)
    batch_var = torch.tensor([100.0, 1.0], requires_grad=True)
    r, d = NF.renorm_correction(
        batch_mean, batch_var, torch.zeros(2), torch.ones(2), torch.tensor(3.0), torch.tensor(0.5)
    )
    assert not r.requires_grad
    assert not d.requires_grad
    torch.testing.assert_close(r, torch.tensor([3.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(d, torch.tensor([0.5, 0.2]), atol=1e-5, rtol=0)
    # r_max = 1 and d_max = 0 as tensors: exactly 1 and 0
    r, d = NF.renorm_correction(
        batch_mean, batch_var, torch.zeros(2), torch.ones(2), torch.tensor(1.0), torch.tensor(0.0)
    )
    assert r.tolist() == [1.0, 1.0]
    assert d.abs().tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("r_max", "d_max", "match"), [(0.9, 1.0, "r_max >= 1"), (2.0, -0.1, "d_max >= 0")])
def test_renorm_correction_rejects_bad_bounds(r_max: float, d_max: float, match: str) -> None:
    one = torch.ones(1)
    with pytest.raises(ValueError, match=match):
        NF.renorm_correction(one, one, one, one, r_max, d_max)


# --- batch_renorm --------------------------------------------------------------------------------------------


def _renorm_by_hand(
    x: Tensor,
    rm: Tensor,
    rv: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    r_max: float,
    d_max: float,
    eps: float,
) -> Tensor:
    dims = [0, *range(2, x.dim())]
    view = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims)
    var = x.var(dims, correction=0)
    r = ((var + eps).sqrt() / (rv + eps).sqrt()).clamp(1 / r_max, r_max)
    d = ((mu - rm) / (rv + eps).sqrt()).clamp(-d_max, d_max)
    y = (x - mu.view(view)) / (var + eps).sqrt().view(view) * r.view(view) + d.view(view)
    if w is not None:
        y = y * w.view(view)
    if b is not None:
        y = y + b.view(view)
    return y


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 3)])
def test_batch_renorm_by_hand(affine: str, shape: tuple[int, ...]) -> None:
    x = _x(*shape, scale=3.0, shift=2.0)
    rm = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    rv = torch.tensor([1.0, 0.5, 4.0], dtype=torch.float64)
    w = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64) if affine in ("both", "weight") else None
    b = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64) if affine in ("both", "bias") else None
    expected = _renorm_by_hand(x, rm, rv, w, b, 1.5, 0.7, 1e-5)
    rm_new, rv_new = rm.clone(), rv.clone()
    y = NF.batch_renorm(x, rm_new, rv_new, w, b, True, 0.1, 1e-5, 1.5, 0.7)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    # running statistics: torch BatchNorm's update, independent of the correction
    rm_bn, rv_bn = rm.clone(), rv.clone()
    F.batch_norm(x, rm_bn, rv_bn, None, None, True, 0.1, 1e-5)
    assert torch.equal(rm_new, rm_bn)
    assert torch.equal(rv_new, rv_bn)


def test_batch_renorm_outside_training_or_without_running_stats_is_batch_norm() -> None:
    x = _x(4, 3, 2, 2)
    rm, rv = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    assert torch.equal(
        NF.batch_renorm(x, rm, rv, w, b, False, r_max=2.0, d_max=1.0), F.batch_norm(x, rm, rv, w, b, False)
    )
    assert torch.equal(
        NF.batch_renorm(x, None, None, w, b, True, r_max=2.0, d_max=1.0),
        F.batch_norm(x, None, None, w, b, True),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_batch_renorm_r1_d0_is_batch_norm_bitwise(dtype: torch.dtype) -> None:
    x = _x(4, 3, 3, 3, scale=5.0, shift=4.0).to(dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = (torch.rand(3) + 0.5).to(dtype).requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    y = NF.batch_renorm(x, rm, rv, w, None, True, 0.1, 1e-5, 1.0, 0.0)
    y2 = F.batch_norm(x2, rm2, rv2, w2, None, True, 0.1, 1e-5)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    y2.backward(g)
    for a, b in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad), (rm, rm2), (rv, rv2)):
        assert torch.equal(a, b)


def test_batch_renorm_stop_gradient() -> None:
    """The gradient treats r and d as constants: it is BatchNorm's gradient with weight γ·r, and β + γ·d."""
    x = _x(6, 2, 3).requires_grad_()
    rm, rv = torch.tensor([0.5, -0.5], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    w = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    r, d = NF.renorm_correction(*NF.batch_norm_stats(x.detach()), rm, rv, 100.0, 100.0)
    y = NF.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 100.0, 100.0)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    scale = (w.detach() * r).requires_grad_()
    shift = (b.detach() + w.detach() * d).requires_grad_()
    F.batch_norm(x2, None, None, scale, shift, True, 0.1, 1e-5).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, scale.grad * r + shift.grad * d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, shift.grad, rtol=1e-10, atol=1e-12)


# --- sample_noise_moments ------------------------------------------------------------------------------------


def test_sample_noise_moments_bounds_and_coverage() -> None:
    g = torch.Generator().manual_seed(0)
    mean, std = NF.sample_noise_moments(20_000, 1.5, (0.25, 2.0), generator=g)
    assert mean.shape == std.shape == (20_000,)
    assert float(mean.min()) >= -1.5
    assert float(mean.max()) <= 1.5
    assert float(std.min()) >= 0.25
    assert float(std.max()) <= 2.0
    # uniform: fills its range, with the uniform's mean and variance
    assert float(mean.min()) < -1.49
    assert float(mean.max()) > 1.49
    assert float(std.min()) < 0.26
    assert float(std.max()) > 1.99
    assert float(mean.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(mean.var()) == pytest.approx(3.0**2 / 12, rel=0.03)
    assert float(std.mean()) == pytest.approx(1.125, abs=0.02)


def test_sample_noise_moments_draws_like_uniform() -> None:
    """The draw order: C means from U(−a, a), then C stds from U(lo, hi), from the given generator."""
    mean, std = NF.sample_noise_moments(5, 2.0, (0.5, 1.5), generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(mean, torch.empty(5).uniform_(-2.0, 2.0, generator=g))
    assert torch.equal(std, torch.empty(5).uniform_(0.5, 1.5, generator=g))


def test_sample_noise_moments_reproducible_dtype_device() -> None:
    a = NF.sample_noise_moments(
        4, 1.0, (0.5, 1.5), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    b = NF.sample_noise_moments(
        4, 1.0, (0.5, 1.5), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert a[0].dtype == torch.float64
    assert a[0].device.type == "cpu"
    meta = NF.sample_noise_moments(4, 1.0, (0.5, 1.5), device="meta")
    assert meta[0].is_meta


def test_sample_noise_moments_degenerate_ranges() -> None:
    mean, std = NF.sample_noise_moments(6, 0.0, (0.7, 0.7))
    assert mean.abs().max().item() == 0.0
    torch.testing.assert_close(std, torch.full((6,), 0.7))


@pytest.mark.parametrize(
    ("mean_range", "std_range"), [(-0.1, (0.5, 1.0)), (1.0, (1.0, 0.5)), (1.0, (-0.5, 1.0))]
)
def test_sample_noise_moments_rejects_bad_ranges(mean_range: float, std_range: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="mean_range >= 0 and 0 <= std_range"):
        NF.sample_noise_moments(3, mean_range, std_range)


# --- noisy_batch_norm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 2), (4, 2, 5), (2, 2, 3, 4), (2, 2, 2, 2, 3)])
def test_noisy_batch_norm_is_batch_norm_plus_noise(shape: tuple[int, ...]) -> None:
    x = _x(*shape)
    w = torch.tensor([1.5, -0.5], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2], dtype=torch.float64)
    noise_mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    noise_std = torch.tensor([0.3, 2.0], dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    y = NF.noisy_batch_norm(
        x, rm, rv, w, b, 0.2, 1e-5, noise_mean, noise_std, torch.Generator().manual_seed(3)
    )
    rm2, rv2 = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    bn = F.batch_norm(x, rm2, rv2, w, b, True, 0.2, 1e-5)
    eps = torch.empty(shape, dtype=torch.float64).normal_(generator=torch.Generator().manual_seed(3))
    view = [1, -1] + [1] * (len(shape) - 2)
    torch.testing.assert_close(
        y, bn + noise_mean.view(view) + noise_std.view(view) * eps, rtol=1e-12, atol=1e-12
    )
    assert torch.equal(rm, rm2)
    assert torch.equal(rv, rv2)


def test_noisy_batch_norm_zero_noise_is_batch_norm() -> None:
    x = _x(4, 2, 3, dtype=torch.float32)
    zeros = torch.zeros(2)
    assert torch.equal(
        NF.noisy_batch_norm(x, None, None, noise_mean=zeros, noise_std=zeros),
        F.batch_norm(x, None, None, training=True),
    )


def test_noisy_batch_norm_needs_moments() -> None:
    with pytest.raises(ValueError, match="noisy_batch_norm needs noise_mean and noise_std"):
        NF.noisy_batch_norm(torch.randn(4, 2), None, None)


# --- paper_renorm_schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "r_max", "d_max"),
    [
        (0, 1.0, 0.0),
        (5_000, 1.0, 0.0),
        (5_001, 1.0 + 2.0 / 35_000, 5.0 / 20_000),
        (15_000, 1.0 + 2.0 * 10 / 35, 2.5),
        (25_000, 1.0 + 2.0 * 20 / 35, 5.0),
        (40_000, 3.0, 5.0),
        (10**9, 3.0, 5.0),
    ],
)
def test_paper_schedule_int_and_tensor_steps(step: int, r_max: float, d_max: float) -> None:
    r, d = NF.paper_renorm_schedule(step)
    assert isinstance(r, float)
    assert isinstance(d, float)
    assert r == pytest.approx(r_max, rel=1e-12)
    assert d == pytest.approx(d_max, rel=1e-12, abs=1e-15)
    rt, dt = NF.paper_renorm_schedule(torch.tensor(step))
    assert isinstance(rt, Tensor)
    assert rt.dim() == 0
    assert rt.dtype == torch.float32
    assert float(rt) == pytest.approx(r_max, rel=1e-6)
    assert float(dt) == pytest.approx(d_max, rel=1e-6, abs=1e-9)


def test_paper_schedule_negative_steps() -> None:
    assert NF.paper_renorm_schedule(-5) == (1.0, 0.0)
    assert NF.paper_renorm_schedule(torch.tensor(-5))[0].item() == 1.0


def test_paper_schedule_custom_parameters() -> None:
    # warm-up 10, r_max 2 reached at 20, d_max 1 reached at 30
    kwargs = {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 10, "r_max_steps": 20, "d_max_steps": 30}
    assert NF.paper_renorm_schedule(10, **kwargs) == (1.0, 0.0)
    assert NF.paper_renorm_schedule(15, **kwargs) == pytest.approx((1.5, 0.25))
    assert NF.paper_renorm_schedule(20, **kwargs) == pytest.approx((2.0, 0.5))
    assert NF.paper_renorm_schedule(100, **kwargs) == (2.0, 1.0)
    # no warm-up and instant ramps: the final bounds from step 0 on, never a division by zero
    assert NF.paper_renorm_schedule(0, warmup_steps=0, r_max_steps=0, d_max_steps=0) == (1.0, 0.0)
    assert NF.paper_renorm_schedule(1, warmup_steps=0, r_max_steps=0, d_max_steps=0) == (3.0, 5.0)


@pytest.mark.parametrize(("warmup", "r_steps", "d_steps"), [(-1, 10, 10), (20, 10, 30), (20, 30, 10)])
def test_paper_schedule_rejects_inconsistent_steps(warmup: int, r_steps: int, d_steps: int) -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        NF.paper_renorm_schedule(0, warmup_steps=warmup, r_max_steps=r_steps, d_max_steps=d_steps)


def test_public_names() -> None:
    for name in NF.__all__:
        assert callable(getattr(NF, name)), name
    assert sorted(NF.__all__) == NF.__all__
