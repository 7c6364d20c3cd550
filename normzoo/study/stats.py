"""The numbers of the study's report, computed from the records of ``results.json`` alone.

Cells, comparisons and the scoreboard
-------------------------------------
A *cell* is every run of one (dataset, experiment, level, model, variant): one run per seed. Its accuracy is
the mean of the runs' ``test_acc``, its *spread* the sample standard deviation over seeds (0 with one seed).
Every such number comes from one aggregation: :func:`runs_frame` puts the records into a pandas table (one
row per run) and :func:`cell_stats` reduces it with one ``groupby(...).agg(...)``; a value that is missing or
not finite (a diverged run) is left out of every mean and sd, a mean of nothing is ``nan``.

A *comparison* sets a normalization variant against vanilla in the same (dataset, experiment, level, model)::

    delta     = mean(variant) - mean(vanilla)
    spread    = sqrt((sd(variant)**2 + sd(vanilla)**2) / 2)   # pooled over seeds; 0 with one seed
    threshold = max(draw_margin, spread)
    outcome   = "win" if delta > threshold, "loss" if delta < -threshold, else "draw"

so a difference inside the seeds' spread is a draw, and ``draw_margin`` (default 0.01: one accuracy point) is a
floor that keeps a difference of a test image or two from counting as a win when the seeds happen to agree
closely, or when there is a single seed (then the threshold *is* the margin). The *scoreboard* counts the
outcomes of a variant over every comparison of the study: ``batchnorm W - vanilla L (D draws)``, the seed
study's style.

Findings
--------
:func:`findings` checks each published claim of the seed studies against the comparisons and gives a verdict
(``reproduced``, ``partly reproduced``, ``not reproduced``, ``not shown``, ``not run``) with the numbers
behind it and the caveats that limit it (runs capped by ``max_epochs``, a single seed, data too easy).

Example:
    >>> runs = [
    ...     {"dataset": "d", "experiment": "baseline", "level": "baseline", "model": "mlp", "variant": v,
    ...      "seed": s, "test_acc": acc, "num_classes": 10}
    ...     for v, accs in {"vanilla": (0.90, 0.92), "batchnorm": (0.95, 0.96)}.items()
    ...     for s, acc in enumerate(accs)]
    >>> board = scoreboard(runs)
    >>> board["batchnorm"].text
    'batchnorm 1 - vanilla 0 (0 draws)'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CEILING",
    "CELL_KEYS",
    "CLAIMS",
    "MEASURES",
    "METRICS",
    "VERDICTS",
    "Cell",
    "Claim",
    "Comparison",
    "Finding",
    "Score",
    "cell_stats",
    "cells",
    "claims_for",
    "compare",
    "comparisons",
    "epochs_to_target",
    "findings",
    "finite_mean",
    "overhead_table",
    "runs_frame",
    "scoreboard",
]

#: Accuracy above which both vanilla and a normalized net are said to sit at the data's ceiling.
CEILING = 0.95
#: The verdicts of :func:`findings`, from best to worst support.
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "not shown", "not run")

Record = Mapping[str, Any]
# accuracies are ratios of counts: a difference equal to the threshold up to rounding is "not more than" it
_EPS = 1e-9


def finite_mean(values: Iterable[float | None]) -> float:
    """The mean of the finite values (``None``, ``nan`` and infinities left out); ``nan`` when none is left.

    The rule of :func:`cell_stats` for the lists outside the runs table (a monitor's history, the epochs to a
    target): a diverged run's ``nan`` never poisons an average silently, and an average of nothing is ``nan``,
    never 0.

    Example:
        >>> finite_mean([1.0, None, float("nan"), 3.0]), finite_mean([])
        (2.0, nan)
    """
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(clean) / len(clean) if clean else math.nan


_mean = finite_mean

#: The fields that make a run's cell, in the order of :func:`cells`' keys: its runs differ by seed alone.
CELL_KEYS = ("dataset", "experiment", "level", "model", "variant")
#: The per-run numbers of :func:`runs_frame`'s table, which :func:`cell_stats` summarizes.
METRICS = ("test_acc", "best_val_acc", "epochs", "epoch_time_s", "epoch_cpu_time_s", "fit_time_s")
#: The columns of :func:`runs_frame` that say which run a row is; every other column is a metric.
_ID_COLUMNS = (*CELL_KEYS, "seed", "batch_size")


def _pandas() -> Any:
    from normzoo.lightning._imports import import_optional

    return import_optional("pandas", extra="study", feature="the study's statistics")


def _number(record: Record, name: str, index: int) -> float:
    """``record[name]`` as a float; ``nan`` when it is missing or not finite (pandas skips ``nan``)."""
    value = record.get(name)
    if value is None:
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"run record {index} ({record.get('experiment')}:{record.get('level')} {record.get('variant')} "
            f"seed {record.get('seed')}) has {name}={value!r}, which is not a number: fix or remove it in "
            "results.json"
        ) from None
    return number if math.isfinite(number) else math.nan


def runs_frame(records: Iterable[Record], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """The records as a table, the one input of the study's statistics: one row per run, row ``i`` record ``i``.

    Columns: :data:`CELL_KEYS` (strings), ``seed`` and ``batch_size`` (integers; the batch size of the run's
    recipe, 0 when it has none), then one float column per name in ``metrics``, ``nan`` where the record has
    no value or a non-finite one (a diverged run), so that pandas' reductions, which skip ``nan``, leave it out.

    Raises:
        ValueError: a record lacks one of :data:`CELL_KEYS`, or a metric is not a number.

    Example:
        >>> runs = [{"dataset": "d", "experiment": "baseline", "level": "baseline", "model": "mlp",
        ...          "variant": "vanilla", "seed": s, "test_acc": acc} for s, acc in enumerate((0.9, None))]
        >>> runs_frame(runs, metrics=("test_acc",))[["variant", "seed", "batch_size", "test_acc"]]
           variant  seed  batch_size  test_acc
        0  vanilla     0           0       0.9
        1  vanilla     1           0       NaN
    """
    pd = _pandas()
    rows = []
    for i, r in enumerate(records):
        missing = [k for k in CELL_KEYS if k not in r]
        if missing:
            raise ValueError(
                f"run record {i} has no {', '.join(map(repr, missing))}: every run of a normzoo study names its "
                f"{', '.join(CELL_KEYS)} (is this a normzoo results.json?)"
            )
        rows.append(
            [
                *(str(r[k]) for k in CELL_KEYS),
                int(r.get("seed", 0)),
                int((r.get("recipe") or {}).get("batch_size") or 0),
                *(_number(r, m, i) for m in metrics),
            ]
        )
    frame = pd.DataFrame(rows, columns=[*_ID_COLUMNS, *metrics])
    return frame.astype({"seed": "int64", "batch_size": "int64", **dict.fromkeys(metrics, "float64")})


def cell_stats(frame: pd.DataFrame, by: Sequence[str] = CELL_KEYS) -> pd.DataFrame:
    """The statistics of :func:`runs_frame`'s table per group of ``by`` (default: per cell), from one
    ``groupby(...).agg(...)``: the one place where the study averages over seeds.

    One row per group, in the order of first appearance, indexed by ``by``; the columns are ``n`` (runs),
    ``seeds`` (a sorted tuple) and, for each metric column ``m``, ``m_mean`` and ``m_sd``: the mean and the
    sample standard deviation (ddof 1) of the finite values. A mean of no value is ``nan``; the sd of fewer
    than two values is 0 (no spread is known), as in :func:`compare`.

    Example:
        >>> runs = [{"dataset": "d", "experiment": "baseline", "level": "baseline", "model": "mlp",
        ...          "variant": "vanilla", "seed": s, "test_acc": acc}
        ...         for s, acc in enumerate((0.90, 0.94, float("nan")))]
        >>> row = cell_stats(runs_frame(runs, metrics=("test_acc",))).to_dict("records")[0]
        >>> row["n"], row["seeds"], round(row["test_acc_mean"], 2), round(row["test_acc_sd"], 4)
        (3, (0, 1, 2), 0.92, 0.0283)
    """
    metrics = [c for c in frame.columns if c not in _ID_COLUMNS]
    named: dict[str, tuple[str, Any]] = {"n": ("seed", "size"), "seeds": ("seed", _sorted_tuple)}
    for m in metrics:  # pandas' mean and std skip nan: runs_frame made every non-finite value nan
        named[f"{m}_mean"] = (m, "mean")
        named[f"{m}_sd"] = (m, "std")
    out = frame.groupby(list(by), sort=False).agg(**named)
    sds = [f"{m}_sd" for m in metrics]
    out[sds] = out[sds].fillna(0.0)  # pandas' sample sd of one value is nan; the study's is 0
    return out


def _sorted_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(int(v) for v in values))


def _capped(record: Record) -> bool:
    """Whether the run ended at the epoch or step cap while still improving: early stopping did not end it
    and its best validation accuracy came in the last quarter of its epochs."""
    reason = record.get("stop_reason")
    capped = (
        reason in ("max_epochs", "max_steps") if reason is not None else record.get("stopped_early") is False
    )
    if not capped:
        return False
    epochs, best = record.get("epochs"), record.get("best_epoch")
    if not epochs or not best:
        return True
    return int(best) > 0.75 * int(epochs)


@dataclass(frozen=True)
class Cell:
    """Every run (one per seed) of one dataset, experiment, level, model and variant.

    Its statistics are its row of :func:`cell_stats`: :func:`cells` passes them in ``stats``, and a Cell built
    by hand aggregates its own runs the same way.
    """

    dataset: str
    experiment: str
    level: str
    model: str
    variant: str
    runs: tuple[Record, ...]
    #: this cell's row of :func:`cell_stats`: ``n``, ``seeds``, ``<metric>_mean`` and ``<metric>_sd``
    stats: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.stats:
            object.__setattr__(self, "stats", self._aggregate(METRICS))

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.dataset, self.experiment, self.level, self.model, self.variant)

    def _aggregate(self, metrics: Sequence[str]) -> dict[str, Any]:
        if not self.runs:  # what cell_stats gives a group without a finite value: no mean, no spread
            return {
                "n": 0,
                "seeds": (),
                **{f"{m}_mean": math.nan for m in metrics},
                **{f"{m}_sd": 0.0 for m in metrics},
            }
        identity = dict(zip(CELL_KEYS, self.key, strict=True))  # the cell says which runs it holds
        frame = runs_frame([{**r, **identity} for r in self.runs], metrics)
        return dict(cell_stats(frame).to_dict("records")[0])

    def _stat(self, name: str, stat: str) -> float:
        row = self.stats if f"{name}_{stat}" in self.stats else self._aggregate((name,))  # not in METRICS
        return float(row[f"{name}_{stat}"])

    def values(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.runs if r.get(name) is not None]

    def mean(self, name: str = "test_acc") -> float:
        """The mean of ``name`` over the runs' finite values (:func:`cell_stats`); ``nan`` if none."""
        return self._stat(name, "mean")

    def sd(self, name: str = "test_acc") -> float:
        """The sample sd of ``name`` over the runs' finite values (:func:`cell_stats`); 0 for fewer than two."""
        return self._stat(name, "sd")

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def chance(self) -> float:
        classes = [int(r["num_classes"]) for r in self.runs if r.get("num_classes")]
        return 1.0 / classes[0] if classes else 0.1

    @property
    def capped(self) -> bool:
        """Whether a run ended at the epoch or step cap while still improving (see :func:`_capped`)."""
        return any(_capped(r) for r in self.runs)

    @property
    def stuck(self) -> bool:
        """Whether the mean test accuracy is within 10 points of chance (the network did not learn)."""
        return self.mean() < self.chance + 0.10


