"""freeze_bn / unfreeze_bn against a hand computation of BatchNorm's eval form, for every BatchNorm kind."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normzoo as nz
from normzoo.surgery import FrozenBatchNorm

from ._corpus import randomize_bn

KINDS: dict[str, Callable[[int], nn.Module]] = {
    "torch": nn.BatchNorm2d,
    "batchnorm": nz.BatchNorm2d,
    "renorm": nz.BatchRenorm2d,
    "noisy": nz.NoisyBatchNorm2d,
    "insert_bn": lambda c: nz.insert_bn(nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU()))[1],
}


def _timm_bn_act(channels: int) -> nn.Module:
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.BatchNormAct2d(channels, act_layer=nn.ReLU)


def model_with(kind: str) -> nn.Module:
    make = _timm_bn_act if kind == "timm" else KINDS[kind]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    return randomize_bn(model)


def bn_of(layer: nn.Module) -> nn.Module:
    return layer.norm if isinstance(layer, nz.surgery.NormAct) else layer


def by_hand(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``γ·(x − running_mean)/sqrt(running_var + ε) + β`` per channel, in float64."""
    shape = (1, -1, 1, 1)
    mean, var = bn.running_mean.double().reshape(shape), bn.running_var.double().reshape(shape)
    y = (x.double() - mean) / torch.sqrt(var + bn.eps)
    return y * bn.weight.double().reshape(shape) + bn.bias.double().reshape(shape)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("kind", [*KINDS, "timm"])
@pytest.mark.parametrize("trainable_affine", [False, True])
def test_frozen_layers_compute_the_eval_form_in_training_too(kind: str, trainable_affine: bool) -> None:
    model = model_with(kind)
    bn = bn_of(model[1])
    frozen_model = nz.freeze_bn(model, trainable_affine=trainable_affine).train()
    frozen = bn_of(frozen_model[1])
    assert isinstance(frozen, FrozenBatchNorm)
    x = torch.randn(8, 3, 6, 6)
    hidden = frozen_model[0](x)
    expected = by_hand(bn, hidden)
    if kind == "timm":
        expected = expected.relu()
    torch.testing.assert_close(frozen(hidden).double(), expected, rtol=1e-5, atol=1e-5)
    eval_model = copy.deepcopy(model).eval()
    torch.testing.assert_close(frozen_model(x), eval_model(x), rtol=0, atol=1e-6)

    statistics = (frozen.running_mean.clone(), frozen.running_var.clone())
    optimizer = torch.optim.SGD(frozen_model.parameters(), lr=0.1)
    frozen_model(x).square().mean().backward()
    optimizer.step()
    frozen_model.train()  # what every training loop does at the start of an epoch
    assert torch.equal(frozen.running_mean, statistics[0])
    assert torch.equal(frozen.running_var, statistics[1])
    assert (frozen.weight.grad is not None) == trainable_affine
    assert frozen.weight.requires_grad == trainable_affine


