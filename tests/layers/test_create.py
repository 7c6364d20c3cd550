"""get_norm_layer / create_norm_layer / is_batch_norm / norm_family: resolving every kind of ``norm=``."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from torch import nn

import normzoo as nz
from normzoo.layers import NORM_FAMILIES, norm_family

from ._reference import FAMILIES, TORCH_BN

ALL_FAMILIES = {**FAMILIES, "torch": TORCH_BN}


@pytest.mark.parametrize("name", ["batchnorm", "renorm", "noisy", "torch"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_strings_resolve_to_the_family_at_each_dimension(name: str, ndim: int) -> None:
    expected = ALL_FAMILIES[name][ndim - 1]
    assert nz.get_norm_layer(name, ndim) is expected
    assert nz.get_norm_layer(name.upper(), ndim) is expected  # case-insensitive
    layer = nz.create_norm_layer(name, 7, ndim=ndim)
    assert type(layer) is expected
    assert layer.num_features == 7


def test_default_dimension_is_2d() -> None:
    assert nz.get_norm_layer("renorm") is nz.BatchRenorm2d
    assert type(nz.create_norm_layer("noisy", 4)) is nz.NoisyBatchNorm2d


@pytest.mark.parametrize("family", ["batchnorm", "renorm", "noisy", "torch"])
@pytest.mark.parametrize("given_ndim", [1, 2, 3])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_a_class_gives_its_family_at_the_requested_dimension(family: str, given_ndim: int, ndim: int) -> None:
    cls = ALL_FAMILIES[family][given_ndim - 1]
    assert nz.get_norm_layer(cls, ndim) is ALL_FAMILIES[family][ndim - 1]
    assert norm_family(cls) == family


@pytest.mark.parametrize("cls", [nn.LayerNorm, nn.Identity, nn.InstanceNorm2d])
def test_other_classes_are_returned_as_they_are(cls: type[nn.Module]) -> None:
    assert nz.get_norm_layer(cls, 1) is cls
    assert norm_family(cls) is None


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_partial_of_a_family_class_keeps_its_arguments_at_each_dimension(ndim: int) -> None:
    spec = functools.partial(nz.BatchRenorm2d, r_max=2.0, d_max=1.0, schedule=None)
    factory = nz.get_norm_layer(spec, ndim)
    assert isinstance(factory, functools.partial)
    assert factory.func is FAMILIES["renorm"][ndim - 1]
    layer = nz.create_norm_layer(spec, 5, ndim=ndim, momentum=0.3)
    assert type(layer) is FAMILIES["renorm"][ndim - 1]
    assert (layer.num_features, layer.r_max, layer.d_max, layer.schedule, layer.momentum) == (
        5,
        2.0,
        1.0,
        None,
        0.3,
    )
    # the partial given is not modified
    assert spec.func is nz.BatchRenorm2d


def test_positional_arguments_of_a_partial_are_kept() -> None:
    spec = functools.partial(nz.BatchNorm1d, 6, 1e-3)
    layer = nz.get_norm_layer(spec, 3)()
    assert type(layer) is nz.BatchNorm3d
    assert (layer.num_features, layer.eps) == (6, 1e-3)


def test_factories_are_returned_as_they_are() -> None:
    def factory(num_features: int) -> nn.Module:
        return nn.GroupNorm(1, num_features)

    other_partial = functools.partial(nn.GroupNorm, 2)
    assert nz.get_norm_layer(factory, 3) is factory
    assert nz.get_norm_layer(other_partial, 1) is other_partial
    layer = nz.create_norm_layer(other_partial, 4)
    assert isinstance(layer, nn.GroupNorm)
    assert layer.num_channels == 4


def test_keyword_arguments_reach_the_layer() -> None:
    layer = nz.create_norm_layer("noisy", 8, ndim=3, momentum=None, mean_range=2.0, dtype=torch.float64)
    assert type(layer) is nz.NoisyBatchNorm3d
    assert layer.momentum is None
    assert layer.mean_range == 2.0
    assert layer.weight.dtype == torch.float64


def test_unknown_string_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown norm 'layernorm'") as info:
        nz.get_norm_layer("layernorm")
    for name in NORM_FAMILIES:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="unknown norm"):
        nz.create_norm_layer("", 3)


@pytest.mark.parametrize("ndim", [0, 4, -1])
def test_bad_dimension(ndim: int) -> None:
    with pytest.raises(ValueError, match=f"ndim must be 1, 2 or 3, got {ndim}"):
        nz.get_norm_layer("batchnorm", ndim)


@pytest.mark.parametrize("spec", [3, None, 2.5])
def test_not_a_spec(spec: object) -> None:
    with pytest.raises(TypeError, match="norm must be a string, a class or a callable"):
        nz.get_norm_layer(spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "module",
    [
        *(cls(3) for classes in ALL_FAMILIES.values() for cls in classes),
        nn.SyncBatchNorm(3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_is_batch_norm_true(module: nn.Module) -> None:
    assert nz.is_batch_norm(module)


@pytest.mark.parametrize(
    "module",
    [nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.InstanceNorm2d(3), nn.Identity(), nn.Conv2d(3, 3, 1)],
    ids=lambda m: type(m).__name__,
)
def test_is_batch_norm_false(module: nn.Module) -> None:
    assert not nz.is_batch_norm(module)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_is_batch_norm_recognizes_timm_batchnorm_act() -> None:
    from timm.layers import BatchNormAct2d

    assert nz.is_batch_norm(BatchNormAct2d(3))
