"""The study's one aggregation (``runs_frame`` and ``cell_stats``) against a hand computation, and the report
tables built from it."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normzoo.study import stats
from normzoo.study.report import build_blocks, render_markdown

INF, NAN = math.inf, math.nan


def run(variant: str, seed: int, acc: Any, *, experiment: str = "baseline", level: str = "baseline",
        dataset: str = "d", model: str = "mlp", **kw: Any) -> dict[str, Any]:  # fmt: skip
    return {"dataset": dataset, "experiment": experiment, "level": level, "model": model, "variant": variant,
            "seed": seed, "test_acc": acc, **kw}  # fmt: skip


def hand_mean(values: list[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else NAN


def hand_sd(values: list[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return 0.0
    m = sum(finite) / len(finite)
    return math.sqrt(sum((x - m) ** 2 for x in finite) / (len(finite) - 1))


values = st.one_of(
    st.none(),
    st.floats(0.0, 1.0),
    st.floats(-1e3, 1e3),
    st.sampled_from([NAN, INF, -INF]),
)
cell_keys = st.tuples(
    st.sampled_from(["d1", "d2"]),
    st.sampled_from(["baseline", "lr"]),
    st.sampled_from(["a", "b"]),
    st.just("mlp"),
    st.sampled_from(["vanilla", "batchnorm"]),
)


@st.composite
def studies(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Records of 1-4 cells, each with 1-3 seeds, values finite, missing or not finite, in a random order."""
    keys = draw(st.lists(cell_keys, min_size=1, max_size=4, unique=True))
    records = []
    for key in keys:
        seeds = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
        for seed in seeds:
            records.append({**dict(zip(stats.CELL_KEYS, key, strict=True)), "seed": seed,
                            "test_acc": draw(values), "epochs": draw(values)})  # fmt: skip
    return draw(st.permutations(records))


@settings(max_examples=60)
@given(studies())
def test_cell_stats_is_the_hand_computation(records: list[dict[str, Any]]) -> None:
    frame = stats.runs_frame(records, metrics=("test_acc", "epochs"))
    table = stats.cell_stats(frame)
    # the cells in the order of their first record, each with its records' statistics
    first_seen = list(dict.fromkeys(tuple(r[k] for k in stats.CELL_KEYS) for r in records))
    assert list(table.index) == first_seen
    for key in first_seen:
        runs = [r for r in records if tuple(r[k] for k in stats.CELL_KEYS) == key]
        row = table.loc[key]
        assert row["n"] == len(runs)
        assert row["seeds"] == tuple(sorted(r["seed"] for r in runs))
        for metric in ("test_acc", "epochs"):
            got = [float(row[f"{metric}_mean"]), float(row[f"{metric}_sd"])]
            want = [hand_mean([r[metric] for r in runs]), hand_sd([r[metric] for r in runs])]
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12, nan_ok=True)


@given(studies())
def test_cells_carry_their_runs_and_the_frame_statistics(records: list[dict[str, Any]]) -> None:
    table = stats.cells(records)
    for key, cell in table.items():
        runs = [r for r in records if tuple(r[k] for k in stats.CELL_KEYS) == key]
        assert [r["seed"] for r in cell.runs] == sorted(r["seed"] for r in runs)
        assert cell.n == len(runs)
        accs = [r["test_acc"] for r in runs]
        assert cell.mean() == pytest.approx(hand_mean(accs), rel=1e-9, nan_ok=True)
        assert cell.sd() == pytest.approx(hand_sd(accs), rel=1e-9, abs=1e-12)
        # a cell built by hand from the same runs aggregates them the same way
        again = stats.Cell(*key, runs=cell.runs)
        assert again.mean() == pytest.approx(cell.mean(), rel=1e-12, nan_ok=True)
        assert again.sd("epochs") == pytest.approx(cell.sd("epochs"), rel=1e-12, abs=1e-12)


def test_runs_frame_columns_and_missing_values() -> None:
    records = [
        run("vanilla", 1, 0.9, recipe={"batch_size": 32}, epochs=7, epoch_time_s=INF),
        run("batchnorm", 0, None, recipe={}, fit_time_s="2.5"),
    ]
    frame = stats.runs_frame(records)
    assert list(frame.columns) == [*stats.CELL_KEYS, "seed", "batch_size", *stats.METRICS]
    assert frame["seed"].tolist() == [1, 0]
    assert frame["batch_size"].tolist() == [32, 0]
    assert frame["epochs"].tolist()[0] == 7.0
    assert math.isnan(frame.at[0, "epoch_time_s"])  # not finite: left out like a missing value
    assert math.isnan(frame.at[1, "test_acc"])
    assert frame.at[1, "fit_time_s"] == 2.5
    assert stats.runs_frame([]).empty


