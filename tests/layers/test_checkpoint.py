"""Recomputation under ``torch.utils.checkpoint``: the same gradients as the plain run, state advanced once.

torch's checkpoint runs a region's forward twice; torch's own BatchNorm updates its running statistics and
step count both times (the plain torch layer below shows it). normzoo's layers replay the first run instead.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import normzoo as nz

from ._reference import FAMILIES, assert_same

SETTINGS: dict[str, dict[str, Any]] = {
    "batchnorm": {},
    "renorm-clipping": {"r_max": 1.2, "d_max": 0.3, "schedule": None},  # r and d active from step 0
    "renorm-paper-scaled": {"schedule": nz.PaperSchedule(total_steps=8)},  # through warm-up and ramps
    "noisy-own-generator": {"generator": "own"},
    "noisy-global-generator": {},
}


def _layer(setting: str, momentum: float | None) -> nn.Module:
    family = setting.split("-")[0]
    kwargs = dict(SETTINGS[setting])
    if kwargs.get("generator") == "own":
        kwargs["generator"] = torch.Generator().manual_seed(11)
    return FAMILIES[family][1](4, momentum=momentum, **kwargs)


def _model(setting: str, momentum: float | None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        _layer(setting, momentum),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        _layer(setting, momentum),
        nn.Tanh(),
    )


def _batches(steps: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [(1 + i / 3) * torch.randn(4, 3, 5, 5, generator=generator) + i / 2 for i in range(steps)]


def _train(model: nn.Module, forward: Any, batches: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """Forward and backward per batch (global RNG seeded per step alike); outputs and every gradient."""
    results = []
    for step, x in enumerate(batches):
        model.zero_grad()
        x = x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        y = forward(model, x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad, *(p.grad for p in model.parameters())))
    return results


FORWARDS = {
    "reentrant": lambda m, x: checkpoint(m, x, use_reentrant=True),
    "non-reentrant": lambda m, x: checkpoint(m, x, use_reentrant=False),
    "segments": lambda m, x: checkpoint_sequential(m, 2, x, use_reentrant=False),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", list(FORWARDS))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_checkpointed_training_is_the_plain_run(setting: str, mode: str, momentum: float | None) -> None:
    plain = _model(setting, momentum)
    checkpointed = copy.deepcopy(plain)
    batches = _batches(10)
    expected = _train(plain, lambda m, x: m(x), batches)
    got = _train(checkpointed, FORWARDS[mode], batches)
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"step {step}, tensor {i} (output, input grad, parameter grads)")
    for key, value in plain.state_dict().items():
        assert_same(checkpointed.state_dict()[key], value, key)
    assert int(checkpointed[1].num_batches_tracked) == len(batches)  # one step per batch
    if SETTINGS[setting].get("generator") == "own":
        # the layer's generator ends where the plain run's does: no draw repeated, none skipped
        assert torch.equal(checkpointed[1].generator.get_state(), plain[1].generator.get_state())


def test_torch_batchnorm_counts_a_checkpointed_step_twice() -> None:
    """What torch does (the reason for the replay): its BatchNorm updates in both runs."""
    layer = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert int(layer.num_batches_tracked) == 2
    ours = nz.BatchNorm2d(3)
    checkpoint(ours, x, use_reentrant=False).sum().backward()
    assert int(ours.num_batches_tracked) == 1


def test_no_grad_training_forwards_keep_little() -> None:
    """Forwards that are never recomputed (e.g. statistics passes under no_grad) keep a bounded record."""
    layer = nz.BatchRenorm2d(3, r_max=1.5, d_max=0.5, schedule=None)
    with torch.no_grad():
        for _ in range(100):
            layer(torch.randn(4, 3, 2, 2))
    assert len(layer.__dict__["_replays"]) <= 16
    y = layer(torch.randn(4, 3, 2, 2, requires_grad=True))  # the normal path records nothing more
    y.sum().backward()
    assert int(layer.num_batches_tracked) == 101
