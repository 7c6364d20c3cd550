"""PreciseBN: population statistics of every BatchNorm layer (Algorithm 2) before validation and at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader
from typing_extensions import override

from ...surgery import recompute_bn_stats
from ._args import positive_int

__all__ = ["PreciseBN"]


@contextmanager
def _untouched_randomness(loader: Iterable[Any]) -> Iterator[None]:
    """Iterating ``loader`` draws a shuffle order (and worker seeds) from torch's generator, or from the
    loader's and its sampler's own: put all of them back afterwards, so training sees the same numbers."""
    generators = [
        g
        for g in (
            getattr(loader, "generator", None),
            getattr(getattr(loader, "sampler", None), "generator", None),
        )
        if isinstance(g, torch.Generator)
    ]
    states = [g.get_state() for g in generators]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        try:
            yield
        finally:
            for g, s in zip(generators, states, strict=True):
                g.set_state(s)


class PreciseBN(Callback):
    """Recompute the running statistics of every BatchNorm layer as population statistics.

    Running averages lag behind the weights: they mix statistics of many past versions of the network.
    Ioffe & Szegedy's Algorithm 2 replaces them by the statistics of the current network over training
    batches (``E[x]`` the mean of the batch means, ``Var[x] = m/(m−1)·E[σ²_B]``), which is what
    :func:`normzoo.recompute_bn_stats` computes; this callback runs it on ``num_batches`` training batches
    before each validation of a fit (the validation, and a checkpoint taken after it, see the precise
    statistics) and at the end of training.

    Every BatchNorm-family layer with running statistics is covered: torch's, timm's and every normzoo
    kind (the statistics are the plain batch statistics of each layer's input, whatever the kind adds in
    training). Under DDP every rank reads its own shard of the training data and the count-weighted sums
    are all-reduced before they are applied, so every rank ends with the same statistics: those of the
    union of the batches. The model's training flags, its parameters and the random state (torch's and the
    data loader's generators) are left as they were.

    With Lightning's :class:`~lightning.pytorch.callbacks.StochasticWeightAveraging`, put PreciseBN after
    it in the callbacks list (it says so at the start of fit otherwise): SWA copies the averaged weights
    into the model in its own ``on_train_end``, and the statistics computed after it are those of the
    averaged weights, exactly (SWA's own BN pass, when it makes one, averages in training mode, dropout on).

    Args:
        num_batches: training batches per recomputation (default 200; ``None``: the whole loader).
        before_validation: recompute before each validation run of a fit (not the sanity check).
        at_train_end: recompute at the end of training (``on_train_end``, after the last validation).
        dataloader: the batches to use; default: the trainer's training dataloader. Needed when the fit
            has several training dataloaders.
        input_fn: ``batch -> input`` of the model, for batches that are not a tensor, ``(input, target,
            ...)`` or a dict of ``forward``'s arguments (see :func:`normzoo.recompute_bn_stats`).

    Example:
        >>> import lightning.pytorch as pl
        >>> callback = PreciseBN(num_batches=100)
        >>> trainer = pl.Trainer(callbacks=[callback], logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        num_batches: int | None = 200,
        before_validation: bool = True,
        at_train_end: bool = True,
        dataloader: Iterable[Any] | None = None,
        input_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        if num_batches is not None:
            positive_int("PreciseBN", "num_batches", num_batches)
        if not (before_validation or at_train_end):
            raise ValueError(
                "PreciseBN: expected before_validation or at_train_end to be True, got both False"
            )
        self.num_batches = num_batches
        self.before_validation = before_validation
        self.at_train_end = at_train_end
        self.dataloader = dataloader
        self.input_fn = input_fn
        #: The global steps at which the statistics were recomputed, oldest first.
        self.updates: list[int] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks: list[Callback] = list(getattr(trainer, "callbacks", []))
        mine = next(i for i, c in enumerate(callbacks) if c is self)
        if self.at_train_end and any(isinstance(c, StochasticWeightAveraging) for c in callbacks[mine:]):
            raise ValueError(
                "PreciseBN: expected to come after StochasticWeightAveraging in the callbacks list, got it "
                "before: its statistics would be those of the last weights, not of SWA's averaged ones; pass "
                "callbacks=[StochasticWeightAveraging(...), PreciseBN(...)]"
            )

    def _loader(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.dataloader is not None:
            return self.dataloader
        loader = trainer.train_dataloader
        if loader is None or (isinstance(loader, (Mapping, Sequence)) and not isinstance(loader, DataLoader)):
            raise ValueError(
                f"PreciseBN: expected one training dataloader, got {type(loader).__name__}; "
                "pass dataloader= the batches to recompute the statistics on"
            )
        return loader

    def recompute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recompute now (on every rank: the sums are all-reduced)."""
        loader = self._loader(trainer)
        with _untouched_randomness(loader):
            recompute_bn_stats(pl_module, loader, num_batches=self.num_batches, input_fn=self.input_fn)
        self.updates.append(trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before_validation and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.recompute(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            self.recompute(trainer, pl_module)
