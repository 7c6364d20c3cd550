"""ClassificationModule in a real Lightning Trainer on the digits: training, metrics, optimizers, schedules,
hyperparameters and checkpoints."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import normzoo as nz
from normzoo.lightning import ClassificationModule, DigitsDataModule
from normzoo.models import build_cnn, build_mlp

SMALL_CNN = {"in_channels": 1, "channels": (8, 16), "pool_every": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These networks are too small to gain from intra-op threads, and on a busy 2-core machine a second
    thread makes each tiny op wait for the other (10-100x slower steps): train them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def flat_digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, flatten=True)
    dm.setup("fit")
    return dm


def _trainer(tmp_path: Path | None = None, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": CSVLogger(str(tmp_path), name="", version="") if tmp_path is not None else False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def _epoch_metrics(tmp_path: Path) -> dict[str, list[float]]:
    """The per-epoch values of each key in the CSVLogger's metrics.csv."""
    out: dict[str, list[float]] = {}
    with (tmp_path / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None) and key not in ("epoch", "step"):
                    out.setdefault(key, []).append(float(value))
    return out


@torch.no_grad()
def _evaluate(module: ClassificationModule, loader: DataLoader[Any]) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy computed by hand over a whole loader."""
    module.eval()
    logits, targets = zip(*[(module(x), y) for x, y in loader], strict=True)
    z, y = torch.cat(logits), torch.cat(targets)
    top5 = z.topk(5, dim=1).indices
    return {
        "loss": nn.functional.cross_entropy(z, y).item(),
        "acc": (z.argmax(1) == y).double().mean().item(),
        "acc_top5": (top5 == y[:, None]).any(1).double().mean().item(),
    }


# -- training --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, "batchnorm", "renorm", "noisy", "torch"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_fit_with_each_norm_reduces_the_loss(
    tmp_path: Path, digits: DigitsDataModule, flat_digits: DigitsDataModule, norm: str | None, arch: str
) -> None:
    torch.manual_seed(0)
    if arch == "mlp":
        module = ClassificationModule(
            "mlp", 10, norm=norm, model_kwargs={"in_features": 64, "hidden": (64, 64)}
        )
        dm = flat_digits
    else:
        module = ClassificationModule("cnn", 10, norm=norm, model_kwargs=SMALL_CNN)
        dm = digits
    n_norms = sum(nz.is_batch_norm(m) for m in module.modules())
    assert n_norms == (0 if norm is None else 2)
    _trainer(tmp_path, max_epochs=3).fit(module, dm)
    metrics = _epoch_metrics(tmp_path)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5", "lr"} <= set(metrics)
    assert all(len(metrics[k]) == 3 for k in ("train/loss", "val/loss", "val/acc", "lr"))
    assert metrics["train/loss"][-1] < metrics["train/loss"][0]
    if norm != "noisy":  # noisy BatchNorm's default noise slows this small network to ~25 % after 3 epochs
        assert metrics["val/acc"][-1] > 0.5


def test_default_cnn_trains_a_few_steps(digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    module = ClassificationModule(build_cnn(1, 10, norm="batchnorm"), 10)
    _trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1).fit(module, digits)
    assert all(torch.isfinite(p.detach()).all() for p in module.parameters())


def test_logged_metrics_equal_a_direct_computation(tmp_path: Path, digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    module = ClassificationModule("cnn", 10, norm="batchnorm", model_kwargs=SMALL_CNN)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, digits)
    (test,) = trainer.test(module, digits, verbose=False)
    (val,) = trainer.validate(module, digits, verbose=False)
    for stage, logged, loader in (
        ("test", test, digits.test_dataloader()),
        ("val", val, digits.val_dataloader()),
    ):
        expected = _evaluate(module, loader)
        assert set(logged) == {f"{stage}/loss", f"{stage}/acc", f"{stage}/acc_top5"}
        assert logged[f"{stage}/acc"] == pytest.approx(expected["acc"], abs=1e-6)
        assert logged[f"{stage}/acc_top5"] == pytest.approx(expected["acc_top5"], abs=1e-6)
        assert logged[f"{stage}/loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert "test/acc" in _epoch_metrics(tmp_path)


def test_training_metrics_equal_a_direct_computation(flat_digits: DigitsDataModule) -> None:
    """With lr = 0 the weights stay put, so the epoch's train/loss and train/acc are those of the fixed model."""
    torch.manual_seed(0)
    module = ClassificationModule("mlp", 10, model_kwargs={"in_features": 64}, lr=0.0, scheduler=None)
    expected = _evaluate(module, flat_digits.train_dataloader())
    module.train()
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, flat_digits)
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(expected["acc"], abs=1e-6)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(expected["loss"], rel=1e-5)


