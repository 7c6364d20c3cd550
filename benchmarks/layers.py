"""Forward+backward time and bytes saved for backward of normzoo's layers, against torch's BatchNorm2d.

Run from the repository root::

    python benchmarks/layers.py [--device cpu|cuda] [--shapes 64,64,32,32 256,256,14,14] [--repeats N]
                                [--warmup N] [--threads N] [--json PATH]

For every input shape, each layer below runs forward and backward on the *same* input tensor and the same
output gradient, in training mode:

========================================  ===============================================================
row                                       what it is
========================================  ===============================================================
torch BatchNorm2d                         ``torch.nn.BatchNorm2d``: the reference of every ratio
torch BatchNorm2d + Dropout(0.5)          ``nn.Sequential(nn.BatchNorm2d, nn.Dropout(0.5))``: the time
                                          reference of the noisy layer (its random numbers cost as much)
normzoo BatchNorm2d                       ``normzoo.BatchNorm2d``
normzoo BatchRenorm2d (r_max=3, d_max=5)  ``normzoo.BatchRenorm2d(schedule=None)``: constant bounds, the
                                          full r/d correction path runs at every step
normzoo BatchRenorm2d (paper, warm-up)    ``normzoo.BatchRenorm2d()``: the paper's schedule in its first 5k
                                          steps (r_max=1, d_max=0 as device tensors)
normzoo NoisyBatchNorm2d                  ``normzoo.NoisyBatchNorm2d()`` with its default noise
normzoo BatchNorm2d (skip_nonfinite)      ``normzoo.BatchNorm2d(skip_nonfinite=True)``: the guard against
                                          non-finite batch statistics, on finite input (its normal path)
normzoo BatchRenorm2d (r_max=3, d_max=5,  the same guard on Batch Renormalization's full correction path
skip_nonfinite)
naive BatchRenorm2d (autograd)            Batch Renormalization written with elementwise torch ops, as
                                          public implementations do (defined below): for comparison only
========================================  ===============================================================

**Time** is the wall time of ``y = layer(x); y.backward(grad)`` (with ``torch.cuda.synchronize()`` before
and after on a GPU). After ``--warmup`` untimed rounds, each of ``--repeats`` rounds runs every layer once,
in an order rotated by one at every round, so that the layers are measured side by side and machine noise
hits them alike. A layer's time is the median over rounds; its *time ratio* is the median over rounds of
its time divided by the reference's time *in the same round* (a paired ratio, more robust to drifting load
than a ratio of medians).

**Saved bytes** are what the autograd graph keeps for backward once the forward has returned: every tensor
packed through :func:`torch.autograd.graph.saved_tensors_hooks` whose graph node is still alive (nodes of
branches that nothing needs any more are freed at once and do not count), de-duplicated by storage (a view
and its base, or the same tensor saved twice, count once, at their storage's size), *excluding* the layer's
own parameters and buffers (they exist whether or not anything is saved). The input counts: torch's
BatchNorm saves it too.

normzoo's targets (issue 2; set for CPU, float32) are checked for each shape and printed PASS or MISS:
normzoo BatchNorm2d <= 1.05x time and <= 1.0x bytes; BatchRenorm2d <= 1.5x time and <= 1.25x bytes;
NoisyBatchNorm2d no slower than BatchNorm2d + Dropout and <= 1.25x BatchNorm2d's bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import normzoo as nz

__all__ = [
    "REFERENCE",
    "VARIANTS",
    "LayerResult",
    "NaiveBatchRenorm2d",
    "ShapeResult",
    "Target",
    "Variant",
    "main",
    "measure",
    "saved_bytes",
]

REFERENCE = "torch BatchNorm2d"
DROPOUT_REFERENCE = "torch BatchNorm2d + Dropout(0.5)"
DEFAULT_SHAPES = ((64, 64, 32, 32), (256, 256, 14, 14))


class NaiveBatchRenorm2d(nn.Module):
    """Batch Renormalization through autograd on elementwise ops, as most public implementations write it.

    Numerically it is the paper's transform (eps under the square roots, r and d stop-gradient, torch's
    running-statistics update); it is here only to show what normzoo's fused formulation saves.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        r_max: float = 3.0,
        d_max: float = 5.0,
    ) -> None:
        super().__init__()
        self.eps, self.momentum, self.r_max, self.d_max = eps, momentum, r_max, d_max
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_mean: Tensor
        self.running_var: Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1, 1, 1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        std = (var + self.eps).sqrt()
        with torch.no_grad():
            running_std = (self.running_var + self.eps).sqrt().view(shape)
            r = (std / running_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - self.running_mean.view(shape)) / running_std).clamp(-self.d_max, self.d_max)
            n = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean.flatten(), self.momentum)
            self.running_var.lerp_(var.flatten() * n / (n - 1), self.momentum)
        x_hat = (x - mean) / std * r + d
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


