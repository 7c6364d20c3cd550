"""The edges of the monitors: any optimizer count, short runs, dict batches, bad folders and arguments,
gradient clipping, resuming mid-epoch. Each test failed before its fix."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus
from monitor_helpers import TinyModule, loader, make_trainer, mlp
from torch import nn

from normzoo.lightning.callbacks import (
    ActivationMonitor,
    CovariateShiftMonitor,
    EpochTimer,
    GradientFlowMonitor,
    JacobianSpectrumMonitor,
    LossLandscapeMonitor,
    WeightNormMonitor,
    all_monitors,
)


class TwoOptimizers(TinyModule):
    """Manual optimization: one optimizer for the first linear layer, one for the rest; two steps a batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first = list(self.model[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.1)]


@pytest.mark.parametrize("every", [2, 4])
def test_batch_monitors_sample_with_two_optimizers_and_an_even_interval(tmp_path, every: int) -> None:
    monitors = [
        ActivationMonitor(every_n_steps=every, save_figures=False),
        JacobianSpectrumMonitor(every_n_steps=every, max_samples=1, save_figures=False),
        CovariateShiftMonitor(every_n_steps=every, save_figures=False),
        LossLandscapeMonitor(every_n_steps=every, save_figures=False),
    ]
    trainer = make_trainer(tmp_path, monitors, max_steps=16)  # 8 batches of 2 optimizer steps
    trainer.fit(TwoOptimizers(mlp()), loader(n=128))
    assert trainer.global_step == 16
    # a batch covers optimizer steps g and g+1; it is sampled when one of them is due (0, every-1, ...)
    expected = [0, 2, 4, 6, 8, 10, 12, 14] if every == 2 else [0, 2, 6, 10, 14]
    for m in monitors:
        assert [r["step"] for r in m.history] == expected, m.name


def test_step_monitors_sample_each_optimizers_due_steps(tmp_path) -> None:
    monitors = [
        GradientFlowMonitor(every_n_steps=4, save_figures=False),
        WeightNormMonitor(every_n_steps=4, save_figures=False),
    ]
    make_trainer(tmp_path, monitors, max_steps=8).fit(TwoOptimizers(mlp()), loader(n=128))
    for m in monitors:
        assert [r["step"] for r in m.history] == [0, 3, 7], m.name


def test_a_run_shorter_than_the_interval_records_its_first_and_last_step(tmp_path) -> None:
    monitors = [
        GradientFlowMonitor(every_n_steps=100, save_figures=False),
        ActivationMonitor(every_n_steps=100, save_figures=False),
        LossLandscapeMonitor(every_n_steps=100, save_figures=False),
    ]
    make_trainer(tmp_path, monitors, max_steps=4).fit(TinyModule(mlp()), loader())
    for m in monitors:
        assert [r["step"] for r in m.history] == [0, 3], m.name


def test_a_monitor_that_recorded_nothing_warns_at_the_end_of_fit(tmp_path) -> None:
    monitor = ActivationMonitor(layers="no_such_layer*", save_figures=False)
    with pytest.warns(UserWarning, match=r"ActivationMonitor: recorded nothing.*no_such_layer"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(TinyModule(mlp()), loader())
    assert monitor.history == []


class DictBatches(TinyModule):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])


def _dict_loader() -> torch.utils.data.DataLoader:
    data = [{"x": x, "y": y} for x, y in loader().dataset]
    return torch.utils.data.DataLoader(data, batch_size=16)


