"""The study on Ray (``--executor ray``): a local Ray instance of two CPUs, started once for the module, trains
the tiny preset's runs as Ray tasks. The results are the local executor's, a rerun trains nothing, a run that
raises is reported with its log, and a worker without the dataset's folder stops the study naming its node."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("lightning")
pytest.importorskip("sklearn")
pytest.importorskip("ray")

import ray

from normzoo.study import StudyConfig, build_plan, run_study
from normzoo.study.cli import main
from normzoo.study.runner import DataNotFoundError, load_run, run_key

from ._results import comparable_runs

#: the tiny preset's baseline: vanilla, BatchNorm and Batch Renormalization (with its diagnostics), two seeds
SELECTION: dict[str, Any] = {"factors": ["baseline"], "seeds": [0, 1]}


def _tiny(out: Path, **kw: Any) -> StudyConfig:
    return StudyConfig(preset="tiny", out=str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    """A local Ray instance of two CPUs for the module (a study uses the instance its process has)."""
    if ray.is_initialized():  # pragma: no cover - someone else's instance
        pytest.skip("a Ray instance is already running in this process")
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)  # ray.init makes SIGTERM a sys.exit


@pytest.fixture(scope="module")
def local_and_ray(ray_instance: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """The same runs trained by the local executor (in this process) and by Ray tasks."""
    base = tmp_path_factory.mktemp("executors")
    local = run_study(_tiny(base / "local", workers=1, **SELECTION))
    on_ray = run_study(_tiny(base / "ray", executor="ray", **SELECTION))
    assert local.trained == on_ray.trained == len(build_plan(_tiny(base, **SELECTION))) == 6
    return base / "local", base / "ray", on_ray


def test_ray_gives_the_local_results(local_and_ray: tuple[Path, Path, Any]) -> None:
    local, on_ray, result = local_and_ray
    assert not result.failed
    assert result.cached == 0
    loc = json.loads((local / "results.json").read_text())
    rem = json.loads((on_ray / "results.json").read_text())
    assert comparable_runs(rem) == comparable_runs(loc)  # bit-identical numbers, in plan order
    # the runs really trained elsewhere: the records are not empty shells, and renorm's schedule acted
    assert {r["variant"] for r in rem["runs"]} == {"vanilla", "batchnorm", "renorm"}
    assert all(r["steps"] == 12 and r["history"] for r in rem["runs"])
    assert sorted(p.name for p in (on_ray / "runs").glob("*.json")) == sorted(
        p.name for p in (local / "runs").glob("*.json")
    )
    assert rem["study"]["trained"] == 6
    assert not list((on_ray / "runs").glob("*.error.txt"))


def test_a_rerun_on_ray_loads_every_run(local_and_ray: tuple[Path, Path, Any], tmp_path: Path) -> None:
    import shutil

    _, on_ray, _ = local_and_ray
    out = tmp_path / "again"
    shutil.copytree(on_ray, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    result = run_study(_tiny(out, executor="ray", **SELECTION))
    assert (result.trained, result.cached, result.trained_keys) == (0, 6, [])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before

    # an interrupted study: two runs never finished; the rerun on Ray trains those two only
    lost = sorted((out / "runs").glob("*.json"))[:2]
    for p in lost:
        p.unlink()
    result = run_study(_tiny(out, executor="ray", **SELECTION))
    assert (result.trained, result.cached) == (2, 4)
    assert sorted(result.trained_keys) == sorted(p.stem for p in lost)
    first = json.loads((on_ray / "results.json").read_text())
    assert comparable_runs(json.loads((out / "results.json").read_text())) == comparable_runs(first)


def test_a_run_that_raises_on_ray_is_reported_with_its_log(ray_instance: Any, tmp_path: Path) -> None:
    config = _tiny(
        tmp_path, executor="ray", factors=["baseline"], seeds=[0], variants=["vanilla", "batchnorm"]
    )
    good, bad = build_plan(config)
    # an optimizer the Lightning module does not know: the run raises inside its Ray task
    bad = dataclasses.replace(bad, recipe=bad.recipe.replace(optimizer="rmsprop"))
    result = run_study(config, plan=[good, bad])
    assert (result.trained, len(result.records)) == (1, 1)
    (failure,) = result.failed
    assert (failure["key"], failure["variant"], failure["seed"]) == (run_key(bad, config), "batchnorm", 0)
    assert failure["error"].startswith("ValueError: ")
    assert "rmsprop" in failure["error"]
    log = Path(failure["log"])
    assert log == tmp_path / "runs" / f"{failure['key']}.error.txt"
    text = log.read_text()
    assert text.startswith("Traceback")
    assert "in run_one" in text
    assert "rmsprop" in text
    assert load_run(tmp_path / "runs" / f"{run_key(good, config)}.json") is not None
    assert not (tmp_path / "runs" / f"{failure['key']}.json").exists()
    assert json.loads((tmp_path / "results.json").read_text())["study"]["failed"] == result.failed


def test_a_worker_without_the_data_folder_names_its_node_and_the_path(
    ray_instance: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The study's process reads the data (here: it pretends to); the Ray workers find no folder at that
    path. The study stops with exit status 2 and a message naming the worker's node and the folder."""
    pytest.importorskip("torchvision")
    from normzoo.study import runner

    # only this process is patched: the Ray workers are other processes and look at the disk
    monkeypatch.setattr(runner._Data, "get", lambda self, *a, **k: SimpleNamespace(train_set=range(120)))
    root = tmp_path / "mnist-is-not-here"
    out = tmp_path / "out"
    argv = ["study", "--preset", "tiny", "--dataset", "mnist", "--data-root", str(root), "--out", str(out)]
    argv += ["--factors", "baseline", "--seeds", "0", "--variants", "vanilla", "--executor", "ray"]
    assert main([*argv, "--no-progress", "--no-figures"]) == 2
    (err,) = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("normzoo study: error")
    ]
    assert err.startswith("normzoo study: error: node ")
    assert socket.gethostname() in err
    assert f"MNIST was not found under {root}" in err
    assert "at the same path on every node" in err
    assert not list((out / "runs").glob("*.json"))
    assert not (out / "results.json").exists()
    (log,) = (out / "runs").glob("*.error.txt")
    assert "FileNotFoundError" in log.read_text()
    with pytest.raises(DataNotFoundError, match="same path on every node"):
        run_study(_tiny(out, dataset="mnist", data_root=str(root), executor="ray", factors=["baseline"],
                        seeds=[0], variants=["vanilla"]))  # fmt: skip
