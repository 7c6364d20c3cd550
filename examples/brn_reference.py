"""An independent plain-torch reference for the study's Batch Renormalization experiments on MNIST-1D.

Nothing of normzoo is imported: BatchNorm is ``torch.nn.BatchNorm1d`` and Batch Renormalization is written
out below from Ioffe (2017), Algorithm 1, with the paper's schedule scaled to the length of the run (the same
scaling as ``normzoo.PaperSchedule(total_steps)``: the paper's breakpoints 5k, 25k and 40k read as fractions
of a 100k-step run, so the warm-up ends at 5 % of the run, d_max is reached at 25 % and r_max at 40 %). The network is the study's MLP (3 hidden layers of 100 ReLU units, Kaiming init, no bias before a
norm) trained with the study's recipe (SGD + Nesterov momentum 0.9, lr 0.01, cross entropy), and each variant
is evaluated with its running statistics, on MNIST-1D generated locally (4,000 training, 1,000 test signals of
length 40; never downloaded).

What it shows (Ioffe 2017, sections 4.2-4.3): BatchNorm is ahead of the unnormalized network at batch 64,
falls behind it at batch 4 and 2, and Batch Renormalization recovers most of that loss; with non-i.i.d.
batches (each drawn from two classes) BatchNorm's batch statistics differ systematically from the
population's and Batch Renormalization corrects them. Runs are deterministic (one thread)::

    pip install "normzoo[study]"          # torch and mnist1d
    python examples/brn_reference.py [--epochs 10] [--seeds 0,1] [--batch-sizes 64,4,2] [--non-iid]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAPER_ANCHORS = (5_000, 25_000, 40_000)  # warm-up ends, d_max reached, r_max reached (Ioffe 2017, section 5)


def mnist1d_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D built by its generator with its default arguments (5,000 signals, 80 % for training)."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    x, x_test = (torch.tensor(data[k], dtype=torch.float32) for k in ("x", "x_test"))
    y, y_test = (torch.tensor(data[k], dtype=torch.int64) for k in ("y", "y_test"))
    mean, std = x.mean(), x.std(unbiased=False)
    return (x - mean) / std, y, (x_test - mean) / std, y_test


def scaled_schedule(
    step: int, total_steps: int, r_max: float = 3.0, d_max: float = 5.0
) -> tuple[float, float]:
    """The paper's schedule read as fractions of a 100k-step run (5 %, 25 %, 40 %), scaled to ``total_steps``."""
    warm, d_end, r_end = (a * total_steps // 100_000 for a in PAPER_ANCHORS)
    r = 1 + (r_max - 1) * min(max((step - warm) / max(r_end - warm, 1e-9), 0.0), 1.0)
    d = d_max * min(max((step - warm) / max(d_end - warm, 1e-9), 0.0), 1.0)
    return r, d


class RefBatchRenorm(nn.Module):
    """Batch Renormalization for ``(N, C)`` inputs, written from Algorithm 1 (r and d are constants)."""

    def __init__(self, features: int, total_steps: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self.total_steps, self.momentum, self.eps, self.step = total_steps, momentum, eps, 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            x_hat = (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
            return self.weight * x_hat + self.bias
        mean, var = x.mean(0), x.var(0, unbiased=False)
        std = torch.sqrt(var + self.eps)
        r_max, d_max = scaled_schedule(self.step, self.total_steps)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (std / running_std).clamp(1 / r_max, r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-d_max, d_max)
            n = x.shape[0]
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        self.step += 1
        return self.weight * ((x - mean) / std * r + d) + self.bias


def mlp(norm: str, total_steps: int, momentum: float = 0.1) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 40
    for _ in range(3):
        layers.append(nn.Linear(width, 100, bias=norm == "vanilla"))
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(100, momentum=momentum))
        elif norm == "renorm":
            layers.append(RefBatchRenorm(100, total_steps, momentum=momentum))
        layers.append(nn.ReLU())
        width = 100
    layers.append(nn.Linear(width, 10))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def batches(y: Tensor, batch_size: int, non_iid: bool, gen: torch.Generator) -> Iterator[Tensor]:
    """Index batches of one epoch: a random permutation, or batches drawn from two classes each."""
    if not non_iid:
        yield from torch.randperm(len(y), generator=gen).split(batch_size)
        return
    pools = {
        c: y.eq(c).nonzero().flatten()[torch.randperm(int(y.eq(c).sum()), generator=gen)] for c in range(10)
    }
    cursor = dict.fromkeys(pools, 0)
    for _ in range(math.ceil(len(y) / batch_size)):
        pair = torch.randperm(10, generator=gen)[:2].tolist()
        half = [batch_size // 2, batch_size - batch_size // 2]
        parts = []
        for c, k in zip(pair, half, strict=True):
            if cursor[c] + k > len(pools[c]):
                pools[c] = pools[c][torch.randperm(len(pools[c]), generator=gen)]
                cursor[c] = 0
            parts.append(pools[c][cursor[c] : cursor[c] + k])
            cursor[c] += k
        yield torch.cat(parts)


def train(
    norm: str,
    batch_size: int,
    epochs: int,
    seed: int,
    data: tuple[Tensor, ...],
    non_iid: bool,
    momentum: float = 0.1,
) -> float:
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    total_steps = epochs * math.ceil(len(y) / batch_size)
    model = mlp(norm, total_steps, momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in batches(y, batch_size, non_iid, gen):
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch-sizes", default="64,4,2")
    parser.add_argument("--norms", default="vanilla,batchnorm,renorm")
    parser.add_argument("--non-iid", action="store_true", help="each batch drawn from two classes")
    parser.add_argument("--momentum", type=float, default=0.1, help="BN/BRN running-statistics momentum")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = mnist1d_arrays()
    seeds = [int(s) for s in args.seeds.split(",")]
    norms = args.norms.split(",")
    print(
        f"MNIST-1D {len(data[1])}/{len(data[3])}, MLP 3x100, {args.epochs} epochs, seeds {seeds}"
        f"{', non-i.i.d. batches (two classes each)' if args.non_iid else ''}"
    )
    print(f"{'batch':>5}  " + "  ".join(f"{n:>15}" for n in norms) + "   seconds")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        cells = []
        for norm in norms:
            accs = [train(norm, bs, args.epochs, s, data, args.non_iid, args.momentum) for s in seeds]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(accs):6.1f} ± {100 * sd:4.1f} %")
        print(f"{bs:>5}  " + "  ".join(f"{c:>15}" for c in cells) + f"   {time.perf_counter() - t0:7.0f}")


if __name__ == "__main__":
    main()
