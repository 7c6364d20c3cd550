"""The study's report: ``report.md``, ``report.html`` and PNG figures, written from ``results.json`` alone.

Every number and every verdict of the report is computed here from the records of ``results.json`` (through
:mod:`normzoo.study.stats`), never from the training process, so ``normzoo study --report-only`` rewrites the
same report from the file, and an edited or merged ``results.json`` gives a report that matches it.

The report is a list of blocks (headings, paragraphs, tables, images, lists) rendered twice: as Markdown and
as a self-contained HTML page (figures are the same PNG files, referenced relatively).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stats
from .grid import FACTORS

__all__ = ["build_blocks", "load_results", "render_html", "render_markdown", "write_report"]

if TYPE_CHECKING:
    import pandas as pd

Record = Mapping[str, Any]

_VARIANT_ORDER = ("vanilla", "batchnorm", "renorm", "noisy")
_VARIANT_COLORS = {"vanilla": "#d1495b", "batchnorm": "#00798c", "renorm": "#edae49", "noisy": "#66a182"}


# ---------------------------------------------------------------------------------------------------------
# blocks


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    path: str  # relative to the report
    alt: str


@dataclass
class Bullets:
    items: list[str]


Block = Heading | Para | Table | Image | Bullets


def load_results(out: str | Path) -> dict[str, Any]:
    """The parsed ``results.json`` of the study in ``out`` (the folder or the file itself).

    Example:
        >>> path = getfixture("tmp_path") / "results.json"
        >>> _ = path.write_text('{"study": {}, "runs": []}')
        >>> load_results(path.parent)["runs"]
        []
    """
    path = Path(out)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a normzoo study results file (no 'runs' list)")
    return data


def _pct(x: float | None, sd: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if sd is not None and sd > 0:
        return f"{100 * x:.1f} ± {100 * sd:.1f}"
    return f"{100 * x:.1f}"


def _variants(records: Sequence[Record]) -> list[str]:
    present = {str(r["variant"]) for r in records}
    return [v for v in _VARIANT_ORDER if v in present] + sorted(present - set(_VARIANT_ORDER))


def _models(records: Sequence[Record]) -> list[str]:
    present = {str(r["model"]) for r in records}
    return [m for m in ("mlp", "cnn") if m in present] + sorted(present - {"mlp", "cnn"})


def _level_label(experiment: str, level: str) -> str:
    return "baseline (relu, bs=64, lr=0.01, kaiming)" if experiment == "baseline" else level


def _factor_levels(frame: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """The levels each (experiment, model) ran: by batch size for the batch-size factor, else in the factor's
    order (levels it does not know last, by name)."""
    order = {
        (name, lv.label): float(i) for name, factor in FACTORS.items() for i, lv in enumerate(factor.levels)
    }
    runs = frame.drop_duplicates(["experiment", "model", "level"])
    rank = [
        float(bs) if experiment == "batch_size" else order.get((experiment, level), 1e9)
        for experiment, level, bs in zip(runs["experiment"], runs["level"], runs["batch_size"], strict=True)
    ]
    ordered = runs.assign(rank=rank).sort_values(["rank", "level"])
    return {
        (str(experiment), str(model)): group["level"].tolist()
        for (experiment, model), group in ordered.groupby(["experiment", "model"], sort=False)
    }


# ---------------------------------------------------------------------------------------------------------
# figures


def _new_figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    from normzoo.lightning.plotting import new_figure

    return new_figure(nrows, ncols, size=size, squeeze=False)


def _save(fig: Any, path: Path) -> None:
    from normzoo.lightning.plotting import save_png

    save_png(fig, path, dpi=80)


def _curves_figure(
    table: Mapping[tuple[str, str, str, str, str], stats.Cell],
    panels: Sequence[tuple[str, str]],
    model: str,
    variants: Sequence[str],
    path: Path,
    title: str,
) -> None:
    """Validation accuracy (top) and training loss (bottom) per epoch: a column per setting, a colour per
    variant, one line per seed."""
    fig, axes = _new_figure(2, len(panels), (3.0, 2.3))
    for col, (experiment, level) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for variant in variants:
            cell = next((c for k, c in table.items() if k[1:] == (experiment, level, model, variant)), None)
            if cell is None:
                continue
            for i, run in enumerate(cell.runs):
                hist = run.get("history") or []
                epochs = [h["epoch"] for h in hist]
                color = _VARIANT_COLORS.get(variant, "0.4")
                label = variant if i == 0 else None
                acc = [math.nan if h.get("val_acc") is None else h["val_acc"] for h in hist]
                loss = [math.nan if h.get("train_loss") is None else h["train_loss"] for h in hist]
                top.plot(epochs, acc, color=color, lw=1.2, alpha=1.0 if i == 0 else 0.45, label=label)
                bottom.plot(epochs, loss, color=color, lw=1.2, alpha=1.0 if i == 0 else 0.45)
        top.set_title(_level_label(experiment, level) if experiment != "baseline" else "baseline", fontsize=9)
        top.set_ylim(0, 1.02)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        bottom.set_xlabel("epoch", fontsize=8)
        if any(line.get_ydata().size and (line.get_ydata() > 0).any() for line in bottom.get_lines()):
            bottom.set_yscale("log")
        if col == 0:
            top.set_ylabel("validation accuracy", fontsize=8)
            bottom.set_ylabel("training loss", fontsize=8)
            top.legend(fontsize=7, frameon=False, loc="lower right")
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _first_epoch_flow(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[float], list[float]]:
    """Per layer, the mean over the first epoch's samples of mean |grad| and max |grad|."""
    if not history:
        return [], [], []
    first = [r for r in history if int(r.get("epoch", 0)) == int(history[0].get("epoch", 0))]
    layers = list(first[0].get("layers", {}))
    mean_abs = [
        _mean([r["layers"][n]["mean_abs"] for r in first if n in r.get("layers", {})]) for n in layers
    ]
    max_abs = [_mean([r["layers"][n]["max_abs"] for r in first if n in r.get("layers", {})]) for n in layers]
    return layers, mean_abs, max_abs


