"""JacobianSpectrumMonitor: singular values of each block's input-output Jacobian, per sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ...diagnostics import jacobian_singular_values, sv_histogram
from ...layers import is_batch_norm
from ._args import non_negative_int, positive_int
from ._base import DiagnosticCallback
from ._layers import (
    LayerSelector,
    LayerSpec,
    find_blocks,
    has_weight_matrix,
    is_bn_without_stats,
    short_names,
)
from ._replay import eval_mode
from ._schedule import SamplingSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["JacobianSpectrumMonitor"]


class JacobianSpectrumMonitor(DiagnosticCallback):
    """Singular values of ``∂h_out/∂h_in`` of each monitored block, for a few samples of the batch.

    Dynamical isometry (Saxe et al. 2014; Pennington et al. 2017): a deep network trains well when the
    singular values of its layers' input-output Jacobians stay near 1; BatchNorm pushes them there. By
    default the "layers" are the blocks of the model's outermost ``nn.Sequential`` that end at an
    activation (``conv -> norm -> act``: the map from one activation to the next, see
    :func:`~normzoo.lightning.callbacks.find_blocks`), else every layer with a weight matrix; with
    ``layers=`` each selected module is one block.

    On a sampled step (rank zero, the first micro-batch under accumulation) forward pre-hooks keep the
    first ``max_samples`` inputs of each block and the batch statistics of every BN layer inside it; in
    ``on_before_optimizer_step`` (same weights as the forward) each sample's Jacobian is taken through
    :func:`torch.func.functional_call` on detached float32 copies of the block's parameters and buffers,
    in eval mode (dropout off, no noise): exactly (basis probes + :func:`torch.linalg.svdvals`) when
    ``max(d_in, d_out) <= max_exact_dim``, else the ``rank`` largest singular values by randomized SVD
    (``power_iters`` power iterations, matrix-free, fixed seed), through reverse-mode autograd alone. See :func:`normzoo.diagnostics.jacobian_singular_values`. The cost per sample is
    bounded by ``max_samples`` and those budgets; the model and the random state are not touched.

    ``bn_stats="batch"`` (default) evaluates BN layers with the statistics of the training batch, as
    training does, treated as constants; ``"running"`` with their running statistics, as inference does.
    BN layers without running statistics (``track_running_stats=False``) normalize with the statistics of
    whatever they are given in eval mode (one probed sample, or the few probed), which is degenerate; the
    monitor warns.

    Sampled steps: the first, every ``every_n_steps``-th (steps ``N-1, 2N-1, ...``) and the last one the
    trainer expects, whatever the number of optimizers; ``every_n_steps=None`` (default) samples only
    the first and the last step (``N`` is the run's length, from
    ``trainer.estimated_stepping_batches``; 1000 when the length is unknown): one sample costs a few
    training steps.

    Logged (``<name>`` defaults to ``jacobian``): ``<name>/sv_max`` (the largest singular value over
    blocks, averaged over samples) and ``<name>/sv_rms_mean`` (the root-mean-square singular value
    ``sqrt(‖J‖_F² / min(d_in, d_out))``, averaged over samples and blocks: 1 for an isometry); with
    ``log_per_layer=True`` also ``<name>/sv_max/<block>`` and ``<name>/sv_rms/<block>``. Records:
    ``{"step", "epoch", "layers": {block: {"hist", "max", "min", "median", "mean", "rms", "exact",
    "n"}}}`` with ``hist`` the counts over :data:`~normzoo.diagnostics.SV_HISTOGRAM_EDGES` (the same bins
    for every run, so histograms can be compared); the last raw values are in :attr:`last_values`.

    Args:
        every_n_steps: sample every N optimizer steps (default: automatic, see above).
        layers: the blocks (default: see above).
        max_samples: samples of the batch per block (default 1: one input's spectrum, the cost of a sample grows
            with it).
        max_exact_dim: largest ``d_in``/``d_out`` for the exact method (default 256).
        rank: how many (of the largest) singular values the estimate gives (default 16); the histograms of
            estimated blocks show only those, while ``rms`` covers every singular value.
        power_iters: power iterations of the estimate (default 1).
        bn_stats: ``"batch"`` or ``"running"`` (see above).
        seed: seed of the estimate's random probes (offset by the step).
        log_per_layer: also log every block's values.
        **kwargs: ``name``, ``figure_dir``, ``save_figures``, ``figure_every_n_epochs``,
            ``figure_dpi``.
    """

    default_name = "jacobian"
    layer_noun = "block"
    schedule: SamplingSchedule
    selector: LayerSelector

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        layers: LayerSpec = None,
        max_samples: int = 1,
        max_exact_dim: int = 256,
        rank: int = 16,
        power_iters: int = 1,
        bn_stats: Literal["batch", "running"] = "batch",
        seed: int = 0,
        log_per_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if bn_stats not in ("batch", "running"):
            raise ValueError(f"{owner}: expected bn_stats to be 'batch' or 'running', got {bn_stats!r}")
        self.schedule = SamplingSchedule(every_n_steps, samples=1, fallback=1000, owner=owner)
        self.selector = LayerSelector(layers, default=has_weight_matrix, owner=owner)
        self.max_samples = positive_int(owner, "max_samples", max_samples)
        self.max_exact_dim = positive_int(owner, "max_exact_dim", max_exact_dim)
        self.rank = positive_int(owner, "rank", rank)
        self.power_iters = non_negative_int(owner, "power_iters", power_iters)
        self.bn_stats = bn_stats
        self.seed = int(seed)
        self.log_per_layer = log_per_layer
        self.selected: list[tuple[str, nn.Module]] = []
        #: ``{block: (samples, r) tensor}`` of the last sampled step's singular values (not checkpointed).
        self.last_values: dict[str, Tensor] = {}
        self._inputs: dict[str, Tensor] = {}
        self._stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._step = -1

    def resolve_layers(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The blocks of the outermost Sequential when ``layers`` is ``None`` and it has some, else the
        selected modules."""
        if self.selector.spec is None:
            blocks = find_blocks(pl_module)
            if blocks:
                return list(zip(short_names([n for n, _ in blocks]), [b for _, b in blocks], strict=True))
        return self.selector.resolve(pl_module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.schedule.check_logging(trainer)
        self.selected = self.resolve_layers(pl_module)
        if any(is_bn_without_stats(m) for _, b in self.selected for m in b.modules()):
            rank_zero_warn(
                "JacobianSpectrumMonitor: a monitored BN layer has no running statistics "
                "(track_running_stats=False); its Jacobian uses the statistics of the probed samples, not the batch's."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.selected, self._inputs, self._stats = [], {}, {}

    # -- capture -------------------------------------------------------------------------------------------
    @staticmethod
    def _entry(block: nn.Module) -> nn.Module:
        if isinstance(block, nn.Sequential) and len(block) > 0:
            return block[0]
        return block

    def _input_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in self._inputs and args and isinstance(args[0], Tensor):
                self._inputs[name] = args[0].detach()[: self.max_samples].clone()

        return hook

    def _bn_hook(self, module: nn.Module, args: Any) -> None:
        if module in self._stats or not args or not isinstance(args[0], Tensor):
            return
        x = args[0].detach().float()
        dims = [0, *range(2, x.dim())]
        self._stats[module] = (x.mean(dims), x.var(dims, unbiased=False))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not (self.selected and self.schedule.arm(trainer.global_step) and self.measures_here(trainer)):
            return
        self._inputs, self._stats, self._step = {}, {}, trainer.global_step
        for name, block in self.selected:
            self._handles.append(self._entry(block).register_forward_pre_hook(self._input_hook(name)))
            if self.bn_stats == "batch":
                for m in block.modules():
                    if is_batch_norm(m) and getattr(m, "running_mean", None) is not None:
                        self._handles.append(m.register_forward_pre_hook(self._bn_hook))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()  # the first micro-batch has been seen; its inputs wait for the optimizer step
        if trainer.global_step > self._step:  # that step is done (or was skipped): drop what it left
            self._inputs, self._stats = {}, {}

    # -- measure -------------------------------------------------------------------------------------------
    def _block_fn(self, block: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        state: dict[str, Tensor] = {n: p.detach().to(dtype) for n, p in block.named_parameters()}
        for n, b in block.named_buffers():
            state[n] = b.detach().to(dtype) if b.is_floating_point() else b.detach()
        if self.bn_stats == "batch":
            names = {m: n for n, m in block.named_modules()}
            for m, (mean, var) in self._stats.items():
                if m in names:
                    prefix = f"{names[m]}." if names[m] else ""
                    state[prefix + "running_mean"] = mean.to(dtype)
                    state[prefix + "running_var"] = var.to(dtype)

        def fn(x: Tensor) -> Tensor:
            out: Tensor = torch.func.functional_call(block, state, (x,))
            return out

        return fn

    def measure(self, step: int) -> dict[str, dict[str, Any]]:
        """The spectra of every block from the inputs kept on this step (empty if none were kept)."""
        layers: dict[str, dict[str, Any]] = {}
        self.last_values = {}
        for name, block in self.selected:
            x = self._inputs.get(name)
            if x is None:
                continue
            x = x.double() if x.dtype == torch.float64 else x.float()
            generator = torch.Generator().manual_seed(self.seed + step)
            with eval_mode(block):
                spec = jacobian_singular_values(
                    self._block_fn(block, x.dtype),
                    x,
                    max_exact_dim=self.max_exact_dim,
                    rank=self.rank,
                    power_iters=self.power_iters,
                    generator=generator,
                )
            values = spec.values
            self.last_values[name] = values.cpu()
            flat = values.flatten().double()
            summary = torch.stack(
                [
                    values[:, 0].double().mean(),
                    flat.min(),
                    flat.median(),
                    flat.mean(),
                    spec.rms.double().mean(),
                ]
            ).tolist()
            layers[name] = {
                "hist": sv_histogram(values),
                "max": summary[0],
                "min": summary[1],
                "median": summary[2],
                "mean": summary[3],
                "rms": summary[4],
                "exact": spec.exact,
                "n": int(values.shape[0]),
            }
        self._inputs, self._stats = {}, {}
        return layers

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not (trainer.is_global_zero and self._inputs and trainer.global_step == self._step):
            return
        self._remove_hooks()
        layers = self.measure(self._step)
        if not layers:
            return
        self._record(trainer, self._step, layers=layers)
        metrics: dict[str, Any] = {
            "sv_max": max(v["max"] for v in layers.values()),
            "sv_rms_mean": sum(v["rms"] for v in layers.values()) / len(layers),
        }
        if self.log_per_layer:
            for layer, v in layers.items():
                metrics[f"sv_max/{layer}"] = v["max"]
                metrics[f"sv_rms/{layer}"] = v["rms"]
        self._log(pl_module, metrics)

    @override
    def make_figure(self, max_curves: int = 5) -> Figure | None:
        """Histograms per block at up to ``max_curves`` sampled steps spread over training."""
        if not self.history:
            return None
        from ..plotting import jacobian_figure

        n = len(self.history)
        picks = sorted({round(i * (n - 1) / max(1, max_curves - 1)) for i in range(min(n, max_curves))})
        spectra: dict[str, dict[str, list[int]]] = {}
        for i in picks:
            record = self.history[i]
            for layer, v in record["layers"].items():
                spectra.setdefault(layer, {})[f"step {record['step']}"] = v["hist"]
        return jacobian_figure(spectra)
