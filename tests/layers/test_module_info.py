"""torch's generic module checks, on normzoo's layers.

torch describes how its BatchNorm1d/2d/3d must behave in ``torch.testing._internal.common_modules.module_db``:
for each class, a ``module_inputs_func`` (constructor arguments and forward inputs: affine or not, tracking
or not, cumulative momentum, ``bias=False``, empty batches, ...) and a ``module_error_inputs_func``
(arguments that must fail, where, with which exception type and message). This module feeds those same
inputs to every normzoo family, with our class in place of torch's, and checks what torch's own module tests
check (``test/test_modules.py`` served as a reference, not a source): the forward against torch's module
where the family computes BatchNorm (BatchNorm always; BatchRenorm in the paper's warm-up and with
``r_max=1, d_max=0``; NoisyBatchNorm in eval and without noise), gradients and running statistics, the
``state_dict`` both ways, ``to`` and ``to_empty``, factory arguments, pickling, non-contiguous inputs,
channels-last memory formats, that train and eval differ, and the error inputs with torch's exception types.
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ._reference import FAMILIES, TORCH_BN

pytest.importorskip("expecttest")  # torch's test helpers import it (normzoo[dev] installs it)


def _import_module_db() -> tuple[Any, ...]:
    # Importing torch's test utilities freezes torch.backends flags for the whole process (torch's test suite
    # wants that); this session is not torch's test suite, so the previous setting is restored.
    flag = "__allow_nonbracketed_mutation_flag"
    previous = getattr(torch.backends, flag, True)
    from torch.testing._internal import common_modules

    setattr(torch.backends, flag, previous)
    return common_modules.module_db, common_modules.ModuleErrorEnum


MODULE_DB, ModuleErrorEnum = _import_module_db()
MODULE_INFOS = {info.module_cls: info for info in MODULE_DB if info.module_cls in TORCH_BN}
assert len(MODULE_INFOS) == 3, "torch's module_db no longer describes BatchNorm1d/2d/3d"

#: Per family, the settings under which it computes exactly BatchNorm in training (eval always does).
AS_BATCHNORM: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "batchnorm": [("default", {})],
    "renorm": [("paper-warmup", {}), ("r1-d0", {"r_max": 1.0, "d_max": 0.0, "schedule": None})],
    "noisy": [("no-noise", {"mean_range": 0.0, "std_range": (0.0, 0.0)})],
}
#: The settings under which a family is *not* BatchNorm in training (eval still is).
NOT_BATCHNORM: dict[str, dict[str, Any]] = {
    "batchnorm": {},
    "renorm": {"r_max": 1.5, "d_max": 0.5, "schedule": None},
    "noisy": {},
}


@dataclass(frozen=True)
class Case:
    """One of torch's module inputs, for one normzoo class."""

    family: str
    ndim: int
    desc: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    forward_input: Tensor

    @property
    def ours(self) -> type[nn.Module]:
        return FAMILIES[self.family][self.ndim - 1]

    @property
    def theirs(self) -> type[nn.Module]:
        return TORCH_BN[self.ndim - 1]

    def build(self, family_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Module]:
        """Our layer and torch's from the same constructor arguments, with the same parameter values."""
        dtype = self.forward_input.dtype  # as torch's module tests do: built, then moved to the input's dtype
        ours = self.ours(*self.args, **self.kwargs, **(family_kwargs or {})).to(dtype)
        theirs = self.theirs(*self.args, **self.kwargs).to(dtype)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in [*theirs.parameters(), *(b for b in theirs.buffers() if b.is_floating_point())]:
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
        ours.load_state_dict(theirs.state_dict())
        return ours, theirs


def _cases(dtype: torch.dtype = torch.float64, requires_grad: bool = True) -> Iterator[Case]:
    for family in FAMILIES:
        for ndim, torch_cls in enumerate(TORCH_BN, start=1):
            info = MODULE_INFOS[torch_cls]
            inputs = info.module_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=True
            )
            for index, module_input in enumerate(inputs):
                (x,) = module_input.forward_input.args
                yield Case(
                    family,
                    ndim,
                    module_input.desc or f"input{index}",
                    tuple(module_input.constructor_input.args),
                    dict(module_input.constructor_input.kwargs),
                    x,
                )


CASES = [*_cases(torch.float64), *(c for c in _cases(torch.float32) if c.ndim == 2)]
CASE_IDS = [f"{c.family}{c.ndim}d-{c.desc}-{str(c.forward_input.dtype)[6:]}" for c in CASES]


