"""The tiny preset end to end: files, the results.json schema, the scoreboard recomputed from results.json,
caching, resume after an interruption, and a report that follows results.json."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from normzoo.study import StudyConfig, build_plan, run_study, write_report
from normzoo.study.cli import main
from normzoo.study.runner import run_key

from ._results import comparable_runs

# field -> accepted types (None means the value may be null)
RECORD_SCHEMA: dict[str, tuple[Any, ...]] = {
    "schema": (int,),
    "key": (str,),
    "experiment": (str,),
    "level": (str,),
    "variant": (str,),
    "model": (str,),
    "dataset": (str,),
    "params": (dict,),
    "seed": (int,),
    "best_val_acc": (float,),
    "best_epoch": (int,),
    "final_val_acc": (float,),
    "test_acc": (float,),
    "epochs": (int,),
    "max_epochs": (int,),
    "max_steps": (int, type(None)),
    "steps": (int,),
    "stopped_early": (bool,),
    "stop_reason": (str,),
    "diverged": (bool,),
    "epoch_time_s": (float,),
    "epoch_cpu_time_s": (float,),
    "fit_time_s": (float,),
    "num_params": (int,),
    "num_classes": (int,),
    "recipe": (dict,),
    "model_kwargs": (dict,),
    "accelerator": (str,),
    "device": (str,),
    "versions": (dict,),
    "finished_at": (str,),
    "history": (list,),
    "diagnostics": (dict, type(None)),
    "renorm": (dict, type(None)),
}
HISTORY_SCHEMA: dict[str, tuple[Any, ...]] = {
    "epoch": (int,),
    "train_loss": (float,),
    "val_loss": (float,),
    "val_acc": (float,),
    "time_s": (float,),
    "cpu_s": (float,),
    "steps": (int,),
}
RECIPE_FIELDS = {
    "activation", "init", "init_std", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "dropout",
    "batch_size", "classes_per_batch", "plateau_factor", "plateau_patience", "early_stop_patience",
}  # fmt: skip


def _tiny(out: Path, **kw: Any) -> StudyConfig:
    kw.setdefault("workers", 1)  # in this process: some tests patch the runner
    return StudyConfig(preset="tiny", out=str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("tiny")
    config = _tiny(out)
    result = run_study(config)
    write_report(out)
    return out, result


@pytest.fixture
def study_copy(tiny_study: tuple[Path, Any], tmp_path: Path) -> Path:
    """A private copy of the tiny study's output folder (tests below modify it)."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_study[0], out)
    return out


def test_tiny_writes_every_file(tiny_study: tuple[Path, Any]) -> None:
    out, result = tiny_study
    plan = build_plan(_tiny(out))
    assert result.trained == len(plan) == 14
    assert result.cached == 0
    for name in ("results.json", "report.md", "report.html"):
        assert (out / name).is_file()
        assert (out / name).stat().st_size > 0
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == len(plan)
    assert {p.stem for p in runs} == {run_key(spec, _tiny(out)) for spec in plan}
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs, "figures were asked for"
    report = (out / "report.md").read_text()
    for png in pngs:  # every figure is referenced by the report, in both formats
        assert f"figures/{png.name}" in report
        assert f'src="figures/{png.name}"' in (out / "report.html").read_text()
    assert any(p.name.startswith("diagnostics_baseline") for p in pngs)
    assert (out / "figures" / "walltime.png").is_file()
    # the reader sees every claim's verdict first: the verdict figure comes before any table
    first_image = report.index("![")
    assert report[first_image:].startswith("![every claim's verdict and effect size](figures/claims.png)")
    assert first_image < report.index("\n| ")
    assert (out / "figures" / "why_bn.png").is_file()


