"""remove_bn and replace_bn: every BatchNorm kind, what is carried over, and bad input."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normzoo as nz
from normzoo.surgery import BatchRenormAct2d, NormAct

from ._corpus import mlp, outputs_equal, randomize_bn


def bn_zoo() -> nn.Module:
    """One of each BatchNorm kind, with dropout-free activations between."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nz.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 6, 1), nz.BatchRenorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 1), nn.SyncBatchNorm(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 7), nn.BatchNorm1d(7, eps=1e-3, momentum=0.3), nn.Tanh(),
        nn.Linear(7, 2), nz.BatchNorm1d(2, affine=False),
    )  # fmt: skip


def test_remove_bn_makes_every_kind_an_identity() -> None:
    model = bn_zoo()
    vanilla = nz.remove_bn(model)
    assert not any(nz.is_batch_norm(m) for m in vanilla.modules())
    assert sum(isinstance(m, nn.Identity) for m in vanilla.modules()) == 6
    assert any(nz.is_batch_norm(m) for m in model.modules())  # a copy was changed
    x = torch.randn(2, 3, 6, 6)
    layers = [m for m in model if not nz.is_batch_norm(m)]
    assert torch.equal(vanilla(x), nn.Sequential(*layers)(x))


def test_remove_bn_keeps_flags_and_other_norms() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.ReLU()).eval()
    vanilla = nz.remove_bn(model)
    assert isinstance(vanilla[1], nn.LayerNorm)
    assert isinstance(vanilla[2], nn.Identity)
    assert not any(m.training for m in vanilla.modules())
    assert isinstance(nz.remove_bn(nn.BatchNorm2d(3)), nn.Identity)
    same = nn.Sequential(nn.BatchNorm1d(3))
    assert nz.remove_bn(same, inplace=True) is same
    assert isinstance(same[0], nn.Identity)


def test_remove_bn_of_a_norm_act_keeps_its_activation() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    layer = timm_layers.BatchNormAct2d(4, act_layer=nn.Hardswish)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    vanilla = nz.remove_bn(model)
    assert isinstance(vanilla[1], nn.Hardswish)
    assert vanilla[1] is not layer.act
    with_drop = timm_layers.BatchNormAct2d(4, drop_layer=functools.partial(nn.Dropout, 0.5))
    replacement = nz.remove_bn(nn.Sequential(with_drop))[0]
    assert isinstance(replacement, nn.Sequential)
    assert list(replacement._modules) == ["drop", "act"]


def test_remove_bn_undoes_insert_bn_with_a_custom_norm_left_alone() -> None:
    inserted = nz.insert_bn(mlp(), lambda c: nn.LayerNorm(c))
    assert nz.remove_bn(inserted).state_dict().keys() == inserted.state_dict().keys()
    assert isinstance(nz.remove_bn(nz.insert_bn(mlp()))[1], nn.ReLU)


def test_remove_bn_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"remove_bn: expected a torch\.nn\.Module"):
        nz.remove_bn("model")  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["renorm", "noisy", "batchnorm", "torch", nz.BatchRenorm3d])
def test_replace_bn_keeps_eval_outputs(norm: object) -> None:
    model = randomize_bn(bn_zoo()).eval()
    replaced = nz.replace_bn(model, norm)  # type: ignore[arg-type]
    x = torch.randn(3, 3, 6, 6)
    assert outputs_equal(model, replaced, x, train=False)
    assert replaced.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("norm", ["renorm", "batchnorm", "torch"])
def test_replace_bn_keeps_training_outputs(norm: str) -> None:
    model = randomize_bn(bn_zoo())
    for module in model.modules():
        if isinstance(module, nn.SyncBatchNorm):  # needs a process group in training
            module.__class__ = nn.BatchNorm2d
    replaced = nz.replace_bn(model, norm)
    assert outputs_equal(model, replaced, torch.randn(3, 3, 6, 6), train=True, atol=1e-5)


