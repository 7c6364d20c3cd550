"""``skip_nonfinite=True``: a NaN or inf batch leaves the running statistics and the step count untouched.

The independent computation: torch's BatchNorm trained on the same sequence with the bad batches left out.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import normzoo as nz

from ._reference import FAMILIES, TORCH_BN, assert_same

#: Settings that keep each family's running update torch's (BatchRenorm clipping, NoisyBatchNorm noisy).
FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "batchnorm": {},
    "renorm": {"r_max": 1.5, "d_max": 0.5, "schedule": None},
    "noisy": {"generator": "own"},
}


def _layer(family: str, ndim: int, **kwargs: Any) -> nn.Module:
    kwargs = {**FAMILY_KWARGS[family], **kwargs}
    if kwargs.get("generator") == "own":
        kwargs["generator"] = torch.Generator().manual_seed(0)
    return FAMILIES[family][ndim - 1](3, **kwargs)


def _batch(ndim: int, seed: int, poison: str | None = None) -> Tensor:
    shape = {1: (6, 3), 2: (4, 3, 2, 3), 3: (2, 3, 2, 2, 2)}[ndim]
    x = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + seed / 4
    if poison is not None:
        x.view(-1)[seed % x.numel()] = float(poison)
    return x


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_bad_batches_are_left_out_of_the_statistics(family: str, ndim: int, momentum: float | None) -> None:
    ours = _layer(family, ndim, momentum=momentum, skip_nonfinite=True)
    reference = TORCH_BN[ndim - 1](3, momentum=momentum)
    poisons = [None, "nan", None, "inf", "-inf", None, "nan", None]
    for seed, poison in enumerate(poisons):
        x = _batch(ndim, seed, poison)
        y = ours(x)
        if poison is None:
            reference(x)
        else:
            assert not torch.isfinite(y).all()  # the output shows the bad batch; only the statistics are kept
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_same(getattr(ours, key), getattr(reference, key), key)
    assert int(ours.skipped_updates) == 4
    assert list(ours.state_dict()) == list(reference.state_dict())  # the counter is not persistent
    assert "skip_nonfinite=True" in repr(ours)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_off_by_default_the_batch_poisons_the_statistics_as_in_torch(family: str) -> None:
    ours, theirs = _layer(family, 2), nn.BatchNorm2d(3)
    x = _batch(2, 1, "nan")
    ours(x)
    theirs(x)
    assert torch.isnan(ours.running_mean).any()
    assert torch.isnan(theirs.running_mean).any()
    assert not hasattr(ours, "skipped_updates") or ours.skipped_updates is None
    assert "skip_nonfinite" not in repr(ours)
    assert list(dict(ours.named_buffers())) == list(dict(theirs.named_buffers()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_guarded_finite_run_is_the_unguarded_run(family: str) -> None:
    plain = _layer(family, 2)
    guarded = copy.deepcopy(plain)
    guarded.skip_nonfinite = True  # switched on after construction: the counter appears
    for seed in range(5):
        x = _batch(2, seed).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = plain(x), guarded(x2)
        assert_same(y2, y, "output")
        y.sum().backward()
        y2.sum().backward()
        assert_same(x2.grad, x.grad, "input gradient")
    for key, value in plain.state_dict().items():
        assert_same(guarded.state_dict()[key], value, key)
    assert int(guarded.skipped_updates) == 0


@settings(max_examples=25, deadline=None)
@given(
    poisons=st.lists(st.sampled_from([None, None, "nan", "inf"]), min_size=1, max_size=8),
    family=st.sampled_from(list(FAMILIES)),
)
def test_hypothesis_sequences(poisons: list[str | None], family: str) -> None:
    ours = _layer(family, 1, skip_nonfinite=True)
    reference = nn.BatchNorm1d(3)
    for seed, poison in enumerate(poisons):
        x = _batch(1, seed, poison)
        ours(x)
        if poison is None:
            reference(x)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_same(getattr(ours, key), getattr(reference, key), key)
    assert int(ours.skipped_updates) == sum(p is not None for p in poisons)


def test_eval_and_untracked_layers_are_unaffected() -> None:
    layer = nz.BatchNorm2d(3, skip_nonfinite=True, track_running_stats=False)
    assert layer.skipped_updates is None
    layer(_batch(2, 1, "nan"))  # nothing to protect
    tracked = nz.BatchNorm2d(3, skip_nonfinite=True).eval()
    tracked(_batch(2, 1, "nan"))
    assert int(tracked.skipped_updates) == 0
    assert int(tracked.num_batches_tracked) == 0


def test_under_checkpoint_and_compile() -> None:
    layer = nz.BatchRenorm2d(3, r_max=1.5, d_max=0.5, schedule=None, skip_nonfinite=True)
    reference = nn.BatchNorm2d(3)
    x = _batch(2, 1).requires_grad_()
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    reference(x.detach())
    checkpoint(layer, _batch(2, 2, "nan").requires_grad_(), use_reentrant=False).sum().backward()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(_batch(2, 3, "inf"))
    compiled(_batch(2, 4))
    reference(_batch(2, 4))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, key), getattr(reference, key), rtol=1e-6, atol=1e-6)
    assert int(layer.skipped_updates) == 2
