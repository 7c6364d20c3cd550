"""Pure tensor functions behind normzoo's layers.

Every layer in :mod:`normzoo.layers` is a thin stateful wrapper around one function here, so the math lives
in one place and is tested once. The functions follow :func:`torch.nn.functional.batch_norm`'s argument
order and conventions: ``running_mean``/``running_var`` are updated in place when ``training`` is true and
they are given, ``momentum`` is the weight of the new batch statistics, and ``eps`` is added to the
variance.

Both :func:`batch_renorm` and :func:`noisy_batch_norm` are expressed as torch's native batch norm with a
per-step correction, so they run torch's kernels forward and backward and save for backward only what
torch's BatchNorm saves (the input and a few per-channel vectors).

Example:
    >>> import torch
    >>> from normzoo import functional as NF
    >>> x = torch.randn(8, 3, 4, 4)
    >>> mean, var = torch.zeros(3), torch.ones(3)
    >>> y = NF.batch_renorm(x, mean, var, training=True, r_max=1.0, d_max=0.0)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "batch_norm",
    "batch_norm_stats",
    "batch_renorm",
    "noisy_batch_norm",
    "paper_renorm_schedule",
    "renorm_correction",
    "sample_noise_moments",
]

# Batch Renormalization's published schedule (Ioffe 2017, section 4): plain BatchNorm for the first
# 5k steps, then r_max relaxes linearly to 3 (reached at 40k steps) and d_max to 5 (reached at 25k steps).
PAPER_WARMUP_STEPS = 5_000
PAPER_R_MAX_STEPS = 40_000
PAPER_D_MAX_STEPS = 25_000


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """BatchNorm (Ioffe & Szegedy 2015, Algorithm 1) through torch's native kernel.

    Identical to :func:`torch.nn.functional.batch_norm` (it is that function), exposed here so that every
    normalization in normzoo has its functional form in one module.

    Example:
        >>> x = torch.randn(16, 4)
        >>> y = batch_norm(x, None, None, training=True)
        >>> y.mean(0).abs().max() < 1e-6
        tensor(True)
    """
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (channels in dimension 1).

    Statistics are taken over the batch and every spatial position, in at least float32.

    Example:
        >>> mean, var = batch_norm_stats(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> mean, var
        (tensor([2., 4.]), tensor([1., 4.]))
    """
    dims = [0, *range(2, input.dim())]
    if input.dtype in (torch.float16, torch.bfloat16):
        input = input.float()
    var, mean = torch.var_mean(input, dim=dims, correction=0)
    return mean, var


def renorm_correction(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: float | Tensor,
    d_max: float | Tensor,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's ``r`` and ``d`` (Ioffe 2017, Algorithm 1), without gradient.

    ``r = clip(σ_B / σ, 1/r_max, r_max)`` and ``d = clip((μ_B − μ) / σ, −d_max, d_max)`` with
    ``σ_B = sqrt(σ²_B + eps)`` and ``σ = sqrt(running_var + eps)``: eps goes under the square root of both
    variances, never onto a standard deviation. The bounds may be floats or 0-dim tensors (a schedule
    evaluated on the device, so that no step needs a host synchronization).

    Example:
        >>> r, d = renorm_correction(torch.tensor([2.0]), torch.tensor([4.0]),
        ...                          torch.tensor([0.0]), torch.tensor([1.0]), 3.0, 5.0, eps=0.0)
        >>> r, d
        (tensor([2.]), tensor([2.]))
    """
    if not isinstance(r_max, Tensor) and r_max < 1.0:
        raise ValueError(f"renorm_correction expects r_max >= 1, got {r_max}")
    if not isinstance(d_max, Tensor) and d_max < 0.0:
        raise ValueError(f"renorm_correction expects d_max >= 0, got {d_max}")
    with torch.no_grad():
        running_std = (running_var + eps).sqrt()
        r_bound = torch.as_tensor(r_max, dtype=running_std.dtype, device=running_std.device)
        d_bound = torch.as_tensor(d_max, dtype=running_std.dtype, device=running_std.device)
        r = torch.clamp((batch_var + eps).sqrt() / running_std, min=r_bound.reciprocal(), max=r_bound)
        d = torch.clamp((batch_mean - running_mean) / running_std, min=-d_bound, max=d_bound)
    return r, d


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017).

    In training, ``y = γ·((x − μ_B)/σ_B · r + d) + β`` with ``r`` and ``d`` from :func:`renorm_correction`,
    computed from the running statistics *before* this step updates them and held constant in backprop.
    Because ``r`` and ``d`` are constants, this is BatchNorm with weight ``γ·r`` and bias ``β + γ·d``: torch's
    native kernels normalize, update the running statistics (unbiased variance over all values of a
    channel) and compute the backward; only that affine correction is added, in place. Outside training,
    or without running statistics, it is exactly :func:`batch_norm`. Double backward is not supported.

    Example:
        >>> x = 3 + 2 * torch.randn(64, 2)
        >>> mean, var = torch.zeros(2), torch.ones(2)
        >>> y = batch_renorm(x, mean, var, training=True, r_max=1.5, d_max=0.5)
        >>> y.mean(0)  # pulled towards the running mean by the clipped d = 0.5
        tensor([0.5000, 0.5000])
    """
    if not training or running_mean is None or running_var is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not isinstance(r_max, Tensor) and not isinstance(d_max, Tensor) and r_max == 1.0 and d_max == 0.0:
        # The paper's warm-up bounds make r = 1 and d = 0: BatchNorm exactly, on its own fused kernel.
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    return _BatchRenormFunction.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max
    )


