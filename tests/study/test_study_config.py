"""The study's grid, presets, config files and command line, without training anything."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from normzoo.study import grid
from normzoo.study.cli import build_parser, main, study_config_from_args
from normzoo.study.config import config_from_mapping, load_config_file, read_config_file
from normzoo.study.grid import BASELINE, FACTORS, PRESETS, StudyConfig, build_plan, resolve_selectors


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["study", *argv])


# -- the grid ------------------------------------------------------------------------------------------


def test_baseline_is_the_seed_recipe() -> None:
    assert BASELINE.activation == "relu"
    assert BASELINE.init == "kaiming"
    assert (BASELINE.optimizer, BASELINE.lr, BASELINE.momentum, BASELINE.nesterov) == ("sgd", 0.01, 0.9, True)
    assert (BASELINE.plateau_factor, BASELINE.plateau_patience, BASELINE.early_stop_patience) == (0.5, 5, 20)
    assert BASELINE.batch_size == 64
    assert BASELINE.weight_decay == 0
    assert BASELINE.dropout == 0


def test_every_level_varies_one_factor_from_the_baseline() -> None:
    base = dataclasses.asdict(BASELINE)
    for factor in FACTORS.values():
        for level in factor.levels:
            recipe = dataclasses.asdict(BASELINE.replace(**level.params))
            changed = {k for k in base if base[k] != recipe[k]}
            assert changed <= set(level.params) <= set(base)
            assert changed or factor.name == "baseline"  # init_std=1.0 is the N(0, 1) of init="normal"
    assert [lv.params["batch_size"] for lv in FACTORS["batch_size"].levels] == [
        2, 4, 8, 16, 32, 128, 256, 512, 1024,
    ]  # fmt: skip
    assert FACTORS["non_iid"].levels[0].params == {"classes_per_batch": 2}
    # below batch 64 the running statistics' momentum shrinks with the batch (about 640 samples averaged)
    assert [lv.params.get("norm_momentum") for lv in FACTORS["batch_size"].levels] == [
        0.1 * 2 / 64, 0.1 * 4 / 64, 0.1 * 8 / 64, 0.1 * 16 / 64, 0.1 * 32 / 64, None, None, None, None,
    ]  # fmt: skip
    assert FACTORS["activation"].levels[0].params == {"activation": "sigmoid", "init": "xavier"}
    assert FACTORS["init"].levels[0].params == {"init": "normal", "init_std": 1.0}


def test_full_preset_is_the_whole_grid() -> None:
    plan = build_plan(StudyConfig(preset="full"))
    levels = sum(len(f.levels) for f in FACTORS.values())
    assert len(plan) == levels * 2 * 4 * 3  # levels x models x variants x seeds
    assert len({(r.level.selector, r.model, r.variant, r.seed) for r in plan}) == len(plan)


def test_quick_preset_covers_every_claim() -> None:
    plan = build_plan(StudyConfig())
    cells = {(r.experiment, r.level.label, r.model, r.variant) for r in plan}
    assert {r.seed for r in plan} == {0, 1}
    for factor in FACTORS.values():  # every factor, vanilla vs batchnorm, on the MLP
        for level in factor.levels:
            if factor.name == "batch_size" and level.params["batch_size"] not in (2, 4, 8, 256):
                continue
            assert (factor.name, level.label, "mlp", "vanilla") in cells
            assert (factor.name, level.label, "mlp", "batchnorm") in cells
    for v in ("renorm", "noisy"):  # Ioffe 2017's experiments: tiny and non-i.i.d. batches, every variant
        for exp, level in [("baseline", "baseline"), ("non_iid", "2 classes/batch")] + [
            ("batch_size", f"bs={b}") for b in (2, 4, 8)
        ]:
            assert (exp, level, "mlp", v) in cells
    for exp, level in [("baseline", "baseline"), ("activation", "sigmoid")]:
        assert (exp, level, "cnn", "vanilla") in cells
        assert (exp, level, "cnn", "batchnorm") in cells
    assert len(plan) == 94


def test_filters_narrow_the_preset() -> None:
    plan = build_plan(StudyConfig(factors=["batch_size:bs=4"], variants=["batchnorm", "renorm"], seeds=[0]))
    assert [(r.experiment, r.level.label, r.variant) for r in plan] == [
        ("batch_size", "bs=4", "batchnorm"),
        ("batch_size", "bs=4", "renorm"),
    ]
    # the CNN of the quick preset does not run the batch sizes: an empty plan
    assert build_plan(StudyConfig(factors=["batch_size"], models=["cnn"])) == []
    assert build_plan(StudyConfig(preset="full", factors=["batch_size"], models=["cnn"], seeds=[0]))


def test_batch_sizes_replace_the_levels() -> None:
    plan = build_plan(
        StudyConfig(factors=["batch_size"], variants=["vanilla"], batch_sizes=[1024, 8, 64], seeds=[0])
    )
    assert [r.recipe.batch_size for r in plan] == [8, 1024]  # sorted, 64 is the baseline's


def test_seeds_and_diagnostics() -> None:
    plan = build_plan(
        StudyConfig(factors=["baseline", "lr"], models=["mlp"], variants=["vanilla"], seeds=[5, 6])
    )
    assert [(r.experiment, r.seed, r.diagnostics) for r in plan] == [
        ("baseline", 5, True),
        ("baseline", 6, False),
        ("lr", 5, False),
        ("lr", 6, False),
    ]


def test_selectors() -> None:
    assert [lv.label for lv in resolve_selectors(["activation:tanh", "activation:elu"])] == ["tanh", "elu"]
    with pytest.raises(
        ValueError, match="unknown level 'swish' of factor 'activation'; valid levels: sigmoid, tanh"
    ):
        resolve_selectors(["activation:swish"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"factors": ["momentum"]},
            "unknown factor 'momentum'; valid factors: baseline, activation, lr, init",
        ),
        (
            {"variants": ["layernorm"]},
            "unknown variant 'layernorm'; valid variants: vanilla, batchnorm, renorm, noisy",
        ),
        ({"models": ["resnet"]}, "unknown model 'resnet'; valid models: mlp, cnn"),
        (
            {"dataset": "imagenet"},
            "unknown dataset 'imagenet'; valid datasets: mnist1d, digits, mnist, fashion_mnist, svhn",
        ),
        ({"preset": "huge"}, "unknown preset 'huge'; valid presets: quick, full, tiny"),
        ({"accelerator": "tpu"}, "unknown accelerator 'tpu'; valid accelerators: cpu, gpu"),
        ({"batch_sizes": [1]}, "batch sizes must be at least 2"),
        ({"seeds": []}, "seeds must not be empty"),
        ({"max_epochs": 0}, "max_epochs must be at least 1"),
        ({"limit_train_batches": 0}, "limit_train_batches must be at least 1 .* a run of zero steps"),
        ({"limit_train_batches": -3}, "limit_train_batches must be at least 1"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"seeds": [0, -1]}, "seeds must be non-negative"),
        ({"devices": 0}, "devices must be at least 1"),
    ],
)
def test_unknown_names_list_the_valid_ones(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_from_mapping(settings).validate()


# -- config files --------------------------------------------------------------------------------------

TOML = """
[study]
preset = "tiny"
factors = ["baseline", "activation:sigmoid"]
variants = ["vanilla", "renorm"]
seeds = [0, 1, 2]
max-epochs = 7
batch_sizes = [4, 16]
draw_margin = 0.02
progress = false
"""


def test_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(TOML)
    config = load_config_file(path)
    assert config.preset == "tiny"
    assert config.factors == ["baseline", "activation:sigmoid"]
    assert config.variants == ["vanilla", "renorm"]
    assert config.seeds == [0, 1, 2]
    assert config.max_epochs == 7
    assert config.batch_sizes == [4, 16]
    assert config.draw_margin == 0.02
    assert config.progress is False
    assert config.out == "normzoo-study"


def test_json_config_top_level(tmp_path: Path) -> None:
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"models": "mlp,cnn", "seeds": [4], "dataset": "mnist", "data_root": "/data"}))
    config = load_config_file(path)
    assert config.models == ["mlp", "cnn"]
    assert config.seeds == [4]
    assert (config.dataset, config.data_root) == ("mnist", "/data")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.toml", "[study]\nepochs = 3\n", "unknown setting 'epochs'.*valid settings: preset, out, factors"),
        ("a.toml", "[study\n", "is not valid TOML"),
        ("a.json", "{", "is not valid JSON"),
        ("a.yaml", "preset: quick", "must end in .toml or .json"),
        ("a.json", '{"seeds": "x"}', "must be a list of integers"),
        ("a.json", '{"max_epochs": "3"}', "must be an integer"),
        ("a.json", '{"study": {}, "seeds": [1]}', "outside the \\[study\\] table"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config_file(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config_file(tmp_path / "nope.toml")


# -- the command line ----------------------------------------------------------------------------------


def test_cli_defaults_are_the_quick_preset() -> None:
    config = study_config_from_args(_args())
    assert config == StudyConfig()
    assert config.preset == "quick"
    assert config.effective_seeds == list(PRESETS["quick"].seeds)


def test_cli_options() -> None:
    config = study_config_from_args(
        _args(
            "--preset", "full", "--out", "o", "--factors", "baseline,lr", "--models", "cnn", "--variants",
            "vanilla,noisy", "--dataset", "cifar10", "--data-root", "/d", "--download", "--seeds", "1,2",
            "--max-epochs", "9", "--max-steps", "100", "--patience", "4", "--batch-sizes", "8,32",
            "--accelerator", "gpu", "--devices", "1", "--threads", "2", "--draw-margin", "0.005", "--force",
            "--no-progress", "--no-figures",
        )
    )  # fmt: skip
    assert config == StudyConfig(
        preset="full", out="o", factors=["baseline", "lr"], models=["cnn"], variants=["vanilla", "noisy"],
        dataset="cifar10", data_root="/d", download=True, seeds=[1, 2], max_epochs=9, max_steps=100,
        early_stop_patience=4, batch_sizes=[8, 32], accelerator="gpu", devices=1, threads=2, draw_margin=0.005,
        force=True, progress=False, figures=False,
    )  # fmt: skip


def test_cli_overrides_config_file(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(TOML)
    config = study_config_from_args(_args("--config", str(path), "--seeds", "9", "--preset", "quick"))
    assert config.seeds == [9]
    assert config.preset == "quick"
    assert config.max_epochs == 7
    assert config.variants == ["vanilla", "renorm"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--variants", "vanilla,groupnorm"],
            "unknown variant 'groupnorm'; valid variants: vanilla, batchnorm",
        ),
        (["--factors", "lr,depth"], "unknown factor 'depth'; valid factors: baseline, activation"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; valid datasets: mnist1d, digits, mnist"),
        (["--models", "vit"], "unknown model 'vit'; valid models: mlp, cnn"),
        (["--preset", "huge"], "unknown preset 'huge'; valid presets: quick, full, tiny"),
        (["--factors", "batch_size", "--models", "cnn"], "the selection leaves no run to do"),
        (["--config", "/nonexistent/study.toml"], "does not exist"),
    ],
)
def test_cli_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normzoo study: error: ")
    assert message in err


def test_cli_bad_option_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["study", "--seeds", "a,b"])
    assert info.value.code == 2
    assert "comma-separated list of integers" in capsys.readouterr().err


def test_cli_dry_run_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--dry-run", "--factors", "activation:sigmoid", "--models", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "cnn  activation:sigmoid" in out
    assert out.strip().endswith("4 runs")  # two seeds
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    for name in [*FACTORS, *grid.VARIANTS, *grid.MODELS, *grid.DATASETS, *PRESETS]:
        assert name in out


def test_cli_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "study" in capsys.readouterr().err


def test_report_only_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--report-only", "--out", str(tmp_path)]) == 2
    assert "run the study first" in capsys.readouterr().err


def test_toml_without_tomllib_or_tomli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.10 without tomli: a TOML config is refused with the way out, JSON still works."""
    from normzoo.study import config as config_module

    monkeypatch.setattr(config_module, "_toml_module", lambda: None)
    path = tmp_path / "study.toml"
    path.write_text(TOML)
    with pytest.raises(RuntimeError, match=r"install 'tomli'.*or write the config as JSON"):
        load_config_file(path)
    json_path = tmp_path / "study.json"
    json_path.write_text('{"study": {"seeds": [2]}}')
    assert load_config_file(json_path).seeds == [2]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--limit-train-batches", "0", "expected an integer of at least 1, got 0"),
        ("--limit-train-batches", "-2", "expected an integer of at least 1, got -2"),
        ("--threads", "0", "expected an integer of at least 1, got 0"),
        ("--workers", "0", "expected an integer of at least 1, got 0"),
        ("--seeds", "0,-1", "expected non-negative integers"),
        ("--devices", "0", "expected an integer of at least 1, got 0"),
        ("--max-steps", "0", "expected an integer of at least 1, got 0"),
    ],
)
def test_bad_numbers_are_refused_up_front(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line naming the option, exit status 2, before anything runs (argparse's own style)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--preset", "tiny", "--out", "/nonexistent/never-created", option, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"normzoo study: error: argument {option}: {message}" or (
        last.startswith(f"normzoo study: error: argument {option}: ") and message in last
    )
