"""The ``normzoo`` command: ``normzoo study [options]`` runs the study and writes its report.

Settings come from the preset (``--preset``, ``quick`` by default), then a config file (``--config``), then
the options given on the command line, each overriding the one before. ``--factors``, ``--models`` and
``--variants`` narrow the preset's grid; ``--preset full`` starts from the whole grid.

``--executor ray`` trains each run as a task of a Ray cluster (``pip install "normzoo[ray]"``): the same
command on a laptop (a local Ray instance) and on a cluster (``ray start``, ``--ray-address``).

Exit status: 0 when the study and its report are written, 1 when some runs failed (the others and the
report are written; a rerun retries the failed ones), 2 for a usage error (unknown name, bad value, missing
file or dataset, Ray not installed or not reachable), 130 when interrupted by Ctrl-C and 143 when stopped by
SIGTERM (the finished runs are kept: run the same command again to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import load_config_file, merge_config
from .grid import DATASETS, EXECUTORS, FACTORS, MODELS, PRESETS, VARIANTS, StudyConfig, build_plan

__all__ = ["build_parser", "main", "study_config_from_args"]

_EPILOG = """\
examples:
  normzoo study                                    # the quick preset on MNIST-1D (< 10 min, 2-core CPU)
  normzoo study --preset full --accelerator gpu --out runs/full
  normzoo study --factors baseline,activation:sigmoid,batch_size --variants vanilla,batchnorm,renorm
  normzoo study --dataset cifar10 --data-root ~/data --models cnn --seeds 0,1,2
  normzoo study --preset full --executor ray --accelerator gpu   # one Ray task per run (docs/study.md)
  normzoo study --config study.toml                # settings from a TOML/JSON file (see docs/study.md)
  normzoo study --list                             # the presets, factors, levels, variants, models, datasets
  normzoo study --report-only --out DIR            # rewrite the report from DIR/results.json
