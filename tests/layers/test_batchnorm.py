"""normzoo.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: numbers, state, checkpoints, copies.

Our BatchNorm runs torch's own kernel, so on the same input it must give the same bits in every dtype:
every comparison here is bitwise (``torch.equal``), bfloat16 and float16 included.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import re
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normzoo as nz

from ._reference import (
    FAMILIES,
    TORCH_BN,
    assert_same,
    case_id,
    input_cases,
    make_inputs,
    paired,
    randomize_,
    train_and_compare,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CASES = input_cases()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_matches_torch_bitwise(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    track: bool,
    momentum: float | None,
) -> None:
    check_matches_torch(case, dtype, affine, track, momentum, "cpu")


def check_matches_torch(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    track: bool,
    momentum: float | None,
    device: str,
) -> None:
    """Four training steps then eval, every number bitwise equal to torch's BatchNorm (CPU and CUDA)."""
    ndim, shape, channels_last = case
    ours, ref = paired(
        "batchnorm",
        ndim,
        dtype=dtype,
        device=device,
        affine=affine,
        track_running_stats=track,
        momentum=momentum,
    )
    inputs = make_inputs(shape, 4, dtype=dtype, device=device, channels_last=channels_last)
    train_and_compare(ours, ref, inputs)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_input_matches_torch(input_dtype: torch.dtype) -> None:
    """float32 parameters and statistics, low-precision input (what a network under autocast feeds BN)."""
    ours, ref = paired("batchnorm", 2)
    train_and_compare(ours, ref, make_inputs((3, 3, 4, 5), 3, dtype=input_dtype))


@given(
    ndim=st.sampled_from([1, 2, 3]),
    data=st.data(),
    channels=st.integers(1, 4),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    eps=st.floats(1e-6, 1.0),
    affine=st.booleans(),
    track=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    channels_last=st.booleans(),
)
def test_matches_torch_hypothesis(
    ndim: int,
    data: st.DataObject,
    channels: int,
    momentum: float | None,
    eps: float,
    affine: bool,
    track: bool,
    dtype: torch.dtype,
    channels_last: bool,
) -> None:
    spatial_dims = data.draw(st.sampled_from([0, 1])) if ndim == 1 else ndim
    batch = data.draw(st.integers(1, 4))
    spatial = data.draw(st.lists(st.integers(1, 4), min_size=spatial_dims, max_size=spatial_dims))
    if batch * int(torch.tensor(spatial, dtype=torch.long).prod()) < 2:
        batch = 2  # training needs more than one value per channel
    shape = (batch, channels, *spatial)
    ours, ref = paired(
        "batchnorm",
        ndim,
        num_features=channels,
        dtype=dtype,
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
    )
    inputs = make_inputs(shape, 3, dtype=dtype, channels_last=channels_last and len(shape) >= 4, seed=batch)
    train_and_compare(ours, ref, inputs)


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
def test_empty_batch_behaves_like_torch(family: str) -> None:
    ours, ref = paired(family, 2)
    x = torch.randn(0, 3, 4, 4)
    try:
        expected = ref(x)
    except Exception as err:  # whatever torch does, we do
        with pytest.raises(type(err)):
            ours(x)
        return
    assert_same(ours(x), expected, "empty batch output")
    assert_same(ours.running_var, ref.running_var, "running_var")


# --- state_dict ------------------------------------------------------------------------------------------


def _trained(module: nn.Module, ndim: int, steps: int = 3) -> nn.Module:
    shape = {1: (5, 3), 2: (3, 3, 2, 2), 3: (2, 3, 2, 2, 2)}[ndim]
    module.train()
    for x in make_inputs(shape, steps):
        module(x)
    return module