def test_replace_bn_carries_everything() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, eps=1e-3, momentum=None), nn.BatchNorm1d(4, affine=False)
    )
    model = randomize_bn(model).double()
    model[1].num_batches_tracked.fill_(7)
    model[1].weight.requires_grad_(False)
    model[1].eval()
    seen: list[str] = []
    handle = model[1].register_forward_hook(lambda *_: seen.append("hook"))
    replaced = nz.replace_bn(model, "renorm", inplace=True)
    assert replaced is model
    new = replaced[1]
    assert type(new) is nz.BatchRenorm1d
    assert (new.eps, new.momentum, new.affine) == (1e-3, None, True)
    assert int(new.num_batches_tracked) == 7
    assert new.weight.dtype == torch.float64
    assert not new.weight.requires_grad
    assert new.bias.requires_grad
    assert not new.training
    assert replaced[2].weight is None
    replaced(torch.randn(5, 3, dtype=torch.float64))
    assert seen == ["hook"]
    handle.remove()  # the user's handle still works on the new layer
    replaced(torch.randn(5, 3, dtype=torch.float64))
    assert seen == ["hook"]


def test_replace_bn_renorm_warm_up_then_back() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    renorm = nz.replace_bn(model)
    assert renorm[1].clip_bounds() == (1.0, 0.0)  # fresh statistics: the paper's warm-up
    back = nz.replace_bn(renorm, "torch")
    assert type(back[1]) is nn.BatchNorm2d
    assert all(
        torch.equal(a, b)
        for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_replace_bn_timm_norm_act_keeps_act_and_layout() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU)))
    replaced = nz.replace_bn(model, "renorm")
    # normzoo's norm+act math, and a timm BatchNormAct2d for timm's own tools (freeze keeps drop and act)
    assert isinstance(replaced[1], BatchRenormAct2d)
    assert isinstance(replaced[1], timm_layers.BatchNormAct2d)
    assert isinstance(replaced[1].act, nn.SiLU)
    assert replaced.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 5, 5)
    assert outputs_equal(model, replaced, x, train=False)
    assert outputs_equal(model, replaced, x, train=True, atol=1e-5)
    back = nz.replace_bn(replaced, "torch")
    assert type(back[1]) is timm_layers.BatchNormAct2d
    assert isinstance(back[1].act, nn.SiLU)
    custom = nz.replace_bn(model, lambda c: nn.BatchNorm2d(c))
    assert list(custom[1]._modules) == ["bn", "drop", "act"]


def test_replace_bn_refuses_what_it_cannot_keep() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nz.replace_bn(model, lambda c: nz.BatchRenorm2d(c))  # a factory that always tracks them
    assert nz.replace_bn(model, "batchnorm")[0].running_mean is None
    assert nz.replace_bn(model, "renorm")[0].running_mean is None
    with pytest.raises(ValueError, match="lacks"):
        nz.replace_bn(nn.Sequential(nn.BatchNorm2d(3)), functools.partial(nz.BatchNorm2d, affine=False))
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        nz.replace_bn(model, "group")
    with pytest.raises(TypeError, match=r"replace_bn: expected a torch\.nn\.Module"):
        nz.replace_bn(None)  # type: ignore[arg-type]


def test_replace_bn_reaches_insert_bn_layers() -> None:
    inserted = nz.insert_bn(mlp())
    replaced = nz.replace_bn(inserted, "noisy")
    assert isinstance(replaced[1], NormAct)
    assert type(replaced[1].norm) is nz.NoisyBatchNorm1d