def test_results_json_schema(tiny_study: tuple[Path, Any]) -> None:
    out, _ = tiny_study
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"schema", "study", "runs"}
    assert data["study"]["preset"] == "tiny"
    assert data["study"]["seeds"] == [0, 1]
    assert len(data["runs"]) == 14
    for record in data["runs"]:
        missing = set(RECORD_SCHEMA) - set(record)
        assert not missing, f"fields missing: {missing}"
        for name, types in RECORD_SCHEMA.items():
            assert isinstance(record[name], types), f"{name}: {record[name]!r} is not {types}"
        assert record["variant"] in ("vanilla", "batchnorm", "renorm")
        assert (record["renorm"] is not None) == (record["variant"] == "renorm")
        assert record["model"] == "mlp"
        assert record["dataset"] == "mnist1d"
        assert record["seed"] in (0, 1)
        assert record["experiment"] in ("baseline", "lr", "batch_size")
        assert set(record["recipe"]) == RECIPE_FIELDS
        # params are exactly the recipe fields that differ from the baseline
        expected = {"baseline": {}, "lr": {"lr": 0.1}, "batch_size": {"batch_size": 128}}[
            record["experiment"]
        ]
        assert record["params"] == expected
        for key, value in record["params"].items():
            assert record["recipe"][key] == value
        for acc in ("best_val_acc", "final_val_acc", "test_acc"):
            assert 0.0 <= record[acc] <= 1.0
        assert record["epochs"] == len(record["history"]) == 3  # the tiny preset's cap, no early stop
        assert record["stop_reason"] == "max_epochs"
        assert record["stopped_early"] is False
        assert record["steps"] == 3 * 4  # limit_train_batches=4
        assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
        for h in record["history"]:
            for name, types in HISTORY_SCHEMA.items():
                assert isinstance(h[name], types), f"history {name}: {h[name]!r}"
            assert h["time_s"] > 0
            assert 0 <= h["val_acc"] <= 1
        assert record["final_val_acc"] == record["history"][-1]["val_acc"]
        assert record["best_val_acc"] == max(h["val_acc"] for h in record["history"])
        assert record["history"][record["best_epoch"] - 1]["val_acc"] == record["best_val_acc"]
        times = [h["time_s"] for h in record["history"]]
        assert math.isclose(record["epoch_time_s"], statistics.mean(times[1:]), rel_tol=1e-9)
        # diagnostics on the first seed of the baseline only (the tiny preset's choice)
        has_diag = record["experiment"] == "baseline" and record["seed"] == 0
        assert (record["diagnostics"] is not None) == has_diag
        if has_diag:
            flow = record["diagnostics"]["gradient_flow"]
            assert flow
            assert set(flow[0]["layers"]) == {"fc1", "fc2", "head"}
            assert all(v["mean_abs"] >= 0 for v in flow[0]["layers"].values())
            assert record["diagnostics"]["weight_norm"]


