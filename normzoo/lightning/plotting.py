"""Figures of normzoo's diagnostics, from plain data (lists and dicts), so the study can reuse them.

matplotlib is imported lazily, inside the functions, and only through its object-oriented API on the Agg
canvas (:class:`matplotlib.figure.Figure` + ``FigureCanvasAgg``): no pyplot state, no GUI backend, safe in
worker processes. Every function returns the :class:`~matplotlib.figure.Figure`; the single-panel ones
draw into ``ax`` when given one (so several runs, e.g. vanilla and BN, can share a figure), else into a
new figure. Layers are coloured by depth (viridis: dark = first, yellow = last).

Example:
    >>> fig = gradient_flow_chart(["conv1", "conv2"], mean_abs=[1e-3, 2e-2], max_abs=[1e-2, 1e-1])
    >>> path = save_png(fig, getfixture("tmp_path") / "flow.png")
    >>> path.stat().st_size > 0
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..diagnostics import SV_HISTOGRAM_EDGES

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "activation_figure",
    "drift_figure",
    "epoch_time_chart",
    "figure_to_array",
    "gradient_flow_chart",
    "gradient_flow_figure",
    "ics_figure",
    "jacobian_figure",
    "landscape_bands",
    "landscape_figure",
    "layer_curves",
    "layer_series",
    "new_figure",
    "save_png",
    "sv_histogram_panel",
    "weight_norm_figure",
]


def layer_series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], dict[str, list[float]]]:
    """``(steps, {layer: values})`` of the per-layer quantity ``key`` over a monitor's history records
    (``{"step", "layers": {layer: {key: value}}}``), ``nan`` where a record lacks it.

    Example:
        >>> layer_series([{"step": 0, "layers": {"a": {"x": 1.0}}}, {"step": 5, "layers": {}}], "x")
        ([0, 5], {'a': [1.0, nan]})
    """
    steps = [int(r["step"]) for r in history]
    layers: dict[str, list[float]] = {}
    for r in history:
        for layer in r.get("layers", {}):
            layers.setdefault(layer, [])
    for layer, values in layers.items():
        for r in history:
            v = r.get("layers", {}).get(layer, {}).get(key)
            values.append(math.nan if v is None else float(v))
    return steps, layers


Series = Mapping[str, Sequence[float]]
_UPDATE_RATIO_TARGET = 1e-3  # cs231n: updates of about 1e-3 of the weights are healthy


def new_figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (4.2, 3.0), squeeze: bool = True
) -> tuple[Figure, Any]:
    """An Agg-backed figure with ``nrows x ncols`` panels of ``size`` inches each; ``(fig, axes)`` with
    ``axes`` squeezed (or not) like :func:`matplotlib.pyplot.subplots`'s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze)
    return fig, axes


