"""Smoke test of benchmarks/layers.py: the measuring function runs for every layer on a tiny input, returns
well-formed results, and its saved-bytes numbers equal an independent count. No timing is asserted."""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

SHAPE = (4, 3, 5, 5)
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "layers.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("normzoo_benchmark_layers", BENCHMARK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def graph_saved_bytes(y: Tensor, exclude: nn.Module) -> int:
    """Bytes saved in ``y``'s autograd graph, found by walking the graph's nodes (not through hooks).

    Every tensor a node holds for backward (``_saved_*`` attributes of built-in nodes, ``saved_tensors`` of
    custom Functions) counts once per storage, at the storage's size, except ``exclude``'s parameters and
    buffers.
    """
    own = {t.untyped_storage().data_ptr() for t in (*exclude.parameters(), *exclude.buffers())}
    storages: dict[int, int] = {}
    seen: set[object] = set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved: list[object] = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                saved.extend(value if isinstance(value, (tuple, list)) else [value])
        if isinstance(node, torch.autograd.function.BackwardCFunction):  # a custom autograd.Function
            saved.extend(node.saved_tensors)
        for t in saved:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in own:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def test_measure_returns_every_layer_well_formed(bench: ModuleType) -> None:
    result = bench.measure(SHAPE, repeats=2, warmup=1)
    assert result.shape == SHAPE
    assert (result.device, result.dtype, result.repeats) == ("cpu", "float32", 2)
    assert [r.name for r in result.layers] == [v.name for v in bench.VARIANTS]
    for r, v in zip(result.layers, bench.VARIANTS, strict=True):
        assert len(r.times_s) == 2
        assert all(math.isfinite(t) and t > 0 for t in r.times_s)
        assert r.time_s > 0
        assert math.isfinite(r.time_ratio)
        assert r.time_ratio > 0
        assert r.saved_bytes > 0
        assert r.bytes_ratio == r.saved_bytes / result.layers[0].saved_bytes
        if v.target is None:
            assert (r.target, r.target_time_ratio, r.passed) == (None, None, None)
        else:
            assert isinstance(r.passed, bool)
            assert r.target == v.target.describe()
            assert r.target_time_ratio is not None
            assert r.target_time_ratio > 0
    reference = result[bench.REFERENCE]
    assert (reference.time_ratio, reference.bytes_ratio) == (1.0, 1.0)
    table = bench.format_table(result)
    assert all(v.name in table for v in bench.VARIANTS)
    assert table.count("PASS") + table.count("MISS") == sum(v.target is not None for v in bench.VARIANTS)


def test_saved_bytes_equal_an_independent_count(bench: ModuleType) -> None:
    result = bench.measure(SHAPE, repeats=1, warmup=0)
    for variant in bench.VARIANTS:
        torch.manual_seed(0)
        module = variant.build(SHAPE[1]).train()
        x = torch.randn(SHAPE, requires_grad=True)
        y = module(x)
        assert result[variant.name].saved_bytes == graph_saved_bytes(y, module), variant.name
    # torch's BatchNorm saves the input and two float32 vectors (batch mean and 1/std) besides its
    # parameters and buffers; normzoo's BatchNorm and NoisyBatchNorm save exactly that too.
    bn_bytes = math.prod(SHAPE) * 4 + 2 * SHAPE[1] * 4
    assert result[bench.REFERENCE].saved_bytes == bn_bytes
    assert result["normzoo BatchNorm2d"].saved_bytes == bn_bytes
    assert result["normzoo NoisyBatchNorm2d"].saved_bytes == bn_bytes


def test_saved_bytes_deduplicates_storages_and_skips_dead_branches(bench: ModuleType) -> None:
    class SavesViewsTwice(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            x.exp().sum()  # a branch nobody backpropagates through: freed at once, not counted
            return x * x[:, :1] * x

    x = torch.randn(6, 4, requires_grad=True)
    assert bench.saved_bytes(SavesViewsTwice(), x) == x.nbytes + 6 * 4 * 4  # x, and the product x * x[:, :1]


def test_main_writes_json(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--shapes", "2,3,2,2", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert [tuple(r["shape"]) for r in data["results"]] == [(2, 3, 2, 2)]
    assert bench.REFERENCE in capsys.readouterr().out


def test_module_doctests(bench: ModuleType) -> None:
    failures, tests = doctest.testmod(bench, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert tests > 0
    assert failures == 0