_mean = stats.finite_mean


def _diagnostics_figure(runs: Sequence[Record], path: Path, title: str) -> None:
    """A row per variant: gradient flow in the first epoch (bars), mean |grad| per layer over training, and
    the weight norm per layer over training."""
    from normzoo.lightning.plotting import gradient_flow_chart, layer_curves, layer_series

    fig, axes = _new_figure(len(runs), 3, (3.8, 2.7))
    for row, run in enumerate(runs):
        diag = run.get("diagnostics") or {}
        flow = diag.get("gradient_flow") or []
        norms = diag.get("weight_norm") or []
        variant = str(run["variant"])
        layers, mean_abs, max_abs = _first_epoch_flow(flow)
        if layers:
            gradient_flow_chart(
                layers, mean_abs, max_abs, ax=axes[row][0], title=f"{variant}: gradient flow, epoch 1"
            )
        if flow:
            steps, series = layer_series(flow, "mean_abs")
            layer_curves(
                steps,
                series,
                ax=axes[row][1],
                ylabel="mean |grad|",
                title=f"{variant}: mean |grad|",
                log=True,
            )
        if norms:
            steps, series = layer_series(norms, "norm")
            layer_curves(
                steps, series, ax=axes[row][2], ylabel="‖w‖", title=f"{variant}: weight norm", legend=row == 0
            )
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


_VERDICT_COLORS = {
    "reproduced": "#2e7d32",
    "partly reproduced": "#f9a825",
    "not reproduced": "#c62828",
    "not shown": "#9e9e9e",
}


