"""Population statistics by other libraries' loops: ``torch.optim.swa_utils.update_bn`` and PreciseBN.

Both find BatchNorm by ``isinstance`` and re-estimate the running statistics by forwarding batches in
training mode. For torch's BatchNorm and normzoo's the result must be the population statistics that
``normzoo.recompute_bn_stats`` gives. BatchRenorm (whose clip-bound schedule counts ``num_batches_tracked``,
which ``update_bn`` zeroes) and NoisyBatchNorm (whose training output carries noise into every later layer's
statistics) cannot be right under these loops, so they say so, naming ``normzoo.recompute_bn_stats``: the
loops switch the layers' momentum to ``None`` (``update_bn``, Lightning's ``StochasticWeightAveraging``) or
1 (PreciseBN), and the layers warn at a training step with a momentum switched that way.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

import normzoo as nz

from ._models import batches, bn_layers, net_pair


def precise_bn(model: nn.Module, data: Iterable[Tensor], num_iters: int) -> None:
    """fvcore's ``update_bn_stats`` (the PreciseBN algorithm), written out: fvcore is not a dependency.

    Every BatchNorm gets ``momentum=1`` (running statistics = the last batch's), the model forwards
    ``num_iters`` batches in training mode, and the per-batch statistics are averaged with equal weights.
    """
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    layers = [m for m in model.modules() if m.training and isinstance(m, bn_types)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 1.0
    means = [torch.zeros_like(m.running_mean) for m in layers]
    variances = [torch.zeros_like(m.running_var) for m in layers]
    for index, inputs in enumerate(itertools.islice(data, num_iters)):
        with torch.no_grad():
            model(inputs)
        for i, m in enumerate(layers):
            means[i] += (m.running_mean - means[i]) / (index + 1)
            variances[i] += (m.running_var - variances[i]) / (index + 1)
    for i, m in enumerate(layers):
        m.running_mean, m.running_var, m.momentum = means[i], variances[i], momenta[i]


def _trained(kind: str) -> tuple[nn.Module, nn.Module]:
    """Both models with statistics and a step count mid-way through BatchRenorm's paper schedule."""
    reference, model = net_pair(kind)
    with torch.no_grad():
        for m in bn_layers(reference):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(20_000)
    model.load_state_dict(reference.state_dict())
    return reference, model


def _stats(model: nn.Module) -> list[Tensor]:
    return [t for m in bn_layers(model) for t in (m.running_mean, m.running_var)]


def _expected(kind: str) -> list[Tensor]:
    model = _trained(kind)[1]
    return _stats(nz.recompute_bn_stats(model, batches()))


@pytest.mark.parametrize("kind", ["torch", "batchnorm"])
def test_update_bn_gives_the_population_statistics(kind: str) -> None:
    _, model = _trained(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        update_bn(batches(), model)
    for got, want in zip(_stats(model), _expected(kind), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["torch", "batchnorm"])
def test_precise_bn_gives_the_population_statistics(kind: str) -> None:
    _, model = _trained(kind)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precise_bn(model, batches(), num_iters=4)
    for got, want in zip(_stats(model), _expected(kind), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


LOUD = {
    "renorm": r"BatchRenorm2d.*normzoo\.recompute_bn_stats",
    "noisy": r"NoisyBatchNorm2d.*normzoo\.recompute_bn_stats",
}


@pytest.mark.parametrize("kind", sorted(LOUD))
def test_update_bn_on_renorm_and_noisy_is_loud(kind: str) -> None:
    _, model = _trained(kind)
    with pytest.warns(UserWarning, match=LOUD[kind]):
        update_bn(batches(), model)


@pytest.mark.parametrize("kind", sorted(LOUD))
def test_precise_bn_on_renorm_and_noisy_is_loud(kind: str) -> None:
    _, model = _trained(kind)
    model.train()
    with pytest.warns(UserWarning, match=LOUD[kind]):
        precise_bn(model, batches(), num_iters=4)


@pytest.mark.parametrize("kind", sorted(LOUD))
def test_recompute_bn_stats_is_the_quiet_way(kind: str) -> None:
    """What the warnings point to: population statistics without noise or renorm, the schedule kept."""
    _, model = _trained(kind)
    reference = copy.deepcopy(_trained("batchnorm")[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nz.recompute_bn_stats(model, batches())
    nz.recompute_bn_stats(reference, batches())
    for got, want in zip(_stats(model), _stats(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert [int(m.num_batches_tracked) for m in bn_layers(model)] == [20_000, 20_000]


@pytest.mark.parametrize("kind", sorted(LOUD))
def test_lightning_stochastic_weight_averaging_on_renorm_and_noisy_is_loud(kind: str) -> None:
    """Lightning's SWA callback zeroes the statistics itself (no reset_running_stats) and sets momentum=None."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _trained(kind)[1]

    module = Module()
    pl.callbacks.StochasticWeightAveraging(swa_lrs=0.1).reset_batch_norm_and_save_state(module)
    with pytest.warns(UserWarning, match=LOUD[kind]):
        module.net.train()(batches()[0])


@pytest.mark.parametrize("momentum", [None, 1.0])
@pytest.mark.parametrize("kind", sorted(LOUD))
def test_a_momentum_chosen_at_construction_trains_quietly(kind: str, momentum: float | None) -> None:
    """The warning is about a momentum switched by a re-estimation loop, not one the user chose."""
    layer = {"renorm": nz.BatchRenorm2d, "noisy": nz.NoisyBatchNorm2d}[kind](3, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.train()(batches()[0])