def cells(records: Iterable[Record]) -> dict[tuple[str, str, str, str, str], Cell]:
    """The records grouped by :data:`CELL_KEYS` in the order of first appearance, runs sorted by seed, each
    cell with its row of :func:`cell_stats`."""
    records = list(records)
    frame = runs_frame(records)
    if frame.empty:
        return {}
    summary: dict[tuple[str, str, str, str, str], dict[str, Any]] = cell_stats(frame).to_dict("index")
    members = frame.groupby(list(CELL_KEYS), sort=False).indices
    seed = frame["seed"].tolist()
    # sorted is stable: runs of the same seed keep the records' order
    by_seed = {key: sorted(rows, key=seed.__getitem__) for key, rows in members.items()}
    return {
        key: Cell(*key, runs=tuple(records[i] for i in by_seed[key]), stats=row)
        for key, row in summary.items()
    }


@dataclass(frozen=True)
class Comparison:
    """A variant against a reference (vanilla unless said otherwise) in one setting; see the module docs."""

    variant: Cell
    reference: Cell
    delta: float
    spread: float
    threshold: float
    outcome: str  # "win" | "loss" | "draw" (from the variant's side)

    @property
    def setting(self) -> tuple[str, str, str, str]:
        c = self.variant
        return (c.dataset, c.experiment, c.level, c.model)


def compare(a: Cell, b: Cell, draw_margin: float = 0.01, metric: str = "test_acc") -> Comparison:
    """``a`` against ``b`` on ``metric``: the delta of the means, the pooled spread, the outcome for ``a``.

    Example:
        >>> mk = lambda v, accs: Cell("d", "e", "l", "m", v, tuple({"test_acc": x, "seed": i} for i, x in enumerate(accs)))
        >>> c = compare(mk("batchnorm", [0.95, 0.97]), mk("vanilla", [0.93, 0.99]))
        >>> c.outcome, round(c.delta, 3), round(c.threshold, 4)
        ('draw', 0.0, 0.0316)
    """
    delta = a.mean(metric) - b.mean(metric)
    spread = math.sqrt((a.sd(metric) ** 2 + b.sd(metric) ** 2) / 2) if a.n >= 2 and b.n >= 2 else 0.0
    threshold = max(draw_margin, spread)
    if math.isnan(delta):
        outcome = "draw"
    elif delta > threshold + _EPS:
        outcome = "win"
    elif delta < -threshold - _EPS:
        outcome = "loss"
    else:
        outcome = "draw"
    return Comparison(a, b, delta, spread, threshold, outcome)