@pytest.mark.parametrize("cls", [CovariateShiftMonitor, LossLandscapeMonitor])
def test_probes_with_dict_batches_say_to_pass_loss_fn(tmp_path, cls: type) -> None:
    with pytest.raises(
        TypeError, match=rf"{cls.__name__}: expected a training batch.*'x', 'y'.*pass loss_fn="
    ):
        make_trainer(tmp_path, [cls(save_figures=False)], max_steps=2).fit(DictBatches(mlp()), _dict_loader())

    def loss_fn(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(module(batch["x"]), batch["y"])

    monitor = cls(loss_fn=loss_fn, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(DictBatches(mlp()), _dict_loader())
    assert [r["step"] for r in monitor.history] == [0, 1]


def test_an_unusable_figure_dir_warns_and_the_fit_finishes(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monitor = GradientFlowMonitor(every_n_steps=1, figure_dir=blocker / "figures")
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.warns(
        UserWarning, match=r"GradientFlowMonitor: could not write its figure.*training goes on"
    ):
        trainer.fit(TinyModule(mlp()), loader())
    assert trainer.state.status == TrainerStatus.FINISHED
    assert len(monitor.history) == 2


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LossLandscapeMonitor(step_sizes=[math.nan]), ValueError, "step_sizes to be finite positive"),
        (lambda: LossLandscapeMonitor(step_sizes=[1.0, math.inf]), ValueError, "step_sizes"),
        (
            lambda: JacobianSpectrumMonitor(max_samples=2.5),
            ValueError,
            "max_samples to be a positive int, got 2.5",
        ),
        (lambda: JacobianSpectrumMonitor(rank=0), ValueError, "rank to be a positive int"),
        (
            lambda: WeightNormMonitor(layers=5),
            TypeError,
            "WeightNormMonitor: expected layers to be None.*got 5",
        ),
        (lambda: ActivationMonitor(layers=[nn.Linear]), TypeError, "ActivationMonitor: expected layers"),
        (lambda: GradientFlowMonitor(every_n_steps=2.0), ValueError, "every_n_steps to be a positive int"),
        (lambda: GradientFlowMonitor(vanishing_threshold=math.nan), ValueError, "vanishing_threshold"),
        (lambda: CovariateShiftMonitor(loss_fn="mse"), TypeError, "loss_fn to be callable"),
        (lambda: EpochTimer(figure_every_n_epochs=0), ValueError, "figure_every_n_epochs"),
        (lambda: LossLandscapeMonitor(layers="0"), TypeError, "layers"),  # it looks at the whole model
    ],
)
def test_arguments_fail_in_the_constructor(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_gradient_flow_reads_the_clipped_gradients(tmp_path) -> None:
    module = TinyModule(mlp(), lr=0.1)
    init = copy.deepcopy(module.model).train()
    monitor = GradientFlowMonitor(every_n_steps=1, save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1, gradient_clip_val=1e-2).fit(module, loader())
    x, y = next(iter(loader()))
    F.cross_entropy(init(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(init.parameters(), 1e-2)
    assert norm > 1e-1  # the clipping does something
    layers = monitor.history[0]["layers"]
    for layer, v in layers.items():
        g = init.get_submodule(layer).weight.grad
        assert v["mean_abs"] == pytest.approx(g.abs().mean().item(), rel=1e-5)
        assert v["max_abs"] == pytest.approx(g.abs().max().item(), rel=1e-5)


def test_epoch_timer_keeps_an_epoch_resumed_from_a_mid_epoch_checkpoint(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(
        tmp_path, [EpochTimer(save_figures=False), ckpt], max_steps=2, enable_checkpointing=True
    ).fit(TinyModule(mlp()), loader())  # 4 steps an epoch: the checkpoint is taken after the second
    timer = EpochTimer(save_figures=False)
    make_trainer(tmp_path, [timer], max_steps=8).fit(
        TinyModule(mlp()), loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    )
    assert [r["epoch"] for r in timer.history] == [0, 1]
    assert [r["steps"] for r in timer.history] == [4, 4]
    assert [r["resumed"] for r in timer.history] == [True, False]
    assert all(r["train_s"] > 0 for r in timer.history)


def test_every_monitor_shows_something_on_a_short_run_with_its_defaults(tmp_path) -> None:
    """2 epochs of 16 steps, the trainer's default log_every_n_steps=50: every monitor records."""
    monitors = all_monitors(save_figures=False)
    make_trainer(tmp_path, monitors, max_steps=-1, max_epochs=2, log_every_n_steps=50).fit(
        TinyModule(mlp()), loader(n=256)
    )
    steps = {m.name: [r["step"] for r in m.history] for m in monitors}
    every_third = [0, *range(2, 32, 3), 31]  # about 10 samples: every 3 steps, the first and the last
    assert steps == {
        "weight_norm": every_third,
        "gradient_flow": every_third,
        "activations": every_third,
        "jacobian": [0, 31],  # the probes: the first and the last step
        "ics": [0, 31],
        "landscape": [0, 31],
        "time": [16, 32],  # one record per epoch, at its end
    }
    assert [m.every_n_steps for m in monitors[:6]] == [None] * 6
    assert [m.schedule.interval for m in monitors[:6]] == [3, 3, 3, 32, 32, 32]


def test_the_automatic_interval_of_a_long_run_is_a_multiple_of_log_every_n_steps(tmp_path) -> None:
    monitor = GradientFlowMonitor(save_figures=False)
    make_trainer(tmp_path, [monitor], max_steps=1000, log_every_n_steps=7, limit_train_batches=1).fit(
        TinyModule(mlp()), loader(n=16)
    )
    assert monitor.schedule.interval == 98  # 1000 // 10 = 100, down to a multiple of 7
    assert [r["step"] for r in monitor.history] == [0, *range(97, 1000, 98), 999]
