"""BatchNorm's statistics in a Lightning run: see the train/eval drift, fix it with precise statistics,
and keep a skipped mixed-precision step out of them.

Trains the seed study's MLP with BatchNorm on scikit-learn's digits with tiny batches (8 by default, where
running averages are noisy and lag the weights), three ways from the same seed: with the running averages
as they are, with ``PreciseBN`` (Algorithm 2 statistics before each validation and at the end), and with
``PreciseBN`` plus ``SkippedStepGuard`` under float16 mixed precision on the CPU with a poisoned step (one
batch's loss is made infinite, so AMP's GradScaler skips that step). ``TrainEvalDriftMonitor`` watches the
first run and writes its figure. A minute or two on two CPU cores::

    pip install "normzoo[study]"       # torch, Lightning, scikit-learn
    python examples/bn_statistics.py --out runs/bn_statistics
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from normzoo.lightning import ClassificationModule, DigitsDataModule
from normzoo.lightning.callbacks import PreciseBN, SkippedStepGuard, TrainEvalDriftMonitor


class Poisoned(ClassificationModule):
    """One step's loss is infinite: its gradients overflow and AMP skips it."""

    poisoned_step = 7

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == self.poisoned_step else loss


def run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size, flatten=True, seed=args.seed)
    cls = Poisoned if variant == "amp" else ClassificationModule
    module = cls("mlp", data.num_classes, norm="batchnorm", model_kwargs={"in_features": data.num_features})
    callbacks: list[L.Callback] = []
    plugins: list[Any] = []
    drift = TrainEvalDriftMonitor(figure_dir=args.out, gap_threshold=0.2)
    if variant == "running":
        callbacks.append(drift)
    else:
        callbacks.append(PreciseBN(num_batches=100))
    guard = SkippedStepGuard()
    if variant == "amp":
        callbacks.append(guard)
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=plugins,
    )
    trainer.fit(module, data)
    val_acc = float(trainer.callback_metrics["val/acc"])  # the last validation's; test() replaces the metrics
    (test,) = trainer.test(module, data, verbose=False)
    result = {"val_acc": val_acc, "test_acc": test["test/acc"]}
    if variant == "running" and drift.history:
        result["gap"] = drift.history[-1]["output_gap"]
    if variant == "amp":
        result["skipped"] = guard.skipped_steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bn_statistics"))
    args = parser.parse_args()
    print(f"MLP with BatchNorm on the digits, batches of {args.batch_size}, {args.epochs} epochs")
    for variant, label in (
        ("running", "running averages"),
        ("precise", "PreciseBN"),
        ("amp", "PreciseBN + SkippedStepGuard, fp16 AMP"),
    ):
        r = run(variant, args)
        extra = ""
        if "gap" in r:
            extra = f"  train/eval output gap at the end {r['gap']:.1%} (figure: {args.out / 'drift.png'})"
        if "skipped" in r:
            extra = f"  steps skipped by AMP and undone in the BN statistics: {r['skipped']}"
        print(f"{label:<40} val acc {r['val_acc']:.3f}  test acc {r['test_acc']:.3f}{extra}")


if __name__ == "__main__":
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    main()