def _toy_data(num_classes: int, n: int = 48) -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=16)


def test_no_top5_with_five_classes_or_fewer() -> None:
    module = ClassificationModule(build_mlp(6, 5, hidden=(8,)), 5, scheduler=None)
    assert module.val_acc_top5 is None
    assert module.test_acc_top5 is None
    train, val = _toy_data(5)
    trainer = _trainer(max_epochs=1)
    trainer.fit(module, train, val)
    (test,) = trainer.test(module, val, verbose=False)
    assert set(test) == {"test/loss", "test/acc"}
    assert "val/acc_top5" not in trainer.callback_metrics


def test_predict_returns_logits(digits: DigitsDataModule) -> None:
    module = ClassificationModule("cnn", 10, model_kwargs=SMALL_CNN)
    batches = _trainer(limit_predict_batches=2).predict(module, digits)
    assert batches is not None
    assert [b.shape for b in batches] == [(64, 10), (64, 10)]


def test_label_smoothing_is_used() -> None:
    module = ClassificationModule(build_mlp(6, 3, hidden=(4,)), 3, label_smoothing=0.2)
    z, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    torch.testing.assert_close(module.loss(z, y), nn.functional.cross_entropy(z, y, label_smoothing=0.2))


# -- optimizers and schedules ----------------------------------------------------------------------------


