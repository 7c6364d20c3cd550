"""fuse_bn: every fold (after/before, conv/transposed/linear, groups), what stays unfused and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normzoo as nz

from ._corpus import CASES, DataDependent, TransformerBlock, randomize_bn

PATTERNS = {
    # name: (model, input shape, BN layers left after fusing)
    "conv1d-bn": (
        lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU()),
        (4, 3, 10),
        0,
    ),
    "conv2d-bn": (
        lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nz.BatchNorm2d(6)),
        (2, 3, 7, 7),
        0,
    ),
    "conv3d-bn": (
        lambda: nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU()),
        (2, 3, 5, 5, 5),
        0,
    ),
    "grouped-conv-bn": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nz.BatchRenorm2d(6)),
        (2, 4, 6, 6),
        0,
    ),
    "convT-bn": (
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
        (2, 4, 5, 5),
        0,
    ),
    "linear-bn-dropout-linear": (
        lambda: nn.Sequential(nn.Linear(5, 6), nz.NoisyBatchNorm1d(6), nn.Dropout(), nn.Linear(6, 3)),
        (7, 5),
        0,
    ),
    "bn-conv-unpadded-grouped": (
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)),
        (2, 4, 8, 8),
        0,
    ),
    "bn-conv-reflect": (
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")),
        (2, 4, 8, 8),
        0,
    ),
    "bn-conv-zero-padded": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1)),
        (2, 3, 8, 8),
        1,
    ),
    "bn-convT-pointwise": (
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 1, groups=2)),
        (2, 4, 5, 5),
        0,
    ),
    "bn-convT-3x3": (lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3)), (2, 4, 5, 5), 1),
    "flatten-bn-linear": (
        lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 3)),
        (7, 3, 2, 2),
        0,
    ),
    "conv-bn-conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
        (2, 3, 6, 6),
        0,
    ),
    "bn-alone": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), (2, 3, 6, 6), 1),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_fused_outputs_match(name: str) -> None:
    build, shape, left = PATTERNS[name]
    model = randomize_bn(build()).eval()
    x = torch.randn(*shape)
    fused = nz.fuse_bn(model)
    assert not fused.training
    assert sum(nz.is_batch_norm(m) for m in fused.modules()) == left
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_fuse_after_insert_on_the_corpus(case_name: str) -> None:
    case = CASES[case_name]
    model = nz.insert_bn(case.build(), example_input=case.input())
    model.train()
    for seed in range(3):  # give the new layers running statistics
        model(case.input(seed))
    model.eval()
    fused = nz.fuse_bn(model)
    torch.testing.assert_close(fused(case.input(9)), model(case.input(9)), atol=1e-5, rtol=1e-5)
    left = 1 if case_name == "functional_resnet" else 0  # the norm after the residual sum stays
    assert sum(nz.is_batch_norm(m) for m in fused.modules()) == left


def test_channels_last_norm_folds_into_its_linear() -> None:
    model = nz.insert_bn(TransformerBlock())
    model.train()
    model(torch.randn(4, 6, 16))
    model.eval()
    fused = nz.fuse_bn(model)
    assert isinstance(fused.act, nn.GELU)
    assert fused.fc1.bias is not None
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_shared_layer_is_left_unfused_with_a_warning() -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv
            self.bn1 = nn.BatchNorm2d(3)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.conv(self.bn1(self.conv(x))))

    model = randomize_bn(Shared()).eval()
    with pytest.warns(UserWarning, match="bn2: its neighbour conv is used in several places"):
        fused = nz.fuse_bn(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fused(x), model(x))
    shared_bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), shared_bn, nn.Conv2d(3, 3, 1), shared_bn)
    with pytest.warns(UserWarning, match="used in several places"):
        assert sum(nz.is_batch_norm(m) for m in nz.fuse_bn(model).modules()) == 1


def test_hooks_and_batch_statistics_prevent_folding() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),
    )
    model[1].register_forward_hook(lambda *_: None)
    with pytest.warns(UserWarning, match=r"1: it has hooks; 3: no running statistics"):
        fused = nz.fuse_bn(model)
    assert sum(nz.is_batch_norm(m) for m in fused.modules()) == 2


def test_timm_norm_act_keeps_its_activation() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU))
    ).eval()
    fused = nz.fuse_bn(model)
    assert isinstance(fused[1], nn.SiLU)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_fuse_needs_sized_layers_and_a_module() -> None:
    with pytest.warns(UserWarning, match="could not trace"):
        model = nz.insert_bn(DataDependent())
    with pytest.raises(ValueError, match="still pending"):
        nz.fuse_bn(model)
    with pytest.raises(TypeError, match=r"fuse_bn: expected a torch\.nn\.Module"):
        nz.fuse_bn(3)  # type: ignore[arg-type]


def test_inplace_and_copy() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    fused = nz.fuse_bn(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert model.training
    assert nz.fuse_bn(model, inplace=True) is model
    assert isinstance(model[1], nn.Identity)
    assert fused[0].weight is not model[0].weight


def test_a_parametrized_neighbour_is_named_in_a_warning() -> None:
    class Positive(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight.abs()

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    parametrize.register_parametrization(model[0], "weight", Positive())
    with pytest.warns(UserWarning, match="1: its neighbour 0 has a parametrization"):
        fused = nz.fuse_bn(model)
    assert isinstance(fused[1], nn.BatchNorm2d)