def _recompute_scoreboard(runs: list[dict[str, Any]], margin: float) -> dict[str, tuple[int, int, int]]:
    """The scoreboard, recomputed here from the records (the definition in docs/study.md)."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for r in runs:
        groups.setdefault((r["experiment"], r["level"], r["model"], r["variant"]), []).append(r["test_acc"])
    board: dict[str, list[int]] = {}
    for (exp, level, model, variant), accs in groups.items():
        if variant == "vanilla" or (exp, level, model, "vanilla") not in groups:
            continue
        ref = groups[(exp, level, model, "vanilla")]
        delta = statistics.mean(accs) - statistics.mean(ref)
        spread = math.sqrt((statistics.stdev(accs) ** 2 + statistics.stdev(ref) ** 2) / 2)
        threshold = max(margin, spread)
        score = board.setdefault(variant, [0, 0, 0])
        score[0 if delta > threshold else 1 if delta < -threshold else 2] += 1
    return {v: (w, lo, d) for v, (w, lo, d) in board.items()}


def _scoreboard_in_report(text: str) -> dict[str, tuple[int, int, int]]:
    found = re.findall(r"\*\*(\w+) (\d+) - vanilla (\d+) \((\d+) draws?\)\*\*", text)
    return {v: (int(w), int(lo), int(d)) for v, w, lo, d in found}


def test_scoreboard_is_recomputed_from_results_json(tiny_study: tuple[Path, Any]) -> None:
    out, _ = tiny_study
    data = json.loads((out / "results.json").read_text())
    expected = _recompute_scoreboard(data["runs"], data["study"]["draw_margin"])
    assert set(expected) == {"batchnorm", "renorm"}
    assert sum(expected["batchnorm"]) == 3
    assert sum(expected["renorm"]) == 1
    assert _scoreboard_in_report((out / "report.md").read_text()) == expected
    html_text = (out / "report.html").read_text()
    w, lo, d = expected["batchnorm"]
    assert f"batchnorm {w} - vanilla {lo} ({d} draw" in html_text


def test_report_follows_edited_results_json(study_copy: Path) -> None:
    """The report's claims come from results.json: rewrite the numbers and the report changes with them."""
    path = study_copy / "results.json"
    data = json.loads(path.read_text())
    for r in data["runs"]:  # batchnorm at chance, vanilla perfect, seeds identical
        r["test_acc"] = 0.1 if r["variant"] != "vanilla" else 1.0
    path.write_text(json.dumps(data))
    write_report(study_copy, figures=False)
    text = (study_copy / "report.md").read_text()
    assert _scoreboard_in_report(text) == {"batchnorm": (0, 3, 0), "renorm": (0, 1, 0)}
    assert re.search(
        r"BN gives higher accuracy and faster convergence: \*\*(not|partly) reproduced\*\*", text
    )
    assert "MLP baseline test accuracy: batchnorm 10.0 ± 0.0 % vs vanilla 100.0 ± 0.0 % (-90.0 points" in text

    for r in data["runs"]:  # now every difference is inside the one-point margin: all draws
        r["test_acc"] = 0.905 if r["variant"] != "vanilla" else 0.90
    path.write_text(json.dumps(data))
    write_report(study_copy, figures=False)
    assert _scoreboard_in_report((study_copy / "report.md").read_text()) == {
        "batchnorm": (0, 0, 3),
        "renorm": (0, 0, 1),
    }
    # the runs folder plays no part in the report
    shutil.rmtree(study_copy / "runs")
    write_report(study_copy, figures=False, draw_margin=0.001)
    assert _scoreboard_in_report((study_copy / "report.md").read_text()) == {
        "batchnorm": (3, 0, 0),
        "renorm": (1, 0, 0),
    }


def test_rerun_skips_finished_runs(study_copy: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (study_copy / "runs").glob("*.json")}
    result = run_study(_tiny(study_copy))
    assert result.trained == 0
    assert result.cached == 14
    assert result.trained_keys == []
    after = {p.name: p.stat().st_mtime_ns for p in (study_copy / "runs").glob("*.json")}
    assert after == before  # no run file was rewritten
    first = json.loads((study_copy / "results.json").read_text())["runs"]
    assert [r["key"] for r in result.records] == [r["key"] for r in first]
    assert [r["test_acc"] for r in result.records] == [r["test_acc"] for r in first]


def test_interrupted_study_resumes(study_copy: Path) -> None:
    runs = sorted((study_copy / "runs").glob("*.json"))
    lost = runs[:3]  # an interrupted study: these never finished
    kept = {p.name: p.stat().st_mtime_ns for p in runs[3:]}
    for p in lost:
        p.unlink()
    (study_copy / "runs" / ".partial.json.123.tmp").write_text("{")  # a half-written file is ignored
    result = run_study(_tiny(study_copy))
    assert result.trained == 3
    assert result.cached == 11
    assert sorted(result.trained_keys) == sorted(p.stem for p in lost)
    assert {p.name: p.stat().st_mtime_ns for p in runs[3:]} == kept
    assert all(p.is_file() for p in lost)
    assert not list((study_copy / "runs").glob("*.tmp"))
    data = json.loads((study_copy / "results.json").read_text())
    assert len(data["runs"]) == 14
    assert data["study"]["trained"] == 3
    assert data["study"]["cached"] == 11


def test_corrupt_run_file_is_retrained(study_copy: Path) -> None:
    victim = sorted((study_copy / "runs").glob("*.json"))[0]
    victim.write_text("{not json")
    result = run_study(_tiny(study_copy))
    assert result.trained_keys == [victim.stem]
    assert json.loads(victim.read_text())["key"] == victim.stem


