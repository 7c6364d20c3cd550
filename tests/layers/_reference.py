"""Shared helpers of the layer tests: inputs, paired torch/normzoo layers, and independent references.

Everything here is device-agnostic, so the CPU tests and the CUDA tests (``test_cuda.py``) run the same
checks. The references are written from the papers' formulas with plain elementwise ops and autograd, in
float64, and share no code with :mod:`normzoo.functional`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

import normzoo as nz

__all__ = [
    "FAMILIES",
    "KERNEL_TOL",
    "LOW_PRECISION",
    "SHAPES",
    "TORCH_BN",
    "RenormReference",
    "assert_close",
    "assert_same",
    "assert_sum_close",
    "input_cases",
    "make_inputs",
    "paired",
    "paper_bounds",
    "randomize_",
    "seeded_generator",
    "train_and_compare",
    "ulp_tol",
    "upstream_grad",
]

#: The 1d, 2d and 3d classes of each normzoo family.
FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "batchnorm": (nz.BatchNorm1d, nz.BatchNorm2d, nz.BatchNorm3d),
    "renorm": (nz.BatchRenorm1d, nz.BatchRenorm2d, nz.BatchRenorm3d),
    "noisy": (nz.NoisyBatchNorm1d, nz.NoisyBatchNorm2d, nz.NoisyBatchNorm3d),
}
TORCH_BN: tuple[type[nn.Module], type[nn.Module], type[nn.Module]] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)

#: Small input shapes per layer dimension (1d layers take (N, C) and (N, C, L)); 3 channels everywhere.
SHAPES: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((6, 3), (4, 3, 5)),
    2: ((3, 3, 4, 5),),
    3: ((2, 3, 3, 2, 4),),
}

#: Tolerances wherever two different computations meet in a low-precision dtype (ours vs the float64
#: reference, or CUDA autocast): a few units in the last place of values of order 1-10.
LOW_PRECISION: dict[torch.dtype, dict[str, float]] = {
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 8e-2, "rtol": 3e-2},
}


#: Tolerances where torch may run a different kernel than ours for the same computation (CUDA: cuDNN for
#: torch's BatchNorm, the native kernel for ours), so results agree to rounding only.
KERNEL_TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    **LOW_PRECISION,
}


def ulp_tol(dtype: torch.dtype, ulps: float = 2.0, magnitude: float = 8.0) -> dict[str, float]:
    """``ulps`` units in the last place of ``dtype``, relative and, for results that are small differences
    of terms up to ``magnitude``, absolute at that magnitude."""
    eps = torch.finfo(dtype).eps
    return {"atol": ulps * eps * magnitude, "rtol": ulps * eps}


def input_cases() -> list[tuple[int, tuple[int, ...], bool]]:
    """Every ``(ndim, shape, channels_last)`` the equivalence tests cover."""
    cases = []
    for ndim, shapes in SHAPES.items():
        for shape in shapes:
            cases.append((ndim, shape, False))
            if len(shape) >= 4:
                cases.append((ndim, shape, True))
    return cases


def case_id(case: tuple[int, tuple[int, ...], bool]) -> str:
    ndim, shape, channels_last = case
    return f"{ndim}d-{'x'.join(map(str, shape))}{'-cl' if channels_last else ''}"


def make_inputs(
    shape: Sequence[int],
    steps: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    seed: int = 0,
    scale: float = 2.0,
    shift: float = 0.5,
) -> list[Tensor]:
    """``steps`` random inputs with per-channel means and scales, so statistics differ per channel."""
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    view = [1, channels] + [1] * (len(shape) - 2)
    out = []
    for _ in range(steps):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        x = x * (scale * (1 + torch.rand(channels, generator=g, dtype=torch.float64))).view(view)
        x = x + (shift * torch.randn(channels, generator=g, dtype=torch.float64)).view(view)
        x = x.to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        out.append(x)
    return out


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``; a CUDA one always names its device index (see
    test_cuda.py for generators created with a bare ``"cuda"``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(device=device).manual_seed(seed)


def upstream_grad(y: Tensor, seed: int) -> Tensor:
    """A fixed random upstream gradient shaped (and laid out) like ``y``."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weight, bias and running statistics (in place), so that nothing passes by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name, None)
            if t is None:
                continue
            v = torch.rand(t.shape, generator=g, dtype=torch.float64)
            v = 0.5 + v if name in ("weight", "running_var") else v - 0.5
            t.copy_(v.to(t.dtype))
    return module


