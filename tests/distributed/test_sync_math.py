"""Synchronized layers over 2 processes equal the unsynchronized layer on the concatenated batch.

All cases run in one spawn of two gloo processes on the CPU (the fixture), then each case is its own test.
The ``cuda`` tests run the very same worker code on GPUs: NCCL with one GPU per process (NCCL refuses two
ranks on one GPU), and gloo with CUDA tensors, which lets both processes share a single GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _sync_workers import (
    MATH_CASES,
    Case,
    available_cases,
    check_math_results,
    ddp_training_reference,
    default_start_method,
    math_worker,
    misc_worker,
    population_reference,
    spawn,
)

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.timeout(300),
]

CASES = available_cases()


@pytest.fixture(scope="module")
def gloo_cpu_results() -> list[dict[str, Any]]:
    return spawn(
        math_worker, CASES, "cpu", world_size=2, backend="gloo", start_method=default_start_method("cpu")
    )


@pytest.mark.parametrize("case", MATH_CASES, ids=lambda c: c.name)
def test_synchronized_equals_concatenated_batch(case: Case, gloo_cpu_results: list[dict[str, Any]]) -> None:
    if case not in CASES:
        pytest.skip("needs timm")
    check_math_results(gloo_cpu_results, case)


#: The cases torch's converter can run on the CPU: normzoo's layers (torch's own become torch's
#: ``SyncBatchNorm``, which refuses CPU tensors in training).
TORCH_CONVERTER_CASES = tuple(c for c in MATH_CASES if c.family in ("batchnorm", "renorm", "noisy"))


@pytest.fixture(scope="module")
def torch_converter_results() -> list[dict[str, Any]]:
    return spawn(
        math_worker,
        TORCH_CONVERTER_CASES,
        "cpu",
        "torch",
        world_size=2,
        backend="gloo",
        start_method=default_start_method("cpu"),
    )


@pytest.mark.parametrize("case", TORCH_CONVERTER_CASES, ids=lambda c: c.name)
def test_torch_converter_keeps_the_kind_and_synchronizes(
    case: Case, torch_converter_results: list[dict[str, Any]]
) -> None:
    """``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``) on normzoo's layers:
    each keeps its kind and, over 2 processes, computes what it computes on the concatenated batch."""
    check_math_results(torch_converter_results, case)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per process: 2 GPUs")
def test_nccl_synchronized_equals_concatenated_batch() -> None:
    results = spawn(math_worker, CASES, "cuda", world_size=2, backend="nccl", start_method="spawn")
    for case in CASES:
        check_math_results(results, case)


@pytest.mark.cuda
def test_gloo_cuda_tensors_on_one_gpu() -> None:
    results = spawn(math_worker, CASES, "cuda", world_size=2, backend="gloo", start_method="spawn")
    for case in CASES:
        check_math_results(results, case)


@pytest.fixture(scope="module")
def misc_results() -> list[dict[str, Any]]:
    return spawn(misc_worker, world_size=2, backend="gloo", start_method=default_start_method("cpu"))


def test_a_one_process_group_leaves_the_layer_local(misc_results: list[dict[str, Any]]) -> None:
    assert all(r["singleton_group_is_local"] for r in misc_results)


def test_an_explicit_group_of_everyone_is_the_default_group(misc_results: list[dict[str, Any]]) -> None:
    for r in misc_results:
        assert r["explicit_group_matches_default"] < 1e-12
    torch.testing.assert_close(misc_results[0]["running_mean"], misc_results[1]["running_mean"])


def test_all_reduce_stat_sums_sums_in_place_keeping_dtypes(misc_results: list[dict[str, Any]]) -> None:
    for r in misc_results:
        floats, count = r["stat_sums"]
        assert torch.equal(floats, torch.full((3,), 3.0))
        assert count.dtype == torch.int64
        assert count.item() == 21


def test_ddp_training_with_synced_layers_equals_whole_batch_training(
    misc_results: list[dict[str, Any]],
) -> None:
    reference = ddp_training_reference(steps=3, batch=4, world_size=2)
    for r in misc_results:
        assert r["ddp_kinds"][1] == "BatchRenorm2d"
        assert r["ddp_kinds"][4] == "SyncedBatchNorm2d"
        torch.testing.assert_close(r["ddp_state"], reference, rtol=1e-9, atol=1e-10)


def test_recompute_bn_stats_with_summed_sums_gives_every_rank_the_population_statistics(
    misc_results: list[dict[str, Any]],
) -> None:
    reference = population_reference(world_size=2)
    for r in misc_results:
        torch.testing.assert_close(r["population_state"], reference, rtol=1e-12, atol=1e-12)
