"""benchmarks/callbacks.py runs end to end and its hook clock counts what Lightning calls."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("lightning")


def _load():
    path = Path(__file__).parents[2] / "benchmarks" / "callbacks.py"
    spec = importlib.util.spec_from_file_location("callbacks_benchmark", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Counter(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: object) -> None:
        self.batches += 1


def test_hook_clock_counts_every_call_of_a_fit() -> None:
    bench = _load()
    clock = bench.HookClock()
    counter = _Counter()
    clock.wrap(counter)
    bench.fit_once(None, 1, [counter])
    assert counter.batches == 21  # 1,293 digits, batch 64
    assert clock.calls[("_Counter", "on_train_batch_end")] == 21
    assert clock.calls[("_Counter", "on_train_batch_start")] == 21
    assert clock.calls[("_Counter", "on_fit_start")] == 1
    assert clock.total_s() > 0


def test_script_reports_overheads_and_samples(tmp_path: Path) -> None:
    bench = _load()
    threads = torch.get_num_threads()
    try:
        result = bench.main(
            ["--epochs", "1", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "r.json")]
        )
    finally:
        torch.set_num_threads(threads)
    (round_,) = result["rounds"]
    assert round_["in_hooks_s"] > 0
    assert result["in_hooks_overhead_median"] == pytest.approx(round_["in_hooks_s"] / round_["base_wall_s"])
    assert set(round_["in_hooks_per_monitor_s"]) == set(result["samples_per_monitor"])
    # 21 steps: every monitor samples at least its first and last step, the epoch timer its one epoch
    assert result["samples_per_monitor"]["time"] == 1
    assert all(n >= 2 for name, n in result["samples_per_monitor"].items() if name != "time")
    assert (tmp_path / "r.json").exists()