def comparisons(
    records: Iterable[Record], draw_margin: float = 0.01, reference: str = "vanilla"
) -> list[Comparison]:
    """Every variant against ``reference`` in every setting where both ran, in the records' order."""
    table = cells(records)
    out: list[Comparison] = []
    for key, cell in table.items():
        if cell.variant == reference:
            continue
        ref = table.get((*key[:4], reference))
        if ref is not None:
            out.append(compare(cell, ref, draw_margin))
    return out


@dataclass
class Score:
    """A variant's record against vanilla: wins, losses and draws, and the comparisons behind them."""

    variant: str
    wins: int = 0
    losses: int = 0
    draws: int = 0
    comparisons: list[Comparison] = field(default_factory=list)
    reference: str = "vanilla"

    @property
    def text(self) -> str:
        """The seed study's style: ``"batchnorm 9 - vanilla 1 (2 draws)"``."""
        draws = f"{self.draws} draw" + ("" if self.draws == 1 else "s")
        return f"{self.variant} {self.wins} - {self.reference} {self.losses} ({draws})"


def scoreboard(
    records: Iterable[Record], draw_margin: float = 0.01, *, model: str | None = None
) -> dict[str, Score]:
    """Each normalization variant's wins, losses and draws against vanilla (optionally for one model)."""
    board: dict[str, Score] = {}
    for comp in comparisons(records, draw_margin):
        if model is not None and comp.variant.model != model:
            continue
        score = board.setdefault(comp.variant.variant, Score(comp.variant.variant))
        score.comparisons.append(comp)
        if comp.outcome == "win":
            score.wins += 1
        elif comp.outcome == "loss":
            score.losses += 1
        else:
            score.draws += 1
    order = {"batchnorm": 0, "renorm": 1, "noisy": 2}
    return dict(sorted(board.items(), key=lambda kv: (order.get(kv[0], 9), kv[0])))


def epochs_to_target(record: Record, target: float) -> int | None:
    """The first epoch whose validation accuracy reaches ``target`` (``None`` if none does).

    Example:
        >>> history = [{"epoch": 1, "val_acc": 0.6}, {"epoch": 2, "val_acc": 0.93}, {"epoch": 3, "val_acc": 0.97}]
        >>> epochs_to_target({"history": history}, 0.9), epochs_to_target({"history": history}, 0.99)
        (2, None)
    """
    for h in record.get("history") or ():
        if h.get("val_acc") is not None and h["val_acc"] >= target:
            return int(h["epoch"])
    return None


def _mean_epochs_to(cell: Cell, target: float) -> float | None:
    """Mean over seeds of :func:`epochs_to_target`; a run that never reaches it counts its epochs + 1."""
    values = []
    for r in cell.runs:
        e = epochs_to_target(r, target)
        values.append(float(e) if e is not None else float(r.get("epochs") or 0) + 1)
    return _mean(values) if values else None


def time_measure(records: Iterable[Record]) -> str:
    """Which epoch time the wall-time comparison uses: ``"cpu"`` (``epoch_cpu_time_s``, the process's CPU
    time) when every run trained on the CPU and has it, else ``"wall"`` (``epoch_time_s``).

    On a CPU with one thread the CPU time of an epoch is its wall time on an idle machine, and it leaves out
    the time spent waiting while other processes hold the cores (cache contention and, on a virtual machine,
    time the host takes away still show in it); on a GPU the host's CPU time says little and the wall time
    (with the device synchronized) is used.
    """
    records = list(records)
    if records and all(r.get("accelerator") == "cpu" and r.get("epoch_cpu_time_s") for r in records):
        return "cpu"
    return "wall"


