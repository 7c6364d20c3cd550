"""normzoo.lightning.plotting needs matplotlib alone; the rest of normzoo.lightning says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HIDE_LIGHTNING = """
import sys
for name in ("lightning", "lightning_utilities", "torchmetrics", "pytorch_lightning"):
    sys.modules[name] = None  # as if not installed
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HIDE_LIGHTNING + code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plotting_imports_and_draws_without_lightning(tmp_path) -> None:
    done = _run(f"""
    from normzoo.lightning.plotting import gradient_flow_chart, save_png
    fig = gradient_flow_chart(["a", "b"], mean_abs=[1e-3, 1e-2], max_abs=[1e-2, 1e-1])
    print(save_png(fig, {str(tmp_path / "f.png")!r}).stat().st_size > 0)
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "torchmetrics") and sys.modules[m]))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True", "[]"]


def test_the_rest_of_normzoo_lightning_says_what_to_install() -> None:
    for statement in (
        "from normzoo.lightning import ClassificationModule",
        "import normzoo.lightning.callbacks",
        "import normzoo.lightning.module",
    ):
        done = _run(statement)
        assert done.returncode != 0
        assert 'pip install "normzoo[lightning]"' in done.stderr, statement