def test_force_retrains(tmp_path: Path) -> None:
    import os

    import torch

    threads, seed_env = torch.get_num_threads(), os.environ.get("PL_GLOBAL_SEED")
    config = _tiny(tmp_path, factors=["baseline"], seeds=[0], variants=["batchnorm"], threads=2)
    assert run_study(config).trained == 1
    # the caller's process is left as it was
    assert torch.get_num_threads() == threads
    assert os.environ.get("PL_GLOBAL_SEED") == seed_env
    config.force = True
    assert run_study(config).trained == 1


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [
        "study",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--factors",
        "lr",
        "--seeds",
        "3",
        "--no-progress",
        "--workers",
        "1",
    ]
    assert main([*argv, "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "2 runs trained, 0 loaded from the cache" in err
    data = json.loads((out / "results.json").read_text())
    assert [(r["experiment"], r["variant"], r["seed"]) for r in data["runs"]] == [
        ("lr", "vanilla", 3),
        ("lr", "batchnorm", 3),
    ]
    assert not (out / "figures").exists()
    assert main([*argv, "--no-figures"]) == 0
    assert "0 runs trained, 2 loaded from the cache" in capsys.readouterr().err
    assert main(["study", "--report-only", "--out", str(out), "--no-figures"]) == 0
    assert "report.md" in capsys.readouterr().out


def test_ctrl_c_keeps_finished_runs_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real Ctrl-C inside Lightning's fit (which Lightning turns into sys.exit) stops the study with exit
    status 130 and the resume hint; the runs finished before it are kept and the rerun trains the rest."""
    import signal

    import lightning as L

    from normzoo.study import runner

    real_timer = runner._epoch_timer
    calls = {"n": 0}

    class CtrlC(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            raise KeyboardInterrupt

    def timer() -> Any:
        calls["n"] += 1
        return CtrlC() if calls["n"] == 3 else real_timer()

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(runner, "_epoch_timer", timer)
    out = tmp_path / "interrupted"
    argv = ["study", "--preset", "tiny", "--out", str(out), "--factors", "baseline,lr", "--seeds", "0"]
    argv += ["--no-progress", "--no-figures", "--workers", "1"]
    assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) == handler  # Lightning's SIG_IGN is undone
    assert len(list((out / "runs").glob("*.json"))) == 2
    assert not (out / "results.json").exists()
    monkeypatch.setattr(runner, "_epoch_timer", real_timer)
    assert main(argv) == 0
    assert "3 runs trained, 2 loaded from the cache" in capsys.readouterr().err


def _write_mnist(root: Path, n_train: int = 120, n_test: int = 40) -> None:
    """MNIST's four idx-ubyte files (big-endian magic 2051/2049, sizes, raw bytes) with learnable fake digits."""
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        x[np.arange(n), 2 * y + 3, 5:20] = 255  # a bright row whose position is the label
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + y.tobytes())


def test_dataset_from_a_local_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torchvision")
    out, root = tmp_path / "out", tmp_path / "data"
    argv = ["study", "--preset", "tiny", "--dataset", "mnist", "--out", str(out), "--factors", "baseline"]
    argv += ["--seeds", "0", "--models", "mlp", "--variants", "vanilla,batchnorm", "--no-progress"]
    argv += ["--no-figures", "--workers", "1"]
    assert main([*argv, "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "MNIST was not found" in err
    assert "--data-root DIR names the folder, --download fetches it" in err
    _write_mnist(root)
    assert main([*argv, "--data-root", str(root)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["dataset"], r["variant"], r["num_classes"]) for r in runs] == [
        ("mnist", "vanilla", 10),
        ("mnist", "batchnorm", 10),
    ]
    assert runs[0]["num_params"] == 784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # the MLP saw 28x28 inputs


def test_a_failing_run_does_not_stop_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from normzoo.study import runner

    real_run_one = runner.run_one

    def flaky(spec: Any, config: Any, data: Any = None) -> dict[str, Any]:
        if spec.experiment == "lr" and spec.variant == "batchnorm":
            raise RuntimeError("derivative for aten::something is not implemented")
        return real_run_one(spec, config, data)

    monkeypatch.setattr(runner, "run_one", flaky)
    out = tmp_path / "flaky"
    argv = ["study", "--preset", "tiny", "--out", str(out), "--factors", "baseline,lr", "--seeds", "0"]
    argv += ["--no-progress", "--no-figures", "--workers", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 runs failed" in err
    assert "mlp lr:lr=0.1 batchnorm seed=0: RuntimeError: derivative for aten::something" in err
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 4
    (failure,) = data["study"]["failed"]
    assert (failure["experiment"], failure["variant"]) == ("lr", "batchnorm")
    log = out / "runs" / f"{failure['key']}.error.txt"
    assert "Traceback" in log.read_text()
    assert "**1 runs failed**" in (out / "report.md").read_text()
    monkeypatch.setattr(runner, "run_one", real_run_one)
    assert main(argv) == 0  # the rerun retries the failed run only
    assert "1 runs trained, 4 loaded from the cache" in capsys.readouterr().err
    assert not log.exists()


# --- Batch Renormalization that acts, parallel workers, the edges of issue 10 -------------------------------


def test_renorm_differs_from_batchnorm_once_the_scaled_warmup_ends(tiny_study: tuple[Path, Any]) -> None:
    out, _ = tiny_study
    runs = json.loads((out / "results.json").read_text())["runs"]
    for seed in (0, 1):
        bn, rn = (
            next(r for r in runs if (r["experiment"], r["variant"], r["seed"]) == ("baseline", v, seed))
            for v in ("batchnorm", "renorm")
        )
        schedule = rn["renorm"]["schedule"]
        # 12 steps: normzoo.PaperSchedule(total_steps=12), the breakpoints at 5 %, 25 % and 40 % of the run
        assert (schedule["total_steps"], schedule["r_max_steps"], schedule["d_max_steps"]) == (12, 4, 3)
        assert (schedule["warmup_steps"], schedule["r_max"], schedule["d_max"]) == (0, 3.0, 5.0)
        # the same initialization and batches: the first epoch's first step is BatchNorm's, then they differ
        assert rn["history"][-1]["train_loss"] != bn["history"][-1]["train_loss"]
        assert rn["test_acc"] is not None
        activity = rn["renorm"]["activity"]
        warm = [a for a in activity if a["step"] <= schedule["warmup_steps"]]
        after = [a for a in activity if a["step"] >= schedule["r_max_steps"]]
        assert warm
        assert after
        for entry in warm:  # r_max = 1, d_max = 0: every channel sits at its bounds, r = 1 and d = 0
            for layer in entry["layers"].values():
                assert (layer["r_max"], layer["d_max"]) == (1.0, 0.0)
                assert layer["mean_abs_r_minus_1"] == 0
                assert layer["mean_abs_d"] == 0
        for entry in after:
            assert set(entry["layers"]) == {"norm1", "norm2"}
            for layer in entry["layers"].values():
                assert (layer["r_max"], layer["d_max"]) == (3.0, 5.0)
                assert layer["mean_abs_d"] > 0
                assert layer["mean_abs_r_minus_1"] > 0
                assert 0 <= layer["r_at_bound"] <= 1
                assert 0 <= layer["d_at_bound"] <= 1
        assert set(rn["renorm"]["after_warmup"]) == {"norm1", "norm2"}


def test_parallel_workers_give_the_sequential_results(tmp_path: Path) -> None:
    selection = {"factors": ["baseline", "lr"], "seeds": [0, 1]}
    sequential = run_study(_tiny(tmp_path / "seq", workers=1, **selection))
    parallel = run_study(_tiny(tmp_path / "par", workers=2, **selection))
    assert parallel.trained == sequential.trained == 10
    seq = json.loads((tmp_path / "seq" / "results.json").read_text())
    par = json.loads((tmp_path / "par" / "results.json").read_text())
    assert comparable_runs(par) == comparable_runs(seq)  # bit-identical numbers, in plan order
    assert sorted(p.name for p in (tmp_path / "par" / "runs").glob("*.json")) == sorted(
        p.name for p in (tmp_path / "seq" / "runs").glob("*.json")
    )


def test_a_second_study_in_the_same_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A live study holds OUT/.lock; a second one stops at once, naming it, and deletes none of its files."""
    import os
    import subprocess
    import sys

    from normzoo.study.runner import StudyFolderInUseError, StudyLock

    out = tmp_path / "busy"
    (out / "runs").mkdir(parents=True)
    in_flight = out / "runs" / ".abc.json.999.tmp"
    in_flight.write_text("{")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from normzoo.study.runner import StudyLock\n"
         f"with StudyLock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            StudyFolderInUseError, match=rf"another normzoo study \(pid {holder.pid}\) is writing"
        ):
            run_study(_tiny(out, factors=["baseline"], seeds=[0]))
        argv = ["study", "--preset", "tiny", "--out", str(out), "--no-progress", "--workers", "1"]
        assert main(argv) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert in_flight.is_file()  # the other study's in-flight file is untouched
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with StudyLock(out):  # released when its process ended
        pass


def test_an_incomplete_cached_run_is_trained_again(
    study_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = sorted((study_copy / "runs").glob("*.json"))[0]
    record = json.loads(victim.read_text())
    del record["test_acc"]
    victim.write_text(json.dumps(record))  # valid JSON, valid schema number, not a whole record
    with caplog.at_level("WARNING", logger="normzoo.study"):
        result = run_study(_tiny(study_copy))
    assert result.trained_keys == [victim.stem]
    assert "is incomplete (it lacks test_acc): training that run again" in caplog.text
    assert "test_acc" in json.loads(victim.read_text())


def test_report_only_with_a_corrupt_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text('{"study": {}, "runs": [')
    assert main(["study", "--report-only", "--out", str(tmp_path), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normzoo study: error: ")
    assert "results.json is not valid JSON" in err
    assert len(err.strip().splitlines()) == 1


def test_an_unusable_out_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from normzoo.study import runner

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(runner, "run_one", never)
    target = tmp_path / "a-file"
    target.write_text("x")
    argv = ["study", "--preset", "tiny", "--no-progress", "--workers", "1", "--out"]
    assert main([*argv, str(target)]) == 2
    assert f"--out {target} is a file" in capsys.readouterr().err
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os_can_write(locked):  # pragma: no cover - running as root
            pytest.skip("root can write into a read-only folder")
        assert main([*argv, str(locked / "study")]) == 2
        assert "is not a writable folder" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def os_can_write(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


def test_ctrl_c_stops_the_worker_processes(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the study exits 130 without waiting for its workers' runs
    (queued ones included), keeps the finished runs, and leaves no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "parallel"
    argv = [sys.executable, "-m", "normzoo.study", "--preset", "tiny", "--out", str(out), "--workers", "2"]
    argv += ["--no-progress", "--no-figures", "--max-epochs", "50"]
    # A job started in the background by a non-interactive shell (as CI may run the suite) inherits an
    # ignored SIGINT, which Python then keeps: give the study the default disposition, as a terminal does.
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not list((out / "runs").glob("*.json")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.5)
        workers = subprocess.run(
            ["pgrep", "-g", str(proc.pid), "-f", "multiprocessing.spawn"], capture_output=True, text=True
        ).stdout.split()
        assert workers
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert proc.stderr is not None
        assert "run the same command again to resume" in proc.stderr.read()
        time.sleep(1)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid)]
        assert not alive, f"workers still running: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


def test_a_step_cap_inside_the_first_epoch_still_validates(tmp_path: Path) -> None:
    """A run whose step cap ends its first epoch (tiny batches) used to crash EarlyStopping (no val/loss)."""
    config = _tiny(tmp_path, factors=["baseline"], seeds=[0], variants=["batchnorm"], max_steps=3)
    result = run_study(config)
    assert not result.failed
    (record,) = result.records
    assert (record["steps"], record["epochs"], record["stop_reason"]) == (3, 1, "max_steps")
    assert [h["steps"] for h in record["history"]] == [3]
    assert record["test_acc"] is not None