"""


def _csv(kind: str) -> Any:
    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}")
        return items

    return parse


def _int_csv(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv("integers")(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of integers, got {text!r}"
        ) from None


def _at_least(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value}")
        return value

    return parse


def _seed_csv(text: str) -> list[int]:
    seeds = _int_csv(text)
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return seeds


def _devices(text: str) -> int | str:
    if text.strip().lstrip("-").isdigit():
        return _at_least(1)(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``normzoo`` argument parser with its ``study`` subcommand."""
    from normzoo import __version__

    parser = argparse.ArgumentParser(
        prog="normzoo",
        description="normzoo: batch-normalization layers, surgery, Lightning diagnostics and the BN study.",
    )
    parser.add_argument("--version", action="version", version=f"normzoo {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands")
    sub.required = True
    p = sub.add_parser(
        "study",
        help="reproduce the classic BatchNorm findings and write a report",
        description="Train vanilla and normalized networks over the seed study's grid (each factor varied "
        "alone from the baseline recipe) and write results.json, report.md, report.html and figures. "
        "Finished runs are cached in OUT/runs/: a rerun skips them and an interrupted study resumes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: quick)")
    p.add_argument("--config", metavar="FILE", help="a TOML or JSON file of settings (see docs/study.md)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: normzoo-study)")
    p.add_argument(
        "--factors",
        type=_csv("factors"),
        metavar="LIST",
        help="keep only these factors (FACTOR or FACTOR:LEVEL), e.g. baseline,activation:sigmoid,batch_size",
    )
    p.add_argument(
        "--models", type=_csv("models"), metavar="LIST", help=f"keep only these of: {', '.join(MODELS)}"
    )
    p.add_argument(
        "--variants", type=_csv("variants"), metavar="LIST", help=f"keep only these of: {', '.join(VARIANTS)}"
    )
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} (default: mnist1d, generated locally)")
    p.add_argument(
        "--data-root", metavar="DIR", help="folder with the torchvision datasets (default: ./data)"
    )
    p.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    p.add_argument(
        "--seeds", type=_seed_csv, metavar="LIST", help="seeds, e.g. 0,1,2 (default: the preset's)"
    )
    p.add_argument(
        "--max-epochs", type=_at_least(1), metavar="N", help="epoch cap per run (default: the preset's)"
    )
    p.add_argument(
        "--max-steps",
        type=_at_least(1),
        metavar="N",
        help="optimizer-step cap per run (default: the preset's)",
    )
    p.add_argument(
        "--patience",
        dest="early_stop_patience",
        type=_at_least(1),
        metavar="N",
        help="early-stopping patience (default 20)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_int_csv,
        metavar="LIST",
        help="the batch sizes of the batch_size factor (64 is the baseline)",
    )
    p.add_argument("--accelerator", help="cpu (default), gpu, mps or auto")
    p.add_argument("--devices", type=_devices, help="devices per run (default 1)")
    p.add_argument(
        "--threads",
        type=_at_least(1),
        metavar="N",
        help="torch CPU threads per run (default 1: fastest for these small nets)",
    )
    p.add_argument(
        "--workers",
        type=_at_least(1),
        metavar="N",
        help="runs trained side by side in worker processes (default: the number of CPU cores); the "
        "results are the same as with --workers 1. With --executor ray: the most runs in flight at once "
        "(default: as many as the cluster's resources allow)",
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="where the runs are trained: local (this machine, --workers processes; the default) or ray "
        '(one task per run on a Ray cluster; pip install "normzoo[ray]"); the results are the same',
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster of --executor ray, e.g. HEAD:6379 (default: RAY_ADDRESS, else a cluster "
        "started with `ray start` on this machine, else a local Ray instance for this study)",
    )
    p.add_argument(
        "--limit-train-batches", type=_at_least(1), metavar="N", help="train on at most N batches per epoch"
    )
    p.add_argument(
        "--draw-margin",
        type=float,
        metavar="X",
        help="smallest accuracy difference that is not a draw, as a fraction (default 0.01 = 1 point)",
    )
    p.add_argument("--force", action="store_true", help="retrain runs that are cached")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--no-figures", dest="figures", action="store_false", help="write the report without figures"
    )
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from OUT/results.json")
    p.add_argument("--dry-run", action="store_true", help="print the runs the study would do, and stop")
    p.add_argument(
        "--list", action="store_true", help="print presets, factors, variants, models and datasets"
    )
    return parser


#: the options that are settings of :class:`StudyConfig` (every field: the dataclass declares them once)
_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(StudyConfig))