class _BatchRenormFunction(torch.autograd.Function):
    """Training-mode Batch Renormalization on torch's native batch-norm forward and backward kernels.

    Forward normalizes with the native kernel (which also updates the running statistics), then applies
    the per-channel affine map ``x̂ ↦ γ·r·x̂ + (β + γ·d)`` in place. Backward is the native batch-norm
    backward with weight ``γ·r``; the parameter gradients follow from the chain rule through the affine
    map, with ``r`` and ``d`` constant. Saved: the input, ``γ·r``, ``r``, ``d`` and the batch statistics.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        momentum: float,
        eps: float,
        r_max: float | Tensor,
        d_max: float | Tensor,
    ) -> Tensor:
        old_mean, old_var = running_mean.clone(), running_var.clone()
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            input, None, None, running_mean, running_var, True, momentum, eps
        )
        # The kernel keeps 1 / sqrt(σ²_B + eps); renorm_correction adds eps back under the square root.
        batch_var = save_invstd.pow(-2) - eps
        r, d = renorm_correction(save_mean, batch_var, old_mean, old_var, r_max, d_max, eps)
        r, d = r.to(old_var.dtype), d.to(old_var.dtype)
        scale = r if weight is None else weight * r
        shift = d if weight is None else weight * d
        if bias is not None:
            shift = shift + bias
        shape = [1, -1] + [1] * (input.dim() - 2)
        torch.addcmul(shift.view(shape), out, scale.view(shape), out=out)
        ctx.save_for_backward(input, scale, r, d, save_mean, save_invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        input, scale, r, d, save_mean, save_invstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
            grad_out,
            input,
            scale,
            None,
            None,
            save_mean,
            save_invstd,
            True,
            ctx.eps,
            [needs_input, needs_weight, needs_weight or needs_bias],
        )
        grad_weight = grad_scale * r + grad_shift * d if needs_weight else None
        grad_bias = grad_shift if needs_bias else None
        return grad_input if needs_input else None, grad_weight, grad_bias, None, None, None, None, None, None


def sample_noise_moments(
    num_features: int,
    mean_range: float,
    std_range: tuple[float, float],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one step's noise distribution for :func:`noisy_batch_norm`, independently per channel.

    ``mean ~ U(−mean_range, mean_range)`` and ``std ~ U(std_range[0], std_range[1])``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mean, std = sample_noise_moments(3, 1.0, (0.5, 1.5), generator=g)
        >>> bool((mean.abs() <= 1).all() and (std >= 0.5).all() and (std <= 1.5).all())
        True
    """
    low, high = std_range
    if mean_range < 0 or not 0 <= low <= high:
        raise ValueError(
            f"expected mean_range >= 0 and 0 <= std_range[0] <= std_range[1], "
            f"got mean_range={mean_range}, std_range={std_range}"
        )
    mean = torch.empty(num_features, device=device, dtype=dtype).uniform_(
        -mean_range, mean_range, generator=generator
    )
    std = torch.empty(num_features, device=device, dtype=dtype).uniform_(low, high, generator=generator)
    return mean, std


