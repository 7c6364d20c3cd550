"""recompute_bn_stats against an independent computation: hooks capture each layer's inputs, numpy pools them."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from torch import nn

import normzoo as nz
from normzoo.surgery import BatchStatSums, apply_bn_stat_sums, collect_bn_stat_sums

from ._corpus import CASES, DataDependent, assert_matches, hand_statistics


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 5, 3), nz.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 5, 1), nz.BatchRenorm2d(5), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(), nn.Linear(6, 2),
    )  # fmt: skip


def batches(sizes: Iterable[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=generator) * 2 + 1, torch.zeros(n)) for n in sizes]


def test_matches_algorithm_2_with_unequal_batches() -> None:
    model = net()
    data = batches([8, 5, 3, 8])
    expected = hand_statistics(model, [x for x, _ in data])
    model.train()
    before = copy.deepcopy(model.state_dict())
    assert nz.recompute_bn_stats(model, data) is model
    assert_matches(model, expected)
    assert model.training
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    for key, value in before.items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(after[key], value), f"{key} changed"
    assert int(model[1].num_batches_tracked) == 0  # a step counter: kept
    assert int(model[12].num_batches_tracked) == 4  # momentum=None: the number of batches pooled


def test_a_last_batch_of_one_sample_is_pooled() -> None:
    """A DataLoader without drop_last can end on one sample: no batch statistics, but its values count."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, generator=g) for _ in range(3)] + [torch.randn(1, 3, generator=g)]
    nz.recompute_bn_stats(model, data)
    with torch.no_grad():
        hidden = [model[0](x).double() for x in data]
    counts = torch.tensor([h.shape[0] for h in hidden], dtype=torch.float64)
    means = torch.stack([h.mean(0) for h in hidden])
    m2 = torch.stack([((h - h.mean(0)) ** 2).sum(0) for h in hidden])
    mean = (counts[:, None] * means).sum(0) / counts.sum()
    var = m2.sum(0) / (counts - 1).sum()  # each batch's degrees of freedom; the single sample adds none
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-6, atol=1e-6)


def test_equal_batches_are_algorithm_2_exactly() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [torch.randn(m, 3) for m in (6, 6, 6)]
    nz.recompute_bn_stats(model, data)
    hidden = [model[0](x).detach().double() for x in data]
    m = 6
    mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    var = m / (m - 1) * torch.stack([h.var(0, unbiased=False) for h in hidden]).mean(0)
    torch.testing.assert_close(model[1].running_mean.double(), mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, atol=1e-6, rtol=1e-6)


def test_num_batches_and_mixed_flags() -> None:
    model = net().eval()
    model[3].train()  # a lone dropout in training mode: its flag comes back, and it is off during the pass
    data = batches([4, 4, 4, 4, 4])
    expected = hand_statistics(model, [x for x, _ in data[:2]])
    nz.recompute_bn_stats(model, data, num_batches=2)
    assert_matches(model, expected)
    assert [m.training for m in model] == [False] * 3 + [True] + [False] * 11
    assert int(model[12].num_batches_tracked) == 2
    with pytest.raises(ValueError, match="expected num_batches to be a positive int"):
        nz.recompute_bn_stats(model, data, num_batches=0)


def test_batch_formats() -> None:
    class KeywordNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net()

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.body(image)

    data = batches([4, 6])
    tensors = [x for x, _ in data]
    expected = hand_statistics(net(), tensors)
    for feed in (
        tensors,
        data,
        [[x, y] for x, y in data],
        [((x,), y) for x, y in data],
    ):
        torch.manual_seed(0)
        model = nz.recompute_bn_stats(net(), feed)
        assert_matches(model, expected)
    torch.manual_seed(0)
    keyword = nz.recompute_bn_stats(KeywordNet(), [{"image": x, "label": y} for x, y in data])
    assert_matches(keyword.body, expected)
    with pytest.raises(TypeError, match="expected a batch dict keyed by parameters"):
        nz.recompute_bn_stats(KeywordNet(), [{"x": tensors[0]}])


