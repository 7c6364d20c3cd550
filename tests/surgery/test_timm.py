"""Surgery on timm models: a ResNet, a MobileNetV3 (BatchNormAct2d), a ConvNeXt and a ViT (skipped without timm)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import normzoo as nz

from ._corpus import assert_matches, hand_statistics, norm_acts, outputs_equal, train_step

timm = pytest.importorskip("timm")


@dataclass
class TimmCase:
    name: str
    kwargs: dict[str, int]
    #: insert_bn goes into remove_bn(model) (a ResNet's activations all follow a BatchNorm)
    vanilla: bool
    count: int
    #: every NormAct name matches this
    where: str
    norm: type[nn.Module]
    channels_last: bool

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        model = timm.create_model(self.name, pretrained=False, num_classes=10, **self.kwargs)
        return nz.remove_bn(model) if self.vanilla else model


CASES = {
    "resnet10t": TimmCase(
        "resnet10t", {}, True, 11, r"conv1\.(2|5)|act1|layer\d\.0\.act(1|2)", nz.BatchNorm2d, False
    ),
    "mobilenetv3_small_050": TimmCase(
        "mobilenetv3_small_050", {}, False, 19, r"blocks\.\d\.\d\.se\.(act1|gate)|act2", nz.BatchNorm2d, False
    ),
    "convnext_atto": TimmCase(
        "convnext_atto", {}, False, 12, r"stages\.\d\.blocks\.\d\.mlp\.act", nz.BatchNorm2d, False
    ),
    "vit_tiny": TimmCase(
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8},
        False,
        12,
        r"blocks\.\d+\.mlp\.act",
        nz.BatchNorm1d,
        True,
    ),
}

_cache: dict[str, tuple[nn.Module, nn.Module]] = {}


def built(key: str) -> tuple[nn.Module, nn.Module]:
    """(model, insert_bn(model, remove_bias=False)), built once per test session."""
    if key not in _cache:
        model = CASES[key].build()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning on these models
            _cache[key] = (model, nz.insert_bn(model, remove_bias=False))
    return _cache[key]


def x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", sorted(CASES))
def test_layers_in_the_right_places(key: str) -> None:
    case = CASES[key]
    _, inserted = built(key)
    found = norm_acts(inserted)
    assert len(found) == case.count
    for name, layer in found.items():
        assert re.fullmatch(case.where, name), name
        assert type(layer.norm) is case.norm, name
        assert layer.channels_last is case.channels_last, name
        assert layer.act is not None


@pytest.mark.parametrize("key", sorted(CASES))
def test_training_step_and_round_trip(key: str) -> None:
    model, inserted = built(key)
    assert outputs_equal(nz.remove_bn(model), nz.remove_bn(inserted), x(), train=False)
    train_step(nz.replace_bn(inserted, "batchnorm"), x(4))  # a copy: the cached model stays as it is


@pytest.mark.parametrize("key", sorted(CASES))
def test_fuse_after_insert(key: str) -> None:
    _, inserted = built(key)
    fresh = nz.replace_bn(inserted, "batchnorm")  # a copy whose statistics may change
    fresh.train()
    with torch.no_grad():
        fresh(x(8, seed=1))
    fresh.eval()
    fused = nz.fuse_bn(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fused(x()), fresh(x()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_fuse_original_batchnorm_models(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    model.train()
    with torch.no_grad():
        model(x(8, seed=1))
    model.eval()
    fused = nz.fuse_bn(model)
    left = sum(nz.is_batch_norm(m) for m in fused.modules())
    assert left == {"resnet10t": 0, "mobilenetv3_small_050": 0}[name]
    with torch.no_grad():
        torch.testing.assert_close(fused(x()), model(x()), atol=1e-4, rtol=1e-4)


def test_resnet_already_normalized() -> None:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    with pytest.warns(UserWarning, match="each of the 11 activations of ResNet already follows"):
        assert not norm_acts(nz.insert_bn(model))


def test_replace_keeps_mobilenet_outputs() -> None:
    torch.manual_seed(0)
    model: Callable[..., nn.Module] = timm.create_model(
        "mobilenetv3_small_050", pretrained=False, num_classes=10
    )
    renorm = nz.replace_bn(model, "renorm")
    assert outputs_equal(model, renorm, x(), train=False)
    assert outputs_equal(model, renorm, x(), train=True, atol=1e-5)


@pytest.mark.parametrize("norm", ["batchnorm", "renorm", "noisy"])
def test_replaced_norm_act_layers_stay_timm_norm_act_for_timm_freeze(norm: str) -> None:
    # timm's freeze_batch_norm_2d keeps drop and act only of timm BatchNormAct2d instances: a replacement
    # that is not one would silently lose its activation there.
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
    from timm.utils.model import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    replaced = nz.replace_bn(model, norm)
    layers = [m for m in replaced.modules() if nz.is_batch_norm(m)]
    assert layers
    family = {"batchnorm": nz.BatchNorm2d, "renorm": nz.BatchRenorm2d, "noisy": nz.NoisyBatchNorm2d}[norm]
    assert all(isinstance(m, TimmBatchNormAct2d) and isinstance(m, family) for m in layers)
    frozen = freeze_batch_norm_2d(replaced)
    assert outputs_equal(model, frozen, x(), train=False, atol=1e-5)


@pytest.mark.parametrize("key", ["mobilenetv3_small_050", "convnext_atto", "vit_tiny"])
def test_recompute_after_insert_matches_hand_computation(key: str) -> None:
    _, inserted = built(key)
    model = nz.replace_bn(inserted, "batchnorm")  # a copy
    inputs = [x(n, seed=n) for n in (2, 3)]
    expected = hand_statistics(model, inputs)
    nz.recompute_bn_stats(model, inputs)
    assert_matches(model, expected)