def _clone_input(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(x.requires_grad)


def _run(
    module: nn.Module, x: Tensor, grad_seed: int = 1
) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
    """Forward and, where something needs it, backward with a fixed output gradient."""
    x = _clone_input(x)
    y = module(x)
    if not y.requires_grad:
        return y.detach(), None, []
    generator = torch.Generator().manual_seed(grad_seed)
    y.backward(torch.randn(y.shape, generator=generator, dtype=y.dtype))
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


def _assert_same_state(ours: nn.Module, theirs: nn.Module) -> None:
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=0, atol=0, msg=f"state {key!r}")


def _assert_same_run(ours: nn.Module, theirs: nn.Module, x: Tensor) -> None:
    y_ours, grad_ours, param_grads_ours = _run(ours, x)
    y_theirs, grad_theirs, param_grads_theirs = _run(theirs, x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0, msg="output")
    if grad_theirs is not None:
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=0, msg="input gradient")
    for got, expected in zip(param_grads_ours, param_grads_theirs, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg="parameter gradient")
    _assert_same_state(ours, theirs)


# --- forward, backward and statistics against torch's module -------------------------------------------------


def _as_batchnorm_params() -> list[Any]:
    params = []
    for case, case_id in zip(CASES, CASE_IDS, strict=True):
        for setting, family_kwargs in AS_BATCHNORM[case.family]:
            params.append(pytest.param(case, family_kwargs, id=f"{case_id}-{setting}"))
    return params