def overhead_table(records: Iterable[Record], measure: str | None = None) -> list[dict[str, Any]]:
    """Time per training epoch by model and batch size, each variant and its overhead over vanilla.

    Uses the baseline (batch 64) and the batch-size experiment; a row per (dataset, model, batch size) with
    ``{variant: mean epoch seconds}`` and ``{variant: overhead fraction}`` (e.g. 0.17 for 17 % slower).
    ``measure`` is ``"wall"`` or ``"cpu"`` (default: :func:`time_measure` of the records used).

    Example:
        >>> runs = [{"dataset": "digits", "experiment": "baseline", "level": "baseline", "model": "mlp",
        ...          "variant": v, "seed": 0, "recipe": {"batch_size": 64}, "epoch_time_s": t}
        ...         for v, t in (("vanilla", 1.0), ("batchnorm", 1.2))]
        >>> row = overhead_table(runs)[0]
        >>> row["batch_size"], row["measure"], round(row["overhead"]["batchnorm"], 2)
        (64, 'wall', 0.2)
    """
    used = [r for r in records if r["experiment"] in ("baseline", "batch_size")]
    measure = measure or time_measure(used)
    field_name = "epoch_cpu_time_s" if measure == "cpu" else "epoch_time_s"
    if not used:
        return []
    # the mean over seeds of cell_stats, by batch size: the baseline is the batch-size factor's 64
    by = ["dataset", "model", "batch_size", "variant"]
    times = cell_stats(runs_frame(used, (field_name,)), by)[f"{field_name}_mean"].unstack("variant")
    times = times.sort_index().sort_index(axis=1)
    out = []
    for (dataset, model, bs), row in times.iterrows():
        time = {str(v): float(t) for v, t in row.items() if not math.isnan(t)}
        base = time.get("vanilla")
        overhead = {v: t / base - 1.0 for v, t in time.items() if v != "vanilla" and base}
        out.append(
            {"dataset": dataset, "model": model, "batch_size": int(bs), "time": time, "measure": measure,
             "overhead": overhead}
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# findings


@dataclass
class Finding:
    """One published claim, this study's verdict on it, the evidence and the caveats."""

    key: str
    title: str
    claim: str
    verdict: str
    evidence: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    #: the claim's headline number: ``(value, spread, unit)``; ``unit`` is ``"points"`` (an accuracy
    #: difference, spread = the draw threshold) or ``"ratio"`` (a measurement of the variant over the
    #: reference's, spread = 0); ``None`` when nothing was measured
    effect: tuple[float, float, str] | None = None
    source: str = ""

    def note(self, comp: Comparison) -> None:
        """Make ``comp`` the headline effect unless one is set already."""
        if self.effect is None and not math.isnan(comp.delta):
            self.effect = (comp.delta, comp.threshold, "points")

    @property
    def text(self) -> str:
        parts = [f"**{self.verdict.capitalize()}.**", *self.evidence]
        if self.caveats:
            parts.append("Caveats: " + "; ".join(self.caveats) + ".")
        return " ".join(parts)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _verdict(checks: Sequence[bool | None]) -> str:
    if not checks:
        return "not run"
    if all(c is True for c in checks):
        return "reproduced"
    if any(c is True for c in checks):
        return "partly reproduced"
    if any(c is False for c in checks):
        return "not reproduced"
    return "not shown"


def _outcome_check(outcome: str, expected: str) -> bool | None:
    """True when the outcome is the expected one; None for an unexpected draw; False otherwise."""
    if outcome == expected:
        return True
    return None if outcome == "draw" else False


class _Ctx:
    def __init__(self, records: Sequence[Record], draw_margin: float) -> None:
        self.records = records
        self.margin = draw_margin
        self.table = cells(records)
        self.datasets = sorted({k[0] for k in self.table})
        self.models = [m for m in ("mlp", "cnn") if any(k[3] == m for k in self.table)] + sorted(
            {k[3] for k in self.table} - {"mlp", "cnn"}
        )

    def cell(
        self, experiment: str, level: str, model: str, variant: str, dataset: str | None = None
    ) -> Cell | None:
        for ds in [dataset] if dataset else self.datasets:
            c = self.table.get((ds, experiment, level, model, variant))
            if c is not None:
                return c
        return None

    def all_levels(self, experiment: str) -> list[str]:
        return list(dict.fromkeys(k[2] for k in self.table if k[1] == experiment))

    def levels(self, experiment: str, model: str) -> list[str]:
        seen: list[str] = []
        for k in self.table:
            if k[1] == experiment and k[3] == model and k[2] not in seen:
                seen.append(k[2])
        return seen

    def caveats_for(self, *cs: Cell | None, ceiling: bool = False) -> list[str]:
        present = [c for c in cs if c is not None]
        out = []
        capped = [r for c in present for r in c.runs if _capped(r)]
        if capped:
            caps = []
            if any(r.get("stop_reason") != "max_steps" for r in capped):
                caps.append(f"{max(int(r.get('max_epochs') or 0) for r in capped)}-epoch")
            if any(r.get("stop_reason") == "max_steps" for r in capped):
                caps.append(f"{max(int(r.get('max_steps') or 0) for r in capped)}-step")
            out.append(
                f"{len(capped)} of these {sum(c.n for c in present)} runs were still improving when the "
                f"{' or '.join(caps)} cap ended them (best validation accuracy in the last quarter of their "
                "epochs), so longer training could change the numbers"
            )
        if present and min(c.n for c in present) < 2:
            out.append(
                f"one seed: no spread is known, a difference of at most {100 * self.margin:.1f} points is a draw"
            )
        if ceiling and present and all(c.mean() >= CEILING for c in present):
            out.append(
                f"all of them score at least {100 * CEILING:.0f} %: the data is too easy to separate them"
            )
        return out


def _cmp_text(comp: Comparison, what: str) -> str:
    v, r = comp.variant, comp.reference
    sd = lambda c: f" ± {100 * c.sd():.1f}" if c.n >= 2 else ""  # noqa: E731
    return (
        f"{what}: {v.variant} {100 * v.mean():.1f}{sd(v)} % vs {r.variant} {100 * r.mean():.1f}{sd(r)} % "
        f"({_pts(comp.delta)}, draw threshold {100 * comp.threshold:.1f}): {comp.outcome}."
    )


def _f_baseline(ctx: _Ctx) -> Finding:
    f = Finding("accuracy", "BN gives higher accuracy and faster convergence", "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        van, bn = (
            ctx.cell("baseline", "baseline", model, "vanilla"),
            ctx.cell("baseline", "baseline", model, "batchnorm"),
        )
        if van is None or bn is None:
            continue
        comp = compare(bn, van, ctx.margin)
        f.note(comp)
        checks.append(_outcome_check(comp.outcome, "win"))
        f.evidence.append(_cmp_text(comp, f"{model.upper()} baseline test accuracy"))
        target = 0.99 * min(bn.mean("best_val_acc"), van.mean("best_val_acc"))
        e_bn, e_van = _mean_epochs_to(bn, target), _mean_epochs_to(van, target)
        if e_bn is not None and e_van is not None:
            faster = None if e_bn == e_van else e_bn < e_van
            checks.append(faster)
            f.evidence.append(
                f"Epochs to reach {100 * target:.1f} % validation accuracy (99 % of the lower best): "
                f"batchnorm {e_bn:.1f}, vanilla {e_van:.1f}."
            )
        involved += [van, bn]
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved, ceiling=True)
    return f


def _f_rescue(ctx: _Ctx, key: str, title: str, experiment: str, level: str, faster: bool = False) -> Finding:
    """Claims of the form "vanilla is stuck while BN trains (better, faster)"."""
    f = Finding(key, title, "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        van, bn = (
            ctx.cell(experiment, level, model, "vanilla"),
            ctx.cell(experiment, level, model, "batchnorm"),
        )
        if van is None or bn is None:
            continue
        comp = compare(bn, van, ctx.margin)
        f.note(comp)
        checks.append(van.stuck)
        checks.append(_outcome_check(comp.outcome, "win") if not bn.stuck else False)
        f.evidence.append(
            f"{model.upper()}: vanilla {'is stuck near chance' if van.stuck else 'trains'} "
            f"({_pct(van.mean())}, chance {_pct(van.chance)}); batchnorm "
            f"{'is stuck too' if bn.stuck else 'trains'} ({_pct(bn.mean())}); {comp.outcome} for batchnorm "
            f"({_pts(comp.delta)}, threshold {100 * comp.threshold:.1f})."
        )
        if faster and not van.stuck and not bn.stuck:
            target = 0.99 * min(bn.mean("best_val_acc"), van.mean("best_val_acc"))
            e_bn, e_van = _mean_epochs_to(bn, target), _mean_epochs_to(van, target)
            if e_bn is not None and e_van is not None:
                checks.append(None if e_bn == e_van else e_bn < e_van)
                f.evidence.append(
                    f"Epochs to {100 * target:.1f} % validation accuracy: batchnorm {e_bn:.1f}, vanilla {e_van:.1f}."
                )
        involved += [van, bn]
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved)
    if f.verdict not in ("reproduced", "not run") and involved and not any(c.stuck for c in involved if c):
        f.caveats.append(
            "the seed's networks were deeper and trained on harder data; on this data the vanilla network "
            "does not get stuck, so the rescue cannot be shown"
        )
    return f


