"""Bad input and bad arguments: a clear error that names the layer, what it expected and what it got."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import normzoo as nz

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
    with pytest.raises(RuntimeError):  # torch's exception type for the same input
        TORCH_BN[ndim - 1](3).train(training)(torch.randn(shape))
    with pytest.raises(RuntimeError, match=re.escape(f"{name}(3) expected 3 channels")) as info:
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
    if dtype in (torch.int64, torch.int32):  # torch's exception type for the same input
        with pytest.raises(NotImplementedError):
            TORCH_BN[ndim - 1](3)(x)
    with pytest.raises(
        NotImplementedError, match=re.escape(f"{type(layer).__name__} expected a floating-point input")
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


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize(
    ("layer_dtype", "input_dtype"),
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float64, torch.float16),
    ],
    ids=str,
)
def test_input_dtype_that_differs_from_the_layers(
    family: str, ndim: int, layer_dtype: torch.dtype, input_dtype: torch.dtype
) -> None:
    """torch raises "mixed dtype" without naming anything; ours names the layer and both dtypes."""
    layer = _layer(family, ndim).to(layer_dtype)
    with pytest.raises(RuntimeError, match=re.escape(type(layer).__name__)) as info:
        layer(torch.randn(GOOD_SHAPE[ndim], dtype=input_dtype))
    assert str(layer_dtype) in str(info.value)
    assert str(input_dtype) in str(info.value)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_input_into_a_float32_layer_is_mixed_precision(
    family: str, ndim: int, input_dtype: torch.dtype
) -> None:
    """What autocast produces (and torch's kernels accept): half-precision input, float32 parameters."""
    layer = _layer(family, ndim)
    y = layer(torch.randn(GOOD_SHAPE[ndim]).to(input_dtype))
    assert y.dtype == input_dtype


# --- constructor arguments ----------------------------------------------------------------------------


BAD_NUM_FEATURES: list[tuple[type[Exception], Any]] = [
    (ValueError, -2),
    (TypeError, 2.5),
    (TypeError, True),
    (TypeError, "3"),
    (TypeError, None),
]


@pytest.mark.parametrize(("error", "num_features"), BAD_NUM_FEATURES, ids=repr)
@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
def test_bad_num_features(family: str, ndim: int, error: type[Exception], num_features: Any) -> None:
    cls = FAMILIES[family][ndim - 1]
    with pytest.raises(error, match=re.escape(cls.__name__)) as info:
        cls(num_features)
    assert "num_features" in str(info.value)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
def test_zero_features_constructs_like_torch(family: str, ndim: int) -> None:
    """torch's lazy layers start with num_features=0; construction accepts it as torch's does."""
    assert FAMILIES[family][ndim - 1](0).weight.shape == (0,)


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")], ids=repr)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_is_checked_where_torch_checks_it(family: str, ndim: int, eps: float, training: bool) -> None:
    """Constructing never raises (torch's rule); the forward that would use a bad eps does, naming the
    layer. torch itself accepts eps=0 in eval, and silently returns NaN for eps=nan."""
    layer = _layer(family, ndim, eps=eps).train(training)
    theirs = TORCH_BN[ndim - 1](3, eps=eps).train(training)
    x = torch.randn(GOOD_SHAPE[ndim])
    if eps == 0.0 and not training:
        torch.testing.assert_close(layer(x), theirs(x))
        return
    with pytest.raises(ValueError, match=re.escape(type(layer).__name__)) as info:
        layer(x)
    assert "eps must be" in str(info.value)
    assert repr(eps) in str(info.value)
    if eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match="eps must be"):  # torch raises the same type
            theirs(x)
    if layer.num_batches_tracked is not None:
        assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize(("family", "ndim"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("inf")], ids=repr)
def test_momentum_is_checked_at_the_update(family: str, ndim: int, momentum: float) -> None:
    layer = _layer(family, ndim, momentum=momentum)
    x = torch.randn(GOOD_SHAPE[ndim])
    layer.eval()(x)  # eval does not use the momentum
    with pytest.raises(ValueError, match=re.escape(type(layer).__name__)) as info:
        layer.train()(x)
    assert "momentum" in str(info.value)
    assert torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0


