#!/usr/bin/env bash
# The GPU check of normzoo's layers, in one run of under 8 minutes on a data-centre GPU:
#   1. the cuda-marked tests (equivalence with torch's BatchNorm on the GPU, autocast, generators, ...);
#   2. benchmarks/layers.py --device cuda (forward+backward time and saved bytes against cuDNN's BatchNorm);
#   3. a summary: equivalence PASS/FAIL, and each normzoo layer's time as a ratio to torch's BatchNorm2d.
# Usage, from anywhere, in the environment where normzoo is installed (pip install -e ".[dev]"):
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
# Exits 0 with a "skipped" line when there is no CUDA GPU; otherwise non-zero if the tests or the benchmark
# failed (a timing above its target is reported, not failed: targets were set for CPU).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA GPU (torch.cuda.is_available() is False)"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1/2 cuda-marked tests"
timeout 300 "$python" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$work/cuda.xml"
tests_status=$?

echo "== 2/2 benchmarks/layers.py --device cuda"
timeout 150 "$python" benchmarks/layers.py --device cuda --json "$work/layers.json"
bench_status=$?

echo "== summary"
"$python" - "$work/cuda.xml" "$work/layers.json" "$tests_status" "$bench_status" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

junit, bench, tests_status, bench_status = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
TARGET = 1.2  # issue 9: normzoo layer time <= 1.2x cuDNN BatchNorm2d on the GPU

if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    verdict = "PASS" if tests_status == 0 and counts["failures"] + counts["errors"] == 0 else "FAIL"
    print(f"equivalence (pytest -m cuda): {verdict}: {passed} passed, {counts['failures']} failed, "
          f"{counts['errors']} errors, {counts['skipped']} skipped (exit {tests_status})")
else:
    print(f"equivalence (pytest -m cuda): FAIL: no report (exit {tests_status}, 124 = timed out)")

if bench.exists():
    data = json.loads(bench.read_text())
    print(f"benchmark on {data['machine']['device']}, torch {data['machine']['torch']}:")
    for shape in data["results"]:
        print(f"  shape {tuple(shape['shape'])}: time as a ratio to torch BatchNorm2d (cuDNN), target <= {TARGET}x")
        for row in shape["layers"]:
            if not row["name"].startswith("normzoo"):
                continue
            mark = "ok" if row["time_ratio"] <= TARGET else "ABOVE TARGET"
            print(f"    {row['name']:<42} {row['time_ratio']:5.2f}x  saved bytes {row['bytes_ratio']:.2f}x  {mark}")
else:
    print(f"benchmark: FAIL: no results (exit {bench_status}, 124 = timed out)")
EOF
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
