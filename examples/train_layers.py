"""Train the same small CNN without normalization and with each normzoo layer family, and compare.

The data is scikit-learn's bundled ``load_digits`` (1,797 8x8 images of handwritten digits, no download).
Every variant starts from the same seed and sees the same batches in the same order. The run is
deterministic (one thread) and takes about 15 s of CPU time::

    pip install "normzoo[study]"      # torch + scikit-learn
    python examples/train_layers.py [--epochs 15] [--seed 0]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import normzoo as nz

try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit(f'This example needs scikit-learn: pip install "normzoo[study]" ({error})') from None

# (name, norm spec for nz.create_norm_layer or None for no normalization, extra layer arguments)
VARIANTS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("vanilla", None, {}),
    ("batchnorm", "batchnorm", {}),
    # The paper's schedule lasts 40k steps; this run has a few hundred, so compress it: plain BatchNorm for
    # 50 steps, then r_max -> 3 by step 300 and d_max -> 5 by step 200.
    ("renorm", "renorm", {"schedule": functools.partial(
        nz.functional.paper_renorm_schedule, warmup_steps=50, r_max_steps=300, d_max_steps=200)}),
    ("noisy", "noisy", {}),
]  # fmt: skip


def make_model(norm: str | None, **norm_kwargs: Any) -> nn.Sequential:
    """conv-norm-relu x 3, global average pooling, linear; convs keep a bias only without normalization."""

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm is None)
        layer = nn.Identity() if norm is None else nz.create_norm_layer(norm, c_out, ndim=2, **norm_kwargs)
        return [conv, layer, nn.ReLU()]

    return nn.Sequential(
        *block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()  # running statistics, no noise
    return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data: TensorDataset, epochs: int, seed: int) -> float:
    """SGD with Nesterov momentum; returns the mean training loss of the last epoch."""
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    losses: list[float] = []
    for _ in range(epochs):
        model.train()
        losses = []
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The model is tiny: one thread is faster than several, and the numbers do not depend on the core count.
    torch.set_num_threads(1)

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=args.seed, stratify=labels
    )
    train_data = TensorDataset(x_train, y_train)
    print(f"digits: {len(x_train)} train, {len(x_test)} test images; {args.epochs} epochs per variant\n")
    print(f"{'variant':<10} {'train loss':>10} {'train acc':>9} {'test acc':>8} {'seconds':>7}")
    for name, norm, kwargs in VARIANTS:
        torch.manual_seed(args.seed)  # initial weights and noise: the same seed for every variant
        model = make_model(norm, **kwargs)
        start = time.perf_counter()
        loss = train(model, train_data, args.epochs, args.seed)
        seconds = time.perf_counter() - start
        train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
        print(f"{name:<10} {loss:>10.4f} {train_acc:>9.3f} {test_acc:>8.3f} {seconds:>7.1f}")


if __name__ == "__main__":
    main()
