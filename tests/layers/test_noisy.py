"""normzoo.NoisyBatchNorm1d/2d/3d: BatchNorm plus per-step re-drawn noise in training, BatchNorm in eval.

The noise is reconstructed independently: a generator seeded like the layer's draws the step's per-channel
moments with :func:`normzoo.functional.sample_noise_moments` and then one standard normal value per output
value, in the output's memory order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normzoo as nz
from normzoo import functional as NF
from normzoo.layers.noisy import DEFAULT_MEAN_RANGE, DEFAULT_STD_RANGE

from ._reference import (
    FAMILIES,
    assert_close,
    assert_same,
    case_id,
    input_cases,
    make_inputs,
    paired,
    randomize_,
    run_step,
    seeded_generator,
    train_and_compare,
    ulp_tol,
)

CASES = input_cases()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

DTYPE_AFFINE = [
    pytest.param(dtype, affine, id=f"{dtype}-{'affine' if affine else 'no-affine'}")
    for dtype in DTYPES
    for affine in (True, False)
]


def standard_normal_like(out: Tensor, generator: torch.Generator) -> Tensor:
    """One N(0, 1) value per value of ``out``, drawn into a tensor laid out like ``out`` (torch draws
    channels-last tensors in a different order than contiguous ones)."""
    return torch.empty_like(out).normal_(generator=generator)


def expected_noise(
    layer: nn.Module, out: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The step's (mean, std) per channel and its noise, drawn from ``generator`` like the layer draws:
    the moments in the dtype of the layer's own tensors (those the kernel combines the mean with), else in
    the input's, then one standard normal value per output value."""
    own = [t for t in (layer.bias, layer.weight, layer.running_mean) if t is not None]
    dtype = own[0].dtype if own else out.dtype
    mean, std = NF.sample_noise_moments(
        layer.num_features,
        layer.mean_range,
        layer.std_range,
        generator=generator,
        device=out.device,
        dtype=dtype,
    )
    return mean, std, standard_normal_like(out, generator)


# --- gradients, statistics and eval are BatchNorm's ------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(("dtype", "affine"), DTYPE_AFFINE)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_gradients_statistics_and_eval_are_torch_batchnorm(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    track: bool,
    momentum: float | None,
) -> None:
    check_noisy_is_batchnorm_but_outputs(case, dtype, affine, track, momentum, "cpu")


