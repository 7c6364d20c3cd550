"""Replaying a training batch: the loss at other weights, the same randomness on every pass.

:class:`BatchReplay` keeps the batch of a sampled step and evaluates its loss through
:func:`torch.func.functional_call` on copies of the parameters and buffers, so a probing monitor
(internal covariate shift, loss landscape) can move the weights without touching the model, its BN
statistics, its gradients, the optimizer or the random state. :func:`replayed_randomness` is the random
part on its own (built on :func:`torch.random.fork_rng`), :func:`eval_mode` the training flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BatchReplay",
    "LossFn",
    "Randomness",
    "default_loss",
    "eval_mode",
    "lr_per_parameter",
    "replayed_randomness",
    "trainable_parameters",
]

#: ``loss_fn(module, batch) -> scalar loss`` for the monitors that replay a batch.
LossFn: TypeAlias = Callable[[nn.Module, Any], Tensor]
#: Whether the passes of a replay draw the same random numbers or fresh ones (see :meth:`BatchReplay.loss_at`).
Randomness: TypeAlias = Literal["same", "fresh"]


def default_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss the probing monitors replay by default: ``batch`` is ``(x, y, ...)``, the logits are
    ``module(x)``, and the loss is ``module.loss(logits, y)`` when the module has such a method (as
    :class:`normzoo.lightning.ClassificationModule` does), else cross entropy."""
    x, y = batch[0], batch[1]
    logits = module(x)
    crit = getattr(module, "loss", None)
    loss: Tensor = crit(logits, y) if callable(crit) else F.cross_entropy(logits, y)
    return loss


def _fits_default_loss(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) >= 2


@contextmanager
def replayed_randomness(module: nn.Module) -> Iterator[Callable[[], None]]:
    """A function that rewinds torch's random state, and that of every ``generator`` a submodule owns
    (e.g. :class:`~normzoo.NoisyBatchNorm2d`'s), to where it was on entry; everything is restored on exit,
    so the block neither sees different noise on each pass nor consumes any."""
    generators = [
        g for m in module.modules() if isinstance(g := getattr(m, "generator", None), torch.Generator)
    ]
    owned = [g.get_state() for g in generators]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        gpu = torch.cuda.get_rng_state_all() if cuda else []

        def rewind() -> None:
            torch.set_rng_state(cpu)
            if cuda:
                torch.cuda.set_rng_state_all(gpu)
            for g, s in zip(generators, owned, strict=True):
                g.set_state(s)

        try:
            yield rewind
        finally:
            for g, s in zip(generators, owned, strict=True):
                g.set_state(s)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` for the block, then every submodule's ``training`` flag back as it was."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class _LossModule(nn.Module):
    """``loss_fn(inner, batch)`` as a module, so :func:`torch.func.functional_call` can swap the inner
    module's parameters and buffers for the duration of one call of any loss function."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.inner, batch)


class BatchReplay:
    """The training batch of a sampled step, kept until its optimizer step and replayed there.

    Args:
        loss_fn: ``loss_fn(module, batch) -> loss``; ``None``: :func:`default_loss`.
        owner: the monitor's class name, for messages.
    """

    def __init__(self, loss_fn: LossFn | None, *, owner: str) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"{owner}: expected loss_fn to be callable (module, batch) -> loss, got {loss_fn!r}"
            )
        self.loss_fn: LossFn = loss_fn or default_loss
        self.owner = owner
        self._batch: Any = None
        self._step = -1

    def keep(self, batch: Any, step: int) -> None:
        """Keep ``batch`` for optimizer step ``step``; a batch the default loss cannot read is an error."""
        if self.loss_fn is default_loss and not _fits_default_loss(batch):
            shape = (
                f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
            )
            raise TypeError(
                f"{self.owner}: expected a training batch (input, target, ...) for the default loss, got "
                f"{shape}; pass loss_fn=lambda module, batch: <the loss of batch> to replay this batch"
            )
        self._batch, self._step = batch, step

    def take(self, step: int) -> Any:
        """The kept batch if it belongs to optimizer step ``step`` (and forget it), else ``None``."""
        batch, self._batch = self._batch, None
        return batch if self._step == step else None

    @contextmanager
    def loss_at(
        self, module: nn.Module, batch: Any, *, randomness: Randomness = "same"
    ) -> Iterator[Callable[[dict[str, Tensor]], Tensor]]:
        """A function ``loss_of(params)``: the float32 loss of ``batch`` at ``params`` (full parameter
        names of ``module``), each call with fresh copies of the buffers. ``randomness="same"``: every call
        draws the same random numbers (dropout masks, noisy BN's noise); ``"fresh"``: the first call
        draws what a ``"same"`` call would, each later call new ones, as the next training steps would.
        Either way the random state is left as it was on entry."""
        if randomness not in ("same", "fresh"):
            raise ValueError(f"{self.owner}: expected randomness 'same' or 'fresh', got {randomness!r}")
        wrapper = _LossModule(module, self.loss_fn)
        buffers = {f"inner.{n}": b.detach().clone() for n, b in module.named_buffers()}
        calls = 0
        with replayed_randomness(module) as rewind:

            def loss_of(params: dict[str, Tensor]) -> Tensor:
                nonlocal calls
                if randomness == "same" or calls == 0:
                    rewind()
                calls += 1
                state = {f"inner.{n}": p for n, p in params.items()}
                state.update((n, b.clone()) for n, b in buffers.items())
                loss: Tensor = torch.func.functional_call(wrapper, state, (batch,), strict=False)
                return loss.float()

            yield loss_of


def trainable_parameters(module: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` of every trainable parameter, in registration (forward) order."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def lr_per_parameter(
    optimizers: Sequence[torch.optim.Optimizer], params: Mapping[str, Tensor]
) -> dict[str, float]:
    """The learning rate of each named parameter's param group (0 for parameters no optimizer holds)."""
    rate: dict[int, float] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                rate[id(p)] = float(group["lr"])
    return {n: rate.get(id(p), 0.0) for n, p in params.items()}