def noisy_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    noise_mean: Tensor | None = None,
    noise_std: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training-mode BatchNorm whose every output value gets i.i.d. noise (Santurkar et al. 2018).

    ``y = BN(x) + ε`` with ``ε ~ N(noise_mean[c], noise_std[c]²)`` drawn independently for each value of
    channel ``c``; :func:`sample_noise_moments` draws a fresh ``(noise_mean, noise_std)`` per step. The mean
    is folded into the bias of torch's native kernel and the rest is one in-place ``addcmul``, so nothing
    beyond BatchNorm's own tensors is saved for backward (the noise does not depend on the input). This
    function always uses batch statistics; in eval, call :func:`batch_norm`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(8192, 2, generator=g)
        >>> y = noisy_batch_norm(x, None, None, noise_mean=torch.tensor([1.0, -1.0]),
        ...                      noise_std=torch.tensor([2.0, 0.5]), generator=g)
        >>> y.mean(0).round(decimals=1), y.var(0).round(decimals=1)  # variance 1 + std²
        (tensor([ 1., -1.]), tensor([5.0000, 1.2000]))
    """
    if noise_mean is None or noise_std is None:
        raise ValueError("noisy_batch_norm needs noise_mean and noise_std (see sample_noise_moments)")
    noise_mean = noise_mean.to(bias.dtype if bias is not None else noise_mean.dtype)
    bias = noise_mean if bias is None else bias + noise_mean
    out = F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    noise = torch.empty_like(out).normal_(generator=generator)
    shape = [1, -1] + [1] * (out.dim() - 2)
    return out.addcmul_(noise, noise_std.to(out.dtype).view(shape))


def paper_renorm_schedule(
    step: int | Tensor,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = PAPER_WARMUP_STEPS,
    r_max_steps: int = PAPER_R_MAX_STEPS,
    d_max_steps: int = PAPER_D_MAX_STEPS,
) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """Clip bounds of Batch Renormalization at ``step`` under the paper's schedule.

    ``(1, 0)`` until ``warmup_steps``, then linear to ``r_max`` at ``r_max_steps`` and to ``d_max`` at
    ``d_max_steps``, constant afterwards. The ramp is clamped to [0, 1], so the bounds never overshoot
    (a warm-up factor that keeps growing is a known bug of public implementations). A tensor ``step``
    (a layer's ``num_batches_tracked``) gives float32 tensors on its device, with no host synchronization.

    Example:
        >>> [paper_renorm_schedule(s) for s in (0, 5_000, 15_000, 25_000, 40_000, 10**6)]
        [(1.0, 0.0), (1.0, 0.0), (1.5714..., 2.5), (2.1428..., 5.0), (3.0, 5.0), (3.0, 5.0)]
        >>> paper_renorm_schedule(torch.tensor(25_000))
        (tensor(2.1429), tensor(5.))
    """
    if not 0 <= warmup_steps <= min(r_max_steps, d_max_steps):
        raise ValueError(
            "expected 0 <= warmup_steps <= min(r_max_steps, d_max_steps), "
            f"got warmup_steps={warmup_steps}, r_max_steps={r_max_steps}, d_max_steps={d_max_steps}"
        )
    if isinstance(step, Tensor):
        elapsed = (step - warmup_steps).to(torch.float64)
        r_ramp = (elapsed / max(r_max_steps - warmup_steps, 1)).clamp(0.0, 1.0).float()
        d_ramp = (elapsed / max(d_max_steps - warmup_steps, 1)).clamp(0.0, 1.0).float()
        return 1.0 + (r_max - 1.0) * r_ramp, d_max * d_ramp
    elapsed_steps = int(step) - warmup_steps
    r_frac = min(max(elapsed_steps / max(r_max_steps - warmup_steps, 1), 0.0), 1.0)
    d_frac = min(max(elapsed_steps / max(d_max_steps - warmup_steps, 1), 0.0), 1.0)
    return 1.0 + (r_max - 1.0) * r_frac, d_max * d_frac