def test_optimizers_are_built_as_configured() -> None:
    net = build_mlp(6, 3, hidden=(4,))
    sgd = ClassificationModule(net, 3, lr=0.1, weight_decay=5e-4, scheduler=None).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.1,
        0.9,
        True,
        5e-4,
    )
    plain = ClassificationModule(net, 3, momentum=0.0, scheduler=None).configure_optimizers()
    assert plain.param_groups[0]["nesterov"] is False  # Nesterov needs momentum
    adam = ClassificationModule(net, 3, optimizer="adam", lr=1e-3, weight_decay=1e-4, scheduler=None)
    adamw = ClassificationModule(net, 3, optimizer="AdamW", lr=1e-3, weight_decay=1e-2, scheduler=None)
    opt, optw = adam.configure_optimizers(), adamw.configure_optimizers()
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert type(optw) is torch.optim.AdamW
    assert optw.param_groups[0]["weight_decay"] == 1e-2
    plateau = ClassificationModule(net, 3, monitor="val/acc").configure_optimizers()
    config = plateau["lr_scheduler"]
    assert isinstance(config["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert config["monitor"] == "val/acc"
    assert config["scheduler"].mode == "max"
    assert config["scheduler"].factor == 0.5
    assert config["scheduler"].patience == 5
    with pytest.raises(ValueError, match="unknown optimizer"):
        ClassificationModule(net, 3, optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown scheduler"):
        ClassificationModule(net, 3, scheduler="onecycle")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_each_optimizer_steps_in_a_trainer(optimizer: str) -> None:
    torch.manual_seed(0)
    module = ClassificationModule(
        build_mlp(6, 3, hidden=(8,)), 3, optimizer=optimizer, lr=1e-2, weight_decay=1e-3
    )
    before = [p.detach().clone() for p in module.parameters()]
    train, val = _toy_data(3)
    trainer = _trainer(max_epochs=2)
    trainer.fit(module, train, val)
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert type(trainer.optimizers[0]).__name__.lower() == optimizer
    assert trainer.global_step == 6


class _LrRecorder(Callback):
    """The learning rate of every optimizer step and at the start of every epoch."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.steps.append(optimizer.param_groups[0]["lr"])


def _fit_schedule(tmp_path: Path, epochs: int, **kwargs: Any) -> tuple[list[float], list[float], int]:
    """Fit a small MLP on a 4-batch toy set; return the per-step lrs, the logged per-epoch lrs, steps/epoch."""
    torch.manual_seed(0)
    module = ClassificationModule(build_mlp(6, 3, hidden=(8,)), 3, **kwargs)
    train, val = _toy_data(3, n=64)
    recorder = _LrRecorder()
    _trainer(tmp_path, max_epochs=epochs, callbacks=[recorder]).fit(module, train, val)
    return recorder.steps, _epoch_metrics(tmp_path)["lr"], 4


def test_step_schedule(tmp_path: Path) -> None:
    steps, epochs, _ = _fit_schedule(tmp_path, 4, lr=0.1, scheduler="step", step_size=2, step_gamma=0.5)
    assert epochs == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert steps == pytest.approx([0.1] * 8 + [0.05] * 8)


def test_cosine_schedule(tmp_path: Path) -> None:
    _, epochs, _ = _fit_schedule(tmp_path, 4, lr=0.1, scheduler="cosine", min_lr=0.01)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert epochs == pytest.approx(expected, rel=1e-5)


def test_warmup_then_step_schedule(tmp_path: Path) -> None:
    steps, epochs, spe = _fit_schedule(
        tmp_path, 4, lr=0.1, scheduler="step", step_size=1, step_gamma=0.5, warmup_epochs=2
    )
    warm = [0.1 * (s + 1) / (2 * spe) for s in range(2 * spe)]  # linear per step, reaching lr at the end
    assert steps == pytest.approx([*warm, *[0.1] * spe, *[0.05] * spe])
    assert epochs == pytest.approx([0.05, 0.1, 0.1, 0.05])


def test_warmup_then_cosine_schedule(tmp_path: Path) -> None:
    steps, epochs, spe = _fit_schedule(tmp_path, 4, lr=0.1, scheduler="cosine", warmup_epochs=1)
    assert steps[:spe] == pytest.approx([0.1 * (s + 1) / spe for s in range(spe)])
    assert epochs == pytest.approx(
        [0.1, 0.1, 0.1 * (1 + math.cos(math.pi / 3)) / 2, 0.1 * (1 + math.cos(2 * math.pi / 3)) / 2]
    )


def test_plateau_halves_after_patience(tmp_path: Path) -> None:
    """A learning rate too small to improve the validation loss by ReduceLROnPlateau's relative threshold
    (1e-4) yet large enough for its minimal change (eps 1e-8): every epoch after the first is a plateau."""
    lr = 1e-6
    _, epochs, _ = _fit_schedule(tmp_path, 6, lr=lr, scheduler="plateau", plateau_patience=1)
    # epoch 0 sets the best value; epochs 1 and 2 do not improve, patience 1 is exceeded at the end of epoch 2
    assert epochs == pytest.approx([lr, lr, lr, lr / 2, lr / 2, lr / 4], rel=1e-6, abs=0)


def test_plateau_waits_for_warmup(tmp_path: Path) -> None:
    lr = 1e-6
    _, epochs, _ = _fit_schedule(tmp_path, 5, lr=lr, plateau_patience=0, warmup_epochs=2)
    # warm-up in epochs 0-1; plateau first consulted after epoch 2 (its best), reduces after epochs 3 and 4
    assert epochs == pytest.approx([lr / 2, lr, lr, lr, lr / 2], rel=1e-6, abs=0)


def test_constant_schedule(tmp_path: Path) -> None:
    steps, epochs, _ = _fit_schedule(tmp_path, 2, lr=0.05, scheduler=None)
    assert set(steps) == {0.05}
    assert epochs == pytest.approx([0.05, 0.05])


def test_early_stopping_is_added_on_request() -> None:
    module = ClassificationModule(build_mlp(6, 3), 3, early_stopping_patience=20, monitor="val/acc")
    (callback,) = module.configure_callbacks()
    assert isinstance(callback, EarlyStopping)
    assert (callback.monitor, callback.patience, callback.mode) == ("val/acc", 20, "max")
    assert ClassificationModule(build_mlp(6, 3), 3).configure_callbacks() == []


# -- hyperparameters and checkpoints ---------------------------------------------------------------------


def test_hyperparameters_are_saved(tmp_path: Path) -> None:
    module = ClassificationModule(
        build_cnn(1, 10, channels=(4,)), 10, optimizer="adam", lr=3e-3, warmup_epochs=2
    )
    hp = module.hparams
    assert "model" not in hp
    assert hp.model_class == "torch.nn.modules.container.Sequential"
    assert (hp.num_classes, hp.optimizer, hp.lr, hp.warmup_epochs, hp.scheduler) == (
        10,
        "adam",
        3e-3,
        2,
        "plateau",
    )
    named = ClassificationModule("mlp", 10, norm="renorm", model_kwargs={"in_features": 64})
    assert (named.hparams.model, named.hparams.norm, named.hparams.model_kwargs) == (
        "mlp",
        "renorm",
        {"in_features": 64},
    )


def test_checkpoint_reloads(tmp_path: Path, digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    module = ClassificationModule(build_cnn(1, 10, channels=(8, 8), norm="renorm"), 10, lr=0.05)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    x = next(iter(digits.test_dataloader()))[0]
    module.eval()
    # a module built from an nn.Module needs a fresh instance of the same architecture
    restored = ClassificationModule.load_from_checkpoint(
        path, model=build_cnn(1, 10, channels=(8, 8), norm="renorm")
    )
    restored.eval()
    assert restored.hparams.lr == 0.05
    assert restored.hparams.model_class == module.hparams.model_class
    torch.testing.assert_close(restored(x), module(x))
    for (name, a), (_, b) in zip(module.state_dict().items(), restored.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_named_model_reloads_from_the_path_alone(tmp_path: Path, flat_digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    module = ClassificationModule("mlp", 10, norm="noisy", model_kwargs={"in_features": 64, "hidden": (16,)})
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, flat_digits)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = ClassificationModule.load_from_checkpoint(tmp_path / "m.ckpt")
    x = torch.randn(4, 64)
    module.eval()
    restored.eval()
    assert isinstance(restored.model.norm1, nz.NoisyBatchNorm1d)
    torch.testing.assert_close(restored(x), module(x))
    # the datamodule's statistics and split travel in the checkpoint too
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert torch.equal(state["DigitsDataModule"]["mean"], flat_digits.mean)


# -- backbones -------------------------------------------------------------------------------------------


def test_named_builtin_models_need_their_input_size() -> None:
    with pytest.raises(ValueError, match="in_features"):
        ClassificationModule("mlp", 10)
    with pytest.raises(ValueError, match="in_channels"):
        ClassificationModule("cnn", 10, model_kwargs={"channels": (4,)})
    with pytest.raises(ValueError, match="model_kwargs is only for a model given by name"):
        ClassificationModule(build_mlp(4, 2), 2, model_kwargs={"hidden": (3,)})


def test_norm_with_a_model_object() -> None:
    net = build_cnn(1, 10, channels=(4, 4), norm="torch")
    module = ClassificationModule(net, 10, norm="renorm")
    assert module.model is net  # swapped in place: the caller's object is the one trained
    assert sum(isinstance(m, nz.BatchRenorm2d) for m in module.modules()) == 2
    assert not any(type(m) is nn.BatchNorm2d for m in module.modules())  # ours are BatchNorm2d subclasses
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        ClassificationModule(build_mlp(4, 2), 2, norm="renorm")


def test_timm_backbone_with_a_norm() -> None:
    pytest.importorskip("timm")
    module = ClassificationModule("test_resnet", 10, norm="renorm")
    norms = [m for m in module.modules() if nz.is_batch_norm(m)]
    assert norms
    assert all(isinstance(m, nz.BatchRenorm2d) for m in norms)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert module.hparams.model == "test_resnet"
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        ClassificationModule("no_such_net", 10)


def test_missing_timm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"needs the 'timm' package.*pip install \"normzoo\[timm\]\""):
        ClassificationModule("resnet18", 10)
