"""Other libraries' SyncBatchNorm converters keep normzoo's kinds (the 2-process runs are in tests/distributed).

torch's ``SyncBatchNorm.convert_sync_batchnorm``, Lightning's ``TorchSyncBatchNorm`` (``sync_batchnorm=True``)
and timm's ``convert_sync_batchnorm`` turn torch's BatchNorm in the same model into ``SyncBatchNorm``, as they
always did; normzoo's layers stay what they are, synchronized, with their state.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ._models import NZ_KINDS, net_pair


def _torch(model: nn.Module) -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _lightning(model: nn.Module) -> nn.Module:
    layer_sync = pytest.importorskip("lightning.pytorch.plugins.layer_sync")
    return layer_sync.TorchSyncBatchNorm().apply(model)


def _timm(model: nn.Module) -> nn.Module:
    pytest.importorskip("normzoo.integrations.timm")
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "torch": _torch,
    "lightning": _lightning,
    "timm": _timm,
}


@pytest.mark.parametrize("kind", NZ_KINDS)
@pytest.mark.parametrize("converter", sorted(CONVERTERS))
def test_converter_keeps_the_kind(converter: str, kind: str) -> None:
    reference, model = net_pair(kind)
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].num_batches_tracked.fill_(123)
    kind_class = type(model[1])
    layers = (model[1], model[4])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted_ref = CONVERTERS[converter](reference)
    converted = CONVERTERS[converter](model)
    assert [type(m) for m in (converted_ref[1], converted_ref[4])] == [nn.SyncBatchNorm] * 2
    assert (converted[1], converted[4]) == layers  # the same objects ...
    assert all(type(m) is kind_class and m.sync for m in layers)  # ... of the same kind, synchronized
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key]), key
