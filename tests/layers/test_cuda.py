"""The equivalence checks of the CPU tests, on CUDA (marked ``cuda``: skipped without a GPU).

Every numerical test here calls the same ``check_*`` function as its CPU counterpart, with
``device="cuda"``; only what exists on CUDA alone (device mismatches, CUDA generators) is written here.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

import normzoo as nz

from ._reference import FAMILIES, TORCH_BN, case_id, input_cases, make_inputs, seeded_generator
from .test_autocast import (
    AUTOCAST_DTYPES,
    SETTING_IDS,
    SETTINGS,
    check_autocast_matches_torch,
    check_autocast_renorm_reference,
)
from .test_batchnorm import check_matches_torch
from .test_compile import check_compiled_matches_eager
from .test_noisy import check_noisy_is_batchnorm_but_outputs, check_noisy_output
from .test_renorm import (
    FLAG_IDS,
    FLAGS,
    check_paper_warmup_is_batchnorm,
    check_r1_d0_is_batchnorm,
    check_reference_with_clipping,
    check_stats_and_eval_while_clipping,
)

pytestmark = pytest.mark.cuda

CUDA = "cuda"
CASES = input_cases()

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_AFFINE = [
    pytest.param(dtype, affine, id=f"{dtype}-{'affine' if affine else 'no-affine'}")
    for dtype in DTYPES
    for affine in (True, False)
]


# --- BatchNorm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_batchnorm_matches_torch(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    track: bool,
    momentum: float | None,
) -> None:
    check_matches_torch(case, dtype, affine, track, momentum, CUDA)


# --- BatchRenorm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("affine", "momentum"), FLAGS, ids=FLAG_IDS)
def test_renorm_r1_d0_is_batchnorm(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool, momentum: float | None
) -> None:
    check_r1_d0_is_batchnorm(case, dtype, affine, momentum, CUDA)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_renorm_paper_warmup_is_batchnorm(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype
) -> None:
    check_paper_warmup_is_batchnorm(case, dtype, CUDA)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_renorm_stats_and_eval_while_clipping(ndim: int, dtype: torch.dtype) -> None:
    check_stats_and_eval_while_clipping(ndim, dtype, CUDA)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("affine", "momentum"), FLAGS, ids=FLAG_IDS)
def test_renorm_matches_paper_reference(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool, momentum: float | None
) -> None:
    check_reference_with_clipping(case, dtype, affine, momentum, CUDA)


# --- NoisyBatchNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(("dtype", "affine"), DTYPE_AFFINE)
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_noisy_is_batchnorm_but_outputs(
    case: tuple[int, tuple[int, ...], bool],
    dtype: torch.dtype,
    affine: bool,
    track: bool,
    momentum: float | None,
) -> None:
    check_noisy_is_batchnorm_but_outputs(case, dtype, affine, track, momentum, CUDA)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(("dtype", "affine"), DTYPE_AFFINE)
def test_noisy_output_is_batchnorm_plus_noise(
    case: tuple[int, tuple[int, ...], bool], dtype: torch.dtype, affine: bool
) -> None:
    check_noisy_output(case, dtype, affine, CUDA)


# --- autocast ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "kwargs", "outputs"), SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_matches_torch(
    family: str, kwargs: dict[str, Any], outputs: str, ndim: int, dtype: torch.dtype
) -> None:
    check_autocast_matches_torch(family, kwargs, outputs, ndim, dtype, CUDA)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_renorm_matches_reference(ndim: int, dtype: torch.dtype) -> None:
    check_autocast_renorm_reference(ndim, dtype, CUDA)


# --- torch.compile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "kwargs", "step"),
    [
        pytest.param("batchnorm", {}, 0, id="batchnorm"),
        pytest.param("renorm", {}, 0, id="renorm-paper-warmup"),
        pytest.param(
            "renorm",
            {"schedule": None, "r_max": 1.5, "d_max": 0.5},
            0,
            id="renorm-clipping",
        ),
        pytest.param("noisy", {"generator": "seeded"}, 0, id="noisy"),
    ],
)
def test_compiled_matches_eager(family: str, kwargs: dict[str, Any], step: int) -> None:
    torch._dynamo.reset()
    check_compiled_matches_eager(family, kwargs, step, 2, CUDA)


# --- what exists only with a GPU -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_moves_like_torch(family: str, ndim: int) -> None:
    ours, theirs = FAMILIES[family][ndim - 1](3), TORCH_BN[ndim - 1](3)
    for move in (lambda m: m.cuda(), lambda m: m.to("cuda", torch.float16), lambda m: m.cpu().to("cuda:0")):
        move(ours)
        move(theirs)
        got = {name: (t.device, t.dtype) for name, t in [*ours.named_parameters(), *ours.named_buffers()]}
        want = {
            name: (t.device, t.dtype) for name, t in [*theirs.named_parameters(), *theirs.named_buffers()]
        }
        assert got == want


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy"])
@pytest.mark.parametrize(("layer_device", "input_device"), [("cpu", "cuda"), ("cuda", "cpu")])
def test_input_on_another_device(family: str, layer_device: str, input_device: str) -> None:
    layer = FAMILIES[family][1](3).to(layer_device)
    x = torch.randn(2, 3, 4, 4, device=input_device)
    with pytest.raises(RuntimeError, match=re.escape(type(layer).__name__)) as info:
        layer(x)
    assert layer_device in str(info.value)
    assert input_device in str(info.value)


@pytest.mark.parametrize(("layer_device", "generator_device"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_noisy_generator_on_another_device(layer_device: str, generator_device: str) -> None:
    layer = nz.NoisyBatchNorm2d(3, generator=seeded_generator(0, generator_device)).to(layer_device)
    x = torch.randn(2, 3, 4, 4, device=layer_device)
    with pytest.raises(RuntimeError, match=r"NoisyBatchNorm2d has its generator on") as info:
        layer(x)
    assert "generator on the input's device" in str(info.value)
    layer.eval()
    layer(x)  # eval draws nothing: the generator is not consulted


def test_noisy_accepts_a_generator_created_with_a_bare_cuda_device() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    layer = nz.NoisyBatchNorm2d(3, generator=generator).cuda()
    y = layer(make_inputs((2, 3, 4, 4), 1, device="cuda")[0])
    assert y.device.type == "cuda"


def test_noisy_cuda_generator_reproducible() -> None:
    x = make_inputs((2, 3, 4, 4), 1, device="cuda")[0]
    outputs = [nz.NoisyBatchNorm2d(3, generator=seeded_generator(5, "cuda")).cuda()(x) for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])


def test_sequential_model_on_cuda_trains_like_torch() -> None:
    """A small conv net with each family: a full optimizer step, parameters equal to torch's BN net."""
    torch.manual_seed(0)

    def net(norm: type[nn.Module]) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

    x = torch.randn(4, 3, 6, 6, device="cuda")
    for family in ("batchnorm", "renorm"):
        torch.manual_seed(0)
        ours = net(FAMILIES[family][1]).cuda()
        torch.manual_seed(0)
        theirs = net(nn.BatchNorm2d).cuda()
        ours(x)
        theirs(x)
        theirs.load_state_dict(ours.state_dict())
        for model in (ours, theirs):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            model(x).square().mean().backward()
            opt.step()
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name, atol=1e-5, rtol=1e-5)
