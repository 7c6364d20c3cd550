"""Code that finds BatchNorm by ``isinstance`` finds normzoo's layers and does to them what it does to torch's.

Each test runs the idiom on torch's model and on the same model (same weights) with each normzoo kind, and
compares the outcome: which layers it touched, the flags it set, and the outputs afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._models import KINDS, NZ_KINDS, bn_layers, images, net_pair


@pytest.mark.parametrize("kind", NZ_KINDS)
def test_freeze_bn_loop_puts_every_kind_in_eval(kind: str) -> None:
    reference, model = net_pair(kind)
    for net in (reference, model):
        net.train()
        for m in net.modules():  # the usual "freeze BN" loop of fine-tuning scripts
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
    assert [m.training for m in bn_layers(model)] == [False, False]
    before = copy.deepcopy(model.state_dict())
    x = images()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # statistics frozen
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]


@pytest.mark.parametrize("kind", NZ_KINDS)
def test_weight_decay_split_by_batchnorm_type(kind: str) -> None:
    def split(net: nn.Module) -> tuple[list[str], list[str]]:
        decay, no_decay = [], []
        for module_name, module in net.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}"
                (no_decay if isinstance(module, _BatchNorm) or name == "bias" else decay).append(full)
        return decay, no_decay

    reference, model = net_pair(kind)
    assert split(model) == split(reference)
    assert "1.weight" in split(model)[1]


def _to_frozen(module: nn.Module) -> nn.Module:
    """detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``, with torchvision's FrozenBatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        if module.affine:
            frozen.weight.data = module.weight.data.clone().detach()
            frozen.bias.data = module.bias.data.clone().detach()
        frozen.running_mean.data = module.running_mean.data
        frozen.running_var.data = module.running_var.data
        return frozen
    for name, child in module.named_children():
        new = _to_frozen(child)
        if new is not child:
            module.add_module(name, new)
    return module


def _trained(kind: str) -> tuple[nn.Module, nn.Module]:
    """Both models after a few training forwards (non-trivial statistics), weights made unequal to 1/0."""
    reference, model = net_pair(kind)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.load_state_dict(reference.state_dict())
    torch.manual_seed(3)
    for net in (reference, model):
        with torch.no_grad():
            for seed in range(3):
                net.train()(images(seed=seed))
    model.load_state_dict(reference.state_dict())  # noisy draws noise in training: start from torch's stats
    return reference, model


@pytest.mark.parametrize("kind", NZ_KINDS)
def test_torchvision_frozen_batchnorm_conversion(kind: str) -> None:
    pytest.importorskip("torchvision")
    reference, model = _trained(kind)
    reference, model = _to_frozen(reference).train(), _to_frozen(model).train()
    assert [type(m).__name__ for m in model] == [type(m).__name__ for m in reference]
    assert type(model[1]).__name__ == "FrozenBatchNorm2d"
    x = images(seed=9)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", NZ_KINDS)
def test_timm_freeze_batch_norm_2d_and_freeze(kind: str) -> None:
    timm_model = pytest.importorskip("timm.utils.model")
    reference, model = _trained(kind)
    frozen_ref = timm_model.freeze_batch_norm_2d(copy.deepcopy(reference))
    frozen = timm_model.freeze_batch_norm_2d(copy.deepcopy(model))
    assert [type(m) for m in frozen] == [type(m) for m in frozen_ref]
    x = images(seed=9)
    torch.testing.assert_close(frozen.train()(x), frozen_ref.train()(x), rtol=0, atol=0)

    timm_model.freeze(reference, include_bn_running_stats=True)
    timm_model.freeze(model, include_bn_running_stats=True)
    assert [type(m) for m in model] == [type(m) for m in reference]
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.train()(x), reference.train()(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", NZ_KINDS)
def test_lightning_base_finetuning_freeze_keeps_bn_trainable(kind: str) -> None:
    finetuning = pytest.importorskip("lightning.pytorch.callbacks")
    reference, model = net_pair(kind)
    for net in (reference, model):
        finetuning.BaseFinetuning.freeze(net, train_bn=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [name for name, p in reference.named_parameters() if p.requires_grad]
    assert trainable == ["1.weight", "1.bias", "4.weight", "4.bias"]
    assert [m.training for m in bn_layers(model)] == [m.training for m in bn_layers(reference)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp_mixed_precision_keeps_batchnorm_in_float32(kind: str) -> None:
    """FSDP wraps the modules of ``MixedPrecision._module_classes_to_ignore`` (``_BatchNorm``) on their own,
    in full precision; this is the check it makes (a real FSDP run is in ``test_fsdp.py``)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    policy = fsdp.MixedPrecision(param_dtype=torch.bfloat16)
    ignored = tuple(policy._module_classes_to_ignore)
    _, model = net_pair(kind)
    assert [isinstance(m, ignored) for m in model] == [isinstance(m, ignored) for m in net_pair("torch")[1]]
    assert all(isinstance(m, ignored) for m in bn_layers(model))
