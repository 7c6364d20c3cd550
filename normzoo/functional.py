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

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "batch_norm",
    "batch_norm_stats",
    "batch_renorm",
    "noisy_batch_norm",
    "paper_renorm_schedule",
    "renorm_correction",
    "sample_noise_moments",
    "sync_batch_norm",
    "sync_batch_stats",
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


def batch_norm_stats(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (channels in dimension 1), without gradient.

    Statistics are taken over the batch and every spatial position by torch's batch-norm statistics kernel,
    so they are the numbers torch's BatchNorm normalizes with (returned in float32 for float16/bfloat16
    input). Given running statistics, it also updates them exactly as torch's BatchNorm does (unbiased
    variance over all values of a channel).

    Example:
        >>> mean, var = batch_norm_stats(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> mean, var
        (tensor([2., 4.]), tensor([1., 4.]))
    """
    with torch.no_grad():
        mean, var = torch.batch_norm_update_stats(input.detach(), running_mean, running_var, momentum)
    # Under CPU autocast the kernel returns the input's low precision; the statistics stay float32.
    dtype = _stats_dtype(input)
    return mean.to(dtype), var.to(dtype)


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
    *,
    sync: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017).

    In training, ``y = γ·((x − μ_B)/σ_B · r + d) + β`` with ``r`` and ``d`` from :func:`renorm_correction`,
    computed from the running statistics *before* this step updates them and held constant in backprop.
    Because ``r`` and ``d`` are constants, this is BatchNorm with weight ``γ·r`` and bias ``β + γ·d``, which is
    how it runs: one pass of torch's statistics kernel, the running update (unbiased variance over all
    values of a channel), one normalization pass with the batch statistics and torch's native batch-norm
    backward — the passes and saved tensors of torch's BatchNorm. Outside training, or without running
    statistics, it is exactly :func:`batch_norm`. Double backward is BatchNorm's (``r`` and ``d`` are constants).

    With ``sync=True`` (training only), the batch statistics are those of the batch concatenated over the
    processes of ``process_group`` (``None``: the default group): ``r`` and ``d`` come from the global mean
    and variance, and the normalization is :func:`sync_batch_norm` with weight ``γ·r`` and bias ``β + γ·d``.

    Example:
        >>> x = 3 + 2 * torch.randn(64, 2)
        >>> mean, var = torch.zeros(2), torch.ones(2)
        >>> y = batch_renorm(x, mean, var, training=True, r_max=1.5, d_max=0.5)
        >>> y.mean(0)  # pulled towards the running mean by the clipped d = 0.5
        tensor([0.5000, 0.5000])
    """
    if not training or running_mean is None or running_var is None or input.numel() == 0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    warmup = not isinstance(r_max, Tensor) and not isinstance(d_max, Tensor) and r_max == 1.0 and d_max == 0.0
    if warmup and not sync:
        # The paper's warm-up bounds make r = 1 and d = 0: BatchNorm exactly, on its own fused kernel.
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    count: Tensor | None = None
    if sync:
        # r and d come from the running statistics before this step's update.
        previous_mean, previous_var = running_mean.clone(), running_var.clone()
        mean, var, count = sync_batch_stats(input, process_group)
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        if warmup:
            return _normalize_with_stats(input, weight, bias, mean, var, count, eps, True, process_group)
        r, d = renorm_correction(mean, var, previous_mean, previous_var, r_max, d_max, eps)
    else:
        bounds = [torch.as_tensor(b, dtype=torch.float64, device=running_var.device) for b in (r_max, d_max)]
        mean, var, r, d = _renorm_statistics(
            input.detach(), running_mean, running_var, momentum, eps, *bounds
        )
    weight, bias = _renorm_affine(weight, bias, r.to(running_var.dtype), d.to(running_var.dtype))
    return _normalize_with_stats(input, weight, bias, mean, var, count, eps, sync, process_group)


@torch.library.custom_op("normzoo::renorm_statistics", mutates_args=("running_mean", "running_var"))
def _renorm_statistics(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    r_max: Tensor,
    d_max: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch statistics, torch's running update, and ``r``, ``d`` from the statistics before it.

    One opaque operator on purpose: traced by ``torch.compile`` as separate ops, the backward graph would be
    free to recompute ``r`` and ``d`` from the running buffers after the forward has updated them in place.
    """
    previous_mean, previous_var = running_mean.clone(), running_var.clone()
    mean, var = batch_norm_stats(input, running_mean, running_var, momentum)
    r, d = renorm_correction(mean, var, previous_mean, previous_var, r_max, d_max, eps)
    return mean, var, r, d


@_renorm_statistics.register_fake
def _(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    r_max: Tensor,
    d_max: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    channels = input.shape[1]
    stats = input.new_empty(channels, dtype=_stats_dtype(input))
    return stats, stats.clone(), running_var.new_empty(channels), running_var.new_empty(channels)


def _renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``γ·((x − μ)/σ·r + d) + β`` is BatchNorm with weight ``γ·r`` and bias ``β + γ·d`` (r, d constant)."""
    if weight is None:
        return r, d if bias is None else bias + d
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


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
    if not (0.0 <= mean_range < math.inf and 0.0 <= low <= high < math.inf):  # NaN fails every comparison
        raise ValueError(
            f"sample_noise_moments: expected finite mean_range >= 0 and 0 <= std_range[0] <= std_range[1], "
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
    *,
    sync: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Training-mode BatchNorm whose every output value gets i.i.d. noise (Santurkar et al. 2018).

    ``y = BN(x) + ε`` with ``ε ~ N(noise_mean[c], noise_std[c]²)`` drawn independently for each value of
    channel ``c``; :func:`sample_noise_moments` draws a fresh ``(noise_mean, noise_std)`` per step. The mean
    is folded into the bias of torch's native kernel and the rest is one in-place ``addcmul``, so nothing
    beyond BatchNorm's own tensors is saved for backward (the noise does not depend on the input). This
    function always uses batch statistics; in eval, call :func:`batch_norm`. With ``sync=True`` the
    normalization is :func:`sync_batch_norm` over ``process_group`` and the noise stays local to each
    process.

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
    if sync:
        out = sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, process_group)
    else:
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


# --- Synchronized statistics (data-parallel training over a process group) ------------------------------
#
# A synchronized layer normalizes each process's share of the batch with the statistics of the batch
# concatenated over every process of a group, so that W processes with n samples each compute exactly what
# one process computes on W·n samples. Everything below is written in portable tensor ops and
# torch.distributed collectives, so it runs on any backend (gloo on CPU, NCCL on GPU): torch's own
# SyncBatchNorm kernels (torch.batch_norm_stats and friends) exist for CUDA only.


def _stats_dtype(input: Tensor) -> torch.dtype:
    """The dtype statistics are computed in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _channel_view(input: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``input`` (channels in dimension 1)."""
    return [1, -1] + [1] * (input.dim() - 2)


def sync_batch_stats(
    input: Tensor, process_group: ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and value count of ``input`` concatenated over a process group.

    Every process of ``process_group`` (``None``: the default group) must call this with its own share of
    the batch; shares may differ in size, and an empty one (no sample) takes part without contributing.
    Each process computes its count ``n``, mean ``m`` and biased variance ``v`` (a compensated two-pass
    computation in float32, float64 for float64 input), and a single ``all_reduce`` of one flat float64
    tensor ``[n·m | n·(v + m²) | n]`` (``2C + 1`` values) gives the global ``N = Σn``, ``μ = Σn·m / N`` and
    ``M2 = Σn·(v + m²) − N·μ²``: Chan et al.'s combination of per-process means and sums of squared
    deviations, written as sums so that one all-reduce carries it. The subtraction cancels the
    between-process part ``N·μ²`` in float64: a relative error of about ``1e-16·μ²/σ²`` in the variance
    (1e-8 at ``|μ|/σ = 10⁴``, 1e-6 at ``10⁵``), below float32 rounding up to ``|μ|/σ ≈ 2·10⁴``; float64
    input gets the same bound, not float64 precision. ``M2`` is clamped at 0. The per-process means carry
    their own rounding correction, so they are exact to the precision of the deviations, not of ``|μ|``.

    Returns ``(mean, var, count)``: ``mean`` and ``var`` per channel in float32 (float64 for float64
    input), ``count`` a 0-dim float64 tensor (the values per channel over all processes; the unbiased
    variance is ``var · count / (count − 1)``). Nothing is differentiable: see :func:`sync_batch_norm` for
    the gradient. Needs an initialized default process group.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
        >>> sync_batch_stats(x)  # one process: the statistics of its own batch
        (tensor([2., 4.]), tensor([1., 4.]), tensor(2., dtype=torch.float64))
        >>> dist.destroy_process_group()
    """
    with torch.no_grad():
        sums = _local_moment_sums(input)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
        return _moments_from_sums(sums, _stats_dtype(input))


def _local_moment_sums(input: Tensor) -> Tensor:
    """This process's ``[n·m | n·(v + m²) | n]`` in float64 (zeros for an empty share), the summands of
    :func:`sync_batch_stats`'s one collective.

    ``m`` and ``v`` come from a compensated two-pass computation: the mean ``a``, then the deviations
    ``d = x − a``, whose sum ``Σd`` is the rounding error of ``a`` (times ``n``) and whose squares give
    ``M2 = Σd² − (Σd)²/n``. Both corrections are applied in float64, so ``m`` is exact to the precision of
    values of the size of the deviations, not of the mean itself (what makes the combination over
    processes accurate for large means), and ``v`` is the two-pass variance. One input-sized temporary.
    """
    num_channels = input.shape[1]
    count = input.numel() // num_channels if num_channels else 0
    if count == 0:
        return torch.zeros(2 * num_channels + 1, dtype=torch.float64, device=input.device)
    dims = [0, *range(2, input.dim())]
    values = input.to(_stats_dtype(input))
    mean = values.mean(dims)
    deviations = values - mean.view(_channel_view(input))
    residual = deviations.sum(dims).to(torch.float64)
    squares = deviations.square_().sum(dims).to(torch.float64)
    mean64 = mean.to(torch.float64) + residual / count
    m2 = (squares - residual * residual / count).clamp(min=0.0)
    return torch.cat([mean64 * count, m2 + mean64 * mean64 * count, mean64.new_full((1,), count)])


def _moments_from_sums(sums: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(mean, biased var, count)`` from the all-reduced :func:`_local_moment_sums`."""
    num_channels = (sums.numel() - 1) // 2
    total = sums[-1]
    sum_x, sum_sq = sums[:num_channels], sums[num_channels : 2 * num_channels]
    n = total.clamp(min=1.0)
    mean64 = sum_x / n
    var64 = (sum_sq - sum_x * mean64).clamp(min=0.0) / n
    return mean64.to(dtype), var64.to(dtype), total


def _update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: float,
) -> None:
    """torch's update with the global statistics: ``(1 − momentum)·running + momentum·batch``, the
    variance unbiased with the global count (as BatchNorm on the concatenated batch)."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var.to(torch.float64) * (count / (count - 1.0).clamp(min=1.0))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class _BatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given its batch statistics, optionally reduced over a process group.

    Forward is ``y = γ·(x − μ)/sqrt(σ² + eps) + β`` with the given batch ``μ``, ``σ²`` (torch's native batch
    norm in inference mode: one fused pass on any device). Backward is BatchNorm's training backward,
    ``∂L/∂x = γ·invstd·(g − mean(g) − x̂·mean(g·x̂))``: torch's native kernel when the statistics are this
    process's own; when they are a group's (``sync``), the two means run over the concatenated batch of
    all processes, so the per-channel sums ``Σg`` and ``Σg·x̂`` are all-reduced (one collective of ``2C``
    values), as torch's SyncBatchNorm does, while ``∂L/∂γ = Σg·x̂`` and ``∂L/∂β = Σg`` stay local (data
    parallelism reduces parameter gradients). Saved: the input and per-channel vectors, never ``x̂``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        count: Tensor | None,
        eps: float,
        sync: bool,
        process_group: ProcessGroup | None,
    ) -> Tensor:
        param = weight if weight is not None else bias
        kernel_dtype = param.dtype if param is not None else mean.dtype
        out = F.batch_norm(input, mean.to(kernel_dtype), var.to(kernel_dtype), weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.sync = sync
        ctx.process_group = process_group
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else input.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, invstd, count = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if not ctx.sync:
            # native_batch_norm_backward has its own derivative (torch's batchnorm_double_backward, which
            # accounts for the batch statistics' dependence on the input), so a gradient of this gradient is
            # BatchNorm's: double backward works as through torch's BatchNorm.
            # The native kernel wants the statistics in the parameters' dtype (float32 for mixed precision).
            kernel_dtype = weight.dtype if weight is not None else mean.dtype
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out,
                input,
                weight,
                None,
                None,
                mean.to(kernel_dtype),
                invstd.to(kernel_dtype),
                True,
                ctx.eps,
                [needs_input, needs_weight, needs_bias],
            )
            return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
        if torch.is_grad_enabled():
            raise RuntimeError(
                "normzoo: double backward (create_graph=True) through a synchronized BatchNorm-family layer "
                "is not supported; run it unsynchronized (sync=False) or without create_graph"
            )
        dtype = mean.dtype
        sum_dy, sum_dy_xhat = _local_grad_sums(grad_out, input, mean, invstd, ctx.eps)
        grad_input = grad_weight = grad_bias = None
        if needs_weight:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if needs_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if needs_input:
            num_channels = input.shape[1]
            combined = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=ctx.process_group)
            n = count.to(dtype).clamp(min=1.0)
            mean_dy, mean_dy_xhat = combined[:num_channels] / n, combined[num_channels:] / n
            scale = invstd if weight is None else invstd * weight.to(dtype)
            shape = _channel_view(input)
            # γ·invstd·(g − mean(g) − x̂·mean(g·x̂)) with x̂ = (x − μ)·invstd; x − μ first, for accuracy.
            xmu = input.to(dtype) - mean.view(shape)  # a fresh input-sized buffer, turned into the result
            grad_input = (
                xmu.mul_((-scale * invstd * mean_dy_xhat).view(shape))
                .add_((-scale * mean_dy).view(shape))
                .addcmul_(grad_out.to(dtype), scale.view(shape))
                .to(input.dtype)
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _local_grad_sums(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """This process's per-channel ``Σg`` and ``Σg·x̂`` with ``x̂ = (x − μ)·invstd`` (global μ and invstd).

    torch's native batch-norm backward computes exactly these as its bias and weight gradients, in one
    fused pass without temporaries, when given the statistics as its saved ones; inputs in a narrower dtype
    than the statistics (float16, bfloat16) and empty ones go through elementary ops in the statistics'
    dtype.
    """
    if input.numel() > 0 and input.dtype == mean.dtype and grad_out.dtype == input.dtype:
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, input, None, None, None, mean, invstd, True, eps, [False, True, True]
        )
        return sum_dy, sum_dy_xhat
    dims = [0, *range(2, input.dim())]
    grad = grad_out.to(mean.dtype)
    xhat = (input.to(mean.dtype) - mean.view(_channel_view(input))) * invstd.view(_channel_view(input))
    return grad.sum(dims), (grad * xhat).sum(dims)


def _normalize_with_stats(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor | None,
    eps: float,
    sync: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    out: Tensor = _BatchNormWithStats.apply(input, weight, bias, mean, var, count, eps, sync, process_group)
    return out


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Training-mode BatchNorm over the batch concatenated across the processes of ``process_group``.

    Every process of the group (``None``: the default group) calls it with its share of the batch (shares
    may differ in size or be empty). The result on each process equals the rows of its share in
    :func:`batch_norm` applied in training to the concatenated batch: outputs, input gradients (through a
    second all-reduce in backward) and running statistics (mean and unbiased variance from the global
    count, updated in place on every process alike). Parameter gradients are this process's part; their
    sum over processes is the concatenated batch's, which is what data-parallel training all-reduces.
    Statistics come from :func:`sync_batch_stats` (one collective); works on any torch.distributed backend.
    The normzoo layers call it only when the group has more than one process; here a one-process group also
    goes through the collectives (useful for testing).

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> x = torch.randn(16, 3)
        >>> torch.allclose(sync_batch_norm(x, None, None), batch_norm(x, None, None, training=True), atol=1e-6)
        True
        >>> dist.destroy_process_group()
    """
    mean, var, count = sync_batch_stats(input, process_group)
    _update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return _normalize_with_stats(input, weight, bias, mean, var, count, eps, True, process_group)
