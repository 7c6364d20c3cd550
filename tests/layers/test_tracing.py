"""torch.fx symbolic tracing, torch.jit.trace and torch.jit.script of models with normzoo layers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normzoo as nz

from ._reference import FAMILIES, assert_same


def _model(family: str, ndim: int = 2, momentum: float | None = None) -> nn.Module:
    """A small model with two layers of ``family`` (dimension ``ndim``), in their non-BatchNorm regime."""
    kwargs = {
        "batchnorm": {},
        "renorm": {"schedule": nz.PaperSchedule(total_steps=20)},  # leaves its warm-up at step 1
        "noisy": {"generator": torch.Generator().manual_seed(0)},
    }[family]
    cls = FAMILIES[family][ndim - 1]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    torch.manual_seed(0)
    return nn.Sequential(
        conv(3, 4, 1), cls(4, **kwargs), nn.ReLU(), nn.Sequential(cls(4, momentum=momentum, **kwargs))
    )


def _inputs(ndim: int, steps: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = {1: (4, 3, 5), 2: (4, 3, 3, 3), 3: (2, 3, 2, 3, 3)}[ndim]
    return [(1 + i / 5) * torch.randn(shape, generator=generator) + i / 4 for i in range(steps)]


def _assert_runs_alike(
    traced: Callable[[Tensor], Tensor],
    traced_model: nn.Module,
    eager: nn.Module,
    inputs: list[Tensor],
    assert_same: Callable[[Tensor, Tensor, str], None] = assert_same,
) -> None:
    """Same outputs, input gradients and state (running statistics, steps) as the eager model, step by step."""
    for step, x in enumerate(inputs):
        x_traced, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_traced, y_eager = traced(x_traced), eager(x_eager)
        assert_same(y_traced, y_eager, f"output at step {step}")
        y_traced.sum().backward()
        y_eager.sum().backward()
        assert_same(x_traced.grad, x_eager.grad, f"input gradient at step {step}")
    for key, value in eager.state_dict().items():
        assert_same(traced_model.state_dict()[key], value, key)


def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=what)


# --- torch.fx ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_symbolic_trace_records_each_layer_as_a_leaf(family: str, ndim: int) -> None:
    model = _model(family, ndim)
    eager = copy.deepcopy(model)
    graph_module = torch.fx.symbolic_trace(model)
    calls = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
    assert calls == ["0", "1", "2", "3.0"]  # each layer once, as a call_module node
    _assert_runs_alike(graph_module, graph_module, eager, _inputs(ndim, 6))
    graph_module.eval()
    eager.eval()
    _assert_runs_alike(graph_module, graph_module, eager, _inputs(ndim, 2))


def test_symbolic_trace_of_a_layer_alone_says_what_to_do() -> None:
    with pytest.raises(
        RuntimeError, match=r"BatchRenorm2d: torch\.fx cannot trace a normzoo layer as the root"
    ):
        torch.fx.symbolic_trace(nz.BatchRenorm2d(3))
    # as the message says
    assert len(list(torch.fx.symbolic_trace(nn.Sequential(nz.BatchRenorm2d(3))).graph.nodes)) == 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fx_quantization_preparation_runs(family: str) -> None:
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    from torch.ao.quantization import get_default_qconfig_mapping

    model = _model(family).eval()
    x = _inputs(2, 1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices of fx quantization
        prepared = quantize_fx.prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x,))
        fused = quantize_fx.fuse_fx(copy.deepcopy(model))
    assert isinstance(prepared.get_submodule("1"), FAMILIES[family][1])
    torch.testing.assert_close(prepared(x), model(x), atol=1e-6, rtol=0)  # observers only: the same numbers
    # fx's fusers match module types exactly: ours are left alone rather than folded as plain BatchNorm
    assert type(fused.get_submodule("1")) is FAMILIES[family][1]
    torch.testing.assert_close(fused(x), model(x), atol=1e-6, rtol=0)


# --- torch.jit.trace --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["batchnorm", "renorm"])
def test_jit_trace_in_training_follows_the_schedule_after_warmup(family: str) -> None:
    """Traced at step 0 (BatchRenorm in its warm-up), the trace must renormalize once the schedule relaxes."""
    model = _model(family, momentum=0.3)
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit's deprecation and tracer notices about the input checks
        traced = torch.jit.trace(copy.deepcopy(model), (_inputs(2, 1)[0],), check_trace=False)
    traced.load_state_dict(model.state_dict())  # undo the tracing run's step
    # the traced graph computes the bounds as tensors: BatchRenorm's general path, equal up to rounding
    _assert_runs_alike(traced, traced, eager, _inputs(2, 12), _close)
    if family == "renorm":
        assert eager[1].clip_bounds() == (3.0, 5.0)  # the run went past the warm-up and the ramps


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jit_trace_in_training_with_a_cumulative_average_warns(family: str) -> None:
    with pytest.warns(UserWarning, match=r"torch\.jit\.trace records momentum=None"):
        torch.jit.trace(_model(family), (_inputs(2, 1)[0],), check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*deprecated")
        torch.jit.trace(_model(family).eval(), (_inputs(2, 1)[0],), check_trace=False)  # eval: nothing to say


# --- torch.jit.script ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [nz.BatchNorm2d(3), nz.BatchRenorm2d(3), nz.NoisyBatchNorm2d(3)],
    ids=["batchnorm", "renorm", "noisy"],
)
def test_jit_script_is_refused_with_advice(layer: nn.Module) -> None:
    """TorchScript is deprecated; the refusal names the layer and the alternatives, and changes nothing."""
    model = nn.Sequential(layer)
    with pytest.raises(
        RuntimeError, match=rf"{type(layer).__name__}: torch\.jit\.script is not supported"
    ) as info:
        torch.jit.script(model)
    assert "replace_bn(model, 'torch')" in str(info.value)
    assert model[0] is layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(nz.replace_bn(model, "torch").eval())  # as the message says
    x = torch.randn(2, 3, 4, 4)
    assert_same(scripted(x), model.eval()(x), "eval output of the scripted torch model")