def check_noisy_is_batchnorm_but_outputs(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    track: bool,
    momentum: float | None,
    device: str,
) -> None:
    """The noise is additive and does not depend on the input: every gradient is BatchNorm's, bit for bit,
    and so are the running statistics and the eval output."""
    ndim, shape, channels_last = case
    ours, ref = paired(
        "noisy",
        ndim,
        dtype=dtype,
        device=device,
        affine=affine,
        track_running_stats=track,
        momentum=momentum,
        generator=seeded_generator(0, device),
    )
    inputs = make_inputs(shape, 4, dtype=dtype, device=device, channels_last=channels_last)
    train_and_compare(ours, ref, inputs, outputs=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_noise_is_torch_batchnorm_bitwise(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype
) -> None:
    ndim, shape, channels_last = case
    ours, ref = paired("noisy", ndim, dtype=dtype, mean_range=0.0, std_range=(0.0, 0.0))
    train_and_compare(ours, ref, make_inputs(shape, 3, dtype=dtype, channels_last=channels_last))


# --- the training output is BatchNorm + the reconstructed noise ----------------------------------------------


def check_noise_reconstruction(
    layer: nn.Module,
    ref: nn.Module,
    inputs: list[Tensor],
    seed: int,
    *,
    tol: dict[str, float],
) -> list[tuple[Tensor, Tensor]]:
    """Train ``layer`` (generator seeded ``seed``) and ``ref`` (torch BN) side by side; each output must be
    torch's output + mean_c + std_c·ε. Returns the per-step (mean, std) drawn."""
    replay = seeded_generator(seed, inputs[0].device)
    moments = []
    layer.train()
    ref.train()
    for i, x in enumerate(inputs):
        got, bn = run_step(layer, x, i), run_step(ref, x, i)
        mean, std, eps = expected_noise(layer, bn.output, replay)
        view = [1, -1] + [1] * (x.dim() - 2)
        expected = bn.output.double() + mean.double().view(view) + std.double().view(view) * eps.double()
        assert_close(got.output, expected, f"step {i} output", **tol)
        assert got.output.stride() == bn.output.stride()
        moments.append((mean, std))
    return moments


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(("dtype", "affine"), DTYPE_AFFINE)
def test_output_is_batchnorm_plus_reconstructed_noise(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool
) -> None:
    check_noisy_output(case, dtype, affine, "cpu")


def check_noisy_output(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool, device: str
) -> None:
    """Three training steps: each output is torch's BatchNorm output plus the independently replayed noise."""
    ndim, shape, channels_last = case
    ours, ref = paired(
        "noisy", ndim, dtype=dtype, device=device, affine=affine, generator=seeded_generator(11, device)
    )
    inputs = make_inputs(shape, 3, dtype=dtype, device=device, channels_last=channels_last)
    # the mean is folded into the kernel's bias: a few units of rounding at the output's magnitude
    check_noise_reconstruction(ours, ref, inputs, 11, tol=ulp_tol(dtype, ulps=4))


def test_custom_noise_parameters_are_used() -> None:
    ours, ref = paired("noisy", 2, mean_range=3.0, std_range=(2.0, 2.5), generator=seeded_generator(5))
    moments = check_noise_reconstruction(
        ours, ref, make_inputs((2, 3, 3, 3), 4), 5, tol=ulp_tol(torch.float32, 4)
    )
    for mean, std in moments:
        assert bool((mean.abs() <= 3.0).all() and (std >= 2.0).all() and (std <= 2.5).all())
    assert "mean_range=3.0" in repr(ours)
    assert "std_range=(2.0, 2.5)" in repr(ours)


def test_noise_does_not_depend_on_the_input() -> None:
    a = nz.NoisyBatchNorm2d(3, generator=seeded_generator(2)).double()
    b = nz.NoisyBatchNorm2d(3, generator=seeded_generator(2)).double()
    x1, x2 = make_inputs((2, 3, 4, 4), 2, dtype=torch.float64)
    noise1 = a(x1) - nn.functional.batch_norm(x1, None, None, training=True)
    noise2 = b(x2) - nn.functional.batch_norm(x2, None, None, training=True)
    torch.testing.assert_close(noise1, noise2, atol=1e-12, rtol=0)


# --- statistics of the noise ----------------------------------------------------------------------------


def _noise_of(layer: nn.Module, x: Tensor) -> Tensor:
    """What the layer added to torch's BatchNorm output (γ = 1, β = 0), per channel in columns."""
    noise = layer(x) - nn.functional.batch_norm(x, None, None, training=True, eps=layer.eps)
    return noise.transpose(0, 1).reshape(x.shape[1], -1)


@pytest.mark.parametrize(
    ("mean_range", "std_range"), [(None, None), (1.0, (0.5, 1.5))], ids=["defaults", "mean1-std0.5-1.5"]
)
def test_noise_has_the_drawn_mean_and_std(
    mean_range: float | None, std_range: tuple[float, float] | None
) -> None:
    kwargs = {} if mean_range is None else {"mean_range": mean_range, "std_range": std_range}
    layer = nz.NoisyBatchNorm2d(4, affine=False, generator=seeded_generator(3), **kwargs).double()
    if mean_range is None:
        mean_range, std_range = DEFAULT_MEAN_RANGE, DEFAULT_STD_RANGE
        assert (layer.mean_range, layer.std_range) == (mean_range, std_range)
    assert std_range is not None
    x = make_inputs((16, 4, 16, 16), 1, dtype=torch.float64)[0]  # 4096 values per channel
    noise = _noise_of(layer, x)
    mean, std, _ = expected_noise(layer, x, seeded_generator(3))
    n = noise.shape[1]
    # 6 standard errors: the test is deterministic (seeded) and not flaky by construction
    assert bool(((noise.mean(1) - mean).abs() < 6 * std / math.sqrt(n)).all()), (noise.mean(1), mean)
    assert bool(((noise.std(1) / std - 1).abs() < 6 / math.sqrt(2 * n)).all()), (noise.std(1), std)
    # Gaussian: about 68.3 % of the values within one std of the mean
    inside = ((noise - mean[:, None]).abs() < std[:, None]).double().mean(1)
    assert bool(((inside - 0.6827).abs() < 6 * math.sqrt(0.6827 * 0.3173 / n)).all()), inside
    # independent across channels
    corr = torch.corrcoef(noise)
    assert bool((corr - torch.eye(4, dtype=torch.float64)).abs().max() < 6 / math.sqrt(n))
    # the drawn moments lie in their ranges: non-zero mean, non-unit variance
    assert bool(
        (mean.abs() <= mean_range).all() and (std >= std_range[0]).all() and (std <= std_range[1]).all()
    )
    assert bool((mean != 0).all() and (std != 1).all())


def test_distribution_changes_between_steps() -> None:
    layer = nz.NoisyBatchNorm1d(4, affine=False, generator=seeded_generator(4)).double()
    x = make_inputs((4096, 4), 1, dtype=torch.float64)[0]
    estimates = []
    for _ in range(3):
        noise = _noise_of(layer, x)
        estimates.append((noise.mean(1), noise.std(1)))
    for (m1, s1), (m2, s2) in itertools.pairwise(estimates):
        # far beyond the estimation error (std/sqrt(4096) <= 0.01 with the defaults): every step re-draws
        assert bool(((m1 - m2).abs() > 0.05).any())
        assert bool(((s1 - s2).abs() > 0.05).any())


# --- reproducibility ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_generator_makes_runs_reproducible(ndim: int) -> None:
    shape = {1: (4, 3, 5), 2: (3, 3, 4, 5), 3: (2, 3, 3, 2, 4)}[ndim]
    inputs = make_inputs(shape, 3)

    def run(seed: int) -> list[Tensor]:
        layer = FAMILIES["noisy"][ndim - 1](3, generator=seeded_generator(seed))
        return [layer(x) for x in inputs]

    first, again, other = run(1), run(1), run(2)
    for a, b in zip(first, again, strict=True):
        assert_same(a, b, "same seed")
    assert not any(torch.equal(a, c) for a, c in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[1])  # and a step differs from the next


def test_global_generator_when_none_is_given() -> None:
    layer = nz.NoisyBatchNorm2d(3)
    x = make_inputs((2, 3, 3, 3), 1)[0]
    torch.manual_seed(123)
    a = layer(x)
    torch.manual_seed(123)
    b = layer(x)
    assert_same(a, b, "same global seed")


def test_eval_draws_no_random_numbers() -> None:
    g = seeded_generator(8)
    layer = randomize_(nz.NoisyBatchNorm2d(3, generator=g)).eval()
    state = g.get_state()
    x = make_inputs((2, 3, 3, 3), 1)[0]
    ref = randomize_(nn.BatchNorm2d(3)).eval()
    assert_same(layer(x), ref(x), "eval output")
    assert torch.equal(g.get_state(), state)


# --- gradients checked numerically -----------------------------------------------------------------------------


def _noisy_fn(seed: int, noise_mean: Tensor, noise_std: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        # the same noise at every evaluation: re-seed inside the function
        return NF.noisy_batch_norm(
            x,
            None,
            None,
            weight,
            bias,
            noise_mean=noise_mean,
            noise_std=noise_std,
            generator=seeded_generator(seed),
        )

    return fn


def _gradcheck_inputs() -> tuple[Tensor, Tensor, Tensor]:
    x = make_inputs((3, 2, 2, 2), 1, dtype=torch.float64, seed=6)[0].requires_grad_()
    weight = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    return x, weight, bias


def test_gradcheck_and_gradgradcheck() -> None:
    fn = _noisy_fn(
        9, torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.7, 1.4], dtype=torch.float64)
    )
    inputs = _gradcheck_inputs()
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_through_the_layer() -> None:
    layer = nz.NoisyBatchNorm2d(2, track_running_stats=False).double()

    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        layer.generator = seeded_generator(10)  # the same noise at every evaluation
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, _gradcheck_inputs())