def paired(
    family: str,
    ndim: int,
    *,
    num_features: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    **kwargs: Any,
) -> tuple[nn.Module, nn.Module]:
    """``(ours, torch's BatchNorm)`` of the same dimension, with equal (randomized) state.

    ``kwargs`` go to our layer; the ones torch's BatchNorm knows go to it too.
    """
    torch_kwargs = {
        k: v for k, v in kwargs.items() if k in ("eps", "momentum", "affine", "track_running_stats")
    }
    ref = randomize_(TORCH_BN[ndim - 1](num_features, **torch_kwargs), seed).to(device=device, dtype=dtype)
    ours = FAMILIES[family][ndim - 1](num_features, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def assert_same(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    """Bitwise equality (same dtype, same values), with a readable message."""
    if expected is None:
        assert actual is None, f"{what}: expected None, got a tensor"
        return
    assert actual is not None, f"{what}: expected a tensor, got None"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (max abs difference {diff:.3g})")


def assert_close(actual: Tensor | None, expected: Tensor | None, what: str, **tol: float) -> None:
    """``torch.testing.assert_close`` in float64 with ``tol`` (``atol``, ``rtol``), or bitwise if none."""
    if not tol:
        assert_same(actual, expected, what)
        return
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    assert actual is not None, f"{what}: expected a tensor, got None"
    torch.testing.assert_close(
        actual.double(), expected.double().to(actual.device), msg=lambda m: f"{what}: {m}", **tol
    )


def assert_sum_close(actual: Tensor | None, expected: Tensor, mass: Tensor, what: str, **tol: float) -> None:
    """``|actual − expected| <= atol + rtol·mass`` elementwise, for sums whose summands have L1 ``mass``."""
    assert actual is not None, f"{what}: expected a tensor, got None"
    if not tol:
        assert_same(actual, expected, what)
        return
    diff = (actual.double() - expected.double().to(actual.device)).abs()
    bound = tol.get("atol", 0.0) + tol.get("rtol", 0.0) * mass.to(actual.device)
    assert bool((diff <= bound).all()), f"{what}: difference {diff.tolist()} above {bound.tolist()}"


@dataclass
class StepRecord:
    """What one step of a layer produced (for comparisons)."""

    output: Tensor
    input_grad: Tensor
    weight_grad: Tensor | None
    bias_grad: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def run_step(layer: nn.Module, x: Tensor, seed: int, lr: float = 0.1) -> StepRecord:
    """One forward/backward of ``layer`` on a fresh leaf copy of ``x``, then an SGD step on its parameters."""
    for p in layer.parameters():
        p.grad = None
    leaf = x.detach().clone().requires_grad_()
    y = layer(leaf)
    y.backward(upstream_grad(y, seed))
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    record = StepRecord(
        output=y.detach().clone(),
        input_grad=leaf.grad.clone(),
        weight_grad=None if weight is None else weight.grad.clone(),
        bias_grad=None if bias is None else bias.grad.clone(),
        running_mean=None if layer.running_mean is None else layer.running_mean.clone(),
        running_var=None if layer.running_var is None else layer.running_var.clone(),
        num_batches_tracked=None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone(),
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.sub_(lr * p.grad)
    return record


def compare_records(
    ours: StepRecord,
    ref: StepRecord,
    label: str,
    *,
    outputs: bool = True,
    exact_stats: bool = False,
    **tol: float,
) -> None:
    if outputs:
        assert_close(ours.output, ref.output, f"{label} output", **tol)
        assert ours.output.is_contiguous(memory_format=_format_of(ref.output)), f"{label}: output layout"
    assert_close(ours.input_grad, ref.input_grad, f"{label} input grad", **tol)
    assert_close(ours.weight_grad, ref.weight_grad, f"{label} weight grad", **tol)
    assert_close(ours.bias_grad, ref.bias_grad, f"{label} bias grad", **tol)
    stats_tol = {} if exact_stats else tol
    assert_close(ours.running_mean, ref.running_mean, f"{label} running_mean", **stats_tol)
    assert_close(ours.running_var, ref.running_var, f"{label} running_var", **stats_tol)
    assert_same(ours.num_batches_tracked, ref.num_batches_tracked, f"{label} num_batches_tracked")


def _format_of(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def train_and_compare(
    ours: nn.Module,
    ref: nn.Module,
    inputs: Sequence[Tensor],
    *,
    outputs: bool = True,
    exact_stats: bool = False,
    on_step: Callable[[int, StepRecord, StepRecord], None] | None = None,
    **tol: float,
) -> None:
    """Train both layers on ``inputs`` (one step each, SGD on the parameters), then compare them in eval.

    Outputs, input/weight/bias gradients, running statistics and ``num_batches_tracked`` must agree after
    every step, bitwise unless tolerances are given. ``outputs=False`` skips the training outputs (noisy
    layers, whose outputs are checked separately); eval outputs are always compared.
    """
    ours.train()
    ref.train()
    for i, x in enumerate(inputs):
        a, b = run_step(ours, x, i), run_step(ref, x, i)
        compare_records(a, b, f"step {i}", outputs=outputs, exact_stats=exact_stats, **tol)
        if on_step is not None:
            on_step(i, a, b)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        assert_close(p.detach(), q.detach(), "parameters after SGD", **tol)
    ours.eval()
    ref.eval()
    for i, x in enumerate(inputs[-2:]):
        a, b = run_step(ours, x, 100 + i, lr=0.0), run_step(ref, x, 100 + i, lr=0.0)
        compare_records(a, b, f"eval {i}", exact_stats=exact_stats, **tol)


# --- Batch Renormalization, from the paper -------------------------------------------------------------


def paper_bounds(step: int) -> tuple[Fraction, Fraction]:
    """(r_max, d_max) of Ioffe (2017), section 4, as exact fractions: 1 and 0 up to 5k steps, then linear
    to r_max = 3 at 40k steps and d_max = 5 at 25k steps, constant afterwards."""
    if step <= 5000:
        return Fraction(1), Fraction(0)
    r = Fraction(1) + 2 * min(Fraction(step - 5000, 35000), Fraction(1))
    d = 5 * min(Fraction(step - 5000, 20000), Fraction(1))
    return r, d


class RenormReference:
    """Batch Renormalization (Ioffe 2017, Algorithm 1) in float64 with plain elementwise ops and autograd.

    ``μ_B``, ``σ²_B`` (biased) over every value of a channel; ``σ_B = sqrt(σ²_B + ε)``, ``σ = sqrt(var + ε)``;
    ``r = clip(σ_B/σ, 1/r_max, r_max)`` and ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` as constants
    (``detach``); ``y = γ·((x − μ_B)/σ_B · r + d) + β``. Then ``μ += m·(μ_B − μ)`` and
    ``var += m·(σ²_B·n/(n−1) − var)`` with ``n`` the number of values per channel (``N·L``, ``N·H·W``, …),
    ``m = momentum`` or ``1/step`` for the cumulative average. Eval: ``γ·(x − μ)/σ + β``.
    """

    def __init__(
        self,
        layer: nn.Module,
        bounds: Callable[[int], tuple[float | Fraction, float | Fraction]],
    ) -> None:
        self.eps = float(layer.eps)
        self.momentum = layer.momentum
        self.bounds = bounds
        self.weight = (
            None if layer.weight is None else layer.weight.detach().double().clone().requires_grad_()
        )
        self.bias = None if layer.bias is None else layer.bias.detach().double().clone().requires_grad_()
        self.running_mean = layer.running_mean.detach().double().cpu().clone()
        self.running_var = layer.running_var.detach().double().cpu().clone()
        self.step = int(layer.num_batches_tracked)
        self.last_r: Tensor | None = None
        self.last_d: Tensor | None = None
        self.last_x_hat: Tensor | None = None
        self.r_history: list[Tensor] = []
        self.d_history: list[Tensor] = []
        self.training = True

    def parameters(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def __call__(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        x = x.double()
        mean_run = self.running_mean.to(x.device).view(shape)
        var_run = self.running_var.to(x.device).view(shape)
        if self.training:
            n = x.numel() // x.shape[1]
            mu = x.mean(dim=dims, keepdim=True)
            var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
            sigma_b = (var + self.eps).sqrt()
            sigma = (var_run + self.eps).sqrt()
            r_max, d_max = (float(v) for v in self.bounds(self.step))
            r = (sigma_b / sigma).detach().clamp(1.0 / r_max, r_max)
            d = ((mu - mean_run) / sigma).detach().clamp(-d_max, d_max)
            x_hat = (x - mu) / sigma_b * r + d
            self.last_x_hat = x_hat.detach()
            self.last_r, self.last_d = r.flatten(), d.flatten()
            self.r_history.append(self.last_r)
            self.d_history.append(self.last_d)
            self.step += 1
            m = 1.0 / self.step if self.momentum is None else float(self.momentum)
            with torch.no_grad():
                self.running_mean = (1 - m) * self.running_mean + m * mu.detach().flatten().cpu()
                unbiased = var.detach().flatten().cpu() * n / (n - 1)
                self.running_var = (1 - m) * self.running_var + m * unbiased
        else:
            x_hat = (x - mean_run) / (var_run + self.eps).sqrt()
        y = x_hat
        if self.weight is not None:
            y = y * self.weight.to(x.device).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(x.device).view(shape)
        return y


def renorm_against_reference(
    layer: nn.Module,
    inputs: Sequence[Tensor],
    bounds: Callable[[int], tuple[float | Fraction, float | Fraction]],
    *,
    lr: float = 0.1,
    eval_too: bool = True,
    **tol: float,
) -> RenormReference:
    """Train ``layer`` and :class:`RenormReference` side by side and compare every step (then eval)."""
    ref = RenormReference(layer, bounds)
    layer.train()
    for i, x in enumerate(inputs):
        got = run_step(layer, x, i, lr=lr)
        leaf = x.detach().double().requires_grad_()
        for p in ref.parameters():
            p.grad = None
        y = ref(leaf)
        g = upstream_grad(got.output, i).double()
        y.backward(g)
        label = f"renorm step {i}"
        assert_close(got.output, y.detach(), f"{label} output", **tol)
        assert_close(got.input_grad, leaf.grad, f"{label} input grad", **tol)
        if ref.weight is not None:
            assert ref.bias is not None
            assert ref.weight.grad is not None
            assert ref.bias.grad is not None
            assert ref.last_x_hat is not None
            # Parameter gradients are sums over every value of a channel: their rounding error scales with
            # the L1 mass of the summands (Σ|g·x̂| and Σ|g|), which is what the relative tolerance applies to.
            dims = [0, *range(2, g.dim())]
            assert_sum_close(
                got.weight_grad,
                ref.weight.grad,
                (g * ref.last_x_hat).abs().sum(dims),
                f"{label} weight grad",
                **tol,
            )
            assert_sum_close(got.bias_grad, ref.bias.grad, g.abs().sum(dims), f"{label} bias grad", **tol)
            # The layer took its SGD step in run_step: follow it exactly (its rounding included), so that
            # every step compares one step's computation and errors do not accumulate.
            ref.weight.data.copy_(layer.weight.detach().double())
            ref.bias.data.copy_(layer.bias.detach().double())
        assert_close(got.running_mean, ref.running_mean, f"{label} running_mean", **tol)
        assert_close(got.running_var, ref.running_var, f"{label} running_var", **tol)
        assert got.num_batches_tracked is not None
        assert int(got.num_batches_tracked) == ref.step
        # Likewise for the running statistics (a no-op in float64 up to rounding).
        ref.running_mean = layer.running_mean.detach().double().cpu().clone()
        ref.running_var = layer.running_var.detach().double().cpu().clone()
    if eval_too:
        layer.eval()
        ref.training = False
        for x in inputs[-1:]:
            with torch.no_grad():
                assert_close(layer(x), ref(x), "renorm eval output", **tol)
    return ref
