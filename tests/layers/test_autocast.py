"""Every family under ``torch.autocast`` against torch's BatchNorm under the same autocast.

The layer sits behind a convolution, as in a network: autocast runs the convolution in float16/bfloat16
and the layer gets a low-precision input while its parameters and statistics stay float32. The checks are
device-agnostic; here they run under CPU autocast, and ``test_cuda.py`` runs the same functions on CUDA.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from ._reference import (
    FAMILIES,
    KERNEL_TOL,
    LOW_PRECISION,
    assert_close,
    assert_same,
    make_inputs,
    paired,
    renorm_against_reference,
    seeded_generator,
    ulp_tol,
    upstream_grad,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SHAPES = {1: (4, 3, 5), 2: (3, 3, 4, 5), 3: (2, 3, 3, 2, 4)}
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]

#: (family, layer kwargs, how outputs compare with torch's BatchNorm): "exact", "ulp" or "skip" (noise).
SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("batchnorm", {}, "exact"),
    ("batchnorm", {"momentum": None, "affine": False}, "exact"),
    ("renorm", {"schedule": None, "r_max": 1.0, "d_max": 0.0}, "exact"),
    ("renorm", {}, "ulp"),  # the paper's warm-up: bounds (1, 0) as tensors
    ("noisy", {}, "skip"),
]
SETTING_IDS = ["batchnorm", "batchnorm-cumulative-no-affine", "renorm-r1-d0", "renorm-paper-warmup", "noisy"]


def check_autocast_matches_torch(
    family: str, kwargs: dict[str, Any], outputs: str, ndim: int, dtype: torch.dtype, device: str
) -> None:
    """conv → layer under autocast, three training steps then eval, against conv → torch BN."""
    torch.manual_seed(0)
    conv = CONV[ndim](3, 3, 1).to(device)
    if family == "noisy":
        kwargs = {**kwargs, "generator": seeded_generator(0, device)}
    ours, theirs = paired(family, ndim, device=device, **kwargs)
    model_a = nn.Sequential(conv, ours)
    model_b = nn.Sequential(copy.deepcopy(conv), theirs)
    # "ulp": ours runs the native kernel plus an exact affine correction; on CPU so does torch, on CUDA
    # torch may pick cuDNN, whose results agree to rounding only (statistics included)
    tol = {} if outputs == "exact" else ulp_tol(dtype) if device == "cpu" else LOW_PRECISION[dtype]
    stats_tol = {} if outputs == "exact" or device == "cpu" else KERNEL_TOL[torch.float32]
    for i, x in enumerate(make_inputs(SHAPES[ndim], 4, device=device)):
        training = i < 3
        model_a.train(training)
        model_b.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            ya, yb = model_a(xa), model_b(xb)
        assert ya.dtype == yb.dtype == dtype
        g = upstream_grad(yb, i)
        ya.backward(g)
        yb.backward(g)
        label = f"{'train' if training else 'eval'} step {i}"
        if outputs != "skip" or not training:
            assert_close(ya, yb, f"{label} output", **tol)
        assert_close(xa.grad, xb.grad, f"{label} input grad", **tol)
        for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
            assert_close(p.grad, q.grad, f"{label} grad of {name}", **tol)
            p.grad, q.grad = None, None
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(theirs, name), f"{label} {name}", **stats_tol)
        assert_same(ours.num_batches_tracked, theirs.num_batches_tracked, f"{label} num_batches_tracked")


def check_autocast_renorm_reference(ndim: int, dtype: torch.dtype, device: str) -> None:
    """Clipping Batch Renormalization under autocast against the paper's formulas on the low-precision
    input the convolution produced."""
    torch.manual_seed(0)
    conv = CONV[ndim](3, 3, 1).to(device)
    layer = FAMILIES["renorm"][ndim - 1](3, schedule=None, r_max=1.5, d_max=0.5).to(device)
    wide = make_inputs(SHAPES[ndim], 2, device=device, scale=4.0, shift=4.0)
    narrow = make_inputs(SHAPES[ndim], 2, device=device, scale=0.15, shift=1.0, seed=3)
    with torch.autocast(device, dtype=dtype), torch.no_grad():
        inputs = [conv(x) for x in (wide[0], narrow[0], wide[1], narrow[1])]
    assert all(x.dtype == dtype for x in inputs)
    with torch.autocast(device, dtype=dtype):
        ref = renorm_against_reference(layer, inputs, lambda step: (1.5, 0.5), **LOW_PRECISION[dtype])
    assert bool((torch.stack(ref.r_history) == 1.5).any())


@pytest.mark.parametrize(("family", "kwargs", "outputs"), SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_cpu_autocast_matches_torch(
    family: str, kwargs: dict[str, Any], outputs: str, ndim: int, dtype: torch.dtype
) -> None:
    check_autocast_matches_torch(family, kwargs, outputs, ndim, dtype, "cpu")


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_cpu_autocast_renorm_matches_reference(ndim: int, dtype: torch.dtype) -> None:
    check_autocast_renorm_reference(ndim, dtype, "cpu")