@dataclass(frozen=True)
class Target:
    """An upper bound on a layer's time ratio (to ``time_reference``) and bytes ratio (to torch's BN)."""

    max_time_ratio: float
    max_bytes_ratio: float
    time_reference: str = REFERENCE

    def describe(self) -> str:
        ref = "" if self.time_reference == REFERENCE else " of BN+Dropout"
        return f"time <= {self.max_time_ratio:.2f}x{ref}, bytes <= {self.max_bytes_ratio:.2f}x"


@dataclass(frozen=True)
class Variant:
    """A row of the benchmark: a name, a builder ``num_features -> module`` and an optional target."""

    name: str
    build: Callable[[int], nn.Module]
    target: Target | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant(REFERENCE, lambda c: nn.BatchNorm2d(c)),
    Variant(DROPOUT_REFERENCE, lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.Dropout(0.5))),
    Variant("normzoo BatchNorm2d", lambda c: nz.BatchNorm2d(c), Target(1.05, 1.0)),
    Variant(
        "normzoo BatchRenorm2d (r_max=3, d_max=5)",
        lambda c: nz.BatchRenorm2d(c, r_max=3.0, d_max=5.0, schedule=None),
        Target(1.5, 1.25),
    ),
    Variant("normzoo BatchRenorm2d (paper, warm-up)", lambda c: nz.BatchRenorm2d(c), Target(1.5, 1.25)),
    Variant(
        "normzoo NoisyBatchNorm2d", lambda c: nz.NoisyBatchNorm2d(c), Target(1.0, 1.25, DROPOUT_REFERENCE)
    ),
    Variant(
        "normzoo BatchNorm2d (skip_nonfinite)",
        lambda c: nz.BatchNorm2d(c, skip_nonfinite=True),
        Target(1.05, 1.0),
    ),
    Variant(
        "normzoo BatchRenorm2d (r_max=3, d_max=5, skip_nonfinite)",
        lambda c: nz.BatchRenorm2d(c, r_max=3.0, d_max=5.0, schedule=None, skip_nonfinite=True),
        Target(1.5, 1.25),
    ),
    Variant("naive BatchRenorm2d (autograd)", lambda c: NaiveBatchRenorm2d(c)),
)


@dataclass
class LayerResult:
    """One layer at one shape. Times in seconds; ratios to torch's BatchNorm2d unless a target says else."""

    name: str
    time_s: float
    time_ratio: float
    saved_bytes: int
    bytes_ratio: float
    times_s: list[float] = field(default_factory=list)
    target: str | None = None
    target_time_ratio: float | None = None
    passed: bool | None = None