def _f_weight_decay(ctx: _Ctx) -> Finding:
    f = Finding("weight_decay", "Weight decay 5e-4 helps both, BN stays ahead", "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        levels = ctx.levels("weight_decay", model)
        if not levels:
            continue
        level = levels[0]
        cs = {v: ctx.cell("weight_decay", level, model, v) for v in ("vanilla", "batchnorm")}
        base = {v: ctx.cell("baseline", "baseline", model, v) for v in ("vanilla", "batchnorm")}
        if any(c is None for c in (*cs.values(), *base.values())):
            continue
        for v in ("vanilla", "batchnorm"):
            comp = compare(cs[v], base[v], ctx.margin)  # type: ignore[arg-type]
            checks.append(_outcome_check(comp.outcome, "win"))
            f.evidence.append(
                f"{model.upper()} {v}: {_pct(cs[v].mean())} with weight decay vs {_pct(base[v].mean())} "  # type: ignore[union-attr]
                f"without ({comp.outcome} for weight decay)."
            )
        comp = compare(cs["batchnorm"], cs["vanilla"], ctx.margin)  # type: ignore[arg-type]
        f.note(comp)
        checks.append(_outcome_check(comp.outcome, "win"))
        f.evidence.append(_cmp_text(comp, f"{model.upper()} with weight decay"))
        involved += [*cs.values(), *base.values()]
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved, ceiling=True)
    return f


def _f_dropout(ctx: _Ctx) -> Finding:
    f = Finding("dropout", "Dropout 0.5: a draw", "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        for level in ctx.levels("dropout", model):
            van, bn = (
                ctx.cell("dropout", level, model, "vanilla"),
                ctx.cell("dropout", level, model, "batchnorm"),
            )
            if van is None or bn is None:
                continue
            comp = compare(bn, van, ctx.margin)
            f.note(comp)
            checks.append(comp.outcome == "draw")
            f.evidence.append(_cmp_text(comp, f"{model.upper()} with dropout {level}"))
            involved += [van, bn]
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved)
    return f


def _batch_size_of(ctx: _Ctx, model: str) -> list[tuple[int, str, str]]:
    """(batch size, experiment, level) of every batch size run for ``model``, the baseline included."""
    out = []
    for level in ctx.levels("batch_size", model):
        c = ctx.cell("batch_size", level, model, "vanilla") or ctx.cell(
            "batch_size", level, model, "batchnorm"
        )
        if c is not None:
            out.append((int((c.runs[0].get("recipe") or {}).get("batch_size", 0)), "batch_size", level))
    if ctx.cell("baseline", "baseline", model, "vanilla") is not None:
        c = ctx.cell("baseline", "baseline", model, "vanilla")
        assert c is not None
        out.append((int((c.runs[0].get("recipe") or {}).get("batch_size", 64)), "baseline", "baseline"))
    return sorted(out)


def _f_batch_sizes(ctx: _Ctx) -> Finding:
    f = Finding("batch_size", "BN is ahead at every batch size from 32 to 1024", "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        if not ctx.levels("batch_size", model):
            continue
        parts = []
        for bs, exp, level in _batch_size_of(ctx, model):
            if not 32 <= bs <= 1024:
                continue
            van, bn = ctx.cell(exp, level, model, "vanilla"), ctx.cell(exp, level, model, "batchnorm")
            if van is None or bn is None:
                continue
            comp = compare(bn, van, ctx.margin)
            f.note(comp)
            checks.append(_outcome_check(comp.outcome, "win"))
            parts.append(f"{bs}: {_pts(comp.delta)} ({comp.outcome})")
            involved += [van, bn]
        if parts:
            f.evidence.append(
                f"{model.upper()}, batchnorm minus vanilla by batch size: " + ", ".join(parts) + "."
            )
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved, ceiling=True)
    if involved and any(c is not None and c.capped for c in involved):
        f.caveats.append(
            "large batches take few steps per epoch, so an epoch cap limits them most: their losses say more about "
            "the cap than about BatchNorm"
        )
    return f


def _recovery(ctx: _Ctx, f: Finding, settings: Sequence[tuple[str, str, str]]) -> list[bool | None]:
    """Ioffe 2017's two checks in each setting ``(experiment, level, label)``: BN loses to vanilla, and
    Batch Renormalization recovers at least half of that loss (and beats BN beyond the draw threshold)."""
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        for experiment, level, label in settings:
            van, bn, rn, noisy = (
                ctx.cell(experiment, level, model, v) for v in ("vanilla", "batchnorm", "renorm", "noisy")
            )
            if van is None or bn is None:
                continue
            loss = compare(bn, van, ctx.margin)
            checks.append(_outcome_check(loss.outcome, "loss"))
            f.evidence.append(_cmp_text(loss, f"{model.upper()} {label}, BN vs vanilla"))
            involved += [van, bn, rn, noisy]
            if rn is not None:
                gain = compare(rn, bn, ctx.margin)
                lost = -loss.delta
                if loss.outcome == "loss" and lost > 0:
                    share = gain.delta / lost
                    if f.effect is None:
                        f.effect = (gain.delta, gain.threshold, "points")
                    checks.append(gain.outcome == "win" and share >= 0.5)
                    f.evidence.append(
                        f"Batch Renormalization {_pct(rn.mean())}: {_pts(gain.delta)} over BN ({gain.outcome}), "
                        f"{100 * share:.0f} % of BN's loss recovered."
                    )
                else:
                    f.evidence.append(
                        f"Batch Renormalization {_pct(rn.mean())} ({_pts(gain.delta)} over BN)."
                    )
            if noisy is not None:
                f.evidence.append(f"Noisy BN {_pct(noisy.mean())}.")
    f.caveats = ctx.caveats_for(*involved)
    return checks


def _f_small_batch(ctx: _Ctx) -> Finding:
    f = Finding("small_batch", "Tiny batches: BN loses accuracy, Batch Renormalization recovers it", "", "")
    settings = []
    for model in ctx.models:
        for bs, exp, level in _batch_size_of(ctx, model):
            if bs <= 8 and (exp, level, f"at batch size {bs}") not in settings:
                settings.append((exp, level, f"at batch size {bs}"))
    checks = _recovery(ctx, f, settings)
    f.verdict = _verdict(checks)
    return f


def _f_non_iid(ctx: _Ctx) -> Finding:
    f = Finding("non_iid", "Non-i.i.d. batches: BN loses accuracy, Batch Renormalization recovers it", "", "")
    settings = [("non_iid", level, f"with {level}") for level in ctx.all_levels("non_iid")]
    f.verdict = _verdict(_recovery(ctx, f, settings))
    return f


