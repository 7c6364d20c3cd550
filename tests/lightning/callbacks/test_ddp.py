"""All monitors in a 2-process DDP run on CPU (gloo): no deadlock, figures written once, by rank 0."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from monitor_helpers import TinyModule, loader, make_trainer
from torch import nn

import normzoo as nz
from normzoo.lightning.callbacks import (
    ActivationMonitor,
    CovariateShiftMonitor,
    EpochTimer,
    GradientFlowMonitor,
    JacobianSpectrumMonitor,
    LossLandscapeMonitor,
    WeightNormMonitor,
)


class _Track:
    """Appends ``<rank> <name>`` to ``writes.txt`` beside the figures whenever a figure is written."""

    def _emit_figure(self, trainer: Any, suffix: str = "") -> Path | None:
        path = super()._emit_figure(trainer, suffix)  # type: ignore[misc]
        if path is not None:
            with open(path.parent / "writes.txt", "a") as f:
                f.write(f"{dist.get_rank()} {path.name}\n")
        return path


class _W(_Track, WeightNormMonitor): ...


class _G(_Track, GradientFlowMonitor): ...


class _A(_Track, ActivationMonitor): ...


class _J(_Track, JacobianSpectrumMonitor): ...


class _I(_Track, CovariateShiftMonitor): ...


class _L(_Track, LossLandscapeMonitor): ...


class _T(_Track, EpochTimer): ...


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_spawn_two_cpu_processes(tmp_path) -> None:
    figs = tmp_path / "figs"
    common: dict[str, Any] = {"figure_dir": figs}
    monitors = [
        _W(every_n_steps=1, **common), _G(every_n_steps=1, **common), _A(every_n_steps=1, **common),
        _J(every_n_steps=1, max_samples=1, **common), _I(every_n_steps=1, **common),
        _L(every_n_steps=1, **common), _T(**common),
    ]  # fmt: skip
    # a BN synchronized across the processes: its forward and backward are collectives, so a probe that
    # ran on one rank only would hang here
    model = nn.Sequential(nn.Linear(8, 8), nz.BatchNorm1d(8, sync=True), nn.ReLU(), nn.Linear(8, 3))
    trainer = make_trainer(
        tmp_path, monitors, max_steps=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=True
    )
    os.environ.setdefault("PL_GLOBAL_SEED", "0")
    trainer.fit(TinyModule(model), loader(n=64, batch_size=8))
    writes = sorted((figs / "writes.txt").read_text().split("\n")[:-1])
    assert writes == sorted(f"0 {m.name}.png" for m in monitors)
    assert all((figs / f"{m.name}.png").stat().st_size > 0 for m in monitors)
    assert torch.distributed.is_available()