def _assert_state_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert_same(a[key], b[key], key)


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_state_dict_round_trip_both_ways(family: str, ndim: int) -> None:
    theirs = _trained(randomize_(TORCH_BN[ndim - 1](3)), ndim)
    ours = FAMILIES[family][ndim - 1](3)
    assert ours.load_state_dict(theirs.state_dict()) == nn.modules.module._IncompatibleKeys([], [])
    _assert_state_equal(ours.state_dict(), theirs.state_dict())
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]

    _trained(ours, ndim)  # then back: ours, trained further, into a fresh torch layer
    back = TORCH_BN[ndim - 1](3)
    back.load_state_dict(ours.state_dict())
    _assert_state_equal(back.state_dict(), ours.state_dict())


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_keys_match_torch_for_every_flag(affine: bool, track: bool) -> None:
    theirs = TORCH_BN[1](3, affine=affine, track_running_stats=track)
    ours = nz.BatchNorm2d(3, affine=affine, track_running_stats=track)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def test_state_dict_mismatched_flags_report_the_same_keys_as_torch() -> None:
    tracked = nn.BatchNorm2d(3).state_dict()
    ours, theirs = nz.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3, track_running_stats=False)
    assert ours.load_state_dict(tracked, strict=False) == theirs.load_state_dict(tracked, strict=False)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ours.load_state_dict(tracked)


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("prefix", ["", "block.0."])
def test_old_checkpoint_without_num_batches_tracked_loads_like_torch(family: str, prefix: str) -> None:
    """A checkpoint from before torch added ``num_batches_tracked`` (state-dict version 1)."""
    old = _trained(randomize_(nn.BatchNorm2d(3)), 2)
    state = old.state_dict()
    del state["num_batches_tracked"]
    metadata = {"": {"version": 1}}
    if prefix:
        state = type(state)({prefix + k: v for k, v in state.items()})
        metadata = {"": {"version": 1}, "block": {"version": 1}, "block.0": {"version": 1}}
    state._metadata = metadata  # type: ignore[attr-defined]

    def wrap(layer: nn.Module) -> nn.Module:
        return nn.ModuleDict({"block": nn.Sequential(layer)}) if prefix else layer

    ours, theirs = FAMILIES[family][1](3), nn.BatchNorm2d(3)
    ours.num_batches_tracked.fill_(7)
    theirs.num_batches_tracked.fill_(7)
    assert wrap(ours).load_state_dict(state) == wrap(theirs).load_state_dict(state)
    _assert_state_equal(ours.state_dict(), theirs.state_dict())
    assert int(ours.num_batches_tracked) == 7  # torch keeps the layer's own count
    assert_same(ours.running_var, old.running_var, "running_var")


def test_torch_save_and_load_round_trip() -> None:
    ours = _trained(randomize_(nz.BatchNorm2d(3)), 2)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    theirs = nn.BatchNorm2d(3)
    theirs.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_state_equal(theirs.state_dict(), ours.state_dict())


# --- construction, casting, moving, copying -----------------------------------------------------------------


def _tensors(module: nn.Module) -> dict[str, tuple[torch.dtype, torch.device, bool]]:
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: (t.dtype, t.device, isinstance(t, nn.Parameter)) for name, t in named}


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.double(),
        lambda m: m.bfloat16(),
        lambda m: m.float(),
        lambda m: m.to(torch.float16),
        lambda m: m.to("cpu", torch.float64),
        lambda m: m.to(torch.empty(0, dtype=torch.bfloat16)),
        lambda m: m.double().float(),
    ],
    ids=["half", "double", "bfloat16", "float", "to-f16", "to-cpu-f64", "to-tensor-bf16", "double-float"],
)
def test_casts_like_torch(family: str, cast: Any) -> None:
    ours, theirs = FAMILIES[family][1](3), nn.BatchNorm2d(3)
    ours_cast, _theirs_cast = cast(ours), cast(theirs)
    assert ours_cast is ours  # in place, like every nn.Module
    assert _tensors(ours) == _tensors(theirs)
    assert ours.num_batches_tracked.dtype == torch.long
    x = torch.randn(2, 3, 3, 3, dtype=ours.weight.dtype)
    y = ours(x)
    assert y.dtype == x.dtype
    if family == "batchnorm":
        assert_same(y, theirs(x), "output after cast")
        assert_same(ours.running_var, theirs.running_var, "running_var after cast")


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_factory_kwargs_like_torch(family: str, dtype: torch.dtype) -> None:
    ours = FAMILIES[family][2](3, dtype=dtype, device="cpu")
    assert _tensors(ours) == _tensors(nn.BatchNorm3d(3, dtype=dtype, device="cpu"))
    meta = FAMILIES[family][2](3, device="meta")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    _assert_state_equal(meta.state_dict(), nn.BatchNorm3d(3).state_dict())


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
def test_reset_like_torch(family: str) -> None:
    ours = _trained(FAMILIES[family][0](3), 1)
    theirs = _trained(nn.BatchNorm1d(3), 1)
    ours.reset_running_stats()
    theirs.reset_running_stats()
    _assert_state_equal(ours.state_dict(), theirs.state_dict())
    with torch.no_grad():
        ours.weight.fill_(3)
    ours.reset_parameters()
    _assert_state_equal(ours.state_dict(), nn.BatchNorm1d(3).state_dict())