def _verdict_figure(found: Sequence[stats.Finding], path: Path) -> None:
    """Every claim's verdict and headline effect: accuracy differences (points, ± the draw threshold) on the
    left, measurements (variant over reference, log scale) on the right; one row per claim, coloured by
    verdict. Claims the study did not run are left out."""
    shown = [f for f in found if f.verdict != "not run"]
    points = [f for f in shown if f.effect is None or f.effect[2] == "points"]
    ratios = [f for f in shown if f.effect is not None and f.effect[2] == "ratio"]
    rows = max(len(points), len(ratios), 1)
    fig, axes = _new_figure(1, 2, (4.6, 0.32 * rows + 1.2))
    for ax, group, ratio in ((axes[0][0], points, False), (axes[0][1], ratios, True)):
        for y, f in enumerate(reversed(group)):
            color = _VERDICT_COLORS.get(f.verdict, "0.5")
            if f.effect is not None:
                value, spread, _ = f.effect
                x = value if ratio else 100 * value
                err = None if ratio else 100 * spread
                ax.errorbar(x, y, xerr=err, fmt="o", color=color, ms=5, capsize=3, lw=1.2)
            else:
                ax.plot(0 if not ratio else 1, y, marker="x", color=color)
            ax.text(
                1.02, y, f.verdict, transform=ax.get_yaxis_transform(), fontsize=7, va="center", color=color
            )
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels([f.key for f in reversed(group)], fontsize=7)
        ax.axvline(1 if ratio else 0, color="0.6", lw=0.8)
        if ratio:
            ax.set_xscale("log")
        ax.set_xlabel(
            "measurement, variant / reference (log)"
            if ratio
            else "accuracy difference, points (± threshold)",
            fontsize=8,
        )
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="x")
        ax.set_ylim(-0.7, rows - 0.3)
    fig.suptitle("Every claim: verdict and effect", fontsize=10)
    _save(fig, path)


#: The "why BN works" measures: key in the records' diagnostics -> axis label.
_WHY_MEASURES = {
    "ics": "internal covariate shift\n(mean ‖G − G'‖)",
    "landscape": "effective β-smoothness\n(lower: smoother)",
    "weight_norm": "weight-norm growth\n(last / first)",
    "gradient_flow": "first-layer mean |grad|\n(first epoch)",
    "jacobian": "|log rms singular value|\n(0: isometry)",
}


def _why_value(record: Record | None, key: str) -> float | None:
    if record is None:
        return None
    if key == "gradient_flow":
        flow = stats._first_layer_grad(record)
        return flow[0] if flow else None
    return stats._diag_measure(record, key)


def _finding_blocks(f: stats.Finding) -> list[Block]:
    """A claim's subsection: its verdict, the claim, the evidence and the caveats."""
    blocks: list[Block] = [
        Heading(3, f"{f.title} — {f.verdict}"),
        Para(f"*Claim:* {f.claim}"),
        Para(" ".join(f.evidence) or "No evidence."),
    ]
    if f.caveats:
        blocks.append(Para("*Caveats:* " + "; ".join(f.caveats) + "."))
    return blocks


def _why_figure(diag: Mapping[tuple[str, str], Mapping[str, Record]], path: Path) -> None:
    """One panel per measure: a bar per (setting, variant) from the first seed's diagnostics."""
    fig, axes = _new_figure(1, len(_WHY_MEASURES), (2.6, 2.6))
    settings = list(diag)
    for ax, (key, label) in zip(axes[0], _WHY_MEASURES.items(), strict=True):
        x = 0
        ticks, names = [], []
        for setting in settings:
            runs = diag[setting]
            start = x
            for variant in ("vanilla", "batchnorm", "noisy"):
                value = _why_value(runs.get(variant), key)
                if value is not None:
                    ax.bar(
                        x,
                        value,
                        color=_VARIANT_COLORS[variant],
                        label=variant if setting == settings[0] else None,
                    )
                x += 1
            ticks.append((start + x - 1) / 2)
            names.append(f"{setting[1].upper()}\n{setting[0]}")
            x += 1
        ax.set_xticks(ticks)
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("gradient_flow", "landscape", "ics"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, frameon=False)
    _save(fig, path)


