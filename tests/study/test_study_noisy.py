"""The study's noisy BatchNorm: the noise of ``grid.NOISY_NOISE`` in every noisy layer, for both models."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

import normzoo as nz
from normzoo.study import StudyConfig, build_plan
from normzoo.study.grid import NOISY_NOISE
from normzoo.study.runner import _build_model


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", ["noisy", "batchnorm"])
def test_noisy_runs_build_layers_with_the_study_noise(model: str, variant: str) -> None:
    config = StudyConfig(preset="quick")
    spec = next(s for s in build_plan(config) if s.model == "mlp" and s.variant == variant)
    spec = dataclasses.replace(spec, model=model)
    data = SimpleNamespace(num_features=40, num_classes=10, in_channels=1, input_shape=(1, 40))
    norms = [m for m in _build_model(spec, config, data).modules() if nz.is_batch_norm(m)]
    assert norms
    noisy = [m for m in norms if isinstance(m, (nz.NoisyBatchNorm1d, nz.NoisyBatchNorm2d))]
    assert len(noisy) == (len(norms) if variant == "noisy" else 0)
    for layer in noisy:
        assert layer.mean_range == NOISY_NOISE["mean_range"]
        assert layer.std_range == NOISY_NOISE["std_range"]
