"""FSDP ``MixedPrecision`` keeps normzoo's layers in float32, as it keeps torch's BatchNorm (one gloo process)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ._models import KINDS, images, net_pair, quiet

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture
def group1() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(model: nn.Module) -> tuple[dict[str, tuple[torch.dtype, torch.dtype]], torch.Tensor]:
    """The (input dtype, weight dtype) each layer saw, and the output, under FSDP with bfloat16 parameters."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    seen: dict[str, tuple[torch.dtype, torch.dtype]] = {}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = (args[0].dtype, module.weight.dtype)

        return hook

    for index, name in ((0, "conv"), (1, "norm"), (8, "linear")):
        model[index].register_forward_pre_hook(record(name))
    policy = fsdp.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP: NO_SHARD with one process
        wrapped = fsdp.FullyShardedDataParallel(
            quiet(model),
            mixed_precision=policy,
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )
    return seen, wrapped(images())


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "torch"])
def test_fsdp_mixed_precision_runs_batchnorm_kinds_in_float32(group1: None, kind: str) -> None:
    reference, model = net_pair(kind)
    seen_ref, out_ref = _run(reference)
    seen, out = _run(model)
    assert seen_ref["norm"] == (torch.bfloat16, torch.float32)  # torch's layer: float32 parameters
    assert seen["norm"] == seen_ref["norm"]
    assert seen["conv"] == seen_ref["conv"] == (torch.bfloat16, torch.bfloat16)  # the rest: bfloat16
    assert seen["linear"] == seen_ref["linear"]
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