def _walltime_figure(rows: Sequence[Mapping[str, Any]], variants: Sequence[str], path: Path) -> None:
    models = sorted({r["model"] for r in rows})
    fig, axes = _new_figure(1, len(models), (4.2, 3.0))
    for ax, model in zip(axes[0], models, strict=True):
        mrows = [r for r in rows if r["model"] == model]
        for variant in variants:
            xs = [r["batch_size"] for r in mrows if variant in r["time"]]
            ys = [r["time"][variant] for r in mrows if variant in r["time"]]
            if xs:
                ax.plot(xs, ys, marker="o", color=_VARIANT_COLORS.get(variant, "0.4"), label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size", fontsize=8)
        cpu = bool(rows) and rows[0].get("measure") == "cpu"
        ax.set_ylabel(("CPU " if cpu else "") + "seconds per training epoch", fontsize=8)
        ax.set_title(model.upper(), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# the report


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def build_blocks(
    results: Mapping[str, Any],
    out: Path | None = None,
    *,
    figures: bool = True,
    draw_margin: float | None = None,
) -> list[Block]:
    """The report's blocks from parsed ``results.json``; figures are written under ``out/figures``."""
    records: list[Record] = list(results["runs"])
    study = dict(results.get("study") or {})
    margin = float(draw_margin if draw_margin is not None else study.get("draw_margin", 0.01))
    table = stats.cells(records)
    # the runs as a table (one row per run), and one row per cell (per_cell) with its means and sds over seeds
    frame = stats.runs_frame(records)
    per_cell = stats.cell_stats(frame).reset_index()
    variants = _variants(records)
    models = _models(records)
    seeds = sorted({int(r["seed"]) for r in records})
    blocks: list[Block] = []
    make_figures = figures and out is not None
    fig_dir = Path("figures")

    # -- header ---------------------------------------------------------------------------------------
    blocks.append(Heading(1, "normzoo study report"))
    datasets = sorted({str(r["dataset"]) for r in records})
    devices = sorted({str(r.get("device", "?")) for r in records})
    accelerators = sorted({str(r.get("accelerator", "?")) for r in records})
    fit_time = sum(float(r.get("fit_time_s") or 0.0) for r in records)
    max_epochs = sorted({int(r.get("max_epochs") or 0) for r in records})
    blocks.append(
        Bullets(
            [
                f"preset: `{study.get('preset', '?')}`; dataset: {', '.join(datasets)}; models: "
                f"{', '.join(m.upper() for m in models)}; variants: {', '.join(variants)}",
                f"{len(records)} runs; seeds: {', '.join(map(str, seeds))}; epoch cap: "
                f"{', '.join(map(str, max_epochs))} (early stopping after "
                f"{_patience(records)} epochs without a better validation loss)",
                f"accelerator: {', '.join(accelerators)} ({', '.join(devices)}); training time of all runs: "
                f"{_fmt_seconds(fit_time)}",
                f"written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} from `results.json`",
            ]
        )
    )
    blocks.append(
        Para(
            "Accuracy is the **test accuracy of the weights from the epoch with the best validation accuracy**, "
            "as a percentage, the mean over seeds (± the standard deviation over seeds where there are several). "
            f"A variant *wins* against vanilla when its mean is higher by more than the draw threshold "
            f"`max({100 * margin:.1f} points, pooled seed spread)`, where the pooled spread is "
            "`sqrt((sd_variant² + sd_vanilla²) / 2)`; a difference inside the threshold is a *draw*. "
            + (
                f"This study has one seed, so the threshold is the {100 * margin:.1f}-point margin alone."
                if len(seeds) < 2
                else f"With {len(seeds)} seeds the threshold is the larger of the margin and the spread."
            )
        )
    )

    failed = list(study.get("failed") or [])
    if failed:
        blocks.append(
            Para(
                f"**{len(failed)} runs failed** and are left out of everything below (a rerun retries them): "
                + "; ".join(
                    f"{f.get('model', '?')} {f.get('experiment', '?')}:{f.get('level', '?')} "
                    f"{f.get('variant', '?')} seed {f.get('seed', '?')} ({f.get('error', '?')})"
                    for f in failed
                )
                + "."
            )
        )

    found = stats.findings(records, margin)
    blocks.append(Heading(2, "At a glance"))
    if make_figures and out is not None and any(f.verdict != "not run" for f in found):
        name = fig_dir / "claims.png"
        _verdict_figure(found, out / name)
        blocks.append(Image(name.as_posix(), "every claim's verdict and effect size"))
    blocks.append(
        Table(
            ["claim", "verdict", "effect", "source"],
            [
                [f.key, f"**{f.verdict}**", _effect_text(f.effect), f.source]
                for f in found
                if f.verdict != "not run"
            ],
            "Effect: an accuracy difference in points (± the draw threshold) or a ratio of measurements, the "
            "first comparison of the claim's evidence (see Findings).",
        )
    )
    if "mnist1d" in datasets:
        from normzoo.lightning.data import MNIST1D_BASELINES

        baselines = per_cell[(per_cell["dataset"] == "mnist1d") & (per_cell["experiment"] == "baseline")]
        baselines = baselines.dropna(subset=["test_acc_mean"])
        best = baselines.loc[baselines.groupby("model")["test_acc_mean"].idxmax()].set_index("model")
        ours = [
            f"{m.upper()} {_pct(best.at[m, 'test_acc_mean'])} % ({best.at[m, 'variant']})"
            for m in models
            if m in best.index
        ]
        published = ", ".join(f"{name} ≈ {100 * acc:.0f} %" for name, acc in MNIST1D_BASELINES.items())
        blocks.append(
            Para(
                f"*Sanity line (MNIST-1D):* the dataset's paper reports {published} (Greydanus 2020); this study's "
                f"baselines: {', '.join(ours) or 'not run'}."
            )
        )

    # -- scoreboard -----------------------------------------------------------------------------------
    blocks.append(Heading(2, "Scoreboard"))
    board = stats.scoreboard(records, margin)
    if not board:
        blocks.append(
            Para("No setting has both vanilla and a normalization variant: there is nothing to score.")
        )
    else:
        blocks.append(Bullets([f"**{score.text}**" for score in board.values()]))
        per_model = {m: stats.scoreboard(records, margin, model=m) for m in models}
        rows = []
        for variant, score in board.items():
            row = [variant]
            for m in models:
                s = per_model[m].get(variant)
                row.append(f"{s.wins}-{s.losses} ({s.draws} d)" if s else "-")
            row.append(f"{score.wins}-{score.losses} ({score.draws} d)")
            rows.append(row)
        blocks.append(
            Table(
                ["variant", *(m.upper() for m in models), "all"],
                rows,
                "Wins-losses against vanilla (d: draws) by model.",
            )
        )
        comp_rows = []
        for score in board.values():
            for c in score.comparisons:
                vc, rc = c.variant, c.reference
                comp_rows.append(
                    [
                        f"{vc.experiment}: {vc.level}" if vc.experiment != "baseline" else "baseline",
                        vc.model.upper(),
                        vc.variant,
                        _pct(vc.mean(), vc.sd()),
                        _pct(rc.mean(), rc.sd()),
                        f"{100 * c.delta:+.1f}",
                        f"{100 * c.threshold:.1f}",
                        c.outcome,
                    ]
                )
        blocks.append(
            Table(
                [
                    "setting",
                    "model",
                    "variant",
                    "variant acc %",
                    "vanilla acc %",
                    "Δ points",
                    "threshold",
                    "outcome",
                ],
                comp_rows,
                "Every comparison behind the scoreboard.",
            )
        )

    # -- findings -------------------------------------------------------------------------------------
    blocks.append(Heading(2, "Findings: did this run reproduce the published claims?"))
    summary = [f"{f.title}: **{f.verdict}**" for f in found]
    blocks.append(Bullets(summary))
    why = {"ics", "landscape", "weight_norm", "gradient_flow", "jacobian"}
    for f in found:
        if f.key not in why:
            blocks += _finding_blocks(f)

    # -- why does BN work? ----------------------------------------------------------------------------
    blocks.append(Heading(2, "Why does BN work?"))
    blocks.append(
        Para(
            "Measured by the library's monitors (`CovariateShiftMonitor`, `LossLandscapeMonitor`, "
            "`WeightNormMonitor`, `GradientFlowMonitor`, `JacobianSpectrumMonitor`) during the first seed's "
            "training at the baseline and with sigmoid, for vanilla, BatchNorm and noisy BN."
        )
    )
    diag: dict[tuple[str, str], dict[str, Record]] = {}
    for run in records:
        if run.get("diagnostics") and run["experiment"] in ("baseline", "activation"):
            setting = (
                "baseline" if run["experiment"] == "baseline" else str(run["level"]),
                str(run["model"]),
            )
            diag.setdefault(setting, {})[str(run["variant"])] = run
    if make_figures and out is not None and diag:
        name = fig_dir / "why_bn.png"
        _why_figure(diag, out / name)
        blocks.append(Image(name.as_posix(), "the why-BN-works measures by variant"))
    for f in found:
        if f.key in why:
            blocks += _finding_blocks(f)

    # -- tables per factor ----------------------------------------------------------------------------
    blocks.append(Heading(2, "Results by factor"))
    blocks.append(
        Para(
            "Test accuracy % (mean ± sd over seeds) and, in brackets, the mean number of epochs trained (early "
            "stopping or the cap). The baseline row repeats the reference for comparison; Δ BN is batchnorm minus "
            "vanilla in points with the scoreboard's outcome."
        )
    )
    experiments = [name for name in FACTORS if any(r["experiment"] == name for r in records)]
    experiments += sorted({str(r["experiment"]) for r in records} - set(experiments))
    # a table cell per setting and variant: "mean ± sd (mean epochs)", the first dataset's where several ran it
    setting_keys = ["experiment", "level", "model"]
    texts = per_cell.assign(
        text=[
            f"{_pct(mean, sd)} ({epochs:.0f})"
            for mean, sd, epochs in zip(
                per_cell["test_acc_mean"], per_cell["test_acc_sd"], per_cell["epochs_mean"], strict=True
            )
        ]
    )
    grid = texts.drop_duplicates([*setting_keys, "variant"]).pivot(
        index=setting_keys, columns="variant", values="text"
    )
    grid = grid.fillna("-")
    batch_sizes = frame.drop_duplicates(setting_keys).set_index(setting_keys)["batch_size"]
    delta_bn: dict[tuple[str, str, str], str] = {}  # the scoreboard's comparison of batchnorm with vanilla
    for comp in board["batchnorm"].comparisons if "batchnorm" in board else []:
        delta_bn.setdefault(comp.setting[1:], f"{100 * comp.delta:+.1f} ({comp.outcome})")
    factor_levels = _factor_levels(frame)
    for experiment in experiments:
        factor = FACTORS.get(experiment)
        blocks.append(Heading(3, factor.title if factor else experiment))
        for claim in stats.claims_for(experiment):
            blocks.append(Para(f"*Published claim:* {claim.text} ({claim.source})"))
        for model in models:
            levels = factor_levels.get((experiment, model), [])
            if not levels:
                continue
            settings = [(experiment, lv) for lv in levels]
            if experiment != "baseline" and ("baseline", "baseline", model) in grid.index:
                settings = [("baseline", "baseline"), *settings]
                if experiment == "batch_size":
                    settings.sort(key=lambda s: int(batch_sizes.get((*s, model), 0)))
            body = grid.reindex(index=[(*s, model) for s in settings], columns=variants, fill_value="-")
            rows = [
                [_setting_label(exp, level, experiment), *cells, delta_bn.get((exp, level, model), "-")]
                for (exp, level, _), cells in zip(body.index, body.to_numpy().tolist(), strict=True)
            ]
            blocks.append(Table(["setting", *variants, "Δ BN"], rows, f"{model.upper()}"))
            if make_figures and out is not None:
                name = fig_dir / f"curves_{experiment}_{model}.png"
                _curves_figure(
                    table,
                    settings,
                    model,
                    variants,
                    out / name,
                    f"{model.upper()}: {factor.title if factor else experiment}",
                )
                blocks.append(Image(name.as_posix(), f"learning curves, {experiment}, {model}"))

    # -- wall time ------------------------------------------------------------------------------------
    blocks.append(Heading(2, "Time per epoch (cf. the seed's Table B.4)"))
    wall = stats.overhead_table(records)
    if not wall:
        blocks.append(Para("No baseline or batch-size runs: no wall-time table."))
    else:
        others = [v for v in variants if v != "vanilla"]
        measure = wall[0]["measure"]
        unit = "CPU s" if measure == "cpu" else "s"
        rows = []
        for w in wall:
            row = [w["model"].upper(), str(w["batch_size"])]
            row.append(f"{w['time']['vanilla']:.3f}" if "vanilla" in w["time"] else "-")
            for v in others:
                t = w["time"].get(v)
                o = w["overhead"].get(v)
                row.append(
                    "-" if t is None else f"{t:.3f}" + (f" ({100 * o:+.0f} %)" if o is not None else "")
                )
            rows.append(row)
        blocks.append(
            Table(
                [
                    "model",
                    "batch size",
                    f"vanilla {unit}/epoch",
                    *(f"{v} {unit}/epoch (overhead)" for v in others),
                ],
                rows,
                ("CPU time of the training process" if measure == "cpu" else "Wall time")
                + " per training epoch (validation excluded; the first epoch is left out when there are three "
                "or more), mean over seeds."
                + (
                    " On a CPU the process's CPU time is used: with one thread it is the wall time of an idle "
                    "machine and it leaves out the time spent waiting while other processes hold the cores; it "
                    "still varies with contention for caches and, on a virtual machine, with time the host takes "
                    "away, so overheads of a few percent need an idle machine or several seeds (the wall times "
                    "are in results.json)."
                    if measure == "cpu"
                    else ""
                ),
            )
        )
        if make_figures and out is not None:
            name = fig_dir / "walltime.png"
            _walltime_figure(wall, variants, out / name)
            blocks.append(Image(name.as_posix(), "wall time per epoch by batch size"))

    # -- diagnostics ----------------------------------------------------------------------------------
    diag_runs = [r for r in records if r.get("diagnostics")]
    blocks.append(Heading(2, "Gradient flow and weight norms"))
    if not diag_runs:
        blocks.append(Para("No run recorded diagnostics."))
    else:
        blocks.append(
            Para(
                "Recorded by `GradientFlowMonitor` and `WeightNormMonitor` on the first seed of these settings. "
                "Left: mean (dark) and max (light) |gradient| per layer, first to last, averaged over the first "
                "epoch; middle: mean |gradient| per layer over training; right: weight norm per layer."
            )
        )
        groups: dict[tuple[str, str, str], list[Record]] = {}
        for run in diag_runs:
            groups.setdefault((str(run["experiment"]), str(run["level"]), str(run["model"])), []).append(run)
        rows = []
        for (experiment, level, model), runs in groups.items():
            runs = sorted(
                runs,
                key=lambda r: _VARIANT_ORDER.index(r["variant"]) if r["variant"] in _VARIANT_ORDER else 9,
            )
            for run in runs:
                layers, mean_abs, _ = _first_epoch_flow((run["diagnostics"] or {}).get("gradient_flow") or [])
                if layers:
                    rows.append(
                        [
                            f"{experiment}: {level}" if experiment != "baseline" else "baseline",
                            model.upper(),
                            str(run["variant"]),
                            f"{mean_abs[0]:.2e}",
                            f"{mean_abs[-1]:.2e}",
                            f"{mean_abs[0] / mean_abs[-1]:.2f}" if mean_abs[-1] else "-",
                        ]
                    )
            if make_figures and out is not None:
                name = fig_dir / f"diagnostics_{experiment}_{_slug(level)}_{model}.png"
                try:
                    _diagnostics_figure(runs, out / name, f"{model.upper()} {experiment}: {level}")
                    blocks.append(
                        Image(
                            name.as_posix(), f"gradient flow and weight norms, {experiment} {level} {model}"
                        )
                    )
                except ImportError:  # pragma: no cover - plotting needs the lightning extra, like the runs
                    pass
        if rows:
            blocks.append(
                Table(
                    [
                        "setting",
                        "model",
                        "variant",
                        "first layer mean |grad|",
                        "last layer mean |grad|",
                        "first / last",
                    ],
                    rows,
                    "Mean |gradient| of the first and last layer in the first epoch (the seed: BN keeps the first "
                    "layers' gradients alive).",
                )
            )
    blocks.append(Heading(2, "Files"))
    blocks.append(
        Bullets(
            [
                "`results.json`: one record per run (settings, accuracies, per-epoch history, diagnostics)",
                "`runs/<key>.json`: the cache, one file per finished run (delete one to rerun it)",
                "`figures/`: the PNG figures of this report",
            ]
        )
    )
    return blocks


def _effect_text(effect: tuple[float, float, str] | None) -> str:
    if effect is None:
        return "-"
    value, spread, unit = effect
    if unit == "ratio":
        return f"x{value:.2f}"
    return f"{100 * value:+.1f} ± {100 * spread:.1f} points"


def _patience(records: Sequence[Record]) -> str:
    values = sorted({int((r.get("recipe") or {}).get("early_stop_patience", 20)) for r in records})
    return ", ".join(map(str, values)) or "20"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _setting_label(experiment: str, level: str, factor: str) -> str:
    """A row of ``factor``'s table: its level, or the baseline (with its batch size in the batch-size table)."""
    if experiment != "baseline":
        return level
    return "baseline (bs=64)" if factor == "batch_size" else "baseline"


# ---------------------------------------------------------------------------------------------------------
# rendering


def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown.

    Example:
        >>> print(render_markdown([Heading(2, "Scoreboard"), Table(["variant", "score"], [["batchnorm", "7-1"]])]))
        ## Scoreboard
        <BLANKLINE>
        | variant | score |
        |---|---|
        | batchnorm | 7-1 |
        <BLANKLINE>
    """
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            if b.caption:
                lines += [f"*{b.caption}*", ""]
            lines.append("| " + " | ".join(_md_escape_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_escape_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Image):
            lines += [f"![{b.alt}]({b.path})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; } th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; font-style: italic; padding: 2px 0; }
code { background: #f4f4f4; padding: 0 3px; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
""".strip()


def render_html(blocks: Sequence[Block], title: str = "normzoo study report") -> str:
    """The blocks as one self-contained HTML page: :func:`render_markdown`'s text through python-markdown
    (with its ``tables`` extension), figures referenced by relative path.

    Example:
        >>> page = render_html([Para("**batchnorm 7 - vanilla 1** (`quick`)")])
        >>> page.splitlines()[-2]
        '<p><strong>batchnorm 7 - vanilla 1</strong> (<code>quick</code>)</p>'
    """
    from normzoo.lightning._imports import import_optional

    markdown = import_optional("markdown", extra="study", feature="the study's HTML report")
    body = markdown.markdown(render_markdown(blocks), extensions=["tables"], output_format="html")
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                f"<title>{html.escape(title)}</title>",
                f"<style>\n{_CSS}\n</style></head><body>",
                body,
                "</body></html>",
            ]
        )
        + "\n"
    )


def write_report(
    out: str | Path, *, figures: bool = True, draw_margin: float | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out`` from ``out/results.json``.

    Returns the paths: ``{"md": ..., "html": ..., "figures": ...}``.
    """
    out = Path(out)
    results = load_results(out)
    if figures:
        fig_dir = out / "figures"
        if fig_dir.is_dir():
            for old in fig_dir.glob("*.png"):
                old.unlink()
    blocks = build_blocks(results, out, figures=figures, draw_margin=draw_margin)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(render_markdown(blocks), encoding="utf-8")
    html_path.write_text(render_html(blocks), encoding="utf-8")
    return {"md": md_path, "html": html_path, "figures": out / "figures"}