@dataclass
class ShapeResult:
    """Every layer at one input shape."""

    shape: tuple[int, ...]
    device: str
    dtype: str
    repeats: int
    layers: list[LayerResult]

    def __getitem__(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


class _Saved:
    """What the pack hook hands to autograd: alive exactly as long as the graph node that saved it."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes that autograd keeps for backward after ``module(x)``, as the module docstring defines them.

    Example:
        >>> x = torch.randn(8, 4, 3, 3, requires_grad=True)
        >>> saved_bytes(nn.BatchNorm2d(4), x) == x.nbytes + 2 * 4 * 4  # input, batch mean and 1/std
        True
    """
    packed: list[weakref.ref[_Saved]] = []

    def pack(t: Tensor) -> _Saved:
        # Detached: a saved output holding its own grad_fn would make a reference cycle that keeps dead
        # branches alive until the garbage collector runs. Autograd restores the graph data on unpack.
        saved = _Saved(t.detach())
        packed.append(weakref.ref(saved))
        return saved

    def unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    own = {_storage_key(t) for t in (*module.parameters(), *module.buffers())}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = module(x)
    storages: dict[tuple[str, int], int] = {}
    for ref in packed:
        saved = ref()
        if saved is None:  # its graph node is gone: nothing keeps it for backward
            continue
        key = _storage_key(saved.tensor)
        if key not in own:
            storages[key] = saved.tensor.untyped_storage().nbytes()
    del y
    return sum(storages.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    module(x).backward(grad)


def _clear_grads(module: nn.Module, x: Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)


def measure(
    shape: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    warmup: int = 2,
    variants: Sequence[Variant] = VARIANTS,
    seed: int = 0,
) -> ShapeResult:
    """Time and saved bytes of every variant at one input shape, side by side (see the module docstring).

    The first variant must be the reference (torch's BatchNorm2d), and a target's time reference must be
    among ``variants``.

    Example:
        >>> result = measure((4, 3, 5, 5), repeats=2, warmup=1)
        >>> result[REFERENCE].time_ratio, result[REFERENCE].bytes_ratio
        (1.0, 1.0)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"expected repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not variants or variants[0].name != REFERENCE:
        raise ValueError(f"the first variant must be {REFERENCE!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randn(*shape, device=device, dtype=dtype).mul_(2.0).add_(0.5).requires_grad_()
    grad = torch.randn(*shape, device=device, dtype=dtype)
    modules = [v.build(shape[1]).to(device=device, dtype=dtype).train() for v in variants]
    # Bytes before timing, so that every layer is measured at the same (early) training step.
    nbytes = [saved_bytes(m, x) for m in modules]
    for _ in range(warmup):
        for m in modules:
            _clear_grads(m, x)
            _forward_backward(m, x, grad)
    times: list[list[float]] = [[] for _ in modules]
    order = list(range(len(modules)))
    for round_ in range(repeats):
        rotation = round_ % len(order)
        for i in order[rotation:] + order[:rotation]:
            _clear_grads(modules[i], x)
            _synchronize(device)
            start = time.perf_counter()
            _forward_backward(modules[i], x, grad)
            _synchronize(device)
            times[i].append(time.perf_counter() - start)

    def paired_ratio(i: int, ref: int) -> float:
        return statistics.median(a / b for a, b in zip(times[i], times[ref], strict=True))

    names = [v.name for v in variants]
    layers = []
    for i, v in enumerate(variants):
        result = LayerResult(
            name=v.name,
            time_s=statistics.median(times[i]),
            time_ratio=paired_ratio(i, 0),
            saved_bytes=nbytes[i],
            bytes_ratio=nbytes[i] / nbytes[0],
            times_s=times[i],
        )
        if v.target is not None:
            result.target = v.target.describe()
            result.target_time_ratio = paired_ratio(i, names.index(v.target.time_reference))
            result.passed = (
                result.target_time_ratio <= v.target.max_time_ratio
                and result.bytes_ratio <= v.target.max_bytes_ratio
            )
        layers.append(result)
    return ShapeResult(tuple(shape), str(device), str(dtype).removeprefix("torch."), repeats, layers)


def format_table(result: ShapeResult) -> str:
    """A fixed-width table of one shape's results."""
    header = f"{'layer':<42} {'time ms':>9} {'x BN':>6} {'saved MiB':>9} {'x BN':>6}  target"
    lines = [
        f"shape {tuple(result.shape)}, {result.device}, {result.dtype}, median of {result.repeats} rounds",
        header,
        "-" * (len(header) + 40),
    ]
    for r in result.layers:
        verdict = ""
        if r.target is not None:
            assert r.target_time_ratio is not None
            verdict = f"{'PASS' if r.passed else 'MISS'}  {r.target}"
            if r.target_time_ratio != r.time_ratio:
                verdict += f" (time is {r.target_time_ratio:.2f}x)"
        lines.append(
            f"{r.name:<42} {1e3 * r.time_s:>9.2f} {r.time_ratio:>6.2f} {r.saved_bytes / 2**20:>9.2f} "
            f"{r.bytes_ratio:>6.3f}  {verdict}"
        )
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W with positive sizes, got {text!r}")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--shapes", nargs="+", type=_parse_shape, default=list(DEFAULT_SHAPES), metavar="N,C,H,W"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per shape (default: 30 up to 8M values, else 15)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine: dict[str, Any] = {
        "torch": torch.__version__,
        "normzoo": nz.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(", ".join(f"{k} {v}" for k, v in machine.items()))
    results = []
    for shape in args.shapes:
        repeats = args.repeats or (30 if torch.Size(shape).numel() <= 8 * 2**20 else 15)
        result = measure(shape, device=device, repeats=repeats, warmup=args.warmup)
        results.append(result)
        print()
        print(format_table(result))
    if device.type != "cpu":
        print("\nthe targets were set for CPU: PASS/MISS on this device is informative only")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": [asdict(r) for r in results]}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