def _axes(ax: Axes | None, size: tuple[float, float] = (5.0, 3.2)) -> tuple[Figure, Axes]:
    if ax is not None:
        fig = ax.get_figure()
        assert fig is not None
        return fig, ax  # type: ignore[return-value]
    return new_figure(size=size)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def save_png(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 90) -> Path:
    """Write ``fig`` as a PNG to ``path``, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def figure_to_array(fig: Figure, *, dpi: int = 90) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array (for TensorBoard's ``add_image``)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _finite_positive(values: Sequence[float]) -> bool:
    return any(v is not None and math.isfinite(v) and v > 0 for v in values)


def layer_curves(
    steps: Sequence[int],
    series: Series,
    *,
    ax: Axes | None = None,
    ylabel: str = "",
    title: str | None = None,
    log: bool = False,
    reference: float | None = None,
    legend: bool = True,
) -> Figure:
    """One line per layer over training steps; ``reference`` draws a dashed horizontal line."""
    fig, ax = _axes(ax)
    for color, (layer, values) in zip(_colors(len(series)), series.items(), strict=True):
        ax.plot(
            steps[: len(values)],
            values,
            color=color,
            label=layer,
            lw=1.4,
            marker="." if len(steps) < 30 else None,
        )
    if log and any(_finite_positive(v) for v in series.values()):
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference, color="0.3", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if legend and series:
        ax.legend(fontsize=6, ncols=2 if len(series) > 6 else 1, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def gradient_flow_chart(
    layers: Sequence[str],
    mean_abs: Sequence[float],
    max_abs: Sequence[float],
    *,
    ax: Axes | None = None,
    title: str | None = "gradient flow",
    log: bool = True,
) -> Figure:
    """The classic gradient-flow bar chart: per layer (first to last) the max ``|grad|`` (light bar) and the
    mean ``|grad|`` (dark bar) on a log scale; layers whose mean is near zero are the vanishing ones."""
    fig, ax = _axes(ax, size=(max(4.0, 0.45 * len(layers) + 2), 3.2))
    x = list(range(len(layers)))
    ax.bar(x, max_abs, color="#4c9be8", alpha=0.45, lw=0, label="max |grad|")
    ax.bar(x, mean_abs, color="#1b3a6b", alpha=0.9, lw=0, width=0.5, label="mean |grad|")
    ax.set_xticks(x, list(layers), rotation=60, ha="right", fontsize=7)
    if log and _finite_positive(list(mean_abs) + list(max_abs)):
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|gradient|")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return fig


def gradient_flow_figure(
    layers: Sequence[str],
    mean_abs: Sequence[float],
    max_abs: Sequence[float],
    steps: Sequence[int],
    mean_abs_series: Series,
    *,
    title: str | None = None,
) -> Figure:
    """Two panels: :func:`gradient_flow_chart` of one step, and each layer's mean ``|grad|`` over steps."""
    fig, (a, b) = new_figure(1, 2)
    gradient_flow_chart(
        layers, mean_abs, max_abs, ax=a, title=f"gradient flow (step {steps[-1]})" if steps else None
    )
    layer_curves(steps, mean_abs_series, ax=b, ylabel="mean |grad|", title="mean |grad| per layer", log=True)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def weight_norm_figure(
    steps: Sequence[int], norms: Series, ratios: Series, *, title: str | None = None
) -> Figure:
    """Two panels: each layer's weight norm, and its update/weight ratio ``‖Δw‖/‖w‖`` (log scale, dashed
    line at the cs231n rule of thumb 1e-3)."""
    fig, (a, b) = new_figure(1, 2)
    layer_curves(steps, norms, ax=a, ylabel="‖w‖", title="weight norm")
    layer_curves(
        steps, ratios, ax=b, ylabel="‖Δw‖ / ‖w‖", title="update / weight", log=True,
        reference=_UPDATE_RATIO_TARGET, legend=False,
    )  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def activation_figure(
    steps: Sequence[int],
    stats: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str | None = None,
) -> Figure:
    """Activation statistics per layer over steps: the median with its 15-85 % band (Ioffe & Szegedy 2015,
    Figure 1), the std, and the fractions of dead ReLU units / saturated sigmoid-tanh outputs.
    ``stats[layer]`` holds the series ``p15, p50, p85, std, dead, saturated`` (``nan`` where undefined)."""
    fig, axes = new_figure(1, 3, size=(3.8, 3.0))
    colors = _colors(len(stats))
    for color, (layer, s) in zip(colors, stats.items(), strict=False):
        n = len(s.get("p50", []))
        axes[0].plot(steps[:n], s["p50"], color=color, lw=1.3, label=layer)
        axes[0].fill_between(steps[:n], s["p15"], s["p85"], color=color, alpha=0.18, lw=0)
        axes[1].plot(steps[:n], s["std"], color=color, lw=1.3, label=layer)
        for key, style in (("dead", "-"), ("saturated", "--")):
            values = s.get(key)
            if values is not None and any(math.isfinite(v) for v in values):
                axes[2].plot(steps[:n], values, color=color, lw=1.3, ls=style)
    for ax, label, name in zip(
        axes,
        ("activation", "std", "fraction"),
        ("median, 15-85 % band", "std", "dead ReLU (—), saturated (--)"),
        strict=True,
    ):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].set_ylim(-0.02, 1.02)
    if stats:
        axes[0].legend(fontsize=6, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def sv_histogram_panel(
    hists: Mapping[str, Sequence[int]],
    *,
    edges: Sequence[float] = SV_HISTOGRAM_EDGES,
    ax: Axes | None = None,
    title: str | None = None,
    colors: Sequence[Any] | None = None,
) -> Figure:
    """Histograms of singular values on a log axis, one outline per label (a step, or a run such as
    ``"vanilla"`` / ``"batchnorm"``), normalized to fractions, with σ = 1 (isometry) dashed."""
    fig, ax = _axes(ax)
    colors = list(colors) if colors is not None else _colors(len(hists))
    used = [i for h in hists.values() for i, c in enumerate(h) if c]
    one = next(i for i, e in enumerate(edges) if e >= 1.0)  # keep σ = 1 in view
    lo, hi = (min([*used, one]), max([*used, one]) + 1) if used else (0, len(edges) - 1)
    for color, (label, counts) in zip(colors, hists.items(), strict=False):
        total = sum(counts) or 1
        ax.stairs([c / total for c in counts], list(edges), color=color, label=label, lw=1.4)
    ax.set_xscale("log")
    ax.tick_params(axis="x", which="both", labelsize=6)
    ax.set_xlim(edges[max(0, lo - 1)], edges[min(len(edges) - 1, hi + 1)])
    ax.axvline(1.0, color="0.3", ls="--", lw=1)
    ax.set_xlabel("singular value of the Jacobian")
    ax.set_ylabel("fraction")
    if title:
        ax.set_title(title, fontsize=9)
    if hists:
        ax.legend(fontsize=6, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def jacobian_figure(
    spectra: Mapping[str, Mapping[str, Sequence[int]]], *, title: str | None = None
) -> Figure:
    """One :func:`sv_histogram_panel` per layer: ``spectra[layer][label] = counts`` (labels: steps)."""
    n = max(1, len(spectra))
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, size=(3.6, 2.7))
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (layer, hists) in zip(flat, spectra.items(), strict=False):
        sv_histogram_panel(hists, ax=ax, title=layer)
    for ax in flat[len(spectra) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def ics_figure(steps: Sequence[int], l2: Series, cos: Series, *, title: str | None = None) -> Figure:
    """Santurkar et al.'s internal covariate shift per layer: ``‖G - G'‖`` (log) and ``cos(G, G')``."""
    fig, (a, b) = new_figure(1, 2)
    layer_curves(steps, l2, ax=a, ylabel="‖G − G′‖₂", title="ICS: ℓ2 difference", log=True)
    layer_curves(steps, cos, ax=b, ylabel="cos(G, G′)", title="ICS: cosine", legend=False)
    b.set_ylim(min([-0.05, *(v for s in cos.values() for v in s if math.isfinite(v))]), 1.05)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def drift_figure(
    steps: Sequence[int],
    distance: Series,
    output_gap: Sequence[float],
    *,
    gap_threshold: float | None = None,
    title: str | None = None,
) -> Figure:
    """BatchNorm's train/eval drift: per layer, the mean distance between batch and running statistics
    (in running standard deviations), and the relative gap between training- and eval-mode outputs."""
    fig, (a, b) = new_figure(1, 2)
    layer_curves(
        steps, distance, ax=a, ylabel="W₂ / σ (mean over channels)", title="batch vs running statistics"
    )
    layer_curves(
        steps,
        {"output gap": output_gap},
        ax=b,
        ylabel="‖f_train − f_eval‖ / ‖f_eval‖",
        title="train vs eval outputs",
        reference=gap_threshold,
        legend=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def landscape_bands(
    series: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
    *,
    ax: Axes | None = None,
    ylabel: str = "",
    title: str | None = None,
    log: bool = False,
    colors: Sequence[Any] | None = None,
) -> Figure:
    """Santurkar et al.'s Figure 4 style: for each run label, the band between the min and the max over
    the step sizes, at each training step: ``series[label] = (steps, low, high)``."""
    fig, ax = _axes(ax)
    default = ["#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057"]
    colors = list(colors) if colors is not None else default
    for i, (label, (steps, low, high)) in enumerate(series.items()):
        color = colors[i % len(colors)]
        ax.fill_between(steps, low, high, color=color, alpha=0.35, lw=0, label=label)
        ax.plot(steps, high, color=color, lw=0.8)
        ax.plot(steps, low, color=color, lw=0.8)
    if log and any(_finite_positive(list(s[2])) for s in series.values()):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def landscape_figure(
    steps: Sequence[int],
    loss_low: Sequence[float],
    loss_high: Sequence[float],
    grad_low: Sequence[float],
    grad_high: Sequence[float],
    beta: Sequence[float],
    *,
    label: str = "model",
    title: str | None = None,
) -> Figure:
    """Three panels: loss landscape band, gradient predictiveness band, effective β-smoothness."""
    fig, axes = new_figure(1, 3, size=(3.8, 3.0))
    landscape_bands(
        {label: (steps, loss_low, loss_high)}, ax=axes[0], ylabel="L(w − ηg)", title="loss landscape"
    )
    landscape_bands(
        {label: (steps, grad_low, grad_high)}, ax=axes[1], ylabel="‖∇L(w − ηg) − ∇L(w)‖",
        title="gradient predictiveness", log=True,
    )  # fmt: skip
    layer_curves(steps, {label: list(beta)}, ax=axes[2], ylabel="β", title="effective β-smoothness", log=True)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def epoch_time_chart(
    epochs: Sequence[int],
    train_s: Sequence[float],
    val_s: Sequence[float] | None = None,
    *,
    ax: Axes | None = None,
) -> Figure:
    """Wall time per epoch: training (bars) and validation (stacked on top)."""
    fig, ax = _axes(ax)
    ax.bar(epochs, train_s, color="#00798c", label="train")
    if val_s is not None:
        ax.bar(epochs, val_s, bottom=train_s, color="#edae49", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.set_title("wall time per epoch", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return fig
