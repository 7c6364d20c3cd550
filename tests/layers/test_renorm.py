"""normzoo.BatchRenorm1d/2d/3d against the paper (Ioffe 2017), written independently in ``_reference``.

The reference computes ``r`` and ``d`` with ``detach`` (stop-gradient), eps under the square root of both
variances, the unbiased running-variance update with the number of values per channel, and lets autograd
differentiate plain elementwise float64 ops. Where the bounds are ``r_max = 1, d_max = 0`` the layer must
be torch's BatchNorm bit for bit; in eval it always is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import normzoo as nz
from normzoo import functional as NF

from ._reference import (
    FAMILIES,
    KERNEL_TOL,
    LOW_PRECISION,
    SHAPES,
    TORCH_BN,
    assert_close,
    assert_same,
    case_id,
    input_cases,
    make_inputs,
    paired,
    paper_bounds,
    randomize_,
    renorm_against_reference,
    run_step,
    train_and_compare,
)

CASES = input_cases()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: Every (affine, momentum) combination.
FLAGS = [(True, 0.1), (False, 0.1), (False, None), (True, None)]
FLAG_IDS = ["affine-m0.1", "no-affine-m0.1", "no-affine-cumulative", "affine-cumulative"]

#: Ours (in the dtype) against the float64 reference: the float64 bound is rounding only.
REFERENCE_TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 2e-4, "rtol": 1e-4},
    **LOW_PRECISION,
}


def constant(r_max: float, d_max: float) -> Callable[[int], tuple[float, float]]:
    return lambda step: (r_max, d_max)


def clipping_inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, **kw: Any) -> list[Tensor]:
    """Batches whose statistics are far from the (randomized, ~N(0, 1)) running ones, alternating wide
    (r clipped at r_max) and narrow (r clipped at 1/r_max), with shifted means (d clipped)."""
    wide = make_inputs(shape, 2, dtype=dtype, scale=4.0, shift=4.0, seed=1, **kw)
    narrow = make_inputs(shape, 2, dtype=dtype, scale=0.15, shift=1.0, seed=2, **kw)
    return [wide[0], narrow[0], wide[1], narrow[1]]


# --- BatchNorm when the bounds are (1, 0), and in eval ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("affine", "momentum"), FLAGS, ids=FLAG_IDS)
def test_r1_d0_is_torch_batchnorm_bitwise(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool, momentum: float | None
) -> None:
    check_r1_d0_is_batchnorm(case, dtype, affine, momentum, "cpu")


def check_r1_d0_is_batchnorm(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    momentum: float | None,
    device: str,
) -> None:
    """Constant bounds r_max = 1, d_max = 0: torch's BatchNorm bit for bit, on inputs that would clip."""
    ndim, shape, channels_last = case
    ours, ref = paired(
        "renorm",
        ndim,
        dtype=dtype,
        device=device,
        affine=affine,
        momentum=momentum,
        schedule=None,
        r_max=1.0,
        d_max=0.0,
    )
    train_and_compare(ours, ref, clipping_inputs(shape, dtype, channels_last=channels_last, device=device))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paper_warmup_is_torch_batchnorm(case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype) -> None:
    check_paper_warmup_is_batchnorm(case, dtype, "cpu")


def check_paper_warmup_is_batchnorm(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, device: str
) -> None:
    """The default schedule's first 5k steps have bounds (1, 0): BatchNorm in outputs, gradients, stats.

    The bounds are then 0-dim tensors (no host synchronization), which takes the general renorm path with
    r = 1 and d = 0 exactly; on CPU that must still be torch's BatchNorm bit for bit. On CUDA torch's
    BatchNorm may run cuDNN where ours runs the native kernels: equal to rounding.
    """
    ndim, shape, channels_last = case
    ours, ref = paired("renorm", ndim, dtype=dtype, device=device)
    assert ours.schedule == "paper"
    inputs = clipping_inputs(shape, dtype, channels_last=channels_last, device=device)
    train_and_compare(ours, ref, inputs, **({} if device == "cpu" else KERNEL_TOL[dtype]))


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_running_stats_and_eval_are_torch_batchnorm_while_clipping(ndim: int, dtype: torch.dtype) -> None:
    check_stats_and_eval_while_clipping(ndim, dtype, "cpu")