BAD_RENORM: list[tuple[str, dict[str, Any]]] = [
    ("r_max", {"r_max": 0.5}),
    ("d_max", {"d_max": -1.0}),
    ("r_max", {"r_max": float("nan")}),
    ("d_max", {"d_max": float("nan")}),
    ("r_max", {"r_max": float("inf")}),  # with the paper schedule, which ramps towards it
    ("d_max", {"d_max": float("inf")}),
    ("schedule", {"schedule": "linear"}),
    ("schedule", {"schedule": 3}),
]
BAD_NOISY: list[tuple[str, dict[str, Any]]] = [
    ("mean_range", {"mean_range": -1.0}),
    ("mean_range", {"mean_range": float("nan")}),
    ("mean_range", {"mean_range": float("inf")}),
    ("std_range", {"std_range": (1.5, 0.5)}),
    ("std_range", {"std_range": (-0.5, 1.0)}),
    ("std_range", {"std_range": (float("nan"), 1.0)}),
    ("std_range", {"std_range": (0.1, float("nan"))}),
    ("std_range", {"std_range": (0.1, float("inf"))}),
]


def _bad_cases() -> list[Any]:
    cases = []
    for family, bad in (("renorm", BAD_RENORM), ("noisy", BAD_NOISY)):
        for what, kwargs in bad:
            cases.append(
                pytest.param(family, what, kwargs, id=f"{family}-{what}-{next(iter(kwargs.values()))}")
            )
    return cases


@pytest.mark.parametrize(("family", "what", "kwargs"), _bad_cases())
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_bad_family_arguments(family: str, what: str, kwargs: dict[str, Any], ndim: int) -> None:
    """The family's own arguments (torch has nothing to say about them) are checked at construction."""
    cls = FAMILIES[family][ndim - 1]
    with pytest.raises(ValueError, match=re.escape(cls.__name__)) as info:
        cls(3, **kwargs)
    assert what in str(info.value)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_std_range_that_is_not_a_pair(ndim: int) -> None:
    cls = FAMILIES["noisy"][ndim - 1]
    for bad in (0.5, (0.1, 0.2, 0.3), "ab"):
        with pytest.raises((TypeError, ValueError), match=re.escape(cls.__name__)):
            cls(3, std_range=bad)


@pytest.mark.parametrize(
    "bounds",
    [
        (0.5, 1.0),
        (2.0, -1.0),
        (float("nan"), 1.0),
        (2.0, float("nan")),
        2.0,
        (2.0,),
        (2.0, 1.0, 0.0),
        (torch.tensor(0.5), torch.tensor(1.0)),
        (torch.ones(2), torch.tensor(1.0)),
    ],
    ids=repr,
)
def test_callable_schedule_returning_bad_bounds(bounds: Any) -> None:
    """Refused when the schedule returns them (it may be fine for a while), naming the layer and step."""
    layer = nz.BatchRenorm2d(3, schedule=lambda step: (1.5, 0.5) if int(step) < 2 else bounds)
    x = torch.randn(GOOD_SHAPE[2])
    layer(x)
    layer(x)
    with pytest.raises((TypeError, ValueError), match=re.escape("BatchRenorm2d")) as info:
        layer(x)
    assert "schedule" in str(info.value)
    assert int(layer.num_batches_tracked) == 2  # nothing counted for the refused step


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_good_edge_arguments_are_accepted(ndim: int) -> None:
    x = torch.randn(GOOD_SHAPE[ndim])
    FAMILIES["batchnorm"][ndim - 1](3, momentum=0.0)(x)
    FAMILIES["batchnorm"][ndim - 1](3, momentum=1.0)(x)
    FAMILIES["renorm"][ndim - 1](3, r_max=1.0, d_max=0.0)(x)
    FAMILIES["renorm"][ndim - 1](3, r_max=float("inf"), d_max=float("inf"), schedule=None)(x)
    FAMILIES["noisy"][ndim - 1](3, mean_range=0.0, std_range=(0.0, 0.0))(x)
