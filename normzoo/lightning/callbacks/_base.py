"""What normzoo's diagnostics callbacks share.

- :class:`DiagnosticCallback`: the sampling schedule (every N optimizer steps), logging through
  ``pl_module.log`` under one prefix, the in-memory :attr:`~DiagnosticCallback.history`, resumable state,
  and figures written on rank zero to a folder and to the loggers (TensorBoard ``add_image``).
- :class:`LayerMonitor`: adds the selection of the layers a monitor looks at, with short display names.
- :class:`ProbingMonitor`: adds the replay of a training batch through :func:`torch.func.functional_call`
  on copies of the parameters and buffers, with the random state replayed and restored, so a monitor can
  evaluate the loss at other weights without touching the model, its BN statistics or the optimizer.

Logged names: ``<name>/<metric>`` for the few aggregates every monitor always logs, and
``<name>/<metric>/<layer>`` per layer only with ``log_per_layer=True``. Values are logged with
``on_step=True`` from rank zero; Lightning writes step values to the loggers every ``log_every_n_steps``
optimizer steps, so ``every_n_steps`` should be a multiple of it (the callbacks warn otherwise). Every
sampled value is kept in :attr:`~DiagnosticCallback.history` in any case.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ...diagnostics import activation_kind
from ...layers import is_batch_norm

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DiagnosticCallback",
    "LayerMonitor",
    "LayerSpec",
    "LossFn",
    "ProbingMonitor",
    "default_loss",
    "find_blocks",
    "select_layers",
    "short_names",
]

#: How a monitor's ``layers`` argument picks modules: ``None`` (the monitor's default), glob patterns
#: matched against a module's dotted name or any dotted suffix of it (``"conv*"`` matches
#: ``model.conv1``), module classes, or a predicate ``(name, module) -> bool``.
LayerSpec: TypeAlias = (
    str
    | Sequence[str]
    | type[nn.Module]
    | tuple[type[nn.Module], ...]
    | Callable[[str, nn.Module], bool]
    | None
)
#: ``loss_fn(module, batch) -> scalar loss`` for the monitors that replay a batch.
LossFn: TypeAlias = Callable[[nn.Module, Any], Tensor]
Record: TypeAlias = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# layer selection
# --------------------------------------------------------------------------------------------------
def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def select_layers(
    root: nn.Module,
    spec: LayerSpec,
    default: Callable[[str, nn.Module], bool],
    allowed: Callable[[str, nn.Module], bool] = lambda name, module: True,
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``root`` (not ``root`` itself) that ``spec`` picks, in registration
    order; ``default`` decides when ``spec`` is ``None``, ``allowed`` always.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [n for n, _ in select_layers(net, nn.Linear, lambda n, m: False)]
        ['0', '2']
        >>> [n for n, _ in select_layers(net, "1", lambda n, m: False)]
        ['1']
    """
    pick: Callable[[str, nn.Module], bool]
    if spec is None:
        pick = default
    elif isinstance(spec, str):
        pick = lambda name, module: _matches(name, [spec])  # noqa: E731
    elif isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(t, type) for t in spec)):
        classes = spec
        pick = lambda name, module: isinstance(module, classes)  # noqa: E731
    elif callable(spec):
        pick = spec
    else:
        patterns = [str(p) for p in spec]
        pick = lambda name, module: _matches(name, patterns)  # noqa: E731
    return [(n, m) for n, m in root.named_modules() if n and pick(n, m) and allowed(n, m)]


def short_names(names: Sequence[str]) -> list[str]:
    """``names`` without the dotted prefix they all share, as long as every name keeps one component.

    Example:
        >>> short_names(["model.conv1", "model.conv2"]), short_names(["model.conv1"])
        (['conv1', 'conv2'], ['conv1'])
    """
    if not names:
        return []
    split = [n.split(".") for n in names]
    common = 0
    while all(len(s) > common + 1 for s in split) and len({s[common] for s in split}) == 1:
        common += 1
    return [".".join(s[common:]) for s in split]


