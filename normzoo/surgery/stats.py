"""``recompute_bn_stats``: population statistics of every BatchNorm layer, Algorithm 2 of Ioffe & Szegedy.

The work is split in three steps so that a distributed run can combine processes in the middle:

1. :func:`collect_bn_stat_sums` runs the data through the model and returns, per layer, a
   :class:`BatchStatSums` of *additive* sums (counts, count-weighted means and variances);
2. sums from several sources combine by adding them (``a + b``, or an all-reduce with ``SUM`` of each tensor
   in :meth:`BatchStatSums.tensors`, in place);
3. :func:`apply_bn_stat_sums` turns the sums into running statistics.

:func:`recompute_bn_stats` is 1 then 3.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..layers import is_batch_norm
from ._common import check_model, first_tensor
from ._inputs import batch_input, call_args, move_to, run_forward
from ._kinds import after_norm
from ._modules import NormAct
from .sync import all_reduce_stat_sums

__all__ = ["BatchStatSums", "apply_bn_stat_sums", "collect_bn_stat_sums", "recompute_bn_stats"]


@dataclass
class BatchStatSums:
    """Per-channel sums of one layer's batch statistics; every field adds up across batches and processes.

    For batches ``b`` with ``n_b`` values per channel, batch mean ``μ_b`` and biased batch variance ``σ²_b``:

    Attributes:
        count: ``Σ n_b`` (float64, 0-dim).
        dof: ``Σ (n_b − 1)``, the degrees of freedom of the pooled variance (float64, 0-dim).
        mean_sum: ``Σ n_b·μ_b`` per channel (float64).
        var_sum: ``Σ n_b·σ²_b`` per channel (float64).
        batches: the number of batches (float64, 0-dim).
    """

    count: Tensor
    dof: Tensor
    mean_sum: Tensor
    var_sum: Tensor
    batches: Tensor

    @classmethod
    def zeros(cls, num_features: int, device: torch.device | None = None) -> BatchStatSums:
        """Empty sums for a layer of ``num_features`` channels."""

        def scalar() -> Tensor:
            return torch.zeros((), dtype=torch.float64, device=device)

        vector = torch.zeros(num_features, dtype=torch.float64, device=device)
        return cls(scalar(), scalar(), vector, vector.clone(), scalar())

    def add_batch(self, input: Tensor) -> None:
        """Add the statistics of one batch ``input`` of shape ``(N, C, *)``; an empty one adds nothing."""
        n = float(input.numel() // input.shape[1]) if input.shape[1] else 0.0
        if n == 0:  # N = 0 holds no values: its mean would be NaN
            return
        dims = [0, *range(2, input.dim())]
        values = input.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        var, mean = torch.var_mean(values, dim=dims, correction=0)
        self.count += n
        self.dof += n - 1.0
        self.mean_sum += n * mean.double()
        self.var_sum += n * var.double()
        self.batches += 1.0

    def tensors(self) -> list[Tensor]:
        """The tensors to sum across processes (``torch.distributed.all_reduce`` each, in place)."""
        return [self.count, self.dof, self.mean_sum, self.var_sum, self.batches]

    def __add__(self, other: BatchStatSums) -> BatchStatSums:
        return BatchStatSums(*(a + b for a, b in zip(self.tensors(), other.tensors(), strict=True)))

    def mean(self) -> Tensor:
        """``E[x] = Σ n_b μ_b / Σ n_b``: the mean of the batch means, weighted by batch size."""
        return self.mean_sum / self.count

    def var(self) -> Tensor:
        """``Var[x] = Σ n_b σ²_b / Σ (n_b − 1)``: ``m/(m−1)`` times the mean batch variance, pooled.

        With equal batch sizes ``m`` this is Algorithm 2's ``m/(m−1)·E_B[σ²_B]``; with unequal ones it is the
        pooled unbiased within-batch variance, each batch weighted by its degrees of freedom.
        """
        return self.var_sum / self.dof


def _tracked_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """The BatchNorm layers with running statistics; a lazy one that no batch has sized yet is left out."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if is_batch_norm(module)
        and isinstance(getattr(module, "running_mean", None), Tensor)
        and not is_lazy(module.running_mean)
    ]