def study_config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed ``study`` arguments: defaults < ``--config`` file < options.

    Example:
        >>> args = build_parser().parse_args(["study", "--seeds", "0,1", "--variants", "vanilla,renorm"])
        >>> config = study_config_from_args(args)
        >>> config.preset, config.seeds, config.variants
        ('quick', [0, 1], ['vanilla', 'renorm'])
    """
    config = StudyConfig()
    if getattr(args, "config", None):
        config = load_config_file(args.config)
    given = {key: getattr(args, key) for key in _CONFIG_KEYS if hasattr(args, key)}
    config = merge_config(config, given, "the command line")
    config.validate()
    return config


def _print_catalogue() -> None:
    print("presets:")
    for preset in PRESETS.values():
        print(f"  {preset.name:8s} {preset.description}")
    print("\nfactors (select with --factors FACTOR or FACTOR:LEVEL):")
    for factor in FACTORS.values():
        levels = ", ".join(level.label for level in factor.levels)
        print(f"  {factor.name:13s} {factor.title}: {levels}")
    print(f"\nvariants: {', '.join(VARIANTS)}")
    print(f"models:   {', '.join(MODELS)}")
    print("datasets:")
    for name, text in DATASETS.items():
        print(f"  {name:14s} {text}")


def _error(message: object) -> int:
    print(f"normzoo study: error: {message}", file=sys.stderr)
    return 2


def _study(args: argparse.Namespace) -> int:
    if getattr(args, "list", False):
        _print_catalogue()
        return 0
    try:
        config = study_config_from_args(args)
        plan = [] if getattr(args, "report_only", False) else build_plan(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # bad names, values or config files
        return _error(error)
    out = Path(config.out)
    from .report import write_report

    if getattr(args, "report_only", False):
        if not (out / "results.json").is_file():
            return _error(f"{out / 'results.json'} does not exist: run the study first")
        try:
            paths = write_report(out, figures=config.figures, draw_margin=config.draw_margin)
        except ValueError as error:  # not JSON, or not a results file
            return _error(f"{error} (rerun the study to write it again)")
        print(f"report: {paths['md']}\n        {paths['html']}")
        return 0
    if not plan:
        return _error(
            "the selection leaves no run to do: the factors, models and variants chosen do not meet in "
            f"preset {config.preset!r} (--preset full starts from the whole grid)"
        )
    if getattr(args, "dry_run", False):
        for spec in plan:
            print(
                f"{spec.model:4s} {spec.experiment}:{spec.level.label:12s} {spec.variant:10s} seed={spec.seed}"
            )
        print(f"{len(plan)} runs")
        return 0
    from .runner import (
        DataNotFoundError,
        StudyFolderInUseError,
        check_executor,
        check_output_folder,
        run_study,
    )

    try:
        check_executor(config)  # before any training: Ray missing is found in a second, not after an hour
        check_output_folder(out)  # the same for a bad --out
    except (ImportError, ValueError) as error:
        return _error(error)
    start = time.perf_counter()
    print(
        f"normzoo study: preset {config.preset}, dataset {config.dataset}, {len(plan)} runs, "
        f"seeds {config.effective_seeds}, up to {config.effective_max_epochs} epochs, output {out}/"
        + (" (executor ray)" if config.executor == "ray" else ""),
        file=sys.stderr,
    )
    try:
        result = run_study(config, plan=plan)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (runner.StudyInterrupted)
        signum = int(getattr(interrupt, "signum", signal.SIGINT))
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(
            f"\n{what}: the finished runs are cached in {out / 'runs'}; run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + signum
    except DataNotFoundError as error:  # a Ray worker's node has no copy of the data folder
        return _error(error)
    except FileNotFoundError as error:  # a dataset that is not on disk
        return _error(
            f"{error}\n(on the command line: --data-root DIR names the folder, --download fetches it)"
        )
    except (ImportError, StudyFolderInUseError, ConnectionError) as error:
        return _error(error)  # a missing optional package; a folder in use; a Ray cluster out of reach
    paths = write_report(out, figures=config.figures, draw_margin=config.draw_margin)
    elapsed = time.perf_counter() - start
    print(
        f"{result.trained} runs trained, {result.cached} loaded from the cache, {elapsed:.0f} s in all\n"
        f"results: {out / 'results.json'}\nreport:  {paths['md']}\n         {paths['html']}",
        file=sys.stderr,
    )
    if result.failed:
        lines = [f"  {f['model']} {f['experiment']}:{f['level']} {f['variant']} seed={f['seed']}: {f['error']}"
                 for f in result.failed]  # fmt: skip
        print(
            f"{len(result.failed)} runs failed (the report leaves them out; run the same command again to retry "
            "them; tracebacks in runs/<key>.error.txt):\n" + "\n".join(lines),
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normzoo`` command with ``argv`` (``sys.argv[1:]`` when ``None``); return its exit status.

    Example:
        >>> main(["study", "--dry-run", "--factors", "activation:sigmoid", "--models", "cnn", "--seeds", "0"])
        cnn  activation:sigmoid vanilla    seed=0
        cnn  activation:sigmoid batchnorm  seed=0
        2 runs
        0
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "study":
        return _study(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
