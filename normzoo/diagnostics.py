"""The measures behind normzoo's diagnostics, as pure torch functions.

The Lightning callbacks in :mod:`normzoo.lightning.callbacks` schedule, log and plot these measures; the
math lives here, needs torch alone, and is tested once. Every function takes tensors (or a function of a
parameter dictionary) and returns tensors or plain Python numbers; none of them touches a module's state.

- :func:`abs_stats` / :func:`update_ratio`: per-layer gradient flow (mean and max ``|g|``) and the
  update-to-weight ratio ``‖Δw‖ / ‖w‖`` (the cs231n rule of thumb: about ``1e-3``).
- :func:`activation_stats`: mean, std, percentiles, the fraction of saturated sigmoid/tanh outputs and the
  fraction of dead ReLU units of one layer's output.
- :func:`jacobian_singular_values`: singular values of the input-output Jacobian of a function per sample,
  exact (basis probes + :func:`torch.linalg.svdvals`) or estimated matrix-free (randomized SVD with power
  iterations), through reverse-mode autograd alone.
- :func:`internal_covariate_shift`: Santurkar et al. (2018)'s ICS of each layer: the ℓ2 distance and the
  cosine between the layer's gradient before and after the earlier layers take an SGD step, same batch.
- :func:`train_eval_drift`: how far each BatchNorm layer's batch statistics are from its running
  statistics, and the gap between the model's training-mode and eval-mode outputs on one batch.
- :func:`loss_landscape`: Santurkar et al.'s measures along the gradient direction ``g``: the loss
  ``L(w - ηg)``, the gradient change ``‖∇L(w - ηg) - ∇L(w)‖`` and the effective β-smoothness
  ``max_η ‖∇L(w - ηg) - ∇L(w)‖ / ‖ηg‖``.

Example:
    >>> import torch
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    >>> sv = jacobian_singular_values(lambda v: v @ W.T, torch.ones(3, 2))
    >>> sv.values.shape, sv.values[0].tolist()
    (torch.Size([3, 2]), [2.0, 0.5])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ._activations import activation_kind
from .layers import is_batch_norm

__all__ = [
    "SV_HISTOGRAM_EDGES",
    "JacobianSpectrum",
    "LandscapeResult",
    "TrainEvalDrift",
    "abs_stats",
    "activation_kind",
    "activation_stats",
    "gradient_change",
    "internal_covariate_shift",
    "jacobian_singular_values",
    "loss_landscape",
    "sv_histogram",
    "train_eval_drift",
    "update_ratio",
]

#: Bin edges of the singular-value histograms: 200 log-spaced bins, 0.05 decades (12 %) each, from 1e-6 to
#: 1e4. Fixed so that histograms from different runs (vanilla vs BN) and steps can be compared bin by bin.
SV_HISTOGRAM_EDGES: tuple[float, ...] = tuple(10.0 ** (-6 + 0.05 * i) for i in range(201))

ParamDict = Mapping[str, Tensor]
LossOf = Callable[[dict[str, Tensor]], Tensor]


# --------------------------------------------------------------------------------------------------
# gradients and weights
# --------------------------------------------------------------------------------------------------
def abs_stats(tensors: Sequence[Tensor]) -> tuple[list[float], list[float]]:
    """Mean and max of ``|t|`` for each tensor, computed in float32 with a single device sync.

    Example:
        >>> abs_stats([torch.tensor([1.0, -3.0]), torch.tensor([0.5])])
        ([2.0, 0.5], [3.0, 0.5])
    """
    if not tensors:
        return [], []
    means = torch.stack([t.detach().float().abs().mean() for t in tensors])
    maxes = torch.stack([t.detach().float().abs().amax() for t in tensors])
    both = torch.stack([means, maxes]).cpu().tolist()
    return both[0], both[1]


def update_ratio(before: Sequence[Tensor], after: Sequence[Tensor]) -> tuple[list[float], list[float]]:
    """Norms ``‖after‖`` and ratios ``‖after - before‖ / ‖before‖`` for each pair of tensors.

    The ratio is the relative size of an optimizer update (cs231n: about ``1e-3`` is healthy; much smaller
    means the learning rate is too low, much larger too high). ``nan`` where ``before`` is all zeros.

    Example:
        >>> update_ratio([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])])
        ([5.408...], [0.1])
    """
    if not before:
        return [], []
    norms = torch.stack([a.detach().float().norm() for a in after])
    deltas = torch.stack(
        [(a.detach().float() - b.detach().float()).norm() for a, b in zip(after, before, strict=True)]
    )
    base = torch.stack([b.detach().float().norm() for b in before])
    ratio = torch.where(base > 0, deltas / base, torch.full_like(base, float("nan")))
    both = torch.stack([norms, ratio]).cpu().tolist()
    return both[0], both[1]


def gradient_change(g: Tensor, g_new: Tensor) -> tuple[float, float]:
    """``(‖g - g_new‖₂, cos(g, g_new))`` of two gradients flattened; the cosine is ``nan`` if either is 0.

    Example:
        >>> gradient_change(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        (1.414..., 0.0)
    """
    a, b = g.detach().flatten().double(), g_new.detach().flatten().double()
    l2 = (a - b).norm()
    denom = a.norm() * b.norm()
    cos = (a @ b) / denom if denom > 0 else torch.tensor(float("nan"))
    return float(l2), float(cos)


# --------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------
def activation_stats(
    output: Tensor,
    kind: str | None = None,
    *,
    saturation: float = 0.99,
    quantiles: Sequence[float] = (0.15, 0.5, 0.85),
    max_quantile_elements: int = 1 << 14,
) -> dict[str, float | None]:
    """Statistics of one layer's output on a batch (dimension 0 is the batch).

    Returns ``mean``, ``std`` (over every element), the ``quantiles`` as ``p15``/``p50``/``p85`` (Ioffe &
    Szegedy 2015, Figure 1, plot these over training; computed on at most ``max_quantile_elements`` evenly
    strided elements), and:

    - ``saturated``: for ``kind="sigmoid"`` the fraction of outputs with ``|2y - 1| >= saturation``, for
      ``"tanh"`` with ``|y| >= saturation`` (``0.99``: the derivative is below 2 % of its maximum);
      ``None`` for other kinds.
    - ``dead``: for ``kind="relu"`` the fraction of units that are zero for *every* sample of the batch; a
      unit is one element of the per-sample output (a neuron; for conv outputs a channel at one position);
      ``None`` for other kinds.

    Example:
        >>> y = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
        >>> s = activation_stats(y, "relu")
        >>> s["dead"], s["mean"], s["saturated"]
        (0.5, 0.75, None)
    """
    y = output.detach()
    if not y.is_floating_point():
        y = y.float()
    y32 = y.float()
    flat = y32.flatten()
    stride = max(1, flat.numel() // max_quantile_elements)
    sample = flat[::stride]
    stats = torch.cat(
        [
            torch.stack([flat.mean(), flat.std() if flat.numel() > 1 else flat.new_zeros(())]),
            torch.quantile(sample, torch.tensor(list(quantiles), dtype=sample.dtype, device=sample.device)),
        ]
    )
    saturated: Tensor | None = None
    dead: Tensor | None = None
    if kind == "sigmoid":
        saturated = ((2 * y32 - 1).abs() >= saturation).float().mean()
    elif kind == "tanh":
        saturated = (y32.abs() >= saturation).float().mean()
    elif kind == "relu":
        per_unit = y32.reshape(y32.shape[0], -1) if y32.dim() > 1 else y32.reshape(-1, 1)
        dead = (per_unit == 0).all(dim=0).float().mean()
    extra = [t for t in (saturated, dead) if t is not None]
    values = torch.cat([stats, torch.stack(extra)]) if extra else stats
    out = values.cpu().tolist()
    result: dict[str, float | None] = {"mean": out[0], "std": out[1]}
    for q, v in zip(quantiles, out[2 : 2 + len(quantiles)], strict=True):
        result[f"p{round(q * 100)}"] = v
    rest = out[2 + len(quantiles) :]
    result["saturated"] = rest.pop(0) if saturated is not None else None
    result["dead"] = rest.pop(0) if dead is not None else None
    return result


# --------------------------------------------------------------------------------------------------
# Jacobian spectra
# --------------------------------------------------------------------------------------------------
class JacobianSpectrum(NamedTuple):
    """Singular values of per-sample Jacobians.

    ``values``: ``(N, r)``, each row sorted in descending order: every singular value (``r = min(d_in,
    d_out)``) when ``exact``, else the ``r = rank`` largest, estimated. ``rms``: ``(N,)``, the root mean
    square of *all* ``min(d_in, d_out)`` singular values, ``sqrt(‖J‖_F² / min(d_in, d_out))``: exact when
    ``exact``, else a Hutchinson estimate from the same random probes (``E‖Jω‖² = ‖J‖_F²``).
    """

    values: Tensor
    rms: Tensor
    exact: bool


class _Linearized:
    """``fn`` linearized at ``copies`` stacked copies of the batch ``x``: ``J_n v`` and ``J_n^T u`` for
    ``copies`` probes of every sample ``n`` at once, through reverse-mode autograd alone.

    The probes ride in the batch dimension (``fn`` treats samples independently), so one call of ``fn``
    and one backward pass apply every probe. ``J v`` is the derivative of the linear map ``u -> J^T u``
    (a second backward pass through the first one's graph), which needs double backward but no
    forward-mode AD: forward mode would script torch's forward-mode decompositions on its first use in a
    process (most of a second on a CPU) and fails on custom autograd functions that define no ``jvp``.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, copies: int) -> None:
        self.copies, self.n = copies, x.shape[0]
        self.x = x.repeat(copies, *([1] * (x.dim() - 1))).requires_grad_()  # (copies * N, ...), probe-major
        with torch.enable_grad():
            self.out = fn(self.x)
        self._u: Tensor | None = None
        self._jt_u: Tensor | None = None

    def _grad(
        self, output: Tensor, inputs: Tensor, grad_output: Tensor, create_graph: bool = False
    ) -> Tensor:
        if not output.requires_grad:  # fn (or J^T u) does not depend on its argument: a zero map
            return torch.zeros_like(inputs)
        (grad,) = torch.autograd.grad(
            output, inputs, grad_output, retain_graph=True, create_graph=create_graph, materialize_grads=True
        )
        return grad

    def t(self, us: Tensor) -> Tensor:
        """``(copies, N, d_out) -> (copies, N, d_in)``: ``J_n^T u`` for every probe and sample."""
        return self._grad(self.out, self.x, us.reshape(self.out.shape)).reshape(self.copies, self.n, -1)

    def __call__(self, vs: Tensor) -> Tensor:
        """``(copies, N, d_in) -> (copies, N, d_out)``: ``J_n v`` for every probe and sample."""
        if self._u is None:
            with torch.enable_grad():
                self._u = torch.zeros_like(self.out, requires_grad=True)
                self._jt_u = self._grad(self.out, self.x, self._u, create_graph=True)
        assert self._jt_u is not None
        return self._grad(self._jt_u, self._u, vs.reshape(self.x.shape)).reshape(self.copies, self.n, -1)


def _exact_jacobians(fn: Callable[[Tensor], Tensor], x: Tensor, d_out: int) -> Tensor:
    """``(N, d_out, d_in)``: every sample's Jacobian, one basis probe per row (``J^T e_i``) or per column
    (``J e_j``), whichever needs fewer."""
    n, d_in = x.shape[0], x[0].numel()
    if d_out <= d_in:
        eye = torch.eye(d_out, dtype=x.dtype, device=x.device)[:, None, :].expand(d_out, n, d_out)
        return _Linearized(fn, x, d_out).t(eye).permute(1, 0, 2)
    eye = torch.eye(d_in, dtype=x.dtype, device=x.device)[:, None, :].expand(d_in, n, d_in)
    return _Linearized(fn, x, d_in)(eye).permute(1, 2, 0)


def _randomized_svdvals(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    d_out: int,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Halko, Martinsson & Tropp (2011), Algorithms 4.3/4.4 and 5.1, matrix-free and for every sample at
    once: ``fn`` is linearized at ``x`` and each sample's Jacobian is applied only to ``width`` probes at
    a time (see :class:`_Linearized`)."""
    d_in = x[0].numel()
    width = min(rank + oversample, d_in, d_out)
    omega = torch.randn(width, x.shape[0], d_in, generator=generator, dtype=torch.float64).to(x)
    jac = _Linearized(fn, x, width)

    def basis(y: Tensor) -> Tensor:  # (width, N, d) -> (width, N, d) orthonormal per sample
        return torch.linalg.qr(y.permute(1, 2, 0)).Q.permute(2, 0, 1)

    y = jac(omega)
    frob_sq = y.pow(2).sum(dim=(0, 2)) / width  # Hutchinson: E ||J w||^2 = ||J||_F^2, w ~ N(0, I)
    q = basis(y)
    for _ in range(power_iters):
        q = basis(jac(basis(jac.t(q))))
    b_t = jac.t(q)  # (width, N, d_in): rows of Q_n^T J_n
    sv = torch.linalg.svdvals(b_t.permute(1, 0, 2))[:, : min(rank, width)]
    return sv, frob_sq


def jacobian_singular_values(
    fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    method: Literal["auto", "exact", "randomized"] = "auto",
    max_exact_dim: int = 256,
    rank: int = 16,
    oversample: int = 8,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
) -> JacobianSpectrum:
    """Singular values of each sample's Jacobian ``∂fn(x)_n/∂x_n``.

    ``fn`` maps a batch to a batch and treats samples independently (a layer in eval mode: sample ``n``'s
    output depends on sample ``n``'s input only); each sample's Jacobian is ``(d_out, d_in)`` with
    ``d_in = x[n].numel()``. ``method="exact"`` builds every sample's Jacobian from ``min(d_in, d_out)``
    basis probes and takes :func:`torch.linalg.svdvals` (cost ``O(d_out·d_in·min)`` a sample);
    ``"randomized"`` estimates the ``rank`` largest singular values by randomized SVD with ``power_iters``
    power iterations, applying the Jacobians only to ``rank + oversample`` probes a sample
    (``2·power_iters + 2`` passes; memory ``O((rank + oversample)·N·d)``). Both stack the probes into the
    batch dimension of ``fn`` and use reverse-mode autograd alone (``J v`` by double backward), so ``fn``
    must support double backward (ReLU, max-pooling and torch's norm layers do) but needs no forward-mode
    (``jvp``) support. ``"auto"`` is exact when
    ``max(d_in, d_out) <= max_exact_dim``. ``rms`` covers *all* singular values either way (exact, or a
    Hutchinson estimate from the first probes). Computed in float32 (float64 inputs stay float64).

    Example:
        >>> A = torch.randn(30, 5) @ torch.randn(5, 40)  # rank 5: the estimate is exact up to rounding
        >>> x = torch.randn(2, 40)
        >>> exact = jacobian_singular_values(lambda v: v @ A.T, x, method="exact").values
        >>> est = jacobian_singular_values(lambda v: v @ A.T, x, method="randomized", rank=5).values
        >>> exact.shape, est.shape, torch.allclose(exact[:, :5], est, rtol=1e-3)
        (torch.Size([2, 30]), torch.Size([2, 5]), True)
    """
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(
            f"jacobian_singular_values: inputs must have a non-empty batch dimension, got {inputs.shape}"
        )
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(
            f"jacobian_singular_values: method must be 'auto', 'exact' or 'randomized', got {method!r}"
        )
    x = inputs.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    d_in = x[0].numel()
    with torch.no_grad():
        d_out = fn(x[:1]).numel()
    exact = method == "exact" or (method == "auto" and max(d_in, d_out) <= max_exact_dim)
    r = min(d_in, d_out)
    if exact:
        values = torch.linalg.svdvals(_exact_jacobians(fn, x, d_out))
        frob_sq = values.pow(2).sum(dim=1)
    else:
        values, frob_sq = _randomized_svdvals(fn, x, d_out, rank, oversample, power_iters, generator)
    return JacobianSpectrum(values.detach(), (frob_sq / r).sqrt().detach(), exact)


def sv_histogram(values: Tensor) -> list[int]:
    """Counts of ``values`` in the bins of :data:`SV_HISTOGRAM_EDGES` (values outside go to the end bins).

    Example:
        >>> h = sv_histogram(torch.tensor([1.0, 1.0, 1e-9]))
        >>> sum(h), h[0], h[120]
        (3, 1, 2)
    """
    edges = torch.tensor(SV_HISTOGRAM_EDGES, dtype=torch.float64)
    v = values.detach().double().cpu().flatten().clamp(edges[0], edges[-1])
    idx = (torch.bucketize(v, edges, right=True) - 1).clamp(0, len(edges) - 2)
    return torch.bincount(idx, minlength=len(edges) - 1).tolist()


# --------------------------------------------------------------------------------------------------
# Santurkar et al. (2018): internal covariate shift and the loss landscape
# --------------------------------------------------------------------------------------------------
def _grads(
    loss_of: LossOf, params: Mapping[str, Tensor], names: Sequence[str]
) -> tuple[Tensor, list[Tensor]]:
    leaves = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
    with torch.enable_grad():
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    out = [
        torch.zeros_like(leaves[n]) if g is None else g.detach() for n, g in zip(names, grads, strict=True)
    ]
    return loss.detach(), out


def internal_covariate_shift(
    loss_of: LossOf,
    params: Mapping[str, Tensor],
    layers: Sequence[Sequence[str]],
    lr: float | Mapping[str, float],
) -> list[tuple[float, float]]:
    """Santurkar et al. (2018), section 2.2: for each layer, ``(‖G - G'‖₂, cos(G, G'))``.

    ``G`` is the gradient of ``loss_of(params)`` w.r.t. the layer's parameters (the names in ``layers[i]``);
    ``G'`` the same gradient after every parameter that comes *before* the layer's first one in ``params``'
    order (the earlier layers) took a plain SGD step ``p ← p - lr·∂L/∂p`` on the same loss. ``loss_of`` must be
    deterministic (replay the same batch and random state); ``lr`` is one rate or one per parameter name.
    The first layer has no earlier layers: its ``G' = G`` gives ``(0.0, 1.0)`` without a pass.

    Example:
        >>> w = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
        >>> loss = lambda p: (p["a"] * p["b"] - 1) ** 2
        >>> [(round(l2, 3), round(c, 3)) for l2, c in internal_covariate_shift(loss, w, [["a"], ["b"]], 0.1)]
        [(0.0, 1.0), (1.76, 1.0)]
    """
    order = list(params)
    if not layers:
        return []
    _, g_all = _grads(loss_of, params, order)
    grad = dict(zip(order, g_all, strict=True))
    rates = {n: float(lr[n]) if isinstance(lr, Mapping) else float(lr) for n in order}
    out: list[tuple[float, float]] = []
    for names in layers:
        first = min(order.index(n) for n in names)
        g = torch.cat([grad[n].flatten() for n in names])
        if first == 0:
            out.append((0.0, 1.0) if g.norm() > 0 else (0.0, float("nan")))
            continue
        stepped = {
            n: (p.detach() - rates[n] * grad[n]) if i < first else p
            for i, (n, p) in enumerate(params.items())
        }
        _, g_new = _grads(loss_of, stepped, list(names))
        out.append(gradient_change(g, torch.cat([t.flatten() for t in g_new])))
    return out


class LandscapeResult(NamedTuple):
    """Santurkar et al.'s measures along ``g = ∇L(w)``, one entry per step size ``η``.

    ``loss``: ``L(w)``; ``grad_norm``: ``‖g‖``; ``losses``: ``L(w - ηg)``; ``grad_diffs``:
    ``‖∇L(w - ηg) - ∇L(w)‖``; ``beta``: ``max_η grad_diffs / ‖ηg‖`` (the effective β-smoothness);
    ``loss_range`` / ``grad_range``: ``max - min`` of ``losses`` / ``grad_diffs`` over the step sizes.
    """

    step_sizes: list[float]
    loss: float
    grad_norm: float
    losses: list[float]
    grad_diffs: list[float]
    loss_range: float
    grad_range: float
    beta: float


def loss_landscape(
    loss_of: LossOf, params: Mapping[str, Tensor], step_sizes: Sequence[float]
) -> LandscapeResult:
    """Santurkar et al. (2018), section 3.1, Figure 4: the loss and gradient along the gradient direction.

    ``loss_of(params)`` is the loss on one batch as a function of the parameters (deterministic: replay the
    same batch and random state); one forward and backward per step size plus one at ``w``.

    Example:
        >>> r = loss_landscape(lambda p: (p["w"] ** 2).sum(), {"w": torch.tensor([1.0])}, [0.1, 0.25])
        >>> [round(v, 4) for v in r.losses], round(r.beta, 4)
        ([0.64, 0.25], 2.0)
    """
    if not step_sizes:
        raise ValueError("loss_landscape: step_sizes must not be empty")
    names = list(params)
    loss0, g = _grads(loss_of, params, names)
    gflat = torch.cat([t.flatten().double() for t in g])
    gnorm = float(gflat.norm())
    losses, diffs, ratios = [], [], []
    for eta in step_sizes:
        moved = {n: p.detach() - eta * gi for (n, p), gi in zip(params.items(), g, strict=True)}
        loss_e, g_e = _grads(loss_of, moved, names)
        diff = float((torch.cat([t.flatten().double() for t in g_e]) - gflat).norm())
        losses.append(float(loss_e))
        diffs.append(diff)
        ratios.append(diff / (eta * gnorm) if eta * gnorm > 0 else math.nan)
    return LandscapeResult(
        step_sizes=[float(s) for s in step_sizes],
        loss=float(loss0),
        grad_norm=gnorm,
        losses=losses,
        grad_diffs=diffs,
        loss_range=max(losses) - min(losses),
        grad_range=max(diffs) - min(diffs),
        beta=max((r for r in ratios if not math.isnan(r)), default=math.nan),
    )


# --------------------------------------------------------------------------------------------------
# train/eval drift of BatchNorm
# --------------------------------------------------------------------------------------------------
class TrainEvalDrift(NamedTuple):
    """What :func:`train_eval_drift` measures on one batch.

    Attributes:
        distance: ``{layer name: (C,) tensor}``, per channel, the 2-Wasserstein distance between the
            Gaussians of the batch statistics and of the running statistics, in units of the running
            standard deviation: ``sqrt((μ_B − μ)² + (σ_B − σ)²) / σ`` with ``σ_B = sqrt(σ²_B + ε)`` and
            ``σ = sqrt(running_var + ε)``. 0 when the batch looks like the population; a mean off by one
            running standard deviation gives 1.
        output_gap: ``‖f_train(x) − f_eval(x)‖ / ‖f_eval(x)‖`` over the batch (Frobenius norms).
        disagreement: for ``(N, K)`` outputs with ``K > 1``, the fraction of samples whose argmax differs
            between the two modes; else ``None``.
    """

    distance: dict[str, Tensor]
    output_gap: float
    disagreement: float | None

    def summary(self) -> dict[str, dict[str, float]]:
        """``{layer: {"mean", "max"}}`` of :attr:`distance` over the channels."""
        return {name: {"mean": float(d.mean()), "max": float(d.max())} for name, d in self.distance.items()}


def train_eval_drift(model: nn.Module, inputs: Tensor | tuple[Any, ...]) -> TrainEvalDrift:
    """Measure, on one batch, how BatchNorm's training and inference behaviours differ in ``model``.

    Two passes over ``inputs`` (a tensor, or a tuple of positional arguments) under ``torch.no_grad()``:
    one in eval mode, and one with every BatchNorm-family layer that has running statistics in training
    mode and everything else in eval mode (dropout off, so the gap is BatchNorm's alone; each kind does
    what it does in training: batch statistics, Batch Renormalization's correction, noisy BatchNorm's
    noise). The batch statistics of each such layer are taken from its input in the training pass and
    compared with its running statistics (see :class:`TrainEvalDrift`). Nothing is left changed: the
    running statistics and every other buffer, the training flags, torch's random state and the
    generators that modules own are restored.

    Args:
        model: any module with BatchNorm layers (torch's, timm's, normzoo's).
        inputs: the batch the model is called with (more than one sample).

    Returns:
        A :class:`TrainEvalDrift`.

    Raises:
        TypeError: the model does not return a tensor.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> drift = train_eval_drift(net, torch.randn(32, 4) * 3 + 2)  # far from the initial (0, 1)
        >>> drift.summary()["1"]["mean"] > 1.0, drift.output_gap > 0.1
        (True, True)
        >>> net[1].running_mean.abs().sum().item()  # left as it was
        0.0
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if is_batch_norm(m) and isinstance(getattr(m, "running_mean", None), Tensor)
    ]
    distance: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[..., None]:
        def hook(module: Any, hook_args: tuple[Any, ...]) -> None:
            if not module.training or name in distance:
                return
            x = hook_args[0].detach().float()
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            eps = float(module.eps)
            sigma = (module.running_var.float() + eps).sqrt()
            sigma_b = (var + eps).sqrt()
            distance[name] = (
                (mean - module.running_mean.float()) ** 2 + (sigma_b - sigma) ** 2
            ).sqrt() / sigma

        return hook

    buffers = [(b, b.clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    generators = [
        g for m in model.modules() if isinstance(g := getattr(m, "generator", None), torch.Generator)
    ]
    states = [g.get_state() for g in generators]
    handles = [m.register_forward_pre_hook(capture(name)) for name, m in layers]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    try:
        devices = list(range(torch.cuda.device_count())) if cuda else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            eval_out = model(*args)
            for _, m in layers:
                m.train()
            train_out = model(*args)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for m, flag in flags:
            m.training = flag
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
    if not isinstance(eval_out, Tensor) or not isinstance(train_out, Tensor):
        raise TypeError(
            f"train_eval_drift: expected the model to return a tensor, got {type(eval_out).__name__}; "
            "pass a module (or a lambda wrapped in one) whose output is the prediction tensor"
        )
    eval_f, train_f = eval_out.detach().double(), train_out.detach().double()
    gap = float((train_f - eval_f).norm() / eval_f.norm().clamp_min(1e-12))
    disagreement = None
    if eval_f.dim() == 2 and eval_f.shape[1] > 1:
        disagreement = float((train_f.argmax(1) != eval_f.argmax(1)).double().mean())
    return TrainEvalDrift(distance, gap, disagreement)
