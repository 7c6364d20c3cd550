"""Model surgery with normzoo on a small CNN: insert, train, re-estimate, swap, fuse, freeze and remove BatchNorm.

    python examples/surgery.py               # the walk-through (a few seconds on a CPU)
    python examples/surgery.py --benchmark   # eval time before/after fuse_bn on larger CNNs

The model mixes activation modules (in a Sequential) with activation calls in ``forward`` (``F.relu``),
which ``insert_bn`` reaches through torch.fx.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normzoo as nz
from normzoo.surgery import GraphForward


class SmallNet(nn.Module):
    """Two conv layers activated by F.relu in forward, a residual add, and an MLP head with nn.ReLU."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(x + self.conv2(x))
        return self.head(F.adaptive_avg_pool2d(x, 4))


def synthetic_batches(count: int, batch: int = 32, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Random images whose class shifts the mean of one colour channel: enough for a loss to go down."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        y = torch.randint(0, 10, (batch,), generator=generator)
        x = torch.randn(batch, 3, 16, 16, generator=generator)
        x[:, 0] += (y.float() - 4.5).view(-1, 1, 1) / 3
        batches.append((x, y))
    return batches


def walkthrough() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    print("== the model\n", model, sep="")

    bn_model = nz.insert_bn(model)
    print("\n== insert_bn(model)\n", bn_model, sep="")
    print("\nits forward, rewritten to call the new layers before F.relu:")
    forward = bn_model.forward
    assert isinstance(forward, GraphForward)
    print(forward.code(True).strip())

    optimizer = torch.optim.SGD(bn_model.parameters(), lr=0.05, momentum=0.9)
    data = synthetic_batches(20)
    bn_model.train()
    for step, (x, y) in enumerate(data):
        loss = F.cross_entropy(bn_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == len(data) - 1:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    nz.recompute_bn_stats(bn_model, data, num_batches=10)  # population statistics (Algorithm 2)
    print(
        "\n== recompute_bn_stats: running_var of norm_relu now",
        bn_model.get_buffer("norm_relu.norm.running_var")[:4],
    )

    x, _ = data[0]
    bn_model.eval()
    renorm = nz.replace_bn(bn_model, "renorm")
    print("\n== replace_bn(model, 'renorm'):", type(renorm.norm_relu.norm).__name__,
          "| eval outputs identical:", torch.equal(renorm(x), bn_model(x)))  # fmt: skip

    fused = nz.fuse_bn(bn_model)
    error = (fused(x) - bn_model(x)).abs().max().item()
    left = sum(nz.is_batch_norm(m) for m in fused.modules())
    print(
        f"\n== fuse_bn: max |difference| {error:.1e}; BatchNorm layers left: {left} (the one after the residual add)"
    )
    slow, fast = compare(bn_model, fused, x, repeats=10, rounds=3)
    print(f"eval forward of a batch of 32: {slow * 1e3:.2f} ms before, {fast * 1e3:.2f} ms after")

    finetune(bn_model, data)

    vanilla = nz.remove_bn(bn_model)
    print("\n== remove_bn(model): back to", [type(m).__name__ for m in vanilla.modules()][:6], "...")


def finetune(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> None:
    """Fine-tune with the BatchNorm statistics frozen: model.train() does not bring batch statistics back."""
    frozen = nz.freeze_bn(model, trainable_affine=True)
    statistics = frozen.get_buffer("norm_relu.norm.running_mean").clone()
    optimizer = torch.optim.SGD(frozen.parameters(), lr=0.01)
    for x, y in data[:5]:
        frozen.train()  # what every epoch starts with: harmless to the frozen layers
        loss = F.cross_entropy(frozen(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unchanged = torch.equal(frozen.get_buffer("norm_relu.norm.running_mean"), statistics)
    print(f"\n== freeze_bn: 5 fine-tuning steps in training mode; statistics unchanged: {unchanged}")
    back = nz.unfreeze_bn(frozen)
    print("unfreeze_bn: back to", type(back.norm_relu.norm).__name__, "with the fine-tuned weight and bias")


def eval_time(model: nn.Module, x: Tensor, repeats: int = 20) -> float:
    """Mean time of ``repeats`` eval forward passes, after a warm-up."""
    model.eval()
    sync: Callable[[], None] = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync()
    return (time.perf_counter() - start) / repeats


def compare(
    model: nn.Module, fused: nn.Module, x: Tensor, repeats: int, rounds: int = 7
) -> tuple[float, float]:
    """The best of ``rounds`` alternating timings of each model: alternating shares any background load."""
    before, after = [], []
    for _ in range(rounds):
        before.append(eval_time(model, x, repeats))
        after.append(eval_time(fused, x, repeats))
    return min(before), min(after)


def vgg_style() -> nn.Module:
    """Six 3x3 conv + BatchNorm + ReLU blocks: a CNN whose every BatchNorm folds into a convolution."""
    layers: list[nn.Module] = []
    for c_in, c_out in [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def benchmark() -> None:
    """Eval time of CNNs before and after fuse_bn, on this machine's CPU (and GPU if there is one)."""
    models: dict[str, Callable[[], nn.Module]] = {
        "SmallNet + insert_bn (16x16)": lambda: nz.insert_bn(SmallNet()),
        "VGG-style 6 conv+BN (32x32)": vgg_style,
    }
    sizes = {"SmallNet + insert_bn (16x16)": 16, "VGG-style 6 conv+BN (32x32)": 32}
    try:
        import timm

        for name in ("resnet18", "mobilenetv3_large_100"):
            models[f"timm {name} (224x224)"] = functools.partial(timm.create_model, name, num_classes=10)
            sizes[f"timm {name} (224x224)"] = 224
    except ImportError:
        print("(timm is not installed: its models are skipped)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| model | device | batch | eval ms before | eval ms after fuse_bn | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, build in models.items():
        torch.manual_seed(0)
        model = build()
        model.train()
        with torch.no_grad():  # non-trivial running statistics
            model(torch.randn(8, 3, sizes[name], sizes[name]))
        model.eval()
        fused = nz.fuse_bn(model)
        for device in devices:
            batch = 8 if device == "cpu" else 64
            x = torch.randn(batch, 3, sizes[name], sizes[name], device=device)
            model.to(device)
            fused.to(device)
            with torch.no_grad():
                assert torch.allclose(fused(x), model(x), atol=1e-3, rtol=1e-3)
            repeats = 3 if sizes[name] == 224 and device == "cpu" else 10
            before, after = compare(model, fused, x, repeats)
            print(
                f"| {name} | {device} | {batch} | {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--benchmark", action="store_true", help="time eval before/after fuse_bn on larger CNNs"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark() if args.benchmark else walkthrough()


if __name__ == "__main__":
    main()