def _f_renorm_acted(ctx: _Ctx) -> Finding:
    """Whether Batch Renormalization's correction was active after its (scaled) warm-up."""
    f = Finding("renorm_acted", "Batch Renormalization acted after its warm-up", "", "")
    checks: list[bool | None] = []
    for cell in ctx.table.values():
        if cell.variant != "renorm":
            continue
        runs = [r for r in cell.runs if (r.get("renorm") or {}).get("after_warmup")]
        if not runs:
            continue
        layers = list(runs[0]["renorm"]["after_warmup"])
        summary = {
            layer: {
                key: finite_mean(r["renorm"]["after_warmup"].get(layer, {}).get(key) for r in runs)
                for key in ("r_at_bound", "d_at_bound", "mean_abs_r_minus_1", "mean_abs_d")
            }
            for layer in layers
        }
        acted = all(v["mean_abs_d"] > 0 or v["mean_abs_r_minus_1"] > 0 for v in summary.values())
        checks.append(acted)
        sched = runs[0]["renorm"]["schedule"]
        setting = "baseline" if cell.experiment == "baseline" else f"{cell.experiment}: {cell.level}"
        f.evidence.append(
            f"{cell.model.upper()} {setting} (schedule: warm-up {sched['warmup_steps']} steps, d_max 5 at "
            f"{sched['d_max_steps']}, r_max 3 at {sched['r_max_steps']} of {sched['total_steps']}): "
            + ", ".join(
                f"{layer} r at a bound {100 * v['r_at_bound']:.0f} %, d at a bound {100 * v['d_at_bound']:.0f} %, "
                f"mean |r-1| {v['mean_abs_r_minus_1']:.2f}, mean |d| {v['mean_abs_d']:.2f}"
                for layer, v in summary.items()
            )
            + "."
        )
    f.verdict = _verdict(checks)
    if checks:
        f.caveats.append(
            "measured after the warm-up, as averages over the sampled steps and the seeds; 'at a bound' is the "
            "fraction of channels whose r or d the clip held"
        )
    return f


def _diag_run(cell: Cell | None) -> Record | None:
    return next((r for r in cell.runs if r.get("diagnostics")), None) if cell is not None else None


def _diag_measure(record: Record | None, name: str) -> float | None:
    """One number per run from a monitor's history (see :data:`MEASURES`); ``None`` when it was not recorded."""
    history = ((record or {}).get("diagnostics") or {}).get(name) or []
    if not history:
        return None
    value = MEASURES[name](history)
    return None if math.isnan(value) else value


def _ics(history: Sequence[Record]) -> float:
    # Santurkar's l2 distance, averaged over samples and the layers after the first (whose G' = G)
    return finite_mean(v["l2"] for h in history for v in list(h["layers"].values())[1:])


def _beta(history: Sequence[Record]) -> float:
    return finite_mean(h.get("beta") for h in history)


def _weight_growth(history: Sequence[Record]) -> float:
    first, last = history[0]["layers"], history[-1]["layers"]
    return finite_mean(last[n]["norm"] / first[n]["norm"] for n in first if n in last and first[n]["norm"])


def _isometry_gap(history: Sequence[Record]) -> float:
    # |log rms singular value|: 0 for an isometry
    return finite_mean(
        abs(math.log(v["rms"]))
        for h in history
        for v in h["layers"].values()
        if v.get("rms") and v["rms"] > 0
    )


#: A measurement claim needs the variant's measure to differ from the reference's by more than this fraction:
#: it rests on one seed (no spread is known), so a difference under 10 % is "not shown" rather than a verdict.
MEASURE_MARGIN = 0.10

#: One number per diagnostics run for each "why BN works" measure.
MEASURES = {"ics": _ics, "landscape": _beta, "weight_norm": _weight_growth, "jacobian": _isometry_gap}


def _f_measure(
    ctx: _Ctx, key: str, title: str, name: str, what: str, variant: str, reference: str, smaller: bool
) -> Finding:
    """A measurement claim: ``variant``'s measure ``name`` is smaller (or larger) than ``reference``'s, at the
    baseline and with sigmoid, on the first seed (the run that records diagnostics)."""
    f = Finding(key, title, "", "")
    checks: list[bool | None] = []
    for model in ctx.models:
        for experiment, level in (("baseline", "baseline"), ("activation", "sigmoid")):
            a = _diag_measure(_diag_run(ctx.cell(experiment, level, model, variant)), name)
            b = _diag_measure(_diag_run(ctx.cell(experiment, level, model, reference)), name)
            if a is None or b is None:
                continue
            ratio = a / b if b else math.inf
            if abs(ratio - 1.0) < MEASURE_MARGIN:  # one seed, no spread: a small difference decides nothing
                checks.append(None)
            else:
                checks.append(ratio < 1.0 if smaller else ratio > 1.0)
            if f.effect is None and math.isfinite(ratio):
                f.effect = (ratio, 0.0, "ratio")
            setting = "baseline" if experiment == "baseline" else "sigmoid"
            f.evidence.append(
                f"{model.upper()} {setting}, {what}: {variant} {a:.3g}, {reference} {b:.3g} (ratio {ratio:.2f})."
            )
    f.verdict = _verdict(checks)
    if checks:
        f.caveats.append(
            "one seed (the first records the diagnostics): no spread is known, so a ratio within "
            f"{100 * MEASURE_MARGIN:.0f} % of 1 is not shown either way"
        )
    return f


def _f_ics(ctx: _Ctx) -> Finding:
    f = _f_measure(
        ctx, "ics", "Noisy BN has more internal covariate shift than BN", "ics",
        "internal covariate shift (mean ‖G − G'‖, G' with the next step's noise)", "noisy", "batchnorm", smaller=False,
    )  # fmt: skip
    for model in ctx.models:  # "yet trains about as well as BN"
        noisy, bn = (ctx.cell("baseline", "baseline", model, v) for v in ("noisy", "batchnorm"))
        if noisy is not None and bn is not None and f.verdict != "not run":
            comp = compare(noisy, bn, ctx.margin)
            f.evidence.append(_cmp_text(comp, f"{model.upper()} baseline accuracy, noisy BN vs BN"))
    return f


def _f_landscape(ctx: _Ctx) -> Finding:
    return _f_measure(
        ctx, "landscape", "BN makes the loss smoother along the gradient", "landscape",
        "effective β-smoothness (mean over samples)", "batchnorm", "vanilla", smaller=True,
    )  # fmt: skip


def _f_weight_norm(ctx: _Ctx) -> Finding:
    return _f_measure(
        ctx, "weight_norm", "BN limits the growth of the weight norms", "weight_norm",
        "weight-norm growth (last / first sample, mean over layers)", "batchnorm", "vanilla", smaller=True,
    )  # fmt: skip


def _f_jacobian(ctx: _Ctx) -> Finding:
    return _f_measure(
        ctx, "jacobian", "BN keeps the Jacobian's singular values nearer 1", "jacobian",
        "|log rms singular value| of the blocks' Jacobians (0: an isometry)", "batchnorm", "vanilla",
        smaller=True,
    )  # fmt: skip