def check_stats_and_eval_while_clipping(ndim: int, dtype: torch.dtype, device: str) -> None:
    """Clipping changes the training output only: statistics and eval are BatchNorm's (bitwise on CPU)."""
    stats_tol = {} if device == "cpu" else KERNEL_TOL[dtype]
    ours, ref = paired("renorm", ndim, dtype=dtype, device=device, schedule=None, r_max=1.5, d_max=0.5)
    shape = {1: (4, 3, 5), 2: (3, 3, 4, 5), 3: (2, 3, 3, 2, 4)}[ndim]
    inputs = clipping_inputs(shape, dtype, device=device)
    for i, x in enumerate(inputs):
        a, b = run_step(ours, x, i), run_step(ref, x, i)
        assert not torch.equal(a.output, b.output)  # clipping is active
        assert_close(a.running_mean, b.running_mean, f"step {i} running_mean", **stats_tol)
        assert_close(a.running_var, b.running_var, f"step {i} running_var", **stats_tol)
        assert_same(a.num_batches_tracked, b.num_batches_tracked, f"step {i} num_batches_tracked")
        with torch.no_grad():  # keep the parameters equal: the gradients differ by design
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
            ref.running_mean.copy_(ours.running_mean)
            ref.running_var.copy_(ours.running_var)
    ours.eval()
    ref.eval()
    for i, x in enumerate(inputs[:2]):
        a, b = run_step(ours, x, 50 + i, lr=0.0), run_step(ref, x, 50 + i, lr=0.0)
        assert_same(a.output, b.output, "eval output")
        assert_same(a.input_grad, b.input_grad, "eval input grad")
        assert_same(a.weight_grad, b.weight_grad, "eval weight grad")


# --- against the paper's formulas ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("affine", "momentum"), FLAGS, ids=FLAG_IDS)
def test_matches_paper_reference_with_clipping(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool, momentum: float | None
) -> None:
    check_reference_with_clipping(case, dtype, affine, momentum, "cpu")


def check_reference_with_clipping(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    momentum: float | None,
    device: str,
) -> None:
    """Four steps with r and d on their bounds against the paper's formulas, then eval."""
    ndim, shape, channels_last = case
    layer = FAMILIES["renorm"][ndim - 1](
        3, affine=affine, momentum=momentum, schedule=None, r_max=1.5, d_max=0.5
    )
    layer = randomize_(layer).to(device=device, dtype=dtype)
    inputs = clipping_inputs(shape, dtype, channels_last=channels_last, device=device)
    ref = renorm_against_reference(layer, inputs, constant(1.5, 0.5), **REFERENCE_TOL[dtype])
    # the inputs did what they are for: r at both bounds and d at its bound on every channel
    r, d = torch.stack(ref.r_history), torch.stack(ref.d_history)
    assert torch.allclose(r[0], torch.full_like(r[0], 1.5)), r
    assert torch.allclose(r[1], torch.full_like(r[1], 1 / 1.5)), r
    assert bool((d.abs() == 0.5).any()), d


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_paper_reference_without_clipping(case: tuple[int, tuple[int, ...], bool]) -> None:
    """Bounds wide enough that r and d are the raw ratios: the stop-gradient matters most here."""
    ndim, shape, channels_last = case
    layer = randomize_(FAMILIES["renorm"][ndim - 1](3, schedule=None, r_max=100.0, d_max=100.0)).double()
    ref = renorm_against_reference(
        layer,
        make_inputs(shape, 4, dtype=torch.float64, channels_last=channels_last),
        constant(100, 100),
        **REFERENCE_TOL[torch.float64],
    )
    assert ref.last_r is not None
    assert bool(((ref.last_r - 1).abs() > 0.05).all())


