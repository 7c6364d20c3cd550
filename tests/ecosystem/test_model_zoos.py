"""normzoo's kinds as the ``norm_layer`` of timm's and torchvision's models.

Every model is built with each kind, its normalization layers are checked to be normzoo's (with the
activation the family asked for, for timm's norm+act families), and it forwards a small batch in training
and eval. With noise off and BatchRenorm in its warm-up every kind computes what torch's BatchNorm computes,
so the outputs are compared with the model built with timm's or torchvision's own layer (same weights).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

import normzoo as nz

from ._models import NZ_KINDS, images, quiet

timm = pytest.importorskip("timm")
nzt = pytest.importorskip("normzoo.integrations.timm")

#: normzoo's norm+act class of each kind: a norm_layer for every timm family.
NORM_ACT = {"batchnorm": nzt.BatchNormAct2d, "renorm": nzt.BatchRenormAct2d, "noisy": nzt.NoisyBatchNormAct2d}
PLAIN = {"batchnorm": nz.BatchNorm2d, "renorm": nz.BatchRenorm2d, "noisy": nz.NoisyBatchNorm2d}

#: timm families that take ``norm_layer`` (norm+act ones marked), small enough for a CPU test. (timm's
#: MobileNetV3, LCNet and MobileNetV4 builders pass their own norm_layer and refuse the argument.)
TIMM_MODELS = {
    "resnet10t": False,  # ResNet: calls norm_layer(num_features)
    "efficientnet_b0": True,  # EfficientNet: get_norm_act_layer(norm_layer, act_layer)
    "regnetx_002": True,  # RegNet
    "cs3darknet_s": True,  # CSPNet
}


def _x() -> torch.Tensor:
    return images(2, seed=0, size=32)


def _forward_both_modes(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):  # noisy layers draw from the global generator: dropout masks differ
            m.eval()
    train = model(_x())
    return train, model.eval()(_x())


def _assert_same_outputs(model: nn.Module, reference: nn.Module) -> None:
    model.load_state_dict(reference.state_dict())  # the same keys: timm's layout is kept
    quiet(model)
    for got, want in zip(_forward_both_modes(model), _forward_both_modes(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("kind", NZ_KINDS)
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_norm_act_class_as_norm_layer(name: str, kind: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=3, drop_rate=0.0)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, drop_rate=0.0, norm_layer=NORM_ACT[kind])
    norms, reference_norms = _norms(model), _norms(reference)
    assert len(norms) == len(reference_norms) > 0
    assert all(type(m) is NORM_ACT[kind] for m in norms)
    # the activation each layer applies is the one timm's own layer applies
    acts = [type(getattr(m, "act", nn.Identity())) for m in norms]
    assert acts == [type(getattr(m, "act", nn.Identity())) for m in reference_norms]
    if TIMM_MODELS[name]:
        assert any(a is not nn.Identity for a in acts)
    _assert_same_outputs(model, reference)


@pytest.mark.parametrize("kind", ["renorm", "noisy"])
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_plain_normzoo_class_as_norm_layer(name: str, kind: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=3, norm_layer=PLAIN[kind])
    norms = _norms(model)
    assert norms
    assert all(isinstance(m, PLAIN[kind]) for m in norms)
    model.eval()(_x())


def test_timm_norm_layer_partial_keeps_family_arguments() -> None:
    layer = functools.partial(nzt.BatchRenormAct2d, r_max=2.0, d_max=1.0, schedule=None)
    model = timm.create_model("tinynet_e", pretrained=False, num_classes=3, norm_layer=layer)
    norms = _norms(model)
    assert all(type(m) is nzt.BatchRenormAct2d for m in norms)
    assert all(m.r_max == 2.0 and m.d_max == 1.0 and m.schedule is None for m in norms)
    assert type(model.bn1.act) is nn.SiLU


def test_timm_models_without_norm_layer_are_converted_by_replace_bn() -> None:
    model = timm.create_model("dla34", pretrained=False, num_classes=3)
    renorm = nz.replace_bn(model, "renorm")
    assert all(isinstance(m, nz.BatchRenorm2d) for m in _norms(renorm))
    model.eval()
    renorm.eval()
    torch.testing.assert_close(renorm(_x()), model(_x()), rtol=1e-5, atol=1e-6)


def test_timm_feature_extraction_keeps_normzoo_layers_as_leaves() -> None:
    model = timm.create_model(
        "resnet18", pretrained=False, features_only=True, feature_cls="fx", norm_layer=nz.BatchRenorm2d
    )
    features = model.eval()(_x())
    assert len(features) == 5


def _torchvision(name: str, norm_layer: Any) -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return getattr(models, name)(num_classes=3, norm_layer=norm_layer)


@pytest.mark.parametrize("kind", NZ_KINDS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_norm_layer(name: str, kind: str) -> None:
    reference = _torchvision(name, nn.BatchNorm2d)
    model = _torchvision(name, PLAIN[kind])
    norms = _norms(model)
    assert len(norms) == len(_norms(reference)) > 0
    assert all(type(m) is PLAIN[kind] for m in norms)
    _assert_same_outputs(model, reference)


@pytest.mark.parametrize("kind", NZ_KINDS)
def test_timm_freeze_keeps_the_activation_of_normzoo_norm_act_layers(kind: str) -> None:
    from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d

    torch.manual_seed(0)
    model = timm.create_model(
        "tinynet_e", pretrained=False, num_classes=3, drop_rate=0.0, norm_layer=NORM_ACT[kind]
    )
    with torch.no_grad():
        model.train()(_x())  # non-trivial statistics
    expected = model.eval()(_x())
    frozen = freeze_batch_norm_2d(model)
    assert not _norms(frozen)
    assert type(frozen.bn1) is FrozenBatchNormAct2d
    assert type(frozen.bn1.act) is nn.SiLU
    torch.testing.assert_close(frozen.train()(_x()), expected, rtol=1e-5, atol=1e-6)  # frozen: eval math