def test_trainable_parameters_keep_their_identity_and_keys() -> None:
    model = model_with("torch")
    weight = model[1].weight
    frozen = nz.freeze_bn(model, trainable_affine=True, inplace=True)
    assert frozen[1].weight is weight
    assert frozen.state_dict().keys() == model_with("torch").state_dict().keys()
    checkpoint = model_with("torch").state_dict()
    frozen.load_state_dict(checkpoint)  # a BatchNorm checkpoint loads into the frozen model...
    assert torch.equal(frozen[1].running_var, checkpoint["1.running_var"])
    back = model_with("torch")
    back.load_state_dict(frozen.state_dict())  # ...and back
    assert all(torch.equal(v, checkpoint[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("kind", [*KINDS, "timm"])
def test_unfreeze_gives_back_the_layer_bit_for_bit(kind: str) -> None:
    model = model_with(kind)
    bn_of(model[1]).requires_grad_(False)  # a flag the freeze changes and the unfreeze restores
    bn_of(model[1]).weight.requires_grad_(True)
    reference = copy.deepcopy(model)
    frozen = nz.freeze_bn(model, trainable_affine=True)
    back = nz.unfreeze_bn(frozen.train())
    assert type(bn_of(back[1])) is type(bn_of(reference[1]))
    assert [p.requires_grad for p in back.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert back.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    for attr in ("eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(bn_of(back[1]), attr) == getattr(bn_of(reference[1]), attr), attr
    assert repr(back) == repr(reference)
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(1)
    y_back = back.train()(x)
    torch.manual_seed(1)
    assert torch.equal(y_back, reference.train()(x))


def test_fuse_bn_folds_frozen_layers() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    model = randomize_bn(model[:3]).eval(), randomize_bn(model[3:]).eval()
    for part, x in zip(model, (torch.randn(5, 3), torch.randn(2, 4, 3, 3)), strict=True):
        fused = nz.fuse_bn(nz.freeze_bn(part))
        assert not any(isinstance(m, FrozenBatchNorm) for m in fused.modules())
        torch.testing.assert_close(fused(x), part(x), rtol=1e-5, atol=1e-6)
    assert isinstance(nz.remove_bn(nz.freeze_bn(model[0]))[1], nn.Identity)


def test_layers_without_running_statistics_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"freeze_bn: expected BatchNorm layers with running statistics, got 1"
    ):
        nz.freeze_bn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))


def test_under_ddp_nothing_is_unused_and_statistics_stay() -> None:
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for trainable_affine in (False, True):
            frozen = nz.freeze_bn(model_with("torch"), trainable_affine=trainable_affine)
            statistics = frozen[1].running_mean.clone()
            ddp = nn.parallel.DistributedDataParallel(frozen)  # find_unused_parameters=False: all used
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
            for _ in range(2):
                optimizer.zero_grad()
                ddp(torch.randn(4, 3, 6, 6)).square().mean().backward()
                optimizer.step()
            assert torch.equal(frozen[1].running_mean, statistics)
            assert (frozen[1].weight.grad is not None) == trainable_affine
            with pytest.raises(TypeError, match=r"freeze_bn: expected a plain .*model\.module"):
                nz.freeze_bn(ddp)
    finally:
        dist.destroy_process_group()


def test_lightning_base_finetuning_keeps_frozen_statistics() -> None:
    """BaseFinetuning.freeze turns BatchNorm's track_running_stats off (batch statistics in eval); not ours."""
    finetuning = pytest.importorskip("lightning.pytorch.callbacks.finetuning")
    model = model_with("renorm")
    eval_output = copy.deepcopy(model).eval()(x := torch.randn(4, 3, 6, 6))
    frozen = nz.freeze_bn(model)
    finetuning.BaseFinetuning.freeze(frozen, train_bn=False)
    finetuning.BaseFinetuning.make_trainable(frozen[1])  # unfreezing the backbone later: the affine trains
    assert frozen[1].weight.requires_grad
    torch.testing.assert_close(frozen.train()(x), eval_output, rtol=0, atol=1e-6)


def test_the_documented_lightning_recipe_keeps_statistics_through_fit() -> None:
    """docs/surgery.md's FreezeBackbone callback in a real Trainer: the statistics never move."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import BaseFinetuning

    class FreezeBackbone(BaseFinetuning):
        def __init__(self, unfreeze_at_epoch: int = 1) -> None:
            super().__init__()
            self.unfreeze_at_epoch = unfreeze_at_epoch

        def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
            nz.freeze_bn(pl_module.backbone, inplace=True)
            self.freeze(pl_module.backbone)

        def finetune_function(
            self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
        ) -> None:
            if epoch == self.unfreeze_at_epoch:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer)

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model_with("torch")
            self.head = nn.Linear(2, 3)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.backbone(x).mean((2, 3))), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)

    module = Classifier()
    statistics = module.backbone[1].running_mean.clone()
    weight = module.backbone[1].weight.detach().clone()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[FreezeBackbone()], accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    frozen = module.backbone[1]
    assert isinstance(frozen, FrozenBatchNorm)
    assert torch.equal(frozen.running_mean, statistics)
    assert not torch.equal(frozen.weight.detach(), weight)  # unfrozen at epoch 1: the affine trained
