"""Train the seed study's CNN with and without BatchNorm in Lightning, and print the test accuracy.

The data is scikit-learn's bundled digits (no download), with the seed recipe: global feature
standardization from the training split, a seeded 10 % validation split, SGD with Nesterov momentum 0.9,
lr 0.01 halved after 5 epochs without improvement. Each variant starts from the same seed. A few epochs
take well under a minute on two CPU cores::

    pip install "normzoo[study]"       # torch, Lightning, scikit-learn
    python examples/train_lightning.py
    python examples/train_lightning.py --activation sigmoid --init xavier   # vanilla stalls, BN trains
    python examples/train_lightning.py --model mlp --norms none batchnorm renorm noisy
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch

from normzoo.lightning import ClassificationModule, DigitsDataModule
from normzoo.lightning.callbacks import EpochTimer


def run(norm: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant; return its validation and test accuracy and seconds per epoch."""
    L.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size, flatten=args.model == "mlp", seed=args.seed)
    size = {"in_features": data.num_features} if args.model == "mlp" else {"in_channels": data.in_channels}
    module = ClassificationModule(
        args.model,
        data.num_classes,
        norm=norm,
        model_kwargs={**size, "activation": args.activation, "init": args.init},
        lr=args.lr,
    )
    clock = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, data)
    val_acc = float(trainer.callback_metrics["val/acc"])  # the last epoch's; test() replaces the metrics
    (test,) = trainer.test(module, data, verbose=False)
    return {
        "val_acc": val_acc,
        "test_acc": test["test/acc"],
        "epoch_s": clock.summary()["epoch_mean_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument(
        "--norms", nargs="+", default=["none", "batchnorm"], help="none, batchnorm, renorm, noisy, torch"
    )
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--init", default="kaiming", choices=["kaiming", "xavier", "normal"])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")

    print(f"{args.model}, {args.activation} + {args.init}, lr {args.lr}, {args.epochs} epochs on the digits")
    print(f"{'variant':<10} {'val acc':>8} {'test acc':>9} {'s/epoch':>8}")
    for name in args.norms:
        result = run(None if name == "none" else name, args)
        label = "vanilla" if name == "none" else name
        print(f"{label:<10} {result['val_acc']:>8.3f} {result['test_acc']:>9.3f} {result['epoch_s']:>8.2f}")


if __name__ == "__main__":
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    main()
