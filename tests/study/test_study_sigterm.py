"""SIGTERM (``kill PID``, a job scheduler's stop) ends a study as Ctrl-C does, for both executors: the study
exits with 143 and the resume hint, keeps its finished runs, and leaves no worker process (nor a Ray instance
it started) running. Only the study's own process gets the signal, as from ``kill``, not its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

from normzoo.study.runner import load_run


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_study(out: Path, *options: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "normzoo.study", "--preset", "tiny", "--out", str(out), *options]
    argv += ["--no-progress", "--no-figures", "--max-epochs", "20"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray instance of its own
    out.mkdir(parents=True)
    # stderr to a file: a full pipe (Ray forwards its workers' output) would block the study
    # the default disposition, whatever the test runner's was (a background job may ignore signals)
    with open(out / "stderr.txt", "w", encoding="utf-8") as stderr:
        return subprocess.Popen(
            argv,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
        )


def _wait_for_a_run(proc: subprocess.Popen[str], out: Path, timeout: float) -> None:
    """Wait until the study has cached a run."""
    deadline = time.monotonic() + timeout
    while not list((out / "runs").glob("*.json")):
        assert proc.poll() is None, (out / "stderr.txt").read_text()
        assert time.monotonic() < deadline, "no run finished in time"
        time.sleep(0.5)


def _check_stopped(proc: subprocess.Popen[str], out: Path, descendants: list[int], grace: float) -> None:
    assert proc.wait(timeout=90) == 128 + signal.SIGTERM, (out / "stderr.txt").read_text()
    err = (out / "stderr.txt").read_text()
    assert "stopped by SIGTERM" in err
    assert "run the same command again to resume" in err
    deadline = time.monotonic() + grace
    while (alive := [pid for pid in descendants if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"still running after the study ended: {alive}"
    finished = sorted((out / "runs").glob("*.json"))
    assert finished
    assert all(load_run(p) is not None for p in finished)
    assert not list((out / "runs").glob(".*.tmp"))
    assert not (out / "results.json").exists()


def test_sigterm_stops_the_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "local"
    proc = _start_study(out, "--workers", "2")
    try:
        _wait_for_a_run(proc, out, timeout=240)
        descendants = _descendants(proc.pid)
        workers = subprocess.run(
            ["pgrep", "-g", str(proc.pid), "-f", "multiprocessing.spawn"], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 2
        assert {int(w) for w in workers} <= set(descendants)
        os.kill(proc.pid, signal.SIGTERM)  # the study's process only, as `kill PID` does
        _check_stopped(proc, out, descendants, grace=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_cancels_the_ray_tasks_and_stops_the_ray_instance(tmp_path: Path) -> None:
    """The study starts a local Ray instance (no RAY_ADDRESS, no `ray start`): on SIGTERM it cancels its
    tasks and shuts the instance down, so that none of its processes (GCS, raylet, workers) outlives it."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    proc = _start_study(out, "--executor", "ray")
    descendants: list[int] = []
    try:
        _wait_for_a_run(proc, out, timeout=240)
        descendants = _descendants(proc.pid)
        assert len(descendants) >= 3  # at least the GCS server, the raylet and a worker
        os.kill(proc.pid, signal.SIGTERM)
        _check_stopped(proc, out, descendants, grace=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in descendants:  # only when the test failed: the Ray processes it found
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