def _f_walltime(ctx: _Ctx) -> Finding:
    f = Finding("walltime", "BN costs 15-20 % more time per epoch", "", "")
    table = overhead_table(ctx.records)
    rows = [r for r in table if "batchnorm" in r["overhead"]]
    checks: list[bool | None] = []
    if rows:
        measure = rows[0]["measure"]
        overheads = [r["overhead"]["batchnorm"] for r in rows]
        median = statistics.median(overheads)
        checks.append(median > 0.02)
        checks.append(0.10 <= median <= 0.30)
        f.evidence.append(
            f"BN's overhead per training epoch ({'CPU' if measure == 'cpu' else 'wall'} time): "
            + ", ".join(
                f"{r['model'].upper()} batch {r['batch_size']}: {100 * r['overhead']['batchnorm']:+.0f} %"
                for r in rows
            )
            + f"; median {100 * median:+.0f} % (counted as reproduced when the median is within 10-30 %)."
        )
        faster = [r for r in rows if r["overhead"]["batchnorm"] < -0.02]
        if faster:  # the noise is larger than the effect: nothing can be concluded either way
            checks = [None]
            sizes = ", ".join(f"{r['model'].upper()} batch {r['batch_size']}" for r in faster)
            f.caveats.append(
                f"BN appears faster than vanilla at {sizes}, which it cannot be for the same work plus "
                "normalization: these timings are noisier than the effect (a shared, virtualized or throttled "
                "machine); rerun on an idle machine, or with several seeds, to measure the overhead"
            )
        devices = {str(run.get("device")) for run in ctx.records}
        f.caveats.append(
            "time depends on the hardware; tiny networks are dominated by per-step framework overhead, which "
            f"BN's share of the work does not change (device: {', '.join(sorted(devices))})"
        )
        if measure == "cpu":
            f.caveats.append(
                "measured as the process's CPU time per training epoch (one thread: the wall time of an idle "
                "machine, without the waits for a core that other processes cause; results.json also holds "
                "the wall times)"
            )
    f.verdict = _verdict(checks)
    return f


def _f_activations(ctx: _Ctx) -> Finding:
    f = Finding("activations", "BN helps with every activation, most with sigmoid", "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        levels = ctx.levels("activation", model)
        if not levels:
            continue
        deltas: dict[str, float] = {}
        parts = []
        for exp, level in [("baseline", "baseline"), *(("activation", lv) for lv in levels)]:
            van, bn = ctx.cell(exp, level, model, "vanilla"), ctx.cell(exp, level, model, "batchnorm")
            if van is None or bn is None:
                continue
            comp = compare(bn, van, ctx.margin)
            f.note(comp)
            name = "relu" if exp == "baseline" else level
            deltas[name] = comp.delta
            checks.append(_outcome_check(comp.outcome, "win"))
            parts.append(f"{name} {_pts(comp.delta)} ({comp.outcome})")
            involved += [van, bn]
        if parts:
            f.evidence.append(f"{model.upper()}, batchnorm minus vanilla: " + ", ".join(parts) + ".")
        if "sigmoid" in deltas and len(deltas) > 1:
            largest = max(deltas, key=lambda k: deltas[k])
            checks.append(largest == "sigmoid")
            f.evidence.append(f"The largest gain is with {largest}.")
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved)
    return f


def _f_optimizer(ctx: _Ctx) -> Finding:
    f = Finding("optimizer", "ReLU-SGD with BN is about as good as ReLU-Adam without", "", "")
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        for level in ctx.levels("optimizer", model):
            adam = ctx.cell("optimizer", level, model, "vanilla")
            sgd_bn = ctx.cell("baseline", "baseline", model, "batchnorm")
            if adam is None or sgd_bn is None:
                continue
            comp = compare(sgd_bn, adam, ctx.margin)
            f.note(comp)
            checks.append(comp.outcome == "draw")
            f.evidence.append(
                f"{model.upper()}: SGD with batchnorm {_pct(sgd_bn.mean())} vs {level} without "
                f"{_pct(adam.mean())} ({_pts(comp.delta)}, threshold {100 * comp.threshold:.1f}): {comp.outcome}."
            )
            adam_bn = ctx.cell("optimizer", level, model, "batchnorm")
            if adam_bn is not None:
                f.evidence.append(f"{level} with batchnorm: {_pct(adam_bn.mean())}.")
            involved += [adam, sgd_bn]
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved)
    return f


def _f_noisy(ctx: _Ctx) -> Finding:
    f = Finding(
        "noisy",
        "Noisy BN still beats vanilla (Santurkar et al.): stable input distributions are not why BN works",
        "",
        "",
    )
    checks: list[bool | None] = []
    involved: list[Cell | None] = []
    for model in ctx.models:
        van, bn, noisy = (
            ctx.cell("baseline", "baseline", model, v) for v in ("vanilla", "batchnorm", "noisy")
        )
        if van is None or noisy is None:
            continue
        comp = compare(noisy, van, ctx.margin)
        f.note(comp)
        checks.append(_outcome_check(comp.outcome, "win"))
        f.evidence.append(_cmp_text(comp, f"{model.upper()} baseline, noisy BN vs vanilla"))
        if bn is not None:
            f.evidence.append(f"Plain batchnorm: {_pct(bn.mean())}.")
        involved += [van, noisy]
    f.verdict = _verdict(checks)
    f.caveats = ctx.caveats_for(*involved, ceiling=True)
    noise = next(
        (r.get("noise") for c in involved if c is not None and c.variant == "noisy" for r in c.runs), None
    )
    if noise:
        f.caveats.append(
            f"the noise: mean_range {noise['mean_range']}, std_range {tuple(noise['std_range'])}; how much "
            "accuracy the noise costs grows with its size (see docs/study.md)"
        )
    return f


def _first_layer_grad(record: Record) -> tuple[float, float] | None:
    """Mean |grad| of the first and of the last monitored layer, averaged over the first epoch's samples."""
    flow = ((record.get("diagnostics") or {}).get("gradient_flow")) or []
    if not flow:
        return None
    first_epoch = [r for r in flow if r.get("epoch") == flow[0].get("epoch")]
    layers = list(first_epoch[0].get("layers", {}))
    if not layers:
        return None

    def mean_of(layer: str) -> float:
        return _mean(
            [float(r["layers"][layer]["mean_abs"]) for r in first_epoch if layer in r.get("layers", {})]
        )

    return mean_of(layers[0]), mean_of(layers[-1])


def _f_gradient_flow(ctx: _Ctx) -> Finding:
    f = Finding("gradient_flow", "With sigmoid, BN keeps the first layers' gradients alive", "", "")
    checks: list[bool | None] = []
    for model in ctx.models:
        runs = {
            v: next((r for r in c.runs if r.get("diagnostics")), None)
            for v in ("vanilla", "batchnorm")
            if (c := ctx.cell("activation", "sigmoid", model, v)) is not None
        }
        van, bn = runs.get("vanilla"), runs.get("batchnorm")
        g_van, g_bn = (_first_layer_grad(r) if r else None for r in (van, bn))
        if g_van is None or g_bn is None:
            continue
        checks.append(g_bn[0] > 2 * g_van[0])
        if f.effect is None and g_van[0] > 0:
            f.effect = (g_bn[0] / g_van[0], 0.0, "ratio")
        f.evidence.append(
            f"{model.upper()} with sigmoid, mean |gradient| of the first layer in the first epoch: batchnorm "
            f"{g_bn[0]:.2e}, vanilla {g_van[0]:.2e} (last layer: {g_bn[1]:.2e} and {g_van[1]:.2e})."
        )
    f.verdict = _verdict(checks)
    if checks:
        f.caveats.append("counted as reproduced when BN's first-layer gradient is more than twice vanilla's")
    return f