@given(
    ndim=st.sampled_from([1, 2, 3]),
    data=st.data(),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    eps=st.floats(1e-6, 1.0),
    r_max=st.floats(1.0, 4.0),
    d_max=st.floats(0.0, 5.0),
    scale=st.floats(0.01, 10.0),
    shift=st.floats(-5.0, 5.0),
    affine=st.booleans(),
)
def test_matches_paper_reference_hypothesis(
    ndim: int,
    data: st.DataObject,
    momentum: float | None,
    eps: float,
    r_max: float,
    d_max: float,
    scale: float,
    shift: float,
    affine: bool,
) -> None:
    spatial_dims = data.draw(st.sampled_from([0, 1])) if ndim == 1 else ndim
    spatial = data.draw(st.lists(st.integers(1, 3), min_size=spatial_dims, max_size=spatial_dims))
    batch = data.draw(st.integers(2, 4))
    channels = data.draw(st.integers(1, 4))
    layer = FAMILIES["renorm"][ndim - 1](
        channels, eps=eps, momentum=momentum, affine=affine, schedule=None, r_max=r_max, d_max=d_max
    )
    layer = randomize_(layer).double()
    inputs = make_inputs((batch, channels, *spatial), 3, dtype=torch.float64, scale=scale, shift=shift)
    renorm_against_reference(layer, inputs, constant(r_max, d_max), atol=1e-8, rtol=1e-7)


def test_clipped_output_has_the_clipped_moments() -> None:
    """Direct numbers: running stats (0, 1), γ = 1, β = 0, a batch with mean 10 and std 8 (then 0.01)."""
    layer = nz.BatchRenorm1d(2, eps=1e-12, schedule=None, r_max=2.0, d_max=0.5).double()
    z = torch.randn(64, 2, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, correction=0)  # exactly standardized per channel
    y = layer(10 + 8 * z)
    torch.testing.assert_close(y.mean(0), torch.full((2,), 0.5, dtype=torch.float64))  # d = d_max
    torch.testing.assert_close(
        y.std(0, correction=0), torch.full((2,), 2.0, dtype=torch.float64)
    )  # r = r_max
    layer.running_mean.zero_()
    layer.running_var.fill_(1)
    y = layer(-10 + 0.01 * z)
    torch.testing.assert_close(y.mean(0), torch.full((2,), -0.5, dtype=torch.float64))  # d = -d_max
    torch.testing.assert_close(y.std(0, correction=0), torch.full((2,), 0.5, dtype=torch.float64))  # 1/r_max


# --- the three known bugs of public implementations -------------------------------------------------------