def finite_mean(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values, ``None`` when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def has_weight_matrix(name: str, module: nn.Module) -> bool:
    """Layers with a weight of two or more dimensions: linear, conv, embedding (not norms' scales)."""
    w = getattr(module, "weight", None)
    return isinstance(w, nn.Parameter) and w.dim() >= 2 and w.requires_grad


def has_weight(name: str, module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def layer_tensor(module: nn.Module, include_bias: bool, grad: bool = False) -> Tensor | None:
    """A layer's ``weight`` (flattened together with its ``bias`` when ``include_bias``), detached, or the
    gradient of the same with ``grad=True`` (``None`` while the weight has no gradient)."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    bias = getattr(module, "bias", None)
    w = weight.grad if grad else weight.detach()
    if w is None:
        return None
    b = (bias.grad if grad else bias.detach()) if include_bias and isinstance(bias, Tensor) else None
    return torch.cat([w.flatten(), b.flatten()]) if b is not None else w


def _contains_activation(module: nn.Module) -> bool:
    return any(activation_kind(m) is not None for m in module.modules())


def find_blocks(root: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """Split the outermost :class:`~torch.nn.Sequential` of ``root`` into blocks that end at an activation.

    Each block maps one activation's output to the next one's (``conv -> norm -> act``, with any pooling
    or flattening in between), which is the "layer" whose input-output Jacobian dynamical isometry talks
    about; trailing modules (the head) form a last block. Blocks are new ``Sequential`` views sharing the
    modules (nothing is copied or re-registered). Names are ``<first>-<last>`` child names (prefixed with
    the Sequential's name). Returns ``[]`` when ``root`` has no Sequential or no activation.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        >>> [name for name, _ in find_blocks(net)]
        ['0-2', '3']
    """
    seq_name, seq = next(
        ((n, m) for n, m in root.named_modules() if isinstance(m, nn.Sequential)), ("", None)
    )
    if seq is None or not _contains_activation(seq):
        return []
    prefix = f"{seq_name}." if seq_name else ""
    blocks: list[tuple[str, nn.Sequential]] = []
    current: list[tuple[str, nn.Module]] = []

    def close() -> None:
        if current and any(True for _, m in current for _ in m.parameters()):
            first, last = current[0][0], current[-1][0]
            name = first if first == last else f"{first}-{last}"
            blocks.append((prefix + name, nn.Sequential(*[m for _, m in current])))
            current.clear()

    for child_name, child in seq.named_children():
        current.append((child_name, child))
        if _contains_activation(child):
            close()
    close()
    return blocks


# --------------------------------------------------------------------------------------------------
# random state
# --------------------------------------------------------------------------------------------------
class RngReplay:
    """Snapshot of torch's CPU and CUDA random states and of the generators that modules own (e.g.
    :class:`~normzoo.NoisyBatchNorm2d`'s ``generator``): :meth:`reset` rewinds them to the snapshot, and
    leaving the ``with`` block restores them, so probes neither see different noise nor consume any."""

    def __init__(self, module: nn.Module) -> None:
        self._generators = [
            g for m in module.modules() if isinstance(g := getattr(m, "generator", None), torch.Generator)
        ]
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._states: tuple[Tensor, list[Tensor], list[Tensor]] | None = None

    def __enter__(self) -> RngReplay:
        self._states = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if self._cuda else [],
            [g.get_state() for g in self._generators],
        )
        return self

    def reset(self) -> None:
        assert self._states is not None, "RngReplay.reset outside its with-block"
        cpu, cuda, gens = self._states
        torch.set_rng_state(cpu)
        if self._cuda:
            torch.cuda.set_rng_state_all(cuda)
        for g, s in zip(self._generators, gens, strict=True):
            g.set_state(s)

    def __exit__(self, *exc: object) -> None:
        self.reset()
        self._states = None


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


def default_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss the probing monitors replay by default: ``batch`` is ``(x, y, ...)``, the logits are
    ``module(x)``, and the loss is ``module.loss(logits, y)`` when the module has such a method (as
    :class:`normzoo.lightning.ClassificationModule` does), else cross entropy."""
    x, y = batch[0], batch[1]
    logits = module(x)
    crit = getattr(module, "loss", None)
    loss: Tensor = crit(logits, y) if callable(crit) else F.cross_entropy(logits, y)
    return loss


class _LossModule(nn.Module):
    """``loss_fn(inner, batch)`` as a module, so :func:`torch.func.functional_call` can swap the inner
    module's parameters and buffers for the duration of one call of any loss function."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.inner, batch)


# --------------------------------------------------------------------------------------------------
# the callbacks' base classes
# --------------------------------------------------------------------------------------------------
class DiagnosticCallback(Callback):
    """Base of normzoo's diagnostics callbacks.

    Args:
        every_n_steps: sample every N optimizer steps (steps ``N-1, 2N-1, ...`` counted from 0, the ones on
            which Lightning writes step metrics when N is a multiple of ``log_every_n_steps``).
        name: prefix of the logged names and stem of the figure files.
        figure_dir: folder for the PNG figures; ``None``: ``<trainer.log_dir>/figures`` (or
            ``<default_root_dir>/figures`` without a logger).
        save_figures: write the figure at the end of training (``on_train_end``), to ``figure_dir`` and to
            every logger that can take an image (TensorBoard's ``add_image``, else a ``log_image`` method).
        figure_every_n_epochs: also write ``<name>_epoch<NNN>.png`` every N epochs.
        figure_dpi: resolution of the PNG files.
    """

    default_name = "diagnostic"

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        name: str | None = None,
        figure_dir: str | os.PathLike[str] | None = None,
        save_figures: bool = True,
        figure_every_n_epochs: int | None = None,
        figure_dpi: int = 90,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"{type(self).__name__}: every_n_steps must be a positive int, got {every_n_steps!r}"
            )
        if figure_every_n_epochs is not None and figure_every_n_epochs < 1:
            raise ValueError(
                f"{type(self).__name__}: figure_every_n_epochs must be a positive int or None, "
                f"got {figure_every_n_epochs!r}"
            )
        self.every_n_steps = every_n_steps
        self.name = name or self.default_name
        self.figure_dir = Path(figure_dir) if figure_dir is not None else None
        self.save_figures = save_figures
        self.figure_every_n_epochs = figure_every_n_epochs
        self.figure_dpi = figure_dpi
        #: One record (a dict of plain Python values) per sample, oldest first; saved in checkpoints.
        self.history: list[Record] = []
        self._armed_step = -1
        self._handles: list[RemovableHandle] = []

    # -- identity and state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # -- schedule ------------------------------------------------------------------------------------------
    def is_sample_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based, the number of steps done before it) is sampled."""
        return (step + 1) % self.every_n_steps == 0

    def _arm(self, trainer: pl.Trainer) -> bool:
        """True once per sampled optimizer step, on its first micro-batch (under gradient accumulation)."""
        step = trainer.global_step
        if step == self._armed_step or not self.is_sample_step(step):
            return False
        self._armed_step = step
        return True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        n = int(getattr(trainer, "log_every_n_steps", 0))
        if stage == "fit" and trainer.loggers and n > 0 and self.every_n_steps % n != 0:
            rank_zero_warn(
                f"{type(self).__name__}(every_n_steps={self.every_n_steps}) is not a multiple of the trainer's "
                f"log_every_n_steps={n}: Lightning writes step metrics to the loggers only every {n} steps, "
                "so some samples reach only the callback's history."
            )

    # -- logging -------------------------------------------------------------------------------------------
    def _record(self, trainer: pl.Trainer, step: int, **values: Any) -> Record:
        record: Record = {"step": int(step), "epoch": int(trainer.current_epoch), **values}
        self.history.append(record)
        return record

    def _log(
        self, pl_module: pl.LightningModule, metrics: Mapping[str, float | None], *, epoch: bool = False
    ) -> None:
        """Log ``<name>/<key>`` from rank zero (call it on rank zero only); ``None`` values are skipped."""
        for key, value in metrics.items():
            if value is None:
                continue
            pl_module.log(
                f"{self.name}/{key}",
                float(value),
                on_step=not epoch,
                on_epoch=epoch,
                rank_zero_only=True,
                batch_size=1,
            )

    # -- hooks lifetime ------------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # -- figures -------------------------------------------------------------------------------------------
    def make_figure(self) -> Figure | None:
        """This monitor's figure from :attr:`history` (``None`` while there is nothing to plot)."""
        return None

    def save_figure(self, path: str | os.PathLike[str]) -> Path | None:
        """Write :meth:`make_figure` as a PNG to ``path`` (folders created); the path, or ``None`` if empty."""
        from ..plotting import save_png

        fig = self.make_figure()
        if fig is None:
            return None
        return save_png(fig, path, dpi=self.figure_dpi)

    def _figure_folder(self, trainer: pl.Trainer) -> Path:
        if self.figure_dir is not None:
            return self.figure_dir
        return Path(trainer.log_dir or trainer.default_root_dir) / "figures"

    def _emit_figure(self, trainer: pl.Trainer, suffix: str = "") -> Path | None:
        """Rank zero: write the figure to the folder and to the loggers that take images."""
        if not trainer.is_global_zero:
            return None
        from ..plotting import figure_to_array, save_png

        fig = self.make_figure()
        if fig is None:
            return None
        path = save_png(fig, self._figure_folder(trainer) / f"{self.name}{suffix}.png", dpi=self.figure_dpi)
        tag = f"{self.name}/figure{suffix}"
        for logger in trainer.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            log_image: Any = getattr(logger, "log_image", None)
            if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
                image = figure_to_array(fig, dpi=self.figure_dpi)
                experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
            elif callable(log_image):  # e.g. WandbLogger
                log_image(key=tag, images=[str(path)], step=trainer.global_step)
        return path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.figure_every_n_epochs
        if self.save_figures and n is not None and (trainer.current_epoch + 1) % n == 0:
            self._emit_figure(trainer, suffix=f"_epoch{trainer.current_epoch:03d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_figures:
            self._emit_figure(trainer)


class LayerMonitor(DiagnosticCallback):
    """A :class:`DiagnosticCallback` that looks at selected layers of the LightningModule.

    Args:
        layers: which modules (a :data:`LayerSpec`); ``None``: the monitor's default.
        log_per_layer: also log ``<name>/<metric>/<layer>`` for every layer (off by default: many keys).
        **kwargs: :class:`DiagnosticCallback`'s arguments.
    """

    def __init__(self, *, layers: LayerSpec = None, log_per_layer: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers = layers
        self.log_per_layer = log_per_layer
        #: ``(display name, module)`` of the monitored layers, resolved in ``setup``.
        self.selected: list[tuple[str, nn.Module]] = []

    def default_layer(self, name: str, module: nn.Module) -> bool:
        """Which modules the monitor looks at when ``layers`` is ``None``."""
        return has_weight_matrix(name, module)

    def allowed_layer(self, name: str, module: nn.Module) -> bool:
        """What a module must be for this monitor to look at it at all."""
        return True

    def resolve_layers(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        picked = select_layers(pl_module, self.layers, self.default_layer, self.allowed_layer)
        return list(zip(short_names([n for n, _ in picked]), [m for _, m in picked], strict=True))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.selected = self.resolve_layers(pl_module)
            if not self.selected:
                rank_zero_warn(
                    f"{type(self).__name__}: no layer matches layers={self.layers!r}; it records nothing."
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.selected = []

    def _layer_metrics(
        self, per_layer: Mapping[str, Mapping[str, float | None]], keys: Sequence[str]
    ) -> dict[str, Any]:
        if not self.log_per_layer:
            return {}
        return {f"{k}/{layer}": v[k] for layer, v in per_layer.items() for k in keys if k in v}

    def series(self, key: str) -> tuple[list[int], dict[str, list[float]]]:
        """``(steps, {layer: values})`` of a per-layer quantity over :attr:`history` (``nan`` where absent)."""
        steps = [r["step"] for r in self.history]
        layers: dict[str, list[float]] = {}
        for r in self.history:
            for layer in r["layers"]:
                layers.setdefault(layer, [])
        for layer, values in layers.items():
            for r in self.history:
                v = r["layers"].get(layer, {}).get(key)
                values.append(float("nan") if v is None else float(v))
        return steps, layers


class ProbingMonitor(LayerMonitor):
    """A :class:`LayerMonitor` that re-evaluates the loss of the current training batch at other weights.

    The batch of a sampled step (its first micro-batch under accumulation) is kept in
    ``on_train_batch_start`` and replayed in ``on_before_optimizer_step`` (after the backward, before the
    step: the weights are those the batch's gradient was taken at) by :func:`torch.func.functional_call`
    on detached copies of the parameters and fresh copies of the buffers, in the module's current
    (training) mode, outside autocast (float32). Dropout and noisy-BN noise are replayed identically on
    every pass, and the random state is restored afterwards. The model, its ``.grad``, BN running
    statistics, the optimizer and the random state are left exactly as they were.

    Under DDP every rank replays its own batch (so a SyncBatchNorm's collectives match) and rank zero logs.

    Args:
        loss_fn: ``loss_fn(module, batch) -> loss``; default :func:`default_loss` (``module.loss`` or cross
            entropy of ``module(batch[0])`` against ``batch[1]``).
    """

    def __init__(self, *, loss_fn: LossFn | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_fn = loss_fn or default_loss
        self._batch: Any = None
        self._batch_step = -1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.selected and self._arm(trainer):
            self._batch, self._batch_step = batch, trainer.global_step

    def take_batch(self, trainer: pl.Trainer) -> Any:
        """The kept batch if this optimizer step is the sampled one (and forget it), else ``None``."""
        batch, self._batch = self._batch, None
        return batch if self._batch_step == trainer.global_step else None

    def trainable_parameters(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """``{name: parameter}`` of every trainable parameter, in registration (forward) order."""
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    @contextmanager
    def replay(self, pl_module: nn.Module, batch: Any) -> Iterator[Callable[[dict[str, Tensor]], Tensor]]:
        """A function ``loss_of(params)``: the loss of ``batch`` at ``params`` (full parameter names of
        ``pl_module``), each call with fresh buffers and the same random state; restored on exit."""
        wrapper = _LossModule(pl_module, self.loss_fn)
        buffers = {f"inner.{n}": b.detach().clone() for n, b in pl_module.named_buffers()}
        with RngReplay(pl_module) as rng:

            def loss_of(params: dict[str, Tensor]) -> Tensor:
                rng.reset()
                state = {f"inner.{n}": p for n, p in params.items()}
                state.update((n, b.clone()) for n, b in buffers.items())
                loss: Tensor = torch.func.functional_call(wrapper, state, (batch,), strict=False)
                return loss.float()

            yield loss_of

    def layer_parameter_names(self, pl_module: nn.Module) -> list[list[str]]:
        """Full names of each selected layer's trainable parameters."""
        ids = {id(p): n for n, p in pl_module.named_parameters() if p.requires_grad}
        return [[ids[id(p)] for p in m.parameters() if id(p) in ids] for _, m in self.selected]


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


def is_bn_without_stats(module: nn.Module) -> bool:
    return is_batch_norm(module) and getattr(module, "running_mean", None) is None
