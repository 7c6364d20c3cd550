"""A run's cache key holds only the settings that affect that run: the normalization momentum of a vanilla
run, ``init_std`` of a non-normal init, SGD's momentum under Adam do not count. Every other key is the key an
older normzoo wrote, and a run cached under its older key (vanilla below batch 64) still loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from normzoo.study import StudyConfig, build_plan
from normzoo.study.grid import BASELINE, FACTORS, RunSpec
from normzoo.study.runner import _legacy_run_key, run_identity, run_key


def _old_key(spec: RunSpec, config: StudyConfig) -> str:
    """The key as normzoo computed it before this rule: every recipe field, used or not (written out here
    from the run-file format, independently of the runner's code)."""
    preset = config.preset_obj
    identity = {
        "schema": 2,
        "dataset": config.dataset,
        "model": spec.model,
        "model_kwargs": dict(preset.model_kwargs.get(spec.model, {})),
        "variant": spec.variant,
        "seed": spec.seed,
        "recipe": dataclasses.asdict(spec.recipe) if spec.recipe.norm_momentum is not None
        else {k: v for k, v in dataclasses.asdict(spec.recipe).items() if k != "norm_momentum"},
        "max_epochs": config.effective_max_epochs,
        "max_steps": config.effective_max_steps,
        "limit_train_batches": config.effective_limit_train_batches,
        "accelerator": "cpu",
        "diagnostics": spec.diagnostics,
        "renorm_schedule": "paper, scaled to the run (5/25/40 %)" if spec.variant == "renorm" else None,
    }  # fmt: skip
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _find(plan: list[RunSpec], selector: str, variant: str, seed: int = 0) -> RunSpec:
    return next(s for s in plan if (s.level.selector, s.variant, s.seed) == (selector, variant, seed))


def test_keys_written_by_the_previous_release_are_kept() -> None:
    """Keys printed by normzoo before this change (a90707d): they must not move."""
    tiny, quick = StudyConfig(preset="tiny"), StudyConfig(preset="quick")
    tiny_plan, quick_plan = build_plan(tiny), build_plan(quick)
    assert run_key(_find(tiny_plan, "baseline:baseline", "vanilla"), tiny) == "f67513743ba0c6d5"
    assert run_key(_find(tiny_plan, "baseline:baseline", "vanilla", 1), tiny) == "964779c3e4e82f99"
    assert run_key(_find(tiny_plan, "baseline:baseline", "batchnorm"), tiny) == "3c921923bce6cc73"
    for variant, key in (("batchnorm", "9de467e57796c29b"), ("renorm", "ea8a48ff9188c6fe")):
        assert run_key(_find(quick_plan, "batch_size:bs=4", variant), quick) == key
    # noisy runs moved on purpose: the study's noise is now half the layer's default (NOISY_NOISE)
    assert run_key(_find(quick_plan, "batch_size:bs=4", "noisy"), quick) != "b30916b27ca07dac"
    # the vanilla run at batch 4 read the norm momentum into its key: it moved, its old key is remembered
    vanilla = _find(quick_plan, "batch_size:bs=4", "vanilla")
    assert run_key(vanilla, quick) != "cad141f6222d08ac"
    assert _legacy_run_key(vanilla, quick) == "cad141f6222d08ac"


@pytest.mark.parametrize("preset", ["tiny", "quick", "full"])
def test_only_vanilla_runs_with_a_norm_momentum_and_noisy_runs_change_key(preset: str) -> None:
    config = StudyConfig(preset=preset)
    plan = build_plan(config)
    moved = [s for s in plan if run_key(s, config) != _old_key(s, config)]
    expected = [s for s in plan if s.variant == "vanilla" and s.recipe.norm_momentum is not None]
    noisy = [s for s in plan if s.variant == "noisy"]  # other noise, and the ICS of their diagnostics
    assert moved == [s for s in plan if s in expected or s in noisy]
    if preset == "full":  # batch 2 to 32, both models, three seeds
        assert len(expected) == 5 * 2 * 3
    for spec in plan:
        legacy = _legacy_run_key(spec, config)
        assert legacy == (_old_key(spec, config) if spec in expected else None)
    for spec in noisy:  # a noisy run's identity names its noise
        assert run_identity(spec, config)["noise"] == {"mean_range": 0.25, "std_range": [0.05, 0.25]}
        assert run_identity(spec, config)["diagnostics"] == (
            {"ics_randomness": "fresh"} if spec.diagnostics else False
        )
    for spec in expected:  # the key of the same run without the momentum: the momentum no longer counts
        assert run_key(spec, config) == _old_key(
            dataclasses.replace(spec, recipe=spec.recipe.replace(norm_momentum=None)), config
        )
    assert len({run_key(s, config) for s in plan}) == len(plan)  # still one key per run


def _key(variant: str, config: StudyConfig | None = None, **recipe: Any) -> str:
    level = FACTORS["baseline"].levels[0]
    return run_key(RunSpec(level, "mlp", variant, 0, BASELINE.replace(**recipe)), config or StudyConfig())


@pytest.mark.parametrize(
    ("field", "value", "unused_in", "used_in"),
    [
        # a setting, a value other than the baseline's, a run that does not read it and one that does
        ("norm_momentum", 0.01, ("vanilla", {}), ("batchnorm", {})),
        ("norm_momentum", 0.01, ("vanilla", {}), ("renorm", {})),
        ("init_std", 0.5, ("batchnorm", {}), ("batchnorm", {"init": "normal"})),
        ("init_std", 0.5, ("batchnorm", {"init": "xavier"}), ("vanilla", {"init": "normal"})),
        ("momentum", 0.5, ("vanilla", {"optimizer": "adam"}), ("vanilla", {})),
        ("nesterov", False, ("vanilla", {"optimizer": "adamw"}), ("vanilla", {})),
        ("nesterov", False, ("vanilla", {"momentum": 0.0}), ("vanilla", {"momentum": 0.5})),
    ],
)
def test_a_setting_counts_only_where_the_run_reads_it(
    field: str, value: Any, unused_in: tuple[str, dict[str, Any]], used_in: tuple[str, dict[str, Any]]
) -> None:
    assert getattr(BASELINE, field) != value
    variant, base = unused_in
    assert _key(variant, **base, **{field: value}) == _key(variant, **base)
    variant, base = used_in
    assert _key(variant, **base, **{field: value}) != _key(variant, **base)


def test_a_run_cached_under_its_older_key_is_loaded_not_retrained(tmp_path: Path) -> None:
    """A vanilla run at batch 4 trained by an older normzoo sits in runs/ under its older key: the study
    loads it (no training), moves it to its key, and labels it with this plan's recipe."""
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    from normzoo.study import run_study
    from normzoo.study.runner import load_run

    config = StudyConfig(preset="tiny", out=str(tmp_path), progress=False, workers=1, factors=["batch_size"],
                         batch_sizes=[4], variants=["vanilla"], seeds=[0])  # fmt: skip
    (spec,) = build_plan(config)
    assert spec.recipe.norm_momentum == 0.1 * 4 / 64
    assert run_study(config).trained == 1
    key, old = run_key(spec, config), _old_key(spec, config)
    assert key != old
    record = json.loads((tmp_path / "runs" / f"{key}.json").read_text())
    # what the older normzoo wrote: the record under the older key; a momentum of its own (a vanilla run
    # never reads it: the plan's is reported)
    (tmp_path / "runs" / f"{key}.json").unlink()
    (tmp_path / "runs" / f"{old}.json").write_text(
        json.dumps({**record, "key": old, "recipe": {**record["recipe"], "norm_momentum": 0.1}})
    )
    result = run_study(config)
    assert (result.trained, result.cached) == (0, 1)
    assert not (tmp_path / "runs" / f"{old}.json").exists()
    moved = load_run(tmp_path / "runs" / f"{key}.json")
    assert moved is not None
    assert moved["key"] == key
    assert moved["test_acc"] == record["test_acc"]
    assert moved["history"] == record["history"]
    (loaded,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert loaded["recipe"] == spec.recipe.as_dict()
    assert loaded["recipe"]["norm_momentum"] == 0.00625