def _unsized(model: nn.Module) -> bool:
    """Whether the model holds layers sized at their first forward: insert_bn's pending ones, torch's lazy ones."""
    lazy = any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers()))
    return lazy or any(isinstance(m, NormAct) and m.pending for m in model.modules())


def _progress(batches: Iterable[Any], total: int | None) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra: no bar
        return batches
    return tqdm(batches, total=total, desc="recompute_bn_stats", leave=False, disable=None)


def _batch_stats_forward(module: Any, sums: BatchStatSums) -> Any:
    """A forward that records the batch statistics and normalizes with them (Algorithm 1), updating nothing."""

    def forward(input: Tensor) -> Tensor:
        sums.add_batch(input)
        if input.numel() // max(input.shape[1], 1) > 1:
            output = F.batch_norm(input, None, None, module.weight, module.bias, True, 0.0, module.eps)
        else:  # one value per channel has no batch statistics: feed later layers with the running ones
            output = F.batch_norm(
                input,
                module.running_mean,
                module.running_var,
                module.weight,
                module.bias,
                False,
                0.0,
                module.eps,
            )
        return after_norm(module, output)  # timm's BatchNormAct2d: its drop and act

    return forward


def collect_bn_stat_sums(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    num_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
) -> dict[str, BatchStatSums]:
    """Run ``dataloader`` through ``model`` and sum the batch statistics of every tracked BatchNorm layer.

    The model runs in eval mode under ``torch.no_grad()`` (dropout off, nothing updated) except that each
    BatchNorm-family layer with running statistics normalizes with its batch statistics, as plain BatchNorm
    (no renorm correction, no noise). The model's flags and forwards are restored afterwards.

    Args and batches: as :func:`recompute_bn_stats`.

    Returns:
        ``{layer name: BatchStatSums}`` for every layer with running statistics (zeros where no batch
        reached it); the same keys in every process for the same model.
    """
    check_model(model, "recompute_bn_stats")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(
            f"recompute_bn_stats: expected num_batches to be a positive int or None, got {num_batches!r}"
        )
    reference = first_tensor(model)
    device = reference.device if reference is not None else None
    modes = {module: module.training for module in model.modules()}
    batches: Iterator[Any] = itertools.islice(dataloader, num_batches)
    input_of = input_fn if input_fn is not None else batch_input(model, "recompute_bn_stats")
    first: list[Any] = []
    if _unsized(model):  # size pending and lazy layers with the first batch, before hooking them
        first = list(itertools.islice(batches, 1))
        if first:
            run_forward(
                model, move_to(input_of(first[0]), device), "recompute_bn_stats", "the first batch's input"
            )
            modes = {module: module.training for module in model.modules()}
    layers = _tracked_layers(model)
    sums = {name: BatchStatSums.zeros(int(module.num_features), _device(module)) for name, module in layers}
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for name, module in layers:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = _batch_stats_forward(module, sums[name])
        model.eval()
        total = num_batches
        if total is None:
            try:
                total = len(dataloader)  # type: ignore[arg-type]
            except TypeError:
                total = None
        with torch.no_grad():
            for batch in _progress([*first, *batches] if first else batches, total):
                args, kwargs = call_args(move_to(input_of(batch), device))
                model(*args, **kwargs)
    finally:
        for module, forward in saved:
            if forward is None:
                del module.__dict__["forward"]
            else:
                module.forward = forward
        for module, mode in modes.items():
            module.training = mode
    return sums


def _device(module: nn.Module) -> torch.device | None:
    buf = getattr(module, "running_mean", None)
    return buf.device if isinstance(buf, Tensor) else None