def test_runs_frame_says_what_is_wrong_with_a_record() -> None:
    bad = run("vanilla", 0, 0.9)
    del bad["variant"]
    with pytest.raises(ValueError, match="run record 1 has no 'variant'"):
        stats.runs_frame([run("vanilla", 0, 0.9), bad])
    with pytest.raises(ValueError, match=r"test_acc='high', which is not a number"):
        stats.runs_frame([run("vanilla", 0, "high")])


def test_cell_statistics_of_a_hand_built_cell() -> None:
    runs = tuple(run("vanilla", s, acc, final_val_acc=acc) for s, acc in enumerate([0.80, 0.90, NAN]))
    cell = stats.Cell("d", "baseline", "baseline", "mlp", "vanilla", runs)
    assert cell.mean() == pytest.approx(0.85)
    assert cell.sd() == pytest.approx(math.sqrt(0.005))  # (0.05² + 0.05²) / 1, the nan left out
    assert cell.n == 3  # the diverged run is still one of the cell's runs
    # a number outside METRICS is aggregated the same way, on demand
    assert cell.mean("final_val_acc") == pytest.approx(0.85)
    assert cell.sd("final_val_acc") == pytest.approx(math.sqrt(0.005))
    empty = stats.Cell("d", "baseline", "baseline", "mlp", "vanilla", ())
    assert math.isnan(empty.mean())
    assert empty.sd() == 0.0


def test_a_diverged_run_leaves_the_spread_of_the_others() -> None:
    # batchnorm 0.90, 0.94 and a diverged seed; vanilla 0.88, 0.90: the pooled spread uses the finite values
    bn = stats.Cell(
        "d",
        "e",
        "l",
        "m",
        "batchnorm",
        tuple(run("batchnorm", s, a) for s, a in enumerate([0.90, 0.94, INF])),
    )
    van = stats.Cell(
        "d", "e", "l", "m", "vanilla", tuple(run("vanilla", s, a) for s, a in enumerate([0.88, 0.90]))
    )
    comp = stats.compare(bn, van)
    sd_bn, sd_van = statistics.stdev([0.90, 0.94]), statistics.stdev([0.88, 0.90])
    assert comp.delta == pytest.approx(0.92 - 0.89)
    assert comp.spread == pytest.approx(math.sqrt((sd_bn**2 + sd_van**2) / 2))
    assert comp.outcome == "win"  # 3 points > threshold max(1, 2.2) points


def test_overhead_table_reads_the_same_aggregation() -> None:
    records = [
        run("vanilla", s, 0.9, recipe={"batch_size": 64}, epoch_time_s=t)
        for s, t in enumerate([1.0, 1.2, INF])
    ] + [
        run("batchnorm", s, 0.9, recipe={"batch_size": 64}, epoch_time_s=t) for s, t in enumerate([1.3, None])
    ]
    (row,) = stats.overhead_table(records)
    assert row["time"] == pytest.approx({"batchnorm": 1.3, "vanilla": 1.1})
    assert row["overhead"]["batchnorm"] == pytest.approx(1.3 / 1.1 - 1.0)


def _table_after(md: str, caption: str) -> list[list[str]]:
    lines = md[md.index(f"*{caption}*") :].splitlines()[2:]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_factor_table_from_the_frame() -> None:
    # two seeds; vanilla's second seed at bs=4 diverged; the baseline (64) sorts between 4 and 256
    records = []
    for s in (0, 1):
        records += [
            run("vanilla", s, 0.60 + 0.02 * s, epochs=10, recipe={"batch_size": 64}),
            run("batchnorm", s, 0.70 + 0.04 * s, epochs=12, recipe={"batch_size": 64}),
            run("vanilla", s, 0.50 if s == 0 else None, experiment="batch_size", level="bs=4",
                recipe={"batch_size": 4}, epochs=5),
            run("batchnorm", s, 0.40, experiment="batch_size", level="bs=4", recipe={"batch_size": 4}, epochs=6),
            run("vanilla", s, 0.55, experiment="batch_size", level="bs=256", recipe={"batch_size": 256}, epochs=3),
        ]  # fmt: skip
    md = render_markdown(build_blocks({"study": {"draw_margin": 0.01}, "runs": records}, None, figures=False))
    section = md[md.index("### Batch size") :]
    assert _table_after(section, "MLP") == [
        ["bs=4", "50.0 (5)", "40.0 (6)", "-10.0 (loss)"],  # the diverged seed left out of the mean and sd
        ["baseline (bs=64)", "61.0 ± 1.4 (10)", "72.0 ± 2.8 (12)", "+11.0 (win)"],
        ["bs=256", "55.0 (3)", "-", "-"],
    ]
