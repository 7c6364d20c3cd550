"""normzoo.models: the seed experiments' MLP and CNN builders, activations and initializations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normzoo as nz
from normzoo.models import (
    ACTIVATIONS,
    build_cnn,
    build_mlp,
    count_parameters,
    get_activation,
    init_weights,
    kaiming_nonlinearity,
)

NORMS = [None, "batchnorm", "renorm", "noisy", "torch"]
NORM_CLASSES = {
    "batchnorm": (nz.BatchNorm1d, nz.BatchNorm2d, nz.BatchNorm3d),
    "renorm": (nz.BatchRenorm1d, nz.BatchRenorm2d, nz.BatchRenorm3d),
    "noisy": (nz.NoisyBatchNorm1d, nz.NoisyBatchNorm2d, nz.NoisyBatchNorm3d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_children())


# -- shapes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_shapes_and_flattening(norm: str | None) -> None:
    mlp = build_mlp(64, 10, norm=norm)
    assert mlp(torch.randn(5, 64)).shape == (5, 10)
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # images are flattened
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [100, 100, 100, 10]


@pytest.mark.parametrize(
    ("ndim", "shape"),
    [
        (2, (1, 8, 8)),
        (2, (1, 28, 28)),
        (2, (3, 32, 32)),
        (2, (3, 5, 7)),
        (1, (2, 64)),
        (1, (1, 9)),
        (3, (1, 6, 6, 6)),
    ],
)
@pytest.mark.parametrize("norm", [None, "batchnorm"])
def test_cnn_shapes(ndim: int, shape: tuple[int, ...], norm: str | None) -> None:
    cnn = build_cnn(shape[0], 7, ndim=ndim, channels=(4, 4, 8, 8, 16, 16), norm=norm)
    assert cnn(torch.randn(3, *shape)).shape == (3, 7)


def test_cnn_default_architecture() -> None:
    cnn = build_cnn(3, 10)
    convs = [m for m in cnn if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn) == 3
    names = [name for name, _ in _children(cnn)]
    assert names[-3:] == ["gap", "flatten", "head"]
    assert count_parameters(cnn) == sum(p.numel() for p in cnn.parameters())


def test_cnn_pool_every_zero_and_bad_arguments() -> None:
    cnn = build_cnn(1, 10, channels=(4, 4), pool_every=0)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cnn)
    with pytest.raises(ValueError, match="ndim"):
        build_cnn(1, 10, ndim=4)
    with pytest.raises(ValueError, match="kernel_size"):
        build_cnn(1, 10, kernel_size=2)
    with pytest.raises(ValueError, match="dropout"):
        build_mlp(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        build_mlp(4, 0)


# -- normalization placement -----------------------------------------------------------------------------


def _check_blocks(model: nn.Sequential, norm: str | None, ndim: int, hidden: int, dropout: bool) -> None:
    """Every hidden affine layer is followed by [norm], activation, [dropout]; the head by nothing."""
    children = [m for _, m in _children(model)]
    affines = [i for i, m in enumerate(children) if isinstance(m, AFFINE)]
    assert len(affines) == hidden + 1
    *hidden_idx, head_idx = affines
    assert head_idx == len(children) - 1
    assert children[head_idx].bias is not None
    norms = [m for m in children if nz.is_batch_norm(m)]
    assert len(norms) == (hidden if norm else 0)
    for i in hidden_idx:
        affine = children[i]
        assert (affine.bias is None) == (norm is not None)
        nxt = children[i + 1 : i + 4]
        if norm is not None:
            assert type(nxt[0]) is NORM_CLASSES[norm][ndim - 1]
            assert nxt[0].num_features == (
                affine.out_features if isinstance(affine, nn.Linear) else affine.out_channels
            )
            nxt = nxt[1:]
        assert isinstance(nxt[0], nn.ReLU)
        assert isinstance(nxt[1], nn.Dropout) == dropout


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_mlp_norm_placement(norm: str | None, dropout: float) -> None:
    _check_blocks(build_mlp(20, 3, hidden=(8, 8, 8), norm=norm, dropout=dropout), norm, 1, 3, dropout > 0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_cnn_norm_placement(norm: str | None, ndim: int) -> None:
    cnn = build_cnn(2, 3, ndim=ndim, channels=(4, 8, 8), norm=norm, dropout=0.1)
    _check_blocks(cnn, norm, ndim, 3, True)


def test_norm_accepts_a_class_and_a_factory() -> None:
    mlp = build_mlp(4, 2, hidden=(3,), norm=nz.BatchRenorm2d)  # the family is used at the needed dimension
    assert isinstance(mlp.norm1, nz.BatchRenorm1d)
    mlp = build_mlp(4, 2, hidden=(3,), norm=lambda c: nn.LayerNorm(c))
    assert isinstance(mlp.norm1, nn.LayerNorm)
    assert mlp.fc1.bias is None


@pytest.mark.parametrize("norm", NORMS)
def test_every_parameter_gets_a_gradient(norm: str | None) -> None:
    cnn = build_cnn(1, 4, channels=(4, 8), norm=norm)
    nn.functional.cross_entropy(cnn(torch.randn(6, 1, 8, 8)), torch.randint(0, 4, (6,))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cnn.parameters())


# -- activations -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_builds(name: str) -> None:
    mlp = build_mlp(6, 2, hidden=(5, 5), activation=name)
    acts = [m for n, m in _children(mlp) if n.startswith("act")]
    assert len(acts) == 2
    assert all(type(a) is ACTIVATIONS[name] for a in acts)
    assert torch.isfinite(mlp(torch.randn(3, 6))).all()


def test_get_activation() -> None:
    assert get_activation("ReLU") is nn.ReLU
    assert get_activation("leaky-relu") is nn.LeakyReLU
    assert get_activation(nn.Hardswish) is nn.Hardswish
    with pytest.raises(ValueError, match=r"get_activation: expected one of .*'relu'.*'sigmoid'.*got 'bogus'"):
        get_activation("bogus")
    with pytest.raises(TypeError):
        get_activation(3)  # type: ignore[arg-type]
    assert isinstance(build_cnn(1, 2, channels=(2,), activation=nn.Hardswish).act1, nn.Hardswish)


def test_kaiming_nonlinearity() -> None:
    assert kaiming_nonlinearity("relu") == ("relu", 0.0)
    assert kaiming_nonlinearity("lrelu") == ("leaky_relu", 0.01)
    assert kaiming_nonlinearity(nn.LeakyReLU(0.3)) == ("leaky_relu", pytest.approx(0.3))
    assert kaiming_nonlinearity("sigmoid") == ("sigmoid", 0.0)
    assert kaiming_nonlinearity("tanh") == ("tanh", 0.0)
    assert kaiming_nonlinearity("selu") == ("linear", 0.0)
    assert kaiming_nonlinearity(None) == ("relu", 0.0)
    assert kaiming_nonlinearity(nn.Hardswish) == ("relu", 0.0)


# -- initialization --------------------------------------------------------------------------------------


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, AFFINE)]


@pytest.mark.parametrize(
    ("activation", "gain"),
    [
        ("relu", math.sqrt(2)),
        ("tanh", 5 / 3),
        ("sigmoid", 1.0),
        ("lrelu", math.sqrt(2 / (1 + 0.01**2))),
        ("selu", 1.0),
    ],
)
def test_kaiming_std(activation: str, gain: float) -> None:
    torch.manual_seed(0)
    mlp = build_mlp(800, 10, hidden=(600,), activation=activation, init="kaiming")
    for weight in _weights(mlp):
        assert weight.std().item() == pytest.approx(gain / math.sqrt(weight.shape[1]), rel=0.02)
        assert weight.mean().item() == pytest.approx(0.0, abs=0.01 * gain / math.sqrt(weight.shape[1]))
    assert all(
        b is None or (b == 0).all() for b in (m.bias for m in mlp.modules() if isinstance(m, nn.Linear))
    )


def test_kaiming_conv_uses_fan_in() -> None:
    torch.manual_seed(0)
    cnn = build_cnn(16, 10, channels=(64, 64), init="kaiming")
    conv = cnn.conv2.weight.detach()
    fan_in = 64 * 3 * 3
    assert conv.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)


def test_xavier_is_glorot_uniform() -> None:
    torch.manual_seed(0)
    mlp = build_mlp(700, 10, hidden=(500,), activation="sigmoid", init="xavier")
    weight = mlp.fc1.weight.detach()
    fan_out, fan_in = weight.shape
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.99 * bound  # uniform: the bound is reached


@pytest.mark.parametrize("std", [1.0, 0.05])
def test_normal_init(std: float) -> None:
    torch.manual_seed(0)
    cnn = build_cnn(8, 10, channels=(32, 32), init="normal", init_std=std)
    pooled = torch.cat([w.flatten() for w in _weights(cnn)])  # 11,840 draws: std within ~2 % of init_std
    assert pooled.std().item() == pytest.approx(std, rel=0.03)
    assert pooled.mean().item() == pytest.approx(0.0, abs=0.03 * std)
    assert (cnn.head.bias == 0).all()


def test_init_leaves_norm_layers_and_default() -> None:
    mlp = build_mlp(10, 2, hidden=(4,), norm="batchnorm", init="normal")
    assert (mlp.norm1.weight == 1).all()
    assert (mlp.norm1.bias == 0).all()
    torch.manual_seed(1)
    a = build_mlp(10, 2, hidden=(4,), init="default")
    torch.manual_seed(1)
    b = nn.Linear(10, 4)
    assert torch.equal(a.fc1.weight, b.weight)
    with pytest.raises(ValueError, match="unknown init 'he'"):
        init_weights(a, "he")
    with pytest.raises(ValueError, match="init_std"):
        init_weights(a, "normal", 0.0)


def test_init_weights_infers_the_activation() -> None:
    torch.manual_seed(0)
    net = init_weights(nn.Sequential(nn.Linear(900, 900), nn.Tanh()), "kaiming")
    assert net[0].weight.detach().std().item() == pytest.approx(5 / 3 / 30, rel=0.02)


@pytest.mark.parametrize("norm", ["batchnorm", "renorm", "noisy"])
def test_1d_cnn_for_mnist1d_signals(norm: str) -> None:
    """The study's CNN on MNIST-1D: signals (N, 1, 40), 1-D convolutions, 1-D norms, three 2x poolings."""
    cnn = build_cnn(1, 10, ndim=1, channels=(8, 8, 16, 16, 32, 32), norm=norm)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv1d)]
    norms = [m for m in cnn.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(convs) == len(norms) == 6
    assert all(type(n).__name__.endswith("1d") for n in norms)
    lengths = []
    x = torch.randn(5, 1, 40)
    for name, module in cnn.named_children():
        x = module(x)
        if name.startswith("pool"):
            lengths.append(x.shape[-1])
    assert lengths == [20, 10, 5]
    assert x.shape == (5, 10)
