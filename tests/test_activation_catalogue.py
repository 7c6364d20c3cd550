"""The activation catalogue: one table that models, insert_bn and the diagnostics read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normzoo import _activations as A
from normzoo.diagnostics import activation_kind
from normzoo.surgery import DEFAULT_ACTIVATION_FUNCTIONS, DEFAULT_ACTIVATION_MODULES


def test_every_entry_is_one_activation_with_consistent_forms() -> None:
    classes = [entry.module for entry in A.ACTIVATION_TABLE]
    assert len(classes) == len(set(classes))
    x = torch.linspace(-3, 3, 13)
    for entry in A.ACTIVATION_TABLE:
        if entry.functional and entry.module not in (nn.Threshold, nn.PReLU):  # those need arguments
            # the function and the module compute the same thing: the table pairs them right
            torch.testing.assert_close(getattr(F, entry.functional)(x), entry.module().eval()(x))
        assert entry.gain in ("relu", "leaky_relu", "tanh", "sigmoid", "linear")
        nn.init.calculate_gain(entry.gain)  # a name torch knows


def test_the_surgery_defaults_are_the_catalogue() -> None:
    assert DEFAULT_ACTIVATION_MODULES is A.ACTIVATION_MODULES
    assert nn.Identity not in DEFAULT_ACTIVATION_MODULES
    assert {F.relu, F.relu_, torch.relu, torch.sigmoid_, F.gelu, F.leaky_relu_} <= set(
        DEFAULT_ACTIVATION_FUNCTIONS
    )
    assert set(A.ACTIVATION_METHODS) == {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.ReLU(), "relu"),
        (nn.ReLU6(), "relu"),  # a Hardtanh subclass, but its zeros are dead units
        (nn.Hardtanh(), "tanh"),
        (nn.Sigmoid(), "sigmoid"),
        (nn.GELU(), "other"),
        (nn.Identity(), None),
        (nn.Linear(2, 2), None),
    ],
)
def test_activation_kind(module: nn.Module, kind: str | None) -> None:
    assert activation_kind(module) == kind


def test_timm_activations_count_once_timm_is_imported() -> None:
    timm_activations = pytest.importorskip("timm.layers.activations")
    assert timm_activations.Swish in A.activation_modules()
    assert activation_kind(timm_activations.Swish()) == "other"