def _surgeries() -> list[tuple[str, Callable[[nn.Module], object]]]:
    return [
        ("insert_bn", lambda m: nz.insert_bn(m, inplace=True)),
        ("remove_bn", nz.remove_bn),
        ("replace_bn", nz.replace_bn),
        ("fuse_bn", nz.fuse_bn),
        ("recompute_bn_stats", lambda m: nz.recompute_bn_stats(m, [torch.randn(4, 3)])),
    ]


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates TorchScript, not what is tested
@pytest.mark.parametrize(("fname", "surgery"), _surgeries())
def test_scripted_traced_and_compiled_models_are_refused(
    fname: str, surgery: Callable[[nn.Module], object]
) -> None:
    model = _plain().eval()
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, torch.randn(2, 3))
    compiled = torch.compile(model)
    for wrapped, advice in (
        (scripted, "before torch.jit.script"),
        (traced, "before torch.jit.script or torch.jit.trace"),
        (compiled, r"compiled\._orig_mod"),
        (nn.Sequential(scripted), r"at '0'"),
    ):
        with pytest.raises(TypeError, match=rf"{fname}: expected a plain torch\.nn\.Module, got .*{advice}"):
            surgery(wrapped)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fname", "surgery"), _surgeries())
def test_ddp_and_fsdp_wrapped_models_are_refused(fname: str, surgery: Callable[[nn.Module], object]) -> None:
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_plain())
        with pytest.raises(
            TypeError, match=rf"{fname}: expected a plain .*DistributedDataParallel.*model\.module"
        ):
            surgery(ddp)
        sharded = fully_shard(_plain(), mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(
            TypeError, match=rf"{fname}: expected a plain .*FSDPSequential.*before FSDP wraps it"
        ):
            surgery(sharded)
    finally:
        dist.destroy_process_group()


class _Positive(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.abs() + 0.5


@pytest.mark.parametrize("norm", ["renorm", "noisy", "batchnorm", "torch"])
def test_replace_bn_carries_a_parametrized_weight(norm: str) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    parametrize.register_parametrization(model[1], "weight", _Positive())
    with torch.no_grad():
        model[1].parametrizations.weight.original.normal_()
    replaced = nz.replace_bn(model, norm)
    assert parametrize.is_parametrized(replaced[1], "weight")
    assert replaced.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 6, 6)
    assert outputs_equal(replaced, model, x, train=False)


def _timm_bn_act(channels: int) -> nn.Module:
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.BatchNormAct2d(channels, act_layer=nn.ReLU)


#: Each BatchNorm kind surgery meets: (its layer at 4 channels, the ``norm`` name that builds it again).
KINDS: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "torch": (nn.BatchNorm2d, "torch"),
    "batchnorm": (nz.BatchNorm2d, "batchnorm"),
    "renorm": (nz.BatchRenorm2d, "renorm"),
    "noisy": (nz.NoisyBatchNorm2d, "noisy"),
    "timm": (_timm_bn_act, "torch"),
}


@pytest.mark.parametrize("source", sorted(KINDS))
@pytest.mark.parametrize("target", ["batchnorm", "renorm", "noisy", "torch"])
def test_every_kind_to_every_kind_and_back(source: str, target: str) -> None:
    make, family = KINDS[source]
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), make(4), nn.Conv2d(4, 2, 1))).eval()
    x = torch.randn(2, 3, 6, 6)
    there = nz.replace_bn(model, target)
    assert nz.layers.norm_family(type(there[1]).__mro__[1] if source == "timm" else type(there[1])) in (
        target,
        None,
    )
    assert outputs_equal(there, model, x, train=False)
    back = nz.replace_bn(there, family)
    assert type(back[1]) is type(model[1])
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in back.state_dict().items())
    assert outputs_equal(back, model, x, train=False)


@pytest.mark.parametrize("source", sorted(KINDS))
def test_every_kind_is_removed_and_fused(source: str) -> None:
    make, _ = KINDS[source]
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), make(4), nn.Conv2d(4, 2, 1))).eval()
    x = torch.randn(2, 3, 6, 6)
    removed = nz.remove_bn(model)
    assert isinstance(removed[1], nn.ReLU if source == "timm" else nn.Identity)
    fused = nz.fuse_bn(model)  # BatchRenorm and noisy BatchNorm fold their eval form, which is BatchNorm's
    assert not any(nz.is_batch_norm(m) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
