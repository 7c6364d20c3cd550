"""Graph capture of models holding normzoo's layers: fx, ``torch.export``, ONNX, ``torch.compile``, ``jit.trace``.

Each captured model must compute what the eager model computes, in eval and (where the capture keeps
training behaviour) in training with its running statistics, as torch's BatchNorm does in the same model.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import normzoo as nz

from ._models import KINDS, images, net_pair, quiet

CAPTURE_KINDS = list(KINDS)


def _model(kind: str) -> nn.Module:
    return quiet(net_pair(kind)[1]) if kind != "torch" else net_pair("torch")[0]


def _assert_same_step(captured: nn.Module, eager: nn.Module, seed: int = 0) -> None:
    """One training forward in each: same outputs and same running statistics."""
    x = images(seed=seed)
    captured.train()
    eager.train()
    torch.testing.assert_close(captured(x), eager(x), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(captured.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_fx_symbolic_trace(kind: str) -> None:
    model = _model(kind)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    _assert_same_step(traced, model)
    traced.eval()
    model.eval()
    x = images(seed=4)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_fx_quantization_preparation(kind: str) -> None:
    """An fx pass that walks the graph (fusing conv+BN for eval, as quantization preparation does)."""
    from torch.fx.experimental.optimization import fuse

    model = _model(kind)
    with torch.no_grad():
        model.train()(images(seed=1))  # non-trivial running statistics
    model.eval()
    fused = fuse(copy.deepcopy(model))
    x = images(seed=4)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_torch_export(kind: str) -> None:
    model = _model(kind).eval()
    x = images(seed=2)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(images(seed=3)), model(images(seed=3)), rtol=0, atol=0)


@pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx and onnxscript are not installed (torch.onnx.export needs them; normzoo does not add them)",
)
@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_onnx_export(kind: str, tmp_path: object) -> None:  # pragma: no cover - needs onnx
    model = _model(kind).eval()
    program = torch.onnx.export(model, (images(),), dynamo=True)
    assert program is not None


@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_torch_compile(kind: str) -> None:
    torch._dynamo.reset()
    model = _model(kind)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for seed in range(2):
        _assert_same_step(compiled, eager, seed)
    compiled.eval()
    eager.eval()
    torch.testing.assert_close(compiled(images(seed=5)), eager(images(seed=5)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_jit_trace_eval(kind: str) -> None:
    model = _model(kind).eval()
    traced = torch.jit.trace(model, (images(),))
    torch.testing.assert_close(traced(images(seed=6)), model(images(seed=6)), rtol=0, atol=0)


def _growing_bounds(step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm at step 0 (the traced one), then clip bounds that grow at every step."""
    s = step.to(torch.float32)
    return 1.0 + 0.5 * s, 0.5 * s


@pytest.mark.parametrize(
    "schedule",
    [_growing_bounds, nz.PaperSchedule(total_steps=100)],  # paper: warm-up over after 5 steps
    ids=["callable", "paper-scaled"],
)
def test_jit_trace_of_renorm_in_training_is_right_after_warmup_or_loud(schedule: Any) -> None:
    """A trace records one step; a traced BatchRenorm must not replay that step's bounds afterwards, or must
    say so when traced."""
    model = _model("renorm").train()
    model[1].schedule = model[4].schedule = schedule
    with torch.no_grad():  # statistics far from the batches', so that r and d clip once the bounds relax
        model[1].running_var.fill_(0.1)
        model[4].running_mean.fill_(2.0)
    eager = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (images(),), check_trace=False)
    eager(images())  # the step the trace ran
    if any("BatchRenorm" in str(w.message) for w in caught):
        return  # loud: the layer says the trace is not right in training
    for seed in range(1, 9):
        x = images(seed=seed)
        torch.testing.assert_close(traced(x), eager(x), rtol=1e-5, atol=1e-6)
    assert model[1].clip_bounds() != (1.0, 0.0)  # the bounds did relax
