"""Helpers shared by the study's tests."""

from __future__ import annotations

from typing import Any

#: the fields of a run record (and of its history entries) that measure the clock or the date
CLOCK_FIELDS = frozenset({"epoch_time_s", "epoch_cpu_time_s", "fit_time_s", "finished_at", "time_s", "cpu_s"})


def comparable_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a results.json without what measures the clock (times, dates): two studies of the same
    runs, trained one after the other, in worker processes or on Ray, must give equal lists."""
    return [
        {
            k: (
                [{hk: hv for hk, hv in h.items() if hk not in CLOCK_FIELDS} for h in v]
                if k == "history"
                else v
            )
            for k, v in r.items()
            if k not in CLOCK_FIELDS
        }
        for r in results["runs"]
    ]
