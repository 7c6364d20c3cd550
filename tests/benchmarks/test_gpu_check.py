"""benchmarks/gpu_check.sh without a GPU: it skips cleanly, and its summary reads what the tools write."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_without_a_gpu_it_exits_0_with_a_skip_message() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gpu_check: skipped: no CUDA GPU" in done.stdout


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def _summary_program() -> str:
    match = re.search(r"<<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), re.DOTALL)
    assert match is not None
    return match.group(1)


@pytest.mark.parametrize("failures", [0, 2])
def test_summary_reads_pytests_report_and_the_benchmarks_json(tmp_path: Path, failures: int) -> None:
    bench = tmp_path / "layers.json"
    subprocess.run(
        [sys.executable, str(SCRIPT.parent / "layers.py"), "--shapes", "4,3,5,5", "--repeats", "2",
         "--warmup", "0", "--json", str(bench)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    junit = tmp_path / "cuda.xml"
    junit.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="{failures}" '
        'errors="0" skipped="1"></testsuite></testsuites>'
    )
    status = 1 if failures else 0
    done = subprocess.run(
        [sys.executable, "-", str(junit), str(bench), str(status), "0"],
        input=_summary_program(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    verdict = "FAIL" if failures else "PASS"
    assert f"equivalence (pytest -m cuda): {verdict}: {9 - failures} passed, {failures} failed" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.strip().startswith("normzoo ")]
    # BatchNorm2d, two BatchRenorm2d rows, NoisyBatchNorm2d, the two skip_nonfinite rows; none of the others
    assert len(rows) == 6
    assert all(re.search(r"\d+\.\d\dx", row) for row in rows)


def test_summary_says_when_a_step_left_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-", str(tmp_path / "none.xml"), str(tmp_path / "none.json"), "124", "124"],
        input=_summary_program(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "equivalence (pytest -m cuda): FAIL: no report (exit 124" in done.stdout
    assert "benchmark: FAIL: no results (exit 124" in done.stdout
