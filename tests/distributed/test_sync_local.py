"""Synchronization in one process: gradcheck, the statistics' numerics, the layers' settings, conversion.

The fixture ``group1`` initializes a one-process gloo group (an in-memory store) and destroys it after the
test, so that no other test sees ``torch.distributed`` initialized.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import normzoo as nz
from normzoo import functional as NF
from normzoo.functional import _local_moment_sums, _moments_from_sums
from normzoo.surgery.sync import (
    SyncedBatchNorm2d,
    all_reduce_stat_sums,
    convert_sync,
    is_synced,
    revert_sync,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

NZ_CLASSES = [
    nz.BatchNorm1d,
    nz.BatchNorm2d,
    nz.BatchNorm3d,
    nz.BatchRenorm1d,
    nz.BatchRenorm2d,
    nz.BatchRenorm3d,
    nz.NoisyBatchNorm1d,
    nz.NoisyBatchNorm2d,
    nz.NoisyBatchNorm3d,
]
SHAPES = {"1d": (6, 3, 4), "2d": (4, 3, 3, 2), "3d": (3, 3, 2, 2, 3)}


def _shape(cls: type[nn.Module]) -> tuple[int, ...]:
    return SHAPES[cls.__name__[-2:]]


@pytest.fixture
def group1() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- the autograd Function -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (3, 2, 3, 2)], ids=["2D", "3D", "4D"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradcheck_sync_batch_norm(group1: None, shape: tuple[int, ...], affine: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    channels = shape[1]
    w = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_(affine)
    b = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_(affine)
    weight, bias = (w, b) if affine else (None, None)

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return NF.sync_batch_norm(x, None, None, *(params or (None, None)), 0.1, 1e-5)

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(fn, inputs)
    del weight, bias


def test_gradcheck_sync_batch_renorm_with_clipping(group1: None) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 3, 4, generator=gen, dtype=torch.float64) * 2 + 3).requires_grad_(True)
    w = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    mean, var = torch.full((3,), -2.0, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return NF.batch_renorm(x, mean.clone(), var.clone(), w, b, True, 0.1, 1e-5, 1.5, 0.5, sync=True)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_sync_batch_norm_equals_batch_norm_in_one_process(group1: None) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, 5, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(True)
    rm_a, rv_a = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm_b, rv_b = rm_a.clone(), rv_a.clone()
    y_a = NF.sync_batch_norm(x, rm_a, rv_a, w, None, 0.3, 1e-5)
    (gx_a, gw_a) = torch.autograd.grad((y_a * g).sum(), (x, w))
    y_b = F.batch_norm(x, rm_b, rv_b, w, None, True, 0.3, 1e-5)
    (gx_b, gw_b) = torch.autograd.grad((y_b * g).sum(), (x, w))
    for a, b in [(y_a, y_b), (gx_a, gx_b), (gw_a, gw_b), (rm_a, rm_b), (rv_a, rv_b)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_backward_saves_only_the_input(group1: None) -> None:
    x = torch.randn(16, 8, 6, 6, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = NF.sync_batch_norm(x, None, None, w, None)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]  # type: ignore[union-attr]
    big = [t for t in saved if t.numel() > 8]
    assert len(big) == 1
    assert big[0].data_ptr() == x.data_ptr()


def test_one_value_per_channel_overall_is_still_computed(group1: None) -> None:
    # A size-1 group with one value per channel: the functional form does not raise (the layers do).
    y = NF.sync_batch_norm(torch.randn(1, 3), None, None)
    torch.testing.assert_close(y, torch.zeros(1, 3), rtol=0, atol=1e-4)


# --- the statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 1e3, 1e4])
def test_moment_sums_combine_uneven_shares(shift: float) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 5, 6, 6, generator=gen, dtype=torch.float64) * 0.5 + shift).float()
    true_var, true_mean = torch.var_mean(x.double(), dim=[0, 2, 3], correction=0)
    shares = [x[:7], x[7:7], x[7:25], x[25:]]  # uneven, one empty
    sums = torch.stack([_local_moment_sums(s) for s in shares]).sum(0)  # what all_reduce computes
    mean, var, count = _moments_from_sums(sums, torch.float32)
    assert count.item() == 40 * 36
    torch.testing.assert_close(mean.double(), true_mean, rtol=2e-7, atol=1e-7)
    # As accurate as BatchNorm on the whole batch: the per-share means carry their rounding correction, and
    # the between-share term cancels in float64 (relative error ~1e-16·μ²/σ², 4e-8 at |μ|/σ = 2·10⁴).
    assert ((var.double() - true_var) / true_var).abs().max() < 5e-7
    running_var = torch.zeros(5)
    F.batch_norm(x, torch.zeros(5), running_var, None, None, True, 1.0, 1e-5)
    torch_var = running_var.double() * (count.item() - 1) / count.item()
    assert ((var.double() - true_var) / true_var).abs().max() <= 5 * (
        (torch_var - true_var) / true_var
    ).abs().max() + 1e-7


def test_moment_sums_are_safe_where_sum_of_squares_is_not() -> None:
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 2, 8, generator=gen, dtype=torch.float64) + 1e4).float()
    true_var = torch.var(x.double(), dim=[0, 2], correction=0)
    sums = _local_moment_sums(x[:20]) + _local_moment_sums(x[20:])
    _, var, _ = _moments_from_sums(sums, torch.float32)
    naive = (x * x).mean([0, 2]) - x.mean([0, 2]) ** 2  # float32 E[x²] − E[x]²: catastrophic cancellation
    assert ((var.double() - true_var) / true_var).abs().max() < 1e-4
    assert ((naive.double() - true_var) / true_var).abs().max() > 0.1


def test_sync_batch_stats_returns_global_count(group1: None) -> None:
    mean, var, count = NF.sync_batch_stats(torch.arange(12.0).view(2, 3, 2))
    assert count.item() == 4
    assert count.dtype == torch.float64
    torch.testing.assert_close(mean, torch.tensor([3.5, 5.5, 7.5]))
    torch.testing.assert_close(var, torch.full((3,), 9.25))
    assert not mean.requires_grad


# --- the layers' settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", NZ_CLASSES, ids=lambda c: c.__name__)
def test_one_process_keeps_the_native_fast_path(group1: None, cls: type[nn.Module]) -> None:
    kwargs = {"mean_range": 0.0, "std_range": (0.0, 0.0)} if "Noisy" in cls.__name__ else {}
    plain, synced = cls(3, **kwargs), cls(3, sync=True, **kwargs)
    assert synced.sync
    assert not plain.sync
    assert not synced._sync_active()  # a one-process group: nothing to synchronize
    x = torch.randn(_shape(cls))
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.state_dict(), plain.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", NZ_CLASSES, ids=lambda c: c.__name__)
def test_settings_survive_deepcopy_and_leave_state_dict_alone(group1: None, cls: type[nn.Module]) -> None:
    group = dist.new_group([0])
    layer = cls(3, process_group=group)
    assert layer.sync
    assert layer.process_group is group
    assert list(layer.state_dict()) == list(cls(3).state_dict())
    clone = copy.deepcopy(layer)
    assert clone.sync
    assert clone.process_group is group
    assert clone.weight is not layer.weight
    assert "sync=True, process_group=<custom>" in repr(layer)
    assert "sync" not in repr(cls(3))


def test_pickling_refuses_an_explicit_group_and_keeps_the_default_one(group1: None) -> None:
    layer = nz.BatchRenorm2d(3, process_group=dist.new_group([0]))
    with pytest.raises(TypeError, match=r"cannot be pickled.*revert_sync"):
        pickle.dumps(layer)
    default = pickle.loads(pickle.dumps(nz.BatchRenorm2d(3, sync=True)))
    assert default.sync
    assert default.process_group is None


def test_unsynchronized_layers_do_not_need_torch_distributed() -> None:
    assert not dist.is_initialized()
    layer = nz.BatchNorm2d(3, sync=True)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))


# --- convert_sync / revert_sync ------------------------------------------------------------------------


def _zoo() -> nn.Module:
    """One of every kind, with non-default weights, statistics, flags and a hook."""
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.ModuleDict(
        {
            "bn1": nz.BatchNorm1d(3),
            "bn2": nz.BatchNorm2d(3, momentum=None),
            "bn3": nz.BatchNorm3d(3, affine=False),
            "renorm": nz.BatchRenorm2d(3, r_max=2.0, d_max=1.0),
            "noisy": nz.NoisyBatchNorm2d(3, mean_range=0.5),
            "torch1": nn.BatchNorm1d(3),
            "torch2": nn.BatchNorm2d(3, track_running_stats=False),
            "torch3": nn.BatchNorm3d(3),
            "timm": timm_layers.BatchNormAct2d(3, act_layer=nn.ReLU),
            "syncbn": nn.SyncBatchNorm(3),
        }
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(12_345)  # mid-way through BatchRenorm's paper schedule
    model["bn1"].weight.requires_grad_(False)
    model["torch3"].eval()
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        assert na == nb
        assert ma.training == mb.training, na
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.requires_grad == pb.requires_grad, na


def test_convert_sync_keeps_every_kind_and_revert_sync_restores_it(group1: None) -> None:
    model = _zoo()
    kinds = {name: type(m) for name, m in model.items()}
    before = copy.deepcopy(model.state_dict())
    calls: list[str] = []
    model["torch2"].register_forward_hook(lambda *_: calls.append("hook"))
    renorm_bounds = model["renorm"].clip_bounds()

    synced = convert_sync(model)
    assert synced is not model
    assert {name: type(m) for name, m in model.items()} == kinds  # the original is untouched
    expected = dict(kinds, torch1="SyncedBatchNorm1d", torch2="SyncedBatchNorm2d", torch3="SyncedBatchNorm3d")
    expected["timm"] = "SyncedBatchNormAct2d"
    for name, m in synced.items():
        want = expected[name]
        assert (type(m).__name__ if isinstance(want, str) else type(m)) == want, name
        assert isinstance(m, kinds[name])  # torch's and timm's classes stay base classes
        assert is_synced(m) == (name != "syncbn"), name
    assert not any(is_synced(m) for m in model.values())
    _assert_same_state(synced, model)
    assert synced["renorm"].clip_bounds() == renorm_bounds
    assert isinstance(synced["timm"].act, nn.ReLU)
    synced["torch2"](torch.randn(2, 3, 2, 2))
    assert calls == ["hook"]  # the deep copy carries the hook, the class switch keeps it

    reverted = revert_sync(synced, inplace=True)
    assert reverted is synced
    assert {name: type(m) for name, m in reverted.items()} == kinds
    assert not any(is_synced(m) for m in reverted.values())
    assert all(
        "_process_group_ref" not in m.__dict__
        for m in reverted.modules()
        if not isinstance(m, nz.layers.BatchNormBase)
    )
    _assert_same_state(reverted, model)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_convert_sync_inplace_keeps_the_objects_and_sets_the_group(group1: None) -> None:
    group = dist.new_group([0])
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nz.BatchRenorm2d(3))
    bn, weight = model[1], model[1].weight
    out = convert_sync(model, group, inplace=True)
    assert out is model
    assert model[1] is bn
    assert model[1].weight is weight
    assert isinstance(bn, SyncedBatchNorm2d)
    assert bn.process_group is group
    assert model[2].process_group is group
    clone = copy.deepcopy(model)  # torch's SyncBatchNorm with a group cannot be deep-copied
    assert clone[1].process_group is group
    assert clone[2].process_group is group
    convert_sync(model, None, inplace=True)  # converting again changes the group
    assert bn.process_group is None
    assert is_synced(bn)


def test_converted_layers_compute_what_they_did(group1: None) -> None:
    torch.manual_seed(6)
    model = _zoo()
    del model["syncbn"]  # torch's SyncBatchNorm raises on CPU in training
    model["noisy"].mean_range, model["noisy"].std_range = 0.0, (0.0, 0.0)
    synced = convert_sync(model)
    inputs = {"bn1": (4, 3), "torch1": (4, 3, 2), "bn3": (2, 3, 2, 2, 2), "torch3": (2, 3, 2, 2, 2)}
    for train in (True, False):
        model.train(train)
        synced.train(train)
        for name in model:
            x = torch.randn(inputs.get(name, (2, 3, 3, 3)))
            assert torch.equal(synced[name](x), model[name](x)), (name, train)
    _assert_same_state(synced, model)


def test_convert_sync_warns_about_what_it_cannot_synchronize() -> None:
    class OwnForward(nn.BatchNorm2d):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 2

    model = nn.Sequential(OwnForward(3), nn.LazyLinear(4))
    with (
        pytest.warns(UserWarning, match="uninitialized \\(lazy\\) parameters"),
        pytest.warns(UserWarning, match=r"left these.*0 \(.*OwnForward\)"),
    ):
        synced = convert_sync(model)
    assert type(synced[0]) is OwnForward


def test_convert_sync_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"convert_sync: expected a torch\.nn\.Module, got str"):
        convert_sync("model")  # type: ignore[type-var]


# --- torch's converter (Lightning's sync_batchnorm=True), as normzoo wraps it ------------------------------


def test_torch_converter_keeps_normzoo_kinds_and_demotes_timm(group1: None) -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        nz.BatchRenorm2d(3, r_max=2.0, schedule=None),
        nn.BatchNorm2d(3),
        timm_layers.BatchNormAct2d(3, act_layer=nn.ReLU),
        nn.Sequential(nz.NoisyBatchNorm2d(3)),
    )
    renorm, noisy = model[0], model[3][0]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model), process_group=None)
    assert type(converted[0]) is nz.BatchRenorm2d  # the kind and its settings are kept ...
    assert converted[0].sync
    assert converted[0].r_max == 2.0
    assert type(converted[3][0]) is nz.NoisyBatchNorm2d
    assert converted[3][0].sync
    _assert_same_state(converted, model)
    assert not renorm.sync  # (the deep copy was converted)
    assert not noisy.sync
    assert type(converted[1]) is nn.SyncBatchNorm  # torch's layers: torch's converter, unchanged
    assert type(converted[2]) is nn.SyncBatchNorm  # timm's layer demoted (normzoo.convert_sync keeps it) ...
    converted.eval()
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    assert (model[2](x) >= 0).all()
    assert (converted[2](x) < 0).any()  # ... and its ReLU is no longer applied
    converted.train()
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        converted[1](x)  # torch's SyncBatchNorm in training on CPU


def test_torch_converter_on_a_single_normzoo_layer_returns_it_synchronized(group1: None) -> None:
    group = dist.new_group([0])
    layer = nz.BatchNorm1d(3)
    assert nn.SyncBatchNorm.convert_sync_batchnorm(layer, group) is layer
    assert layer.sync
    assert layer.process_group is group


def test_torch_converter_is_torchs_for_everything_else() -> None:
    from normzoo.integrations import sync_batchnorm

    assert sync_batchnorm.is_installed()
    wrapper = nn.SyncBatchNorm.convert_sync_batchnorm
    torch_converter = wrapper.__wrapped__  # type: ignore[attr-defined]
    assert wrapper.__doc__ == torch_converter.__doc__
    sync_batchnorm.install()  # a second install does not wrap twice
    assert nn.SyncBatchNorm.convert_sync_batchnorm.__wrapped__ is torch_converter  # type: ignore[attr-defined]

    def plain() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(3)))

    ours, theirs = wrapper(plain()), torch_converter(nn.SyncBatchNorm, plain())
    assert repr(ours) == repr(theirs)
    _assert_same_state(ours, theirs)


# --- all_reduce_stat_sums ------------------------------------------------------------------------------


def test_all_reduce_stat_sums_is_a_no_op_in_one_process(group1: None) -> None:
    sums = [torch.tensor([1.5, 2.5]), torch.tensor(7)]
    all_reduce_stat_sums(sums)
    assert torch.equal(sums[0], torch.tensor([1.5, 2.5]))
    assert torch.equal(sums[1], torch.tensor(7))
    all_reduce_stat_sums([])
