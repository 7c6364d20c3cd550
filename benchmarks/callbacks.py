"""Overhead of normzoo's diagnostics callbacks on the seed study's CNN, with their default settings.

Run from the repository root::

    python benchmarks/callbacks.py [--epochs 48] [--repeats 3] [--norm batchnorm|none] [--threads N]
                                   [--per-monitor] [--json PATH]

The model is :func:`normzoo.models.build_cnn` (six 3x3 convolutions, 32-64-128 channels, BN before every
ReLU unless ``--norm none``) in :class:`normzoo.lightning.ClassificationModule` (SGD + Nesterov, lr 0.01)
on :class:`normzoo.lightning.DigitsDataModule` (8x8 digits, 1,293 training images, batch 64: 21 optimizer
steps an epoch), CPU, no logger. ``--epochs 48`` gives 1,008 steps, enough for every default schedule to
fire (every 50 steps: weights, gradients, activations; every 500: ICS, landscape; every 1000: Jacobian
spectra). That CNN is tiny (about 10-20 ms a step on a CPU core), so this is a worst case: a monitor's
sample costs about the same in absolute terms on a bigger model, whose steps are longer.

Each round trains the model twice from the same seed, once without callbacks and once with all seven
monitors at their defaults (``save_figures=False``: the one-off figure rendering at the end of training is
timed separately, per figure), in an order that alternates between rounds so that drifting machine load
hits both alike. The overhead of a round is ``time(with) / time(without) - 1`` for the wall time of
``Trainer.fit`` and for the CPU time of the training thread; the report gives the median over rounds, and
the ratio of the fastest run with monitors to the fastest run without (the least disturbed by other load on
the machine).
``--per-monitor`` adds one run per monitor alone (one round), to see where the time goes.

``--side-by-side`` runs each round's two fits at the same time instead, in two processes pinned to two
different CPUs (swapped every round), so that whatever else slows the machine down during a round (other
processes, a busy hyperthread sibling, the host) slows both alike; it needs two CPUs and gives the
steadiest end-to-end number on a shared machine.

On a shared machine the wall time of a fit varies by several per cent from run to run, as much as the
overhead being measured, so the script also clocks the time spent *inside* the monitors' Lightning hooks
(:class:`HookClock`: every hook of every monitor wrapped with a timer, in the runs with monitors). That
in-hook time, as a fraction of the fit without monitors, is the monitors' own cost free of that noise; what
it leaves out is Lightning's handling of the values the monitors log and the forward hooks they register on
sampled steps (which run inside the training step).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from normzoo.lightning import ClassificationModule, DigitsDataModule
from normzoo.lightning.callbacks import DiagnosticCallback, all_monitors
from normzoo.models import build_cnn


def fit_once(
    norm: str | None, epochs: int, callbacks: list[pl.Callback], seed: int = 0
) -> tuple[float, float]:
    """Train once; ``(wall seconds, CPU seconds of the training thread)`` of ``Trainer.fit``.

    The thread's CPU time (:func:`time.thread_time`) does not count the time the thread waits for a core,
    so it is the steadier of the two on a machine that other work shares (with ``--threads 1`` and the
    in-process data loader, the training thread does all the work)."""
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, seed=seed)
    module = ClassificationModule(build_cnn(1, data.num_classes, norm=norm), data.num_classes, lr=0.01)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    wall, cpu = time.perf_counter(), time.thread_time()
    trainer.fit(module, data)
    return time.perf_counter() - wall, time.thread_time() - cpu


#: The hooks Lightning may call on a callback.
HOOKS = tuple(name for name in vars(pl.Callback) if name.startswith("on_") or name in ("setup", "teardown"))


class HookClock:
    """The wall time spent inside each callback's Lightning hooks, summed per ``(callback, hook)``.

    Example:
        >>> clock = HookClock()
        >>> cb = clock.wrap(pl.Callback())
        >>> cb.on_train_start(None, None)
        >>> clock.calls[("Callback", "on_train_start")], clock.total_s() >= 0
        (1, True)
    """

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def wrap(self, callback: pl.Callback) -> pl.Callback:
        """Time every hook of ``callback`` (instance attributes shadow the class's methods)."""
        name = getattr(callback, "name", type(callback).__name__)
        for hook in HOOKS:
            setattr(callback, hook, self._timed(getattr(callback, hook), (name, hook)))
        return callback

    def _timed(self, fn: Callable[..., Any], key: tuple[str, str]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1

        return timed

    def total_s(self) -> float:
        return sum(self.seconds.values())

    def per_callback(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (name, _), seconds in self.seconds.items():
            out[name] += seconds
        return dict(out)


def monitors(clock: HookClock | None = None) -> list[DiagnosticCallback]:
    callbacks = all_monitors(save_figures=False)
    if clock is not None:
        for cb in callbacks:
            clock.wrap(cb)
    return callbacks


def figure_times(callbacks: list[DiagnosticCallback], folder: str) -> dict[str, float]:
    out = {}
    for cb in callbacks:
        start = time.perf_counter()
        cb.save_figure(f"{folder}/{cb.name}.png")
        out[cb.name] = time.perf_counter() - start
    return out


def _one_fit(label: str, norm: str | None, epochs: int, cpu: int | None) -> dict[str, Any]:
    """One fit in this process (``--one``): pinned to ``cpu``, after a warm-up fit; its times as a dict."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    fit_once(norm, 1, [])
    clock = HookClock()
    callbacks: list[pl.Callback] = list(monitors(clock)) if label == "all" else []
    wall, cpu_s = fit_once(norm, epochs, callbacks)
    return {"label": label, "cpu": cpu, "wall_s": wall, "cpu_s": cpu_s, "in_hooks_s": clock.total_s()}


def side_by_side_round(args: argparse.Namespace, r: int) -> dict[str, Any]:
    """Both fits of round ``r`` at once, each in its own process pinned to its own CPU."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    procs = {}
    for label, cpu in zip(("base", "all"), cpus if r % 2 == 0 else cpus[::-1], strict=True):
        cmd = [sys.executable, __file__, "--one", label, "--cpu", str(cpu), "--epochs", str(args.epochs)]
        cmd += ["--norm", args.norm, "--threads", "1"]
        procs[label] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    runs = {}
    for label, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the {label!r} fit of round {r} failed (exit {proc.returncode})")
        runs[label] = json.loads(out.strip().splitlines()[-1])
    base, full = runs["base"], runs["all"]
    return {
        "base_wall_s": base["wall_s"],
        "all_wall_s": full["wall_s"],
        "base_cpu_s": base["cpu_s"],
        "all_cpu_s": full["cpu_s"],
        "wall_overhead": full["wall_s"] / base["wall_s"] - 1,
        "cpu_overhead": full["cpu_s"] / base["cpu_s"] - 1,
        "in_hooks_s": full["in_hooks_s"],
        "in_hooks_overhead": full["in_hooks_s"] / base["wall_s"],
        "cpus": {"base": base["cpu"], "all": full["cpu"]},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--norm", default="batchnorm", help="batchnorm | renorm | noisy | none")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--per-monitor", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--side-by-side", action="store_true", help="run each round's two fits at once")
    parser.add_argument("--one", choices=("base", "all"), help=argparse.SUPPRESS)  # a --side-by-side child
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    norm = None if args.norm == "none" else args.norm
    if args.one:
        one = _one_fit(args.one, norm, args.epochs, args.cpu)
        print(json.dumps(one))
        return one
    if args.side_by_side:
        if len(os.sched_getaffinity(0)) < 2:
            parser.error("--side-by-side needs two CPUs")
        # each fit is pinned to one CPU and runs one torch thread: other settings would not be honoured
        if args.threads not in (None, 1):
            parser.error(
                f"--side-by-side runs each fit on one CPU with one thread; got --threads {args.threads}"
            )
        if args.per_monitor:
            parser.error("--per-monitor runs in the default mode only; drop --side-by-side to use it")
        pairs = []
        for r in range(args.repeats):
            pairs.append(side_by_side_round(args, r))
            print(
                f"round {r} (side by side): without {pairs[-1]['base_wall_s']:.1f} s, with all monitors "
                f"{pairs[-1]['all_wall_s']:.1f} s: wall {pairs[-1]['wall_overhead']:+.1%}, "
                f"cpu {pairs[-1]['cpu_overhead']:+.1%}; inside the monitors' hooks "
                f"{pairs[-1]['in_hooks_s']:.2f} s ({pairs[-1]['in_hooks_overhead']:+.1%})",
                flush=True,
            )
        summary = {
            "model": f"build_cnn(1, 10, norm={norm!r}) on digits, batch 64, {args.epochs} epochs",
            "mode": "side by side",
            "rounds": pairs,
            "wall_overhead_median": statistics.median(r["wall_overhead"] for r in pairs),
            "cpu_overhead_median": statistics.median(r["cpu_overhead"] for r in pairs),
            "in_hooks_overhead_median": statistics.median(r["in_hooks_overhead"] for r in pairs),
        }
        print(
            f"overhead of all monitors (defaults), side by side: wall {summary['wall_overhead_median']:+.1%}, "
            f"cpu {summary['cpu_overhead_median']:+.1%}, inside their hooks "
            f"{summary['in_hooks_overhead_median']:+.1%} (medians of {args.repeats} rounds)"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        return summary
    fit_once(norm, 1, [])  # warm-up: imports, data, allocator
    rounds: list[dict[str, Any]] = []
    last: list[DiagnosticCallback] = []
    for r in range(args.repeats):
        runs: dict[str, tuple[float, float]] = {}
        clock = HookClock()
        order: list[tuple[str, Callable[[], list[DiagnosticCallback]]]] = [
            ("base", list),
            ("all", functools.partial(monitors, clock)),
        ]
        for label, make in order if r % 2 == 0 else order[::-1]:
            cbs = make()
            runs[label] = fit_once(norm, args.epochs, list(cbs))
            if label == "all":
                last = cbs
        rounds.append(
            {
                "base_wall_s": runs["base"][0],
                "all_wall_s": runs["all"][0],
                "base_cpu_s": runs["base"][1],
                "all_cpu_s": runs["all"][1],
                "wall_overhead": runs["all"][0] / runs["base"][0] - 1,
                "cpu_overhead": runs["all"][1] / runs["base"][1] - 1,
                "in_hooks_s": clock.total_s(),
                "in_hooks_overhead": clock.total_s() / runs["base"][0],
                "in_hooks_per_monitor_s": clock.per_callback(),
            }
        )
        print(
            f"round {r}: without {runs['base'][0]:.1f} s, with all monitors {runs['all'][0]:.1f} s: "
            f"wall {rounds[-1]['wall_overhead']:+.1%}, cpu {rounds[-1]['cpu_overhead']:+.1%}; "
            f"inside the monitors' hooks {clock.total_s():.2f} s ({rounds[-1]['in_hooks_overhead']:+.1%})",
            flush=True,
        )
    steps = {cb.name: len(cb.history) for cb in last}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        figures = figure_times(last, tmp)
    result: dict[str, Any] = {
        "model": f"build_cnn(1, 10, norm={norm!r}) on digits, batch 64, {args.epochs} epochs",
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "wall_overhead_median": statistics.median(r["wall_overhead"] for r in rounds),
        "cpu_overhead_median": statistics.median(r["cpu_overhead"] for r in rounds),
        "in_hooks_overhead_median": statistics.median(r["in_hooks_overhead"] for r in rounds),
        "wall_overhead_of_fastest": min(r["all_wall_s"] for r in rounds)
        / min(r["base_wall_s"] for r in rounds)
        - 1,
        "cpu_overhead_of_fastest": min(r["all_cpu_s"] for r in rounds) / min(r["base_cpu_s"] for r in rounds)
        - 1,
        "samples_per_monitor": steps,
        "figure_s": figures,
    }
    print(
        f"overhead of all monitors (defaults): wall {result['wall_overhead_median']:+.1%}, "
        f"cpu {result['cpu_overhead_median']:+.1%} (median of {args.repeats} rounds); "
        f"fastest with / fastest without: wall {result['wall_overhead_of_fastest']:+.1%}, "
        f"cpu {result['cpu_overhead_of_fastest']:+.1%}"
    )
    print(
        f"time inside the monitors' hooks: {result['in_hooks_overhead_median']:+.1%} of the fit without "
        "monitors (median); per monitor, last round:",
        {k: round(v, 2) for k, v in rounds[-1]["in_hooks_per_monitor_s"].items()},
        "s",
    )
    print("samples recorded:", steps)
    print("figure rendering, one-off at the end:", {k: round(v, 2) for k, v in figures.items()}, "s")
    if args.per_monitor:
        base = statistics.median(r["base_wall_s"] for r in rounds)
        base_cpu = statistics.median(r["base_cpu_s"] for r in rounds)
        per: dict[str, float] = {}
        for cb in monitors():
            wall, cpu = fit_once(norm, args.epochs, [cb])
            per[cb.name] = cpu / base_cpu - 1
            print(
                f"  {cb.name:14s} alone: cpu {per[cb.name]:+.1%}, wall {wall / base - 1:+.1%}, "
                f"{len(cb.history)} samples",
                flush=True,
            )
        result["per_monitor_wall_overhead"] = per
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
