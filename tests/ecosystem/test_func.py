"""``torch.func``: per-sample gradients with ``replace_all_batch_norm_modules_`` and ``vmap``.

``replace_all_batch_norm_modules_`` drops the running statistics of every ``_BatchNorm`` (``vmap`` cannot
update them in place); each sample is then normalized over its own spatial positions. The per-sample
gradients from ``vmap`` must equal those of a loop over the samples, for torch's BatchNorm and normzoo's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

import normzoo as nz

from ._models import images, net_pair


def _per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], sample: Tensor, target: Tensor) -> Tensor:
        out = functional_call(model, p, (sample.unsqueeze(0),))
        return F.cross_entropy(out, target.unsqueeze(0))

    vmapped = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    looped: dict[str, list[Tensor]] = {name: [] for name in params}
    for i in range(x.shape[0]):
        grads = grad(loss)(params, x[i], y[i])
        for name, g in grads.items():
            looped[name].append(g)
    return vmapped, {name: torch.stack(gs) for name, gs in looped.items()}


@pytest.mark.parametrize("kind", ["batchnorm", "renorm"])
def test_vmap_per_sample_gradients(kind: str) -> None:
    reference, model = net_pair(kind)
    for net in (reference, model):
        replace_all_batch_norm_modules_(net)
        net.train()
    assert model[1].running_mean is None
    assert not model[1].track_running_stats
    x = images(6, seed=1)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    vmapped, looped = _per_sample_grads(model, x, y)
    ref_vmapped, _ = _per_sample_grads(reference, x, y)
    for name in looped:
        torch.testing.assert_close(vmapped[name], looped[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(vmapped[name], ref_vmapped[name], rtol=1e-5, atol=1e-6, msg=name)


def test_vmap_refuses_noisy_training_without_a_randomness_choice() -> None:
    """Loud by torch: vmap refuses random operations unless told how samples share them."""

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nz.NoisyBatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    replace_all_batch_norm_modules_(model)
    x = images(5, seed=2)
    with pytest.raises(RuntimeError, match="randomness"):
        _per_sample_grads(model, x, torch.zeros(5, dtype=torch.long))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], sample: Tensor) -> Tensor:
        return functional_call(model, p, (sample.unsqueeze(0),)).sum()

    grads = vmap(grad(loss), in_dims=(None, 0), randomness="same")(params, x)
    assert grads["3.weight"].shape == (5, 2, 64)