TORCH_SIGNATURE = inspect.signature(nn.BatchNorm2d.__init__).parameters


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
def test_constructor_takes_torchs_arguments_in_torchs_order(family: str) -> None:
    """A drop-in replacement: torch's arguments first, in torch's order and kinds, with torch's defaults."""
    ours = list(inspect.signature(FAMILIES[family][1].__init__).parameters.values())
    theirs = list(TORCH_SIGNATURE.values())
    for mine, torchs in zip(ours, theirs, strict=False):
        assert (mine.name, mine.kind, mine.default) == (torchs.name, torchs.kind, torchs.default)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_is_a_torch_batchnorm_of_its_dimension(family: str, ndim: int) -> None:
    layer = FAMILIES[family][ndim - 1](3)
    assert isinstance(layer, TORCH_BN[ndim - 1])
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(layer, TORCH_BN[ndim % 3])
    assert list(layer.state_dict()) == list(TORCH_BN[ndim - 1](3).state_dict())


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_torch_positional_arguments(family: str, ndim: int) -> None:
    """``(C, eps, momentum, affine, track_running_stats)`` positionally means what it means to torch."""
    ours = FAMILIES[family][ndim - 1](3, 1e-3, 0.8, False, False)
    theirs = TORCH_BN[ndim - 1](3, 1e-3, 0.8, False, False)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert _tensors(ours) == _tensors(theirs)


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize(
    "num_features", [np.int64(3), np.int32(3), torch.tensor(3)], ids=["np64", "np32", "tensor"]
)
def test_integer_like_num_features(family: str, num_features: Any) -> None:
    layer = FAMILIES[family][1](num_features)
    assert type(layer.num_features) is int
    assert layer.num_features == 3
    assert layer.weight.shape == (3,)


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("track", [True, False])
def test_weight_without_bias_matches_torch(family: str, track: bool) -> None:
    """``bias=False``: a learnable weight and no bias, as in torch (for every family in its BN regime)."""
    kwargs: dict[str, Any] = {"bias": False, "track_running_stats": track}
    if family == "noisy":
        kwargs.update(mean_range=0.0, std_range=(0.0, 0.0))
    ours, theirs = FAMILIES[family][1](3, **kwargs), nn.BatchNorm2d(3, bias=False, track_running_stats=track)
    assert ours.bias is None
    assert ours.weight is not None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        theirs.weight.copy_(ours.weight)
    x = make_inputs((4, 3, 3, 3), 1, seed=4)[0]
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert_same(y_ours, y_theirs, "output")
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    assert_same(x_ours.grad, x_theirs.grad, "input gradient")
    assert_same(ours.weight.grad, theirs.weight.grad, "weight gradient")
    assert "bias=False" in repr(ours)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("bias", [True, False])
def test_repr_matches_torch(affine: bool, track: bool, momentum: float | None, bias: bool) -> None:
    kwargs = {"eps": 1e-3, "momentum": momentum, "affine": affine, "track_running_stats": track, "bias": bias}
    for ours_cls, theirs_cls in zip(FAMILIES["batchnorm"], TORCH_BN, strict=True):
        # torch always prints its bias option; ours only when it removes a bias that affine would create.
        shown = ", bias=False" if affine and not bias else ""
        expected = re.sub(r", bias=(True|False)", shown, repr(theirs_cls(5, **kwargs)))
        assert repr(ours_cls(5, **kwargs)) == expected


def _copies(module: nn.Module) -> list[nn.Module]:
    return [copy.deepcopy(module), pickle.loads(pickle.dumps(module))]


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_deepcopy_and_pickle(family: str, ndim: int) -> None:
    kwargs: dict[str, Any] = {"momentum": None}
    if family == "noisy":
        kwargs["generator"] = torch.Generator().manual_seed(3)
    if family == "renorm":
        kwargs.update(schedule=None, r_max=1.5, d_max=0.5)
    original = _trained(randomize_(FAMILIES[family][ndim - 1](3, **kwargs)), ndim)
    shape = {1: (4, 3, 2), 2: (3, 3, 2, 2), 3: (2, 3, 2, 2, 2)}[ndim]
    x = make_inputs(shape, 1, seed=9)[0]
    for clone in _copies(original):
        assert type(clone) is type(original)
        assert repr(clone) == repr(original)
        _assert_state_equal(clone.state_dict(), original.state_dict())
        assert clone.momentum is None
        if family == "noisy":
            assert clone.generator is not original.generator  # an independent copy of the generator state
            assert torch.equal(clone.generator.get_state(), original.generator.get_state())
    for clone in _copies(original):
        # the next training step of a copy is the original's next step, bit for bit
        expected = copy.deepcopy(original)(x)
        assert_same(clone(x), expected, "output of a copy")
