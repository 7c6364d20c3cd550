"""Worker code of the distributed tests: spawned processes, shared by the gloo (CPU) and NCCL (GPU) runs.

:func:`spawn` starts ``world_size`` processes with ``torch.multiprocessing.spawn``; they meet through a
file store in a temporary folder (no port to find, nothing to collide with a parallel run), each runs a
worker and saves what it returns to ``<out>/rank<r>.pt``, which :func:`spawn` loads and returns, one entry
per rank. An exception in a worker fails the spawning test with the worker's traceback.

The math cases (:data:`MATH_CASES`) check the defining property of synchronized statistics: W processes
holding shares of a batch compute what one process computes on the concatenated batch. Every rank draws
the same full batch (same seed), runs an unsynchronized reference layer on all of it and the synchronized
copy on its own rows, and reports the largest differences in outputs, input gradients, parameter
gradients (summed over ranks, as data parallelism sums them), running statistics and eval outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import normzoo as nz
from normzoo import functional as NF
from normzoo.surgery.sync import convert_sync

# --- process management --------------------------------------------------------------------------------


def _entry(
    rank: int,
    world_size: int,
    backend: str,
    store_file: str,
    out_dir: str,
    worker: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),  # a collective that hangs fails the test instead
    )
    try:
        result = worker(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def default_start_method(device_kind: str) -> str:
    """``fork`` for CPU runs where the platform has it (the children start in milliseconds instead of
    importing torch again), ``spawn`` otherwise: for CUDA, and once this process has initialized CUDA
    (a forked child cannot use it)."""
    cuda_initialized = torch.cuda.is_available() and torch.cuda.is_initialized()
    if device_kind == "cpu" and not cuda_initialized and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


def spawn(
    worker: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    backend: str = "gloo",
    start_method: str | None = None,
) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` processes; their results by rank.

    ``start_method`` defaults to :func:`default_start_method` for the backend; pass ``"spawn"`` for any run
    whose workers use CUDA."""
    if start_method is None:
        start_method = default_start_method("cuda" if backend == "nccl" else "cpu")
    with tempfile.TemporaryDirectory(prefix="normzoo-dist-") as tmp:
        store_file = os.path.join(tmp, "store")
        mp.start_processes(
            _entry,
            args=(world_size, backend, store_file, tmp, worker, args),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# --- the math cases ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer configuration and the per-rank batch sizes of the two processes."""

    name: str
    family: str  # "batchnorm" | "renorm" | "noisy" | "torch" | "timm"
    ndim: int  # 1 ((N, C) or (N, C, L)), 2 or 3
    sizes: tuple[int, int]
    dtype: torch.dtype = torch.float64
    length: int | None = None  # 1d only: L of an (N, C, L) input, None for (N, C)
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    channels_last: bool = False
    steps: int = 3


MATH_CASES: tuple[Case, ...] = (
    Case("batchnorm-1d", "batchnorm", 1, (4, 4)),
    Case("batchnorm-1d-L-uneven", "batchnorm", 1, (3, 5), length=4),
    Case("batchnorm-1d-one-sample-each", "batchnorm", 1, (1, 1)),
    Case("batchnorm-2d-uneven", "batchnorm", 2, (5, 2)),
    Case("batchnorm-2d-empty-rank", "batchnorm", 2, (0, 4)),
    Case("batchnorm-3d", "batchnorm", 3, (2, 3)),
    Case(
        "batchnorm-2d-float32-channels-last", "batchnorm", 2, (6, 3), dtype=torch.float32, channels_last=True
    ),
    Case("batchnorm-2d-cumulative-no-affine", "batchnorm", 2, (3, 4), momentum=None, affine=False),
    Case("batchnorm-2d-no-running-stats", "batchnorm", 2, (3, 4), track_running_stats=False),
    Case("renorm-1d", "renorm", 1, (4, 4)),
    Case("renorm-2d-uneven", "renorm", 2, (5, 2)),
    Case("renorm-3d", "renorm", 3, (2, 3)),
    Case("renorm-2d-float32", "renorm", 2, (4, 4), dtype=torch.float32),
    Case("noisy-1d", "noisy", 1, (4, 4), length=3),
    Case("noisy-2d-uneven", "noisy", 2, (5, 2)),
    Case("noisy-3d", "noisy", 3, (2, 3)),
    Case("torch-batchnorm2d-uneven", "torch", 2, (5, 2)),
    Case("torch-batchnorm1d", "torch", 1, (3, 3)),
    Case("timm-batchnormact2d", "timm", 2, (3, 4)),
)

#: Largest accepted difference per dtype (statistics through a different, equally exact path).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}

_RENORM_BOUNDS = (1.5, 0.5)  # r_max, d_max: the batch statistics are chosen far outside, so both clip


def _spatial(case: Case) -> tuple[int, ...]:
    if case.ndim == 1:
        return () if case.length is None else (case.length,)
    return (3, 4) if case.ndim == 2 else (2, 3, 2)


def _make_layer(case: Case, channels: int) -> nn.Module:
    kwargs: dict[str, Any] = {"dtype": case.dtype}
    if case.family == "renorm":
        r_max, d_max = _RENORM_BOUNDS
        return nz.get_norm_layer("renorm", case.ndim)(
            channels,
            momentum=case.momentum,
            affine=case.affine,
            r_max=r_max,
            d_max=d_max,
            schedule=None,
            **kwargs,
        )
    if case.family == "timm":
        from timm.layers.norm_act import BatchNormAct2d

        return BatchNormAct2d(channels, act_layer=nn.ReLU, **kwargs)
    common = {
        "momentum": case.momentum,
        "affine": case.affine,
        "track_running_stats": case.track_running_stats,
    }
    if case.family == "noisy":  # no noise: the normalization alone is compared
        return nz.get_norm_layer("noisy", case.ndim)(
            channels, mean_range=0.0, std_range=(0.0, 0.0), **common, **kwargs
        )
    return nz.get_norm_layer(case.family, case.ndim)(channels, **common, **kwargs)


def _max_diff(a: Tensor | None, b: Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _renorm_clips(layer: nn.Module, x: Tensor) -> bool:
    """Whether both r and d hit their bounds on some channel for this batch (clipping is active)."""
    mean, var = NF.batch_norm_stats(x)
    r, d = NF.renorm_correction(
        mean, var, layer.running_mean, layer.running_var, *_RENORM_BOUNDS, eps=layer.eps
    )
    r_max, d_max = _RENORM_BOUNDS
    return bool(((r - r_max).abs() < 1e-6).any() and ((d.abs() - d_max).abs() < 1e-6).any())


def run_case(
    case: Case, rank: int, world_size: int, device: torch.device, converter: str = "normzoo"
) -> dict[str, Any]:
    """The synchronized layer on this rank's rows against the reference on the whole batch.

    ``converter`` is ``"normzoo"`` (:func:`normzoo.convert_sync`) or ``"torch"``
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which keeps normzoo layers' kind once normzoo is imported).
    """
    channels = 3
    gen = torch.Generator().manual_seed(1234)
    reference = _make_layer(case, channels).to(device)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 1.0)
        if getattr(reference, "running_mean", None) is not None and case.family == "renorm":
            reference.running_mean.fill_(-4.0)  # far below the batch mean (3): d clips at +d_max
            reference.running_var.fill_(0.05)  # far below the batch variance (4): r clips at r_max
    if converter == "torch":
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    else:
        synced = convert_sync(reference)  # a deep copy, synchronized over the default group
    sizes = case.sizes
    offset, total = sum(sizes[:rank]), sum(sizes)
    rows = slice(offset, offset + sizes[rank])
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    diffs: dict[str, float] = {}
    clipped: list[bool] = []

    def note(key: str, value: float) -> None:
        diffs[key] = max(diffs.get(key, 0.0), value)

    for step in range(case.steps):
        full = (
            torch.randn(total, channels, *_spatial(case), generator=gen, dtype=case.dtype) * 2 + 3 + step
        ).to(device)
        grad = torch.randn(full.shape, generator=gen, dtype=case.dtype).to(device)
        if case.channels_last:
            full, grad = full.to(memory_format=memory_format), grad.to(memory_format=memory_format)
        if case.family == "renorm":
            clipped.append(_renorm_clips(reference, full))
        x_ref = full.clone().requires_grad_(True)
        y_ref = reference(x_ref)
        (y_ref * grad).sum().backward()
        x_loc = full[rows].clone().requires_grad_(True)
        y_loc = synced(x_loc)
        (y_loc * grad[rows]).sum().backward()
        note("output", _max_diff(y_loc, y_ref[rows]))
        note("input_grad", _max_diff(x_loc.grad, x_ref.grad[rows] if x_ref.grad is not None else None))
        for (name, p_ref), (_, p_loc) in zip(
            reference.named_parameters(), synced.named_parameters(), strict=True
        ):
            g_loc = p_loc.grad.clone() if p_loc.grad is not None else torch.zeros_like(p_loc)
            dist.all_reduce(g_loc)  # data parallelism sums (then averages) the parameter gradients
            note(f"grad_{name}", _max_diff(g_loc, p_ref.grad))
            p_ref.grad = p_loc.grad = None
    for name, b_ref in reference.named_buffers():
        note(f"buffer_{name}", _max_diff(dict(synced.named_buffers())[name], b_ref))
    reference.eval()
    synced.eval()
    with torch.no_grad():
        probe = full[rows] if sizes[rank] else full[:1]
        note("eval_output", _max_diff(synced(probe), reference(probe)))
    kinds = (type(reference).__name__, type(synced).__name__)
    return {"diffs": diffs, "renorm_clipped": clipped, "kinds": kinds, "dtype": str(case.dtype)}


def math_worker(
    rank: int, world_size: int, cases: tuple[Case, ...], device_kind: str, converter: str = "normzoo"
) -> dict[str, Any]:
    """Run every case on this rank: on the CPU, or on GPU ``rank % device_count`` for ``device_kind="cuda"``."""
    if device_kind == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return {case.name: run_case(case, rank, world_size, device, converter) for case in cases}


def available_cases(device_kind: str = "cpu") -> tuple[Case, ...]:
    """The math cases this machine can run (timm's need timm)."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return tuple(c for c in MATH_CASES if c.family != "timm")
    return MATH_CASES


def check_math_results(results: list[dict[str, Any]], case: Case) -> None:
    """Assert the per-rank results of ``case`` (shared by the CPU and GPU tests)."""
    tol = TOLERANCE[case.dtype]
    for rank, by_case in enumerate(results):
        res = by_case[case.name]
        bad = {k: v for k, v in res["diffs"].items() if not v <= tol}
        assert not bad, f"{case.name} rank {rank}: differences above {tol}: {bad}"
        ref_kind, synced_kind = res["kinds"]
        expected = {"torch": "Synced" + ref_kind, "timm": "SyncedBatchNormAct2d"}.get(case.family, ref_kind)
        assert synced_kind == expected, f"{case.name}: converted {ref_kind} to {synced_kind}"
        if case.family == "renorm":
            assert all(res["renorm_clipped"]), f"{case.name}: clipping was not active at every step"
    expected_keys = {"output", "input_grad", "eval_output"}
    assert expected_keys <= set(results[0][case.name]["diffs"])


# --- process groups, stat sums and a DDP training run -----------------------------------------------------


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nz.BatchRenorm2d(4, r_max=1.5, d_max=0.5, schedule=None),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).double()


def ddp_training_reference(steps: int, batch: int, world_size: int) -> dict[str, Tensor]:
    """The model trained on whole batches in one process, without any synchronization."""
    model = _ddp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(batch * world_size, 3, 5, 5, generator=gen, dtype=torch.float64) + 2
        target = torch.randint(0, 2, (batch * world_size,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def misc_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Explicit process groups, :func:`all_reduce_stat_sums`, and DDP training with synchronized layers."""
    from torch.nn.parallel import DistributedDataParallel

    from normzoo.surgery.sync import all_reduce_stat_sums

    out: dict[str, Any] = {}
    singletons = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    everyone = dist.new_group(list(range(world_size)))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(4 + rank, 3, 2, 2, generator=gen, dtype=torch.float64)

    alone = nz.BatchNorm2d(3, process_group=singletons[rank], dtype=torch.float64)
    out["singleton_group_is_local"] = bool(
        torch.equal(alone(x), nn.functional.batch_norm(x, None, None, training=True))
    )
    explicit = nz.BatchNorm2d(3, process_group=everyone, dtype=torch.float64)
    default = nz.BatchNorm2d(3, sync=True, dtype=torch.float64)
    out["explicit_group_matches_default"] = _max_diff(explicit(x), default(x))
    out["running_mean"] = explicit.running_mean.clone()

    sums = [torch.full((3,), float(rank + 1)), torch.tensor(rank + 10)]
    all_reduce_stat_sums(sums)
    out["stat_sums"] = sums

    # DDP: even shares and a mean loss, so DDP's averaged gradients are the whole batch's gradients.
    steps, batch = 3, 4
    model = DistributedDataParallel(convert_sync(_ddp_model()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(batch * world_size, 3, 5, 5, generator=gen, dtype=torch.float64) + 2
        target = torch.randint(0, 2, (batch * world_size,), generator=gen)
        rows = slice(rank * batch, (rank + 1) * batch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), target[rows]).backward()
        optimizer.step()
    out["ddp_state"] = {k: v.clone() for k, v in model.module.state_dict().items()}
    out["ddp_kinds"] = [type(m).__name__ for m in model.module]

    # recompute_bn_stats under DDP: each rank collects sums on its own batches, one all-reduce combines them.
    from normzoo.surgery.stats import apply_bn_stat_sums, collect_bn_stat_sums

    net = _population_model()
    sums = collect_bn_stat_sums(net, population_batches(rank, world_size))
    all_reduce_stat_sums(sums)
    apply_bn_stat_sums(net, sums)
    out["population_state"] = {k: v.clone() for k, v in net.state_dict().items()}
    return out


def _population_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nz.BatchRenorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).double()


def population_batches(rank: int | None, world_size: int) -> list[Tensor]:
    """Batches of uneven sizes; rank ``r`` gets every ``world_size``-th of them, ``None`` gets them all."""
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randn(3 + i, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + i for i in range(6)]
    return batches if rank is None else batches[rank::world_size]


def population_reference(world_size: int) -> dict[str, Tensor]:
    """``recompute_bn_stats`` in one process over every rank's batches."""
    from normzoo.surgery.stats import recompute_bn_stats

    net = recompute_bn_stats(_population_model(), population_batches(None, world_size))
    return {k: v.clone() for k, v in net.state_dict().items()}