def apply_bn_stat_sums(model: nn.Module, sums: Mapping[str, BatchStatSums]) -> None:
    """Set the running statistics of the layers named in ``sums`` from them.

    ``running_mean`` becomes :meth:`BatchStatSums.mean` and ``running_var`` :meth:`BatchStatSums.var`.
    ``num_batches_tracked`` counts training steps and is kept, except for layers with ``momentum=None``
    (a cumulative average over ``num_batches_tracked`` batches), where it becomes the number of batches
    pooled, so that later training averages on from the new estimate. Layers that no batch reached, or whose
    batches held one value per channel, keep their statistics (a warning names them).
    """
    untouched: list[str] = []
    for name, stat in sums.items():
        module: Any = model.get_submodule(name)
        if float(stat.dof) <= 0:
            untouched.append(name)
            continue
        with torch.no_grad():
            module.running_mean.copy_(stat.mean().to(module.running_mean.dtype))
            module.running_var.copy_(stat.var().to(module.running_var.dtype))
            if module.momentum is None and module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(int(stat.batches))
    if untouched:
        warnings.warn(
            "recompute_bn_stats: no usable batch reached these layers, which keep their statistics: "
            + ", ".join(untouched),
            UserWarning,
            stacklevel=3,
        )


def recompute_bn_stats(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    num_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
) -> nn.Module:
    """Replace the running statistics of every BatchNorm layer by population statistics (Algorithm 2).

    For each BatchNorm-family layer with running statistics (torch's, timm's, normzoo's, those of
    ``insert_bn``): ``E[x]`` is the mean of the batch means and ``Var[x]`` is ``m/(m−1)`` times the mean of
    the batch variances, ``m`` being the number of values per channel in a batch (batch size times spatial
    size); batches of different sizes are pooled by weighting each with its count (its degrees of freedom for
    the variance). The layers' inputs are those of the training network: during the pass every such layer
    normalizes with its batch statistics, while everything else runs in eval mode (dropout off). Parameters,
    other buffers and every module's training flag are left as they were; ``num_batches_tracked`` is kept
    (it counts training steps; with ``momentum=None`` it becomes the number of batches pooled). Under
    ``torch.distributed`` with several processes, the sums are all-reduced before they are applied, so every
    process gets the population statistics of the data seen by all of them. An empty batch (N = 0) adds
    nothing. Layers sized at their first forward (``insert_bn``'s pending ones, torch's ``LazyBatchNorm``) are
    sized with the first batch before the pass.

    What the model receives from each batch is ``input_fn(batch)``, called as every surgery function calls a
    model with an input: a tuple or list is unpacked into positional arguments, a dict into keyword
    arguments, anything else is the one argument. The default ``input_fn`` takes a tensor batch as it is,
    the first element of a tuple or list (``(x, y)`` gives ``x``) and, from a dict (or a dict first element),
    the entries that name parameters of ``forward`` (all of them if ``forward`` takes ``**kwargs``). Tensors
    are moved to the model's device. A progress bar is shown when tqdm is installed.

    Args:
        model: the model, modified in place.
        dataloader: an iterable of batches.
        num_batches: use at most this many batches (all by default).
        input_fn: ``batch -> input`` of the model, for batches the default does not read (see above).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module, or a batch cannot be fed to it.
        ValueError: ``num_batches`` is not a positive int.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> data = [torch.randn(8, 3) for _ in range(5)]
        >>> net = recompute_bn_stats(net, data)
        >>> hidden = torch.cat([net[0](x) for x in data]).detach()
        >>> torch.allclose(net[1].running_mean, hidden.mean(0), atol=1e-6)
        True
    """
    sums = collect_bn_stat_sums(model, dataloader, num_batches=num_batches, input_fn=input_fn)
    all_reduce_stat_sums(sums)  # under DDP every process ends with the statistics of all processes' data
    apply_bn_stat_sums(model, sums)
    return model