@pytest.mark.parametrize("step", [40_000, 10**6, 10**9, 2**62])
def test_bounds_never_grow_past_their_limits(step: int) -> None:
    """Bug 1: a warm-up factor that keeps growing lets r and d escape their clip (r_max > 3, d_max > 5)."""
    layer = nz.BatchRenorm1d(2).double()
    layer.num_batches_tracked.fill_(step)
    r_max, d_max = layer.clip_bounds()
    assert float(r_max) == 3.0
    assert float(d_max) == 5.0
    assert NF.paper_renorm_schedule(step) == (3.0, 5.0)
    # and the layer really clips there: a batch 100 running stds away gets d = 5 exactly, r = 3
    z = torch.randn(32, 2, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, correction=0)
    y = layer(100 + 50 * z)
    torch.testing.assert_close(y.mean(0), torch.full((2,), 5.0, dtype=torch.float64))
    torch.testing.assert_close(
        y.std(0, correction=0), torch.full((2,), 3.0, dtype=torch.float64), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize(("ndim", "shape"), [(1, (2, 3, 5)), (2, (2, 3, 3, 4)), (3, (2, 3, 2, 3, 2))])
def test_unbiased_variance_uses_values_per_channel(family: str, ndim: int, shape: tuple[int, ...]) -> None:
    """Bug 2: the unbiased factor must be n/(n−1) with n = N·(spatial size), not N/(N−1) from the batch."""
    layer = FAMILIES[family][ndim - 1](3, momentum=0.5).double()
    x = make_inputs(shape, 1, dtype=torch.float64)[0]
    layer(x)
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    assert n > shape[0]
    biased = x.var(dim=dims, correction=0)
    expected = 0.5 * 1.0 + 0.5 * biased * n / (n - 1)
    buggy = 0.5 * 1.0 + 0.5 * biased * shape[0] / (shape[0] - 1)
    torch.testing.assert_close(layer.running_var, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer.running_var, buggy, rtol=1e-3)
    torch.testing.assert_close(layer.running_var, x.var(dim=dims, correction=1) * 0.5 + 0.5)


def test_eps_goes_under_the_square_root_of_both_variances() -> None:
    """Bug 3: eps added to the standard deviations instead of the variances changes r, d and the output.

    Running variance 4, batch variance 1, eps 0.5, unclipped: r = sqrt(1.5)/sqrt(4.5) = 0.577 (buggy:
    (1 + 0.5)/(2 + 0.5) = 0.6), d = (μ_B − μ)/sqrt(4.5) (buggy: /2.5).
    """
    eps = 0.5
    layer = nz.BatchRenorm1d(1, eps=eps, schedule=None, r_max=3.0, d_max=5.0).double()
    layer.running_var.fill_(4.0)
    layer.running_mean.fill_(1.0)
    z = torch.randn(256, 1, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, correction=0)
    x = 3.0 + z  # batch mean 3, biased batch variance 1
    y = layer(x)
    r = (1.0 + eps) ** 0.5 / (4.0 + eps) ** 0.5
    d = (3.0 - 1.0) / (4.0 + eps) ** 0.5
    r_buggy, d_buggy = (1.0 + eps) / (2.0 + eps), (3.0 - 1.0) / (2.0 + eps)
    expected = z / (1.0 + eps) ** 0.5 * r + d
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    buggy = z / (1.0 + eps) * r_buggy + d_buggy
    assert not torch.allclose(y, buggy, rtol=1e-3)
    got_r, got_d = NF.renorm_correction(
        torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([4.0]), 3.0, 5.0, eps
    )
    assert got_r.item() == pytest.approx(r, rel=1e-6)
    assert got_d.item() == pytest.approx(d, rel=1e-6)


# --- the schedule ------------------------------------------------------------------------------------------

BREAKPOINTS = [0, 1, 4_999, 5_000, 5_001, 15_000, 24_999, 25_000, 25_001, 39_999, 40_000, 40_001, 10**6]


@pytest.mark.parametrize("step", BREAKPOINTS)
def test_paper_schedule_at_its_breakpoints(step: int) -> None:
    r_exact, d_exact = paper_bounds(step)
    assert NF.paper_renorm_schedule(step) == pytest.approx(
        (float(r_exact), float(d_exact)), rel=1e-12, abs=1e-12
    )
    layer = randomize_(nz.BatchRenorm2d(3)).double()
    layer.num_batches_tracked.fill_(step)
    r_max, d_max = layer.clip_bounds()
    assert float(r_max) == pytest.approx(float(r_exact), rel=1e-6)
    assert float(d_max) == pytest.approx(float(d_exact), rel=1e-6, abs=1e-12)
    assert 1.0 <= float(r_max) <= 3.0
    assert 0.0 <= float(d_max) <= 5.0
    # the step uses the bounds of num_batches_tracked *before* it, and counts itself
    renorm_against_reference(
        layer, clipping_inputs((2, 3, 2, 3))[:2], paper_bounds, eval_too=False, atol=1e-6, rtol=1e-6
    )
    assert int(layer.num_batches_tracked) == step + 2


def test_paper_schedule_is_monotone_and_bounded() -> None:
    steps = [*list(range(0, 45001, 250)), 10**7]
    ints = [NF.paper_renorm_schedule(s) for s in steps]
    tensors = NF.paper_renorm_schedule(torch.tensor(steps))
    assert isinstance(tensors[0], Tensor)
    for i, (s, (r, d)) in enumerate(zip(steps, ints, strict=True)):
        r_exact, d_exact = paper_bounds(s)
        assert r == pytest.approx(float(r_exact), abs=1e-12)
        assert d == pytest.approx(float(d_exact), abs=1e-12)
        assert float(tensors[0][i]) == pytest.approx(r, rel=1e-6)
        assert float(tensors[1][i]) == pytest.approx(d, rel=1e-6, abs=1e-12)
    r_all, d_all = torch.tensor([r for r, _ in ints]), torch.tensor([d for _, d in ints])
    assert bool((r_all.diff() >= 0).all() and (d_all.diff() >= 0).all())
    assert float(r_all.max()) == 3.0
    assert float(r_all.min()) == 1.0
    assert float(d_all.max()) == 5.0
    assert float(d_all.min()) == 0.0
    assert bool((tensors[0] <= 3.0).all() and (tensors[1] <= 5.0).all())


def test_paper_schedule_scales_to_custom_limits() -> None:
    layer = nz.BatchRenorm1d(2, r_max=2.0, d_max=1.0)
    for step in (0, 5_000, 15_000, 25_000, 40_000, 10**6):
        layer.num_batches_tracked.fill_(step)
        r_exact, d_exact = paper_bounds(step)
        r, d = layer.clip_bounds()
        # the same ramps, scaled: 1 + (r_max − 1)·ramp and d_max·ramp
        assert float(r) == pytest.approx(1 + float((r_exact - 1) / 2), rel=1e-6)
        assert float(d) == pytest.approx(float(d_exact / 5), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("tensor_bounds", [False, True], ids=["floats", "tensors"])
def test_callable_schedule(tensor_bounds: bool) -> None:
    steps_seen: list[int] = []

    def schedule(step: Tensor) -> tuple[Any, Any]:
        assert isinstance(step, Tensor)
        assert step.dim() == 0
        steps_seen.append(int(step))
        r, d = 1.0 + 0.25 * int(step), 0.1 * int(step)
        if tensor_bounds:
            return torch.tensor(r, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
        return r, d

    layer = randomize_(nz.BatchRenorm2d(3, schedule=schedule)).double()
    assert "schedule='custom'" in repr(layer)
    renorm_against_reference(
        layer,
        clipping_inputs((2, 3, 2, 3)),
        lambda s: (Fraction(1) + Fraction(s, 4), Fraction(s, 10)),
        **REFERENCE_TOL[torch.float64],
    )
    assert steps_seen == [0, 1, 2, 3]
    layer(torch.randn(2, 3, 2, 3, dtype=torch.float64))  # eval: the schedule is not consulted
    assert steps_seen == [0, 1, 2, 3]


def test_schedule_none_uses_constant_bounds() -> None:
    layer = nz.BatchRenorm1d(2, r_max=2.5, d_max=0.75, schedule=None)
    for step in (0, 10**6):
        layer.num_batches_tracked.fill_(step)
        assert layer.clip_bounds() == (2.5, 0.75)


def _scaled_paper_bounds(total: int) -> Callable[[int], tuple[Fraction, Fraction]]:
    """The paper's bounds with its breakpoints read as fractions of a 100k-step run of ``total`` steps."""
    warmup, d_steps, r_steps = 5 * total // 100, 25 * total // 100, 40 * total // 100

    def bounds(step: int) -> tuple[Fraction, Fraction]:
        ramp_r = min(max(Fraction(step - warmup, max(r_steps - warmup, 1)), Fraction(0)), Fraction(1))
        ramp_d = min(max(Fraction(step - warmup, max(d_steps - warmup, 1)), Fraction(0)), Fraction(1))
        return 1 + 2 * ramp_r, 5 * ramp_d

    return bounds


def test_paper_schedule_object_is_the_paper_schedule_by_default() -> None:
    for step in BREAKPOINTS:
        assert nz.PaperSchedule()(step) == NF.paper_renorm_schedule(step)
    layer, default = nz.BatchRenorm1d(2, schedule=nz.PaperSchedule()), nz.BatchRenorm1d(2)
    layer.num_batches_tracked.fill_(15_000)
    default.num_batches_tracked.fill_(15_000)
    assert layer.clip_bounds() == default.clip_bounds() == NF.paper_renorm_schedule(15_000)


@pytest.mark.parametrize("total", [1, 7, 200, 1_000, 12_345, 100_000])
def test_scaled_paper_schedule_leaves_warmup_early_and_reaches_full_bounds(total: int) -> None:
    schedule = nz.PaperSchedule(total_steps=total)
    reference = _scaled_paper_bounds(total)
    steps = sorted({0, *range(0, total + 1, max(total // 50, 1)), total})
    for step in steps:
        r_exact, d_exact = reference(step)
        r, d = schedule(step)
        assert r == pytest.approx(float(r_exact), abs=1e-12)
        assert d == pytest.approx(float(d_exact), abs=1e-12)
    assert schedule(total) == (3.0, 5.0)  # full bounds well before the end of the run
    assert schedule(-(-4 * total // 10)) == (3.0, 5.0)  # from 40 % of the run on
    if total >= 40:
        assert schedule(total // 10) != (1.0, 0.0)  # out of the warm-up after a tenth of the run


def test_scaled_paper_schedule_in_a_layer_against_the_reference() -> None:
    total = 40
    layer = randomize_(nz.BatchRenorm2d(3, schedule=nz.PaperSchedule(total))).double()
    layer.num_batches_tracked.fill_(1)
    renorm_against_reference(
        layer, clipping_inputs((2, 3, 2, 3))[:3], _scaled_paper_bounds(total), **REFERENCE_TOL[torch.float64]
    )
    assert "schedule=PaperSchedule(total_steps=40)" in repr(layer)
    layer.num_batches_tracked.fill_(total // 4)  # on a tensor step too (what compiled code sees)
    r, d = nz.PaperSchedule(total)(layer.num_batches_tracked, 2.0, 1.0)
    assert (float(r), float(d)) == pytest.approx((1 + 8 / 14, 1.0), rel=1e-6)  # breakpoints 2, 10, 16


def test_scaled_paper_schedule_is_a_frozen_picklable_value() -> None:
    schedule = nz.PaperSchedule(total_steps=np.int64(2_000))
    assert type(schedule.total_steps) is int
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    assert hash(schedule) == hash(nz.PaperSchedule(2_000))
    assert json.loads(json.dumps(schedule.as_dict())) == {
        "name": "paper", "total_steps": 2000, "warmup_steps": 100, "d_max_steps": 500, "r_max_steps": 800,
    }  # fmt: skip
    assert nz.PaperSchedule().as_dict()["warmup_steps"] == 5_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.total_steps = 3  # type: ignore[misc]
    layer = nz.BatchRenorm2d(3, schedule=schedule)
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.schedule == schedule
    for bad, error in (
        (0, ValueError),
        (-5, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ("10", TypeError),
    ):
        with pytest.raises(error, match="PaperSchedule"):
            nz.PaperSchedule(bad)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_without_running_stats_it_is_torch_batchnorm(ndim: int) -> None:
    """Nothing to renormalize towards: BatchNorm with batch statistics in training and eval, as torch's."""
    cls, torch_cls = FAMILIES["renorm"][ndim - 1], TORCH_BN[ndim - 1]
    shape = SHAPES[ndim][0]
    ours = randomize_(cls(3, 1e-3, 0.3, True, False, schedule=None, r_max=2.0, d_max=1.0))
    theirs = torch_cls(3, 1e-3, 0.3, True, False)
    theirs.load_state_dict(ours.state_dict())
    assert ours.running_mean is None
    assert ours.clip_bounds() == (2.0, 1.0)
    for training in (True, False):
        for x in make_inputs(shape, 2, seed=5):
            ours.train(training)
            theirs.train(training)
            x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
            assert_same(y_ours, y_theirs, "output")
            y_ours.sum().backward()
            y_theirs.sum().backward()
            assert_same(x_ours.grad, x_theirs.grad, "input gradient")
    assert "track_running_stats=False" in repr(ours)
    assert nz.BatchRenorm2d(3, track_running_stats=False).clip_bounds() == (1.0, 0.0)


# --- checkpoints ------------------------------------------------------------------------------------------


def test_torch_checkpoint_loads_unchanged_and_evaluates_identically() -> None:
    theirs = randomize_(nn.BatchNorm2d(3))
    for x in make_inputs((3, 3, 2, 2), 3):
        theirs(x)
    ours = nz.BatchRenorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert_same(ours.state_dict()[key], value, key)
    x = make_inputs((3, 3, 2, 2), 1, seed=5)[0]
    assert_same(ours.eval()(x), theirs.eval()(x), "eval output")


@pytest.mark.parametrize("step", [4_999, 20_000, 39_999])
def test_mid_schedule_checkpoint_resumes_identically(step: int) -> None:
    first = randomize_(nz.BatchRenorm2d(3)).double()
    first.num_batches_tracked.fill_(step)
    inputs = clipping_inputs((2, 3, 2, 3))
    for i, x in enumerate(inputs[:2]):
        run_step(first, x, i)
    state = copy.deepcopy(first.state_dict())
    resumed = nz.BatchRenorm2d(3).double()
    resumed.load_state_dict(state)
    via_torch = nn.BatchNorm2d(3).double()  # and through a torch BN checkpoint on the way
    via_torch.load_state_dict(state)
    resumed_via_torch = nz.BatchRenorm2d(3).double()
    resumed_via_torch.load_state_dict(via_torch.state_dict())
    assert int(resumed.num_batches_tracked) == step + 2
    for i, x in enumerate(inputs[2:] + inputs[:2]):
        a = run_step(first, x, 10 + i)
        for other in (resumed, resumed_via_torch):
            b = run_step(other, x, 10 + i)
            for name in ("output", "input_grad", "weight_grad", "bias_grad", "running_mean", "running_var"):
                assert_same(getattr(b, name), getattr(a, name), f"resumed step {i} {name}")
            assert_same(b.num_batches_tracked, a.num_batches_tracked, "num_batches_tracked")


# --- gradients ---------------------------------------------------------------------------------------------


def _renorm_fn(
    running_mean: Tensor, running_var: Tensor, r_max: float, d_max: float
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        # fresh copies: every evaluation starts from the same running statistics
        return NF.batch_renorm(
            x, running_mean.clone(), running_var.clone(), weight, bias, True, 0.1, 1e-5, r_max, d_max
        )

    return fn


def _gradcheck_inputs(scale: float, shift: float) -> tuple[Tensor, Tensor, Tensor]:
    x = make_inputs((3, 2, 2, 2), 1, dtype=torch.float64, scale=scale, shift=shift, seed=4)[0]
    weight = torch.tensor([1.3, -0.7], dtype=torch.float64)
    bias = torch.tensor([0.2, -0.4], dtype=torch.float64)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


@pytest.mark.parametrize(("scale", "shift"), [(8.0, 20.0), (0.01, -20.0)], ids=["r-at-max", "r-at-min"])
def test_gradcheck_with_clipping_active(scale: float, shift: float) -> None:
    """r and d on their bounds (far from them): the function is locally BN with fixed γ·r, β + γ·d,
    so the stop-gradient derivative is the true one and gradcheck applies to every input."""
    fn = _renorm_fn(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 2.0, 1.0)
    inputs = _gradcheck_inputs(scale, shift)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_with_clipping_inactive() -> None:
    """Unclipped r and d depend on the batch but are constants in backprop (stop-gradient): the gradients
    with respect to γ and β are still the true ones, those with respect to x are deliberately not."""
    fn = _renorm_fn(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 100.0, 100.0)
    x, weight, bias = _gradcheck_inputs(2.0, 0.5)
    assert torch.autograd.gradcheck(lambda w, b: fn(x.detach(), w, b), (weight, bias))
    # were r and d differentiated through, the input gradient would pass gradcheck: it must not
    assert not torch.autograd.gradcheck(fn, (x, weight, bias), raise_exception=False)


def test_gradcheck_r1_d0_path_and_double_backward() -> None:
    fn = _renorm_fn(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 1.0, 0.0)
    inputs = _gradcheck_inputs(2.0, 0.5)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize(("scale", "shift"), [(8.0, 20.0), (0.01, -20.0)], ids=["r-at-max", "r-at-min"])
def test_gradgradcheck_with_clipping_active(scale: float, shift: float) -> None:
    """Double backward with r and d active is BatchNorm's with weight γ·r and bias β + γ·d (issue 10: it used
    to fail with autograd internals once the schedule left its warm-up)."""
    fn = _renorm_fn(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 2.0, 1.0)
    assert torch.autograd.gradgradcheck(fn, _gradcheck_inputs(scale, shift))


@pytest.mark.parametrize("step", [0, 5_000, 40_000])
def test_double_backward_through_the_layer_at_every_stage_of_the_schedule(step: int) -> None:
    """A gradient penalty (the gradient of a gradient norm) at any step, equal to BatchNorm's with the
    step's γ·r, β + γ·d, computed by torch's BatchNorm with those parameters."""
    layer = randomize_(nz.BatchRenorm2d(2)).double()
    layer.num_batches_tracked.fill_(step)
    x = make_inputs((3, 2, 2, 2), 1, dtype=torch.float64, scale=6.0, shift=9.0, seed=4)[0].requires_grad_()
    r_max, d_max = layer.clip_bounds()
    previous_mean, previous_var = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(grad_x.square().sum(), layer.weight)
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False)
    r, d = NF.renorm_correction(mean, var, previous_mean, previous_var, float(r_max), float(d_max), layer.eps)
    gamma = layer.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.batch_norm(
        x2, None, None, gamma * r, layer.bias.detach() + gamma.detach() * d, True, 0.0, layer.eps
    )
    (grad_x2,) = torch.autograd.grad(y2.square().sum(), x2, create_graph=True)
    (expected,) = torch.autograd.grad(grad_x2.square().sum(), gamma)
    torch.testing.assert_close(grad_x, grad_x2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(penalty_grad, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("needs", ["x", "w", "b", "x+w", "w+b"])
def test_partial_requires_grad(needs: str) -> None:
    """Gradients asked for only some inputs equal those of the full computation."""
    fn = _renorm_fn(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 2.0, 1.0)
    full = _gradcheck_inputs(8.0, 20.0)
    g = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    fn(*full).backward(g)
    partial = [t.detach().clone().requires_grad_(name in needs) for t, name in zip(full, "xwb", strict=True)]
    fn(*partial).backward(g)
    for t, p, name in zip(full, partial, "xwb", strict=True):
        if name in needs:
            assert_same(p.grad, t.grad, f"grad of {name}")
        else:
            assert p.grad is None
