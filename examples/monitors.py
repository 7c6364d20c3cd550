"""Train the seed CNN without and with BatchNorm, all diagnostics monitors on, and save their figures.

Each variant (the seed CNN at half width: six 3x3 convolutions of 16-16-32-32-64-64 channels) trains on
scikit-learn's bundled 8x8 digits (no download) with the seed recipe (SGD + Nesterov, lr 0.01) and the seven
monitors of :mod:`normzoo.lightning.callbacks`, sampling more often than their
defaults so that a short run has curves to show. Every monitor writes its own figure to
``OUT/<variant>/figures/<name>.png``; the script then puts the two variants side by side with the plotting
functions of :mod:`normzoo.lightning.plotting` (``OUT/compare_*.png``), as the study does. About a minute
on two CPU cores::

    pip install "normzoo[study]"
    python examples/monitors.py --out runs/monitors
    python examples/monitors.py --activation sigmoid --init xavier   # vanilla's gradients vanish, BN's do not
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from normzoo.lightning import ClassificationModule, DigitsDataModule
from normzoo.lightning.callbacks import (
    ActivationMonitor,
    CovariateShiftMonitor,
    DiagnosticCallback,
    EpochTimer,
    GradientFlowMonitor,
    JacobianSpectrumMonitor,
    LossLandscapeMonitor,
    WeightNormMonitor,
)
from normzoo.lightning.plotting import (
    gradient_flow_chart,
    landscape_bands,
    new_figure,
    save_png,
    sv_histogram_panel,
)
from normzoo.models import build_cnn


def train(norm: str | None, args: argparse.Namespace) -> dict[str, DiagnosticCallback]:
    """Train one variant with every monitor; return the monitors by name (their histories filled)."""
    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=64, seed=args.seed)
    model = build_cnn(
        1,
        data.num_classes,
        channels=(16, 16, 32, 32, 64, 64),
        norm=norm,
        activation=args.activation,
        init=args.init,
    )
    module = ClassificationModule(model, data.num_classes, lr=args.lr)
    out = Path(args.out) / (norm or "vanilla")
    monitors: list[DiagnosticCallback] = [
        WeightNormMonitor(every_n_steps=4),
        GradientFlowMonitor(every_n_steps=4),
        ActivationMonitor(every_n_steps=4),
        JacobianSpectrumMonitor(every_n_steps=28, max_samples=4),
        CovariateShiftMonitor(every_n_steps=14),
        LossLandscapeMonitor(every_n_steps=7),
        EpochTimer(),
    ]
    for m in monitors:
        m.figure_dir = out / "figures"
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=monitors,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    acc = trainer.callback_metrics.get("val/acc")
    print(
        f"{norm or 'vanilla':10s} val acc {float(acc) if acc is not None else float('nan'):.3f}, "
        f"{time.perf_counter() - start:.0f} s, figures in {out / 'figures'}",
        flush=True,
    )
    return {m.name: m for m in monitors}


def compare(runs: dict[str, dict[str, Any]], out: Path) -> None:
    """Side-by-side figures of the variants from the monitors' histories."""
    labels = list(runs)
    fig, axes = new_figure(1, len(labels), size=(4.2, 3.2))
    for ax, label in zip(axes, labels, strict=True):
        last = runs[label]["gradient_flow"].history[-1]["layers"]
        gradient_flow_chart(
            list(last), [v["mean_abs"] for v in last.values()], [v["max_abs"] for v in last.values()],
            ax=ax, title=f"{label}: gradient flow",
        )  # fmt: skip
    save_png(fig, out / "compare_gradient_flow.png")

    fig, axes = new_figure(1, 2, size=(4.2, 3.2))
    loss_bands, grad_bands = {}, {}
    for label in labels:
        h = runs[label]["landscape"].history
        steps = [r["step"] for r in h]
        loss_bands[label] = (steps, [min(r["losses"]) for r in h], [max(r["losses"]) for r in h])
        grad_bands[label] = (steps, [min(r["grad_diffs"]) for r in h], [max(r["grad_diffs"]) for r in h])
    landscape_bands(loss_bands, ax=axes[0], ylabel="L(w − ηg)", title="loss landscape")
    landscape_bands(
        grad_bands, ax=axes[1], ylabel="‖∇L(w − ηg) − ∇L(w)‖", title="gradient predictiveness", log=True
    )
    save_png(fig, out / "compare_landscape.png")

    first_block = {
        label: next(iter(runs[label]["jacobian"].history[-1]["layers"].values())) for label in labels
    }
    fig, ax = new_figure(size=(4.6, 3.2))
    sv_histogram_panel(
        {k: v["hist"] for k, v in first_block.items()}, ax=ax, title="first block, end of training"
    )
    save_png(fig, out / "compare_jacobian.png")

    for label in labels:
        s = runs[label]["time"].summary()
        print(
            f"{label:10s} {s['epoch_mean_s']:.2f} s per epoch, {1000 * (s['step_mean_s'] or 0):.1f} ms per step"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/monitors")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--init", default="kaiming")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = {label: train(norm, args) for label, norm in (("vanilla", None), ("batchnorm", "batchnorm"))}
    compare(runs, Path(args.out))


if __name__ == "__main__":
    main()
