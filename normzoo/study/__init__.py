"""``normzoo study``: reproduce the classic BatchNorm findings on your data and write a report.

The pieces, from data to report:

- :mod:`.grid`: the baseline recipe, the factors and their settings, the presets (``quick``, ``full``,
  ``tiny``) and :func:`build_plan`, which turns a :class:`StudyConfig` into the list of runs;
- :mod:`.config`: the same settings from a TOML or JSON file;
- :mod:`.runner`: trains each run with Lightning, caches it in ``OUT/runs/<key>.json``, resumes, shows a
  progress bar, writes ``OUT/results.json``;
- :mod:`.stats`: the numbers of the report: the runs as one pandas table and its per-cell means and spreads
  over seeds (:func:`~.stats.runs_frame`, :func:`~.stats.cell_stats`), the scoreboard, the claims and their
  verdicts;
- :mod:`.renorm`: what Batch Renormalization did during a run (``r``, ``d`` at their clip bounds);
- :mod:`.report`: ``report.md``, ``report.html`` and the figures, from ``results.json`` alone;
- :mod:`.cli`: the ``normzoo`` command.

Example (the tiny preset trains in a few seconds)::

    from normzoo.study import StudyConfig, run_study, write_report
    config = StudyConfig(preset="tiny", out="/tmp/nz-tiny")
    result = run_study(config)
    write_report(config.out)
"""

from __future__ import annotations

from .config import load_config_file
from .grid import BASELINE, FACTORS, MODELS, PRESETS, VARIANTS, Recipe, RunSpec, StudyConfig, build_plan
from .report import write_report
from .runner import StudyResult, run_study
from .stats import scoreboard

__all__ = [
    "BASELINE",
    "FACTORS",
    "MODELS",
    "PRESETS",
    "VARIANTS",
    "Recipe",
    "RunSpec",
    "StudyConfig",
    "StudyResult",
    "build_plan",
    "load_config_file",
    "run_study",
    "scoreboard",
    "write_report",
]
