"""``--executor`` and ``--ray-address`` (and their config-file settings), the resources each Ray task asks
for, and the up-front error when Ray is not installed. Nothing here needs Ray or trains a run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from normzoo.study import StudyConfig
from normzoo.study.cli import build_parser, main, study_config_from_args
from normzoo.study.config import load_config_file
from normzoo.study.runner import ray_resources


def _config(*argv: str) -> StudyConfig:
    return study_config_from_args(build_parser().parse_args(["study", *argv]))


def test_executor_options() -> None:
    assert (_config().executor, _config().ray_address) == ("local", None)
    config = _config("--executor", "ray", "--ray-address", "10.0.0.1:6379")
    assert (config.executor, config.ray_address) == ("ray", "10.0.0.1:6379")
    assert _config("--executor", "local").executor == "local"


def test_an_unknown_executor_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--executor", "dask"])
    assert exit_info.value.code == 2
    assert "argument --executor: invalid choice: 'dask' (choose from" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown executor 'dask'; valid executors: local, ray"):
        StudyConfig(executor="dask").validate()


def test_executor_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text('[study]\nexecutor = "ray"\nray_address = "head:6379"\nworkers = 8\n')
    if sys.version_info < (3, 11):  # pragma: no cover
        pytest.importorskip("tomli")
    config = load_config_file(path)
    assert (config.executor, config.ray_address, config.workers) == ("ray", "head:6379", 8)
    args = build_parser().parse_args(["study", "--config", str(path), "--executor", "local"])
    assert study_config_from_args(args).executor == "local"  # the command line overrides the file


def test_ray_resources() -> None:
    assert ray_resources(StudyConfig()) == {"num_cpus": 1}
    assert ray_resources(StudyConfig(threads=4)) == {"num_cpus": 4}
    assert ray_resources(StudyConfig(threads=None)) == {"num_cpus": 1}
    assert ray_resources(StudyConfig(accelerator="cuda")) == {"num_cpus": 1, "num_gpus": 1}
    assert ray_resources(StudyConfig(accelerator="gpu", devices=2)) == {"num_cpus": 1, "num_gpus": 2}
    assert ray_resources(StudyConfig(accelerator="mps")) == {"num_cpus": 1}


def test_executor_ray_without_ray_fails_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lightning")
    from normzoo.study import run_study, runner

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a run was trained")

    monkeypatch.setattr(runner, "run_one", never)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is missing
    out = tmp_path / "out"
    argv = ["study", "--preset", "tiny", "--out", str(out), "--executor", "ray", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("normzoo study: error: --executor ray needs Ray, which is not installed here: ")
    assert 'pip install "normzoo[ray]"' in err
    assert not out.exists()  # found before --out was created
    with pytest.raises(ImportError, match=r'pip install "normzoo\[ray\]"'):
        run_study(StudyConfig(preset="tiny", out=str(out), executor="ray"))
    assert not out.exists()
    assert main([*argv, "--dry-run"]) == 0  # printing the plan needs no Ray
