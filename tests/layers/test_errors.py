"""Bad input and bad arguments: a clear error that names the layer, what it expected and what it got."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ._reference import FAMILIES, TORCH_BN

LAYERS = [(family, ndim) for family in FAMILIES for ndim in (1, 2, 3)]
LAYER_IDS = [f"{family}{ndim}d" for family, ndim in LAYERS]
GOOD_SHAPE = {1: (4, 3), 2: (2, 3, 4, 4), 3: (2, 3, 2, 2, 2)}
ONE_VALUE = {1: [(1, 3), (1, 3, 1)], 2: [(1, 3, 1, 1)], 3: [(1, 3, 1, 1, 1)]}


def _layer(family: str, ndim: int, **kwargs: Any) -> nn.Module:
    return FAMILIES[family][ndim - 1](3, **kwargs)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_number_of_channels(family: str, ndim: int, training: bool) -> None:
    layer = _layer(family, ndim).train(training)
    shape = list(GOOD_SHAPE[ndim])
    shape[1] = 5
    name = type(layer).__name__
    with pytest.raises(ValueError, match=re.escape(f"{name}(3) expected 3 channels")) as info:
        layer(torch.randn(shape))
    assert str(tuple(shape)) in str(info.value)
    assert "5" in str(info.value)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
def test_wrong_number_of_dimensions(family: str, ndim: int) -> None:
    layer = _layer(family, ndim)
    name = type(layer).__name__
    accepted = {1: (2, 3), 2: (4,), 3: (5,)}[ndim]
    for dims in range(1, 7):
        if dims in accepted:
            continue
        shape = (2, 3, 2, 2, 2, 2)[:dims]
        with pytest.raises(ValueError, match=re.escape(name)) as info:
            layer(torch.randn(shape))
        message = str(info.value)
        assert f"got {dims}D input of shape {shape}" in message
        assert {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[ndim] in message


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
def test_one_value_per_channel_in_training(family: str, ndim: int) -> None:
    for shape in ONE_VALUE[ndim]:
        layer = _layer(family, ndim)
        x = torch.randn(shape)
        with pytest.raises(
            ValueError, match=r"^Expected more than 1 value per channel when training"
        ) as info:
            layer(x)
        assert type(layer).__name__ in str(info.value)
        assert int(layer.num_batches_tracked) == 0  # nothing was counted or updated
        assert torch.equal(layer.running_var, torch.ones(3))
        # in eval, with running statistics, one value is fine (as in torch)
        layer.eval()
        torch.testing.assert_close(layer(x), TORCH_BN[ndim - 1](3).eval()(x))


@pytest.mark.parametrize(("family", "ndim"), [(f, n) for f in ("batchnorm", "noisy") for n in (1, 2, 3)])
def test_one_value_per_channel_without_running_stats_even_in_eval(family: str, ndim: int) -> None:
    """Without running statistics, eval uses batch statistics too: torch raises, and so do we."""
    shape = ONE_VALUE[ndim][0]
    ours = _layer(family, ndim, track_running_stats=False).eval()
    theirs = TORCH_BN[ndim - 1](3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        theirs(torch.randn(shape))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(shape))


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64], ids=str
)
def test_non_floating_point_input(family: str, ndim: int, dtype: torch.dtype) -> None:
    layer = _layer(family, ndim)
    x = torch.ones(GOOD_SHAPE[ndim]).to(dtype)
    with pytest.raises(
        TypeError, match=re.escape(f"{type(layer).__name__} expected a floating-point input")
    ) as info:
        layer(x)
    assert str(dtype) in str(info.value)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize(
    "value",
    [None, 3.0, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.ones((4, 3))],
    ids=["None", "float", "list", "numpy"],
)
def test_not_a_tensor(family: str, ndim: int, value: object) -> None:
    layer = _layer(family, ndim)
    with pytest.raises(TypeError, match=re.escape(f"{type(layer).__name__} expected a torch.Tensor")) as info:
        layer(value)
    assert type(value).__name__ in str(info.value)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
def test_input_on_another_device(family: str, ndim: int) -> None:
    """CPU parameters, input on the meta device (CUDA is covered in test_cuda.py)."""
    layer = _layer(family, ndim)
    x = torch.empty(GOOD_SHAPE[ndim], device="meta")
    with pytest.raises(RuntimeError, match=re.escape(type(layer).__name__)) as info:
        layer(x)
    assert "cpu" in str(info.value)
    assert "meta" in str(info.value)


# --- constructor arguments ----------------------------------------------------------------------------


BAD_COMMON: list[tuple[str, dict[str, Any]]] = [
    ("num_features", {"num_features": 0}),
    ("num_features", {"num_features": -2}),
    ("num_features", {"num_features": 2.5}),
    ("num_features", {"num_features": True}),
    ("num_features", {"num_features": "3"}),
    ("eps", {"eps": 0.0}),
    ("eps", {"eps": -1e-5}),
    ("momentum", {"momentum": -0.1}),
    ("momentum", {"momentum": 1.5}),
    ("momentum", {"momentum": float("nan")}),
]
BAD_RENORM: list[tuple[str, dict[str, Any]]] = [
    ("r_max", {"r_max": 0.5}),
    ("d_max", {"d_max": -1.0}),
    ("schedule", {"schedule": "linear"}),
    ("schedule", {"schedule": 3}),
]
BAD_NOISY: list[tuple[str, dict[str, Any]]] = [
    ("mean_range", {"mean_range": -1.0}),
    ("std_range", {"std_range": (1.5, 0.5)}),
    ("std_range", {"std_range": (-0.5, 1.0)}),
]


def _bad_cases() -> list[Any]:
    cases = []
    for family in FAMILIES:
        extra = {"renorm": BAD_RENORM, "noisy": BAD_NOISY}.get(family, [])
        for what, kwargs in BAD_COMMON + extra:
            cases.append(
                pytest.param(family, what, kwargs, id=f"{family}-{what}-{next(iter(kwargs.values()))}")
            )
    return cases


@pytest.mark.parametrize(("family", "what", "kwargs"), _bad_cases())
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_bad_constructor_arguments(family: str, what: str, kwargs: dict[str, Any], ndim: int) -> None:
    cls = FAMILIES[family][ndim - 1]
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(cls.__name__)) as info:
        cls(**kwargs)
    assert what in str(info.value)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_good_edge_arguments_are_accepted(ndim: int) -> None:
    FAMILIES["batchnorm"][ndim - 1](1, momentum=0.0)
    FAMILIES["batchnorm"][ndim - 1](1, momentum=1.0)
    FAMILIES["renorm"][ndim - 1](2, r_max=1.0, d_max=0.0)
    FAMILIES["renorm"][ndim - 1](2, r_max=float("inf"), d_max=float("inf"), schedule=None)
    FAMILIES["noisy"][ndim - 1](2, mean_range=0.0, std_range=(0.0, 0.0))