def test_input_fn_reads_any_batch_and_follows_the_input_convention() -> None:
    """``input_fn`` gives the input; a tuple input is positional arguments, as in insert_bn's example_input."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net()

        def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.body(image * scale)

    data = batches([4, 6])
    expected = hand_statistics(net(), [x * 2 for x, _ in data])
    feed = [{"pixels": x, "target": y} for x, y in data]
    torch.manual_seed(0)
    model = nz.recompute_bn_stats(
        TwoInputs(), feed, input_fn=lambda batch: (batch["pixels"], torch.tensor(2.0))
    )
    assert_matches(model.body, expected)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_sums_combine_across_sources() -> None:
    """The seam for distributed runs: sums from two halves of the data add up to the sums of all of it."""
    model = net()
    data = batches([5, 3, 7, 4])
    whole = collect_bn_stat_sums(model, data)
    first, second = collect_bn_stat_sums(model, data[:2]), collect_bn_stat_sums(model, data[2:])
    combined = {name: first[name] + second[name] for name in first}
    assert whole.keys() == combined.keys() == {"1", "5", "8", "12"}
    for name in whole:
        for a, b in zip(whole[name].tensors(), combined[name].tensors(), strict=True):
            torch.testing.assert_close(a, b)
    expected = hand_statistics(model, [x for x, _ in data])
    apply_bn_stat_sums(model, combined)
    assert_matches(model, expected)


def test_unreached_layer_warns_and_keeps_its_statistics() -> None:
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
            self.unused = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = WithUnused()
    model.unused.running_mean.fill_(3.0)
    with pytest.warns(
        UserWarning, match="no usable batch reached these layers, which keep their statistics: unused"
    ):
        nz.recompute_bn_stats(model, [torch.randn(4, 3)])
    assert torch.equal(model.unused.running_mean, torch.full((2,), 3.0))
    empty = BatchStatSums.zeros(3)
    assert float(empty.count) == 0
    assert empty.mean_sum.shape == (3,)


def test_pending_layers_of_insert_bn_are_sized_first() -> None:
    with pytest.warns(UserWarning, match="could not trace"):
        model = nz.insert_bn(DataDependent())
    data = [torch.randn(6, 5) for _ in range(3)]
    nz.recompute_bn_stats(model, data)
    layer = model.act.norm
    assert isinstance(layer, nz.BatchNorm1d)
    hidden = torch.cat([model.fc1(x) for x in data]).detach().double()
    torch.testing.assert_close(layer.running_mean.double(), hidden.mean(0), atol=1e-6, rtol=1e-6)


def test_timm_resnet_matches_hand_computation() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    data = [torch.randn(n, 3, 32, 32) for n in (4, 2, 3)]
    expected = hand_statistics(model, data)
    nz.recompute_bn_stats(model, data)
    assert len(expected) == 14
    for name, (mean, var) in expected.items():
        layer = model.get_submodule(name)
        np.testing.assert_allclose(
            layer.running_mean.double().numpy(), mean, rtol=1e-4, atol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(
            layer.running_var.double().numpy(), var, rtol=1e-4, atol=1e-5, err_msg=name
        )


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"recompute_bn_stats: expected a torch\.nn\.Module"):
        nz.recompute_bn_stats([], [])  # type: ignore[arg-type]


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_corpus_after_insert_bn(case_name: str) -> None:
    case = CASES[case_name]
    model = nz.insert_bn(case.build(), example_input=case.input())
    inputs = [case.input(seed) for seed in (1, 2, 3)]
    expected = hand_statistics(model, inputs)
    assert len(expected) == len(case.expected)
    nz.recompute_bn_stats(model, inputs)
    assert_matches(model, expected)


def test_an_empty_batch_adds_nothing() -> None:
    """A loader can yield N = 0 (a filtered batch): its NaN mean must not reach the statistics."""
    model = net()
    data = batches([6, 0, 5])
    expected = hand_statistics(model, [x for x, _ in data if len(x)])
    nz.recompute_bn_stats(model, data)
    assert_matches(model, expected)
    assert int(model[12].num_batches_tracked) == 2  # momentum=None: the batches pooled, the empty one not


def test_lazy_layers_are_sized_by_the_first_batch() -> None:
    lazy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    data = batches([4, 6])
    nz.recompute_bn_stats(lazy, data)
    assert isinstance(lazy[1], nn.BatchNorm2d)
    assert lazy[1].running_mean.shape == (4,)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    plain[0].load_state_dict(lazy[0].state_dict())
    assert_matches(lazy, {"1": hand_statistics(plain, [x for x, _ in data])["1"]})