@dataclass(frozen=True)
class Claim:
    """One published claim: its text and source, the runs it needs, and the check that decides it.

    :data:`CLAIMS` is the one registry: :func:`findings` runs every ``decide``, the report's verdict figure,
    findings section and per-factor "published claims" are generated from it.
    """

    key: str
    text: str
    source: str
    #: the factors whose runs it reads (the report lists it under each of them)
    factors: tuple[str, ...]
    #: what to select to run it (``--factors ...``), shown when the study did not run it
    needs: str
    decide: Callable[[_Ctx], Finding]


def _claims(*claims: Claim) -> dict[str, Claim]:
    return {c.key: c for c in claims}


def _rescue(
    key: str, title: str, experiment: str, level: str, faster: bool = False
) -> Callable[[_Ctx], Finding]:
    return lambda ctx: _f_rescue(ctx, key, title, experiment, level, faster)


SCHILLING = "Schilling, The effect of batch normalization on deep CNNs"
MLP_STUDY = "Schilling's MNIST MLP study"
SANTURKAR = "Santurkar et al. 2018, How does batch normalization help optimization?"
IOFFE_2015 = "Ioffe & Szegedy 2015"
IOFFE_2017 = "Ioffe 2017, Batch Renormalization, sections 4.2-4.3"

#: The claims of the study, in report order.
CLAIMS: dict[str, Claim] = _claims(
    Claim("accuracy", "BN gives a higher accuracy and converges in fewer epochs.", f"{SCHILLING}; {IOFFE_2015}",
          ("baseline",), "baseline", _f_baseline),
    Claim("sigmoid", "With sigmoid (+ Xavier init) vanilla is stuck at chance while BN trains.", SCHILLING,
          ("activation",), "activation:sigmoid",
          _rescue("sigmoid", "Sigmoid: vanilla stuck, BN trains", "activation", "sigmoid")),
    Claim("lr", "With a learning rate x10 (0.1) vanilla is stuck while BN trains, better and faster.", SCHILLING,
          ("lr",), "lr",
          _rescue("lr", "Learning rate x10: vanilla stuck, BN better and faster", "lr", "lr=0.1", faster=True)),
    Claim("init", "With N(0, 1) initialization vanilla is stuck while BN trains.", SCHILLING, ("init",), "init",
          _rescue("init", "N(0, 1) initialization: vanilla stuck, BN trains", "init", "normal(1.0)")),
    Claim("weight_decay", "L2 weight decay 5e-4 improves both, and BN stays ahead.", SCHILLING,
          ("weight_decay",), "baseline,weight_decay", _f_weight_decay),
    Claim("dropout", "With dropout 0.5 vanilla and BN draw.", SCHILLING, ("dropout",), "dropout", _f_dropout),
    Claim("batch_size", "BN is ahead at every batch size from 32 to 1024.", SCHILLING, ("batch_size",),
          "baseline,batch_size", _f_batch_sizes),
    Claim("small_batch", "BN hurts with tiny batches (2, 4, 8); Batch Renormalization recovers most of the loss.",
          f"{MLP_STUDY}; {IOFFE_2017}", ("batch_size",),
          "batch_size:bs=4 with --variants vanilla,batchnorm,renorm", _f_small_batch),
    Claim("non_iid", "With non-i.i.d. batches (each from two classes) BN loses accuracy; Batch Renormalization "
          "recovers most of it.", IOFFE_2017, ("non_iid",), "non_iid with --variants vanilla,batchnorm,renorm",
          _f_non_iid),
    Claim("renorm_acted", "Batch Renormalization corrects the batch statistics (r != 1, d != 0) once its warm-up "
          "ends; otherwise it is BatchNorm.", IOFFE_2017, ("baseline", "batch_size", "non_iid"),
          "any setting with --variants renorm", _f_renorm_acted),
    Claim("walltime", "BN costs 15-20 % more wall time per epoch.", f"{SCHILLING}, Table B.4",
          ("baseline", "batch_size"), "baseline,batch_size", _f_walltime),
    Claim("activations", "BN helps with every activation (relu, leaky relu, sigmoid, softplus, tanh), most with "
          "sigmoid.", MLP_STUDY, ("activation",), "baseline,activation", _f_activations),
    Claim("optimizer", "ReLU-SGD with BN is about as good as ReLU-Adam without BN.", MLP_STUDY, ("optimizer",),
          "baseline,optimizer", _f_optimizer),
    Claim("noisy", "BN with noise injected after it (unstable layer inputs) still trains better than vanilla.",
          SANTURKAR, ("baseline",), "baseline with --variants vanilla,batchnorm,noisy", _f_noisy),
    Claim("ics", "Noisy BN has more internal covariate shift than BN, yet trains about as well: a stable input "
          "distribution is not why BN works.", SANTURKAR, ("baseline", "activation"),
          "baseline,activation:sigmoid with --variants vanilla,batchnorm,noisy", _f_ics),
    Claim("landscape", "BN makes the loss landscape smoother: a smaller effective β-smoothness along the "
          "gradient.", SANTURKAR, ("baseline", "activation"), "baseline,activation:sigmoid", _f_landscape),
    Claim("weight_norm", "BN limits the growth of the weight norms.", f"{SCHILLING}; {SANTURKAR}",
          ("baseline", "activation"), "baseline,activation:sigmoid", _f_weight_norm),
    Claim("gradient_flow", "With sigmoid, BN keeps the gradients of the first layers alive where vanilla's "
          "vanish (e.g. 0.1 vs 0.02).", SCHILLING, ("activation",), "activation:sigmoid", _f_gradient_flow),
    Claim("jacobian", "BN pushes the singular values of the layers' input-output Jacobians towards 1 "
          "(dynamical isometry).", f"{SCHILLING}; Pennington et al. 2017", ("baseline", "activation"),
          "baseline,activation:sigmoid", _f_jacobian),
)  # fmt: skip


def claims_for(factor: str) -> list[Claim]:
    """The claims that read the runs of ``factor``.

    Example:
        >>> [c.key for c in claims_for("non_iid")]
        ['non_iid', 'renorm_acted']
    """
    return [c for c in CLAIMS.values() if factor in c.factors]


def findings(records: Sequence[Record], draw_margin: float = 0.01) -> list[Finding]:
    """The verdict on each claim of :data:`CLAIMS`, computed from the records alone."""
    ctx = _Ctx(records, draw_margin)
    out = []
    for claim in CLAIMS.values():
        f = claim.decide(ctx)
        f.key = claim.key
        f.claim = f"{claim.text} ({claim.source})"
        f.source = claim.source
        if f.verdict == "not run":
            f.evidence = [f"This study did not run the settings it needs (--factors {claim.needs})."]
            f.caveats = []
            f.effect = None
        out.append(f)
    return out