@pytest.mark.parametrize(("case", "family_kwargs"), _as_batchnorm_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_matches_torch_where_the_family_is_batchnorm(
    case: Case, family_kwargs: dict[str, Any], training: bool
) -> None:
    ours, theirs = case.build(family_kwargs)
    ours.train(training)
    theirs.train(training)
    for _ in range(3):  # several steps: running statistics, num_batches_tracked, the cumulative momentum
        _assert_same_run(ours, theirs, case.forward_input)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eval_matches_torch_after_training_in_the_familys_own_regime(case: Case) -> None:
    """Trained as itself (renormalized, noisy), each family keeps torch's statistics and eval."""
    ours, theirs = case.build(NOT_BATCHNORM[case.family])
    for _ in range(3):
        ours(_clone_input(case.forward_input))
        theirs(_clone_input(case.forward_input))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        expected = getattr(theirs, key)
        torch.testing.assert_close(getattr(ours, key), expected, rtol=1e-12, atol=1e-12, msg=key)
    ours.eval()
    theirs.eval()
    _assert_same_run(ours, theirs, case.forward_input)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_train_and_eval_differ_like_torch(case: Case) -> None:
    """module_db marks BatchNorm ``train_and_eval_differ``: the mode changes the output (with data)."""
    assert MODULE_INFOS[case.theirs].train_and_eval_differ
    ours, _ = case.build()
    x = case.forward_input.detach()
    if x.numel() == 0 or not ours.track_running_stats:
        return  # nothing to differ on, or batch statistics in both modes (torch's too)
    with torch.no_grad():
        assert not torch.equal(ours.train()(x), copy.deepcopy(ours).eval()(x))


# --- state_dict, copies, conversions --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_round_trip_both_ways(case: Case) -> None:
    ours, _ = case.build(NOT_BATCHNORM[case.family])
    ours(_clone_input(case.forward_input))
    fresh_theirs = case.theirs(*case.args, **case.kwargs).to(case.forward_input.dtype)
    fresh_theirs.load_state_dict(ours.state_dict())  # strict
    _assert_same_state(fresh_theirs, ours)
    fresh_ours = case.ours(*case.args, **case.kwargs).to(case.forward_input.dtype)
    fresh_ours.load_state_dict(fresh_theirs.state_dict())
    _assert_same_state(fresh_ours, ours)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours)
        assert repr(clone) == repr(ours)
        _assert_same_state(clone, ours)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.to(torch.float32),
        lambda m: m.double().float().double(),
        lambda m: m.to("meta"),
        lambda m: m.to(device="cpu", dtype=torch.bfloat16),
    ],
    ids=["to-float32", "double-float-double", "to-meta", "to-cpu-bf16"],
)
def test_to_like_torch(case: Case, convert: Callable[[nn.Module], nn.Module]) -> None:
    ours, theirs = case.build()
    assert convert(ours) is ours
    convert(theirs)
    for (name, got), (_, expected) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert (got.dtype, got.device, got.shape) == (expected.dtype, expected.device, expected.shape), name
    if ours.num_batches_tracked is not None:
        assert ours.num_batches_tracked.dtype == torch.long  # integer buffers are never cast


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_to_empty_and_factory_kwargs_like_torch(case: Case) -> None:
    dtype = case.forward_input.dtype
    ours = case.ours(*case.args, **case.kwargs, device="meta", dtype=dtype)
    theirs = case.theirs(*case.args, **case.kwargs, device="meta", dtype=dtype)
    assert all(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    ours.to_empty(device="cpu")
    theirs.to_empty(device="cpu")
    ours.reset_parameters()
    theirs.reset_parameters()
    _assert_same_state(ours, theirs)
    assert all(t.dtype == dtype for t in ours.parameters())
    ours.eval()(case.forward_input.detach())  # usable after materializing


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_input(case: Case, training: bool) -> None:
    """A strided view gives the numbers of its contiguous copy, and torch's numbers."""
    x = case.forward_input.detach()
    strided = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    assert torch.equal(strided, x)
    assert not strided.is_contiguous() or x.numel() == 0
    family_kwargs = AS_BATCHNORM[case.family][0][1]
    ours, theirs = case.build(family_kwargs)
    ours.train(training)
    theirs.train(training)
    _assert_same_run(ours, theirs, strided.requires_grad_())
    contiguous, _ = case.build(family_kwargs)
    y_contiguous, _, _ = _run(contiguous.train(training), x.requires_grad_())
    y_strided, _, _ = _run(case.build(family_kwargs)[0].train(training), strided)
    torch.testing.assert_close(y_strided, y_contiguous, rtol=0, atol=0)


MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.forward_input.dim() in MEMORY_FORMATS],
    ids=lambda c: f"{c.family}{c.ndim}d-{c.desc}-{str(c.forward_input.dtype)[6:]}",
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_like_torch(case: Case, training: bool) -> None:
    memory_format = MEMORY_FORMATS[case.forward_input.dim()]
    ours, theirs = case.build(AS_BATCHNORM[case.family][0][1])
    ours.train(training).to(memory_format=memory_format)
    theirs.train(training).to(memory_format=memory_format)
    x = case.forward_input.detach().contiguous(memory_format=memory_format).requires_grad_()
    y_ours, y_theirs = ours(x), theirs(_clone_input(x))
    assert y_ours.is_contiguous(memory_format=memory_format) == y_theirs.is_contiguous(
        memory_format=memory_format
    )
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
    # and the numbers of a contiguous input
    contiguous, _ = case.build(AS_BATCHNORM[case.family][0][1])
    torch.testing.assert_close(contiguous.train(training)(case.forward_input.detach()), y_ours.detach())


# --- error inputs -----------------------------------------------------------------------------------------------


def _error_cases() -> Iterator[Any]:
    for family in FAMILIES:
        for ndim, torch_cls in enumerate(TORCH_BN, start=1):
            info = MODULE_INFOS[torch_cls]
            errors = info.module_error_inputs_func(
                info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
            )
            for index, error in enumerate(errors):
                yield pytest.param(family, ndim, error, id=f"{family}{ndim}d-error{index}")


@pytest.mark.parametrize(("family", "ndim", "error"), list(_error_cases()))
def test_error_inputs_raise_torchs_exception(family: str, ndim: int, error: Any) -> None:
    """Where, with which type and message torch's module raises, ours raises too (naming the layer)."""
    cls = FAMILIES[family][ndim - 1]
    module_input = error.module_error_input
    constructor, forward = module_input.constructor_input, module_input.forward_input
    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(*constructor.args, **constructor.kwargs)
        return
    layer = cls(*constructor.args, **constructor.kwargs)  # construction succeeds, as torch's does
    with pytest.raises(error.error_type, match=error.error_regex) as info:
        layer(*forward.args, **forward.kwargs)
    assert re.search(re.escape(cls.__name__), str(info.value))
    # torch's own module agrees with its description
    theirs = TORCH_BN[ndim - 1](*constructor.args, **constructor.kwargs)
    with pytest.raises(error.error_type, match=error.error_regex):
        theirs(*forward.args, **forward.kwargs)
