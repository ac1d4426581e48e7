"""Standard plots: learning curves with seeds and CIs, paired differences against a reference
cell, dose-response, points with CIs against any x, forests of labelled estimates, delta
quantiles by confidence bin, reference lines, and the two-panel curves of a results directory.

Every function takes tidy DataFrames (`timsim.load(...).metrics`, `.summary`, `.compare()`),
returns a `matplotlib.figure.Figure`, and accepts an `ax` to draw into. Figures are built with
matplotlib's object-oriented API, never pyplot, so calling timsim does not change the
process's matplotlib backend (a notebook keeps its inline plots; show a figure with
`display(fig)` or as a cell's last value). Colours are the Okabe-Ito palette, which stays
distinguishable under the common colour-vision deficiencies; axes carry the metric's unit
from `timsim.metrics.METRICS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from timsim.metrics import METRICS
from timsim.summary import ci_half_width

# Okabe & Ito (2008), "Color Universal Design": black first for the reference cell.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
LINESTYLES = ("-", "--", "-.", ":")


def style(i: int) -> dict:
    """Colour (and, past eight series, line style) of the i-th series."""
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "ls": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def label(metric: str) -> str:
    """Axis label of a metric: its name and, where it has one, its unit."""
    unit = METRICS[metric].unit if metric in METRICS else ""
    return f"{metric} ({unit})" if unit else metric


_label = label  # for functions whose `label` argument shadows it


def _axes(ax: Axes | None, size=(6, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def mean_and_ci(wide: pd.DataFrame, confidence: float = 0.95) -> tuple[pd.Series, pd.Series]:
    """Row-wise mean over runs (columns) and its CI half-width (`timsim.summary.ci_half_width`)."""
    return wide.mean(axis=1), wide.apply(lambda row: ci_half_width(row.dropna(), confidence), axis=1)


def curves(metrics: pd.DataFrame, metric: str = "eval_greedy_accuracy", cells=None, smooth: int = 1,
           runs: bool = True, ax: Axes | None = None, confidence: float = 0.95, ylabel: str | None = None) -> Figure:
    """`metric` against step, one colour per cell: the mean over runs with its CI band over
    seeds, and each run as a thin line (`runs`). `smooth` > 1 takes a rolling mean per run
    first (for per-step metrics such as reward_mean). `ylabel` replaces the metric's label."""
    fig, ax = _axes(ax)
    cells = list(cells) if cells is not None else list(metrics.cell_id.unique())
    for i, cell in enumerate(cells):
        data = metrics[metrics.cell_id == cell].dropna(subset=[metric])
        if data.empty:
            continue
        wide = data.pivot_table(index="step", columns="run_idx", values=metric).rolling(smooth, min_periods=1).mean()
        mean, ci = mean_and_ci(wide, confidence)
        s = style(i)
        if runs:
            ax.plot(wide.index, wide.values, color=s["color"], alpha=0.2, lw=0.7)
        ax.plot(mean.index, mean, lw=2, label=f"{cell} (n={wide.shape[1]})", **s)
        ax.fill_between(mean.index, mean - ci, mean + ci, color=s["color"], alpha=0.18, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel((ylabel or label(metric)) + (f", rolling mean over {smooth} steps" if smooth > 1 else ""))
    ax.legend(fontsize=8)
    return fig


def paired(table: pd.DataFrame, against: str = "zero", ax: Axes | None = None) -> Figure:
    """Forest plot of `Result.compare(against)`: each cell's final accuracy minus the
    reference cell's on the same seeds, with its paired CI; 0 is no effect."""
    rows = table[table.cell != against].assign(row=lambda t: [f"{c} (n={n})" for c, n in zip(t.cell, t.seeds)])
    return forest(rows, f"minus_{against}", f"minus_{against}_ci", label="row", ax=ax,
                  xlabel=f"final held-out accuracy minus {against!r} (paired by seed, 95% CI)")


def forest(frame: pd.DataFrame, value: str, err: str | None = None, label: str = "label", hue: str | None = None,
           ax: Axes | None = None, zero: bool = True, logx: bool = False, xlabel: str | None = None) -> Figure:
    """One row per `label` (first at the top), `value` ± `err` as a point with its CI, one colour
    per value of `hue` (groups sharing a row are set side by side); 0 marked unless `logx`."""
    names = list(dict.fromkeys(frame[label]))
    groups = list(frame.groupby(hue, sort=False)) if hue else [(None, frame)]
    fig, ax = _axes(ax, (6, 0.32 * len(names) + 1.4))
    shared = hue is not None and frame[label].duplicated().any()
    row = {name: len(names) - 1 - i for i, name in enumerate(names)}
    for i, (name, rows) in enumerate(groups):
        rows = rows.iloc[::-1]
        offset = 0.4 * (i / (len(groups) - 1) - 0.5) if shared and len(groups) > 1 else 0.0
        y = np.asarray([row[n] for n in rows[label]], float) - offset
        ax.errorbar(rows[value], y, xerr=None if err is None else rows[err], fmt="o", capsize=3, ms=5,
                    label=None if name is None else str(name),
                    color=style(i)["color"] if hue else OKABE_ITO[4])
    if logx:
        ax.set_xscale("log")
    elif zero:
        mark(ax, x=0.0, ls="-")
    ax.set_yticks(np.arange(len(names)), names[::-1])
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel(xlabel or _label(value))
    if hue:
        ax.legend(fontsize=8, title=hue, title_fontsize=8)
    return fig


def against(frame: pd.DataFrame, x: str, y: str, yerr: str | None = None, hue: str | None = None,
            ax: Axes | None = None, xerr: str | None = None, identity: bool = False, zero: bool = False,
            logx: bool = False, logy: bool = False, connect: bool = False, annotate: str | None = None,
            ticks=None, xlabel: str | None = None, ylabel: str | None = None) -> Figure:
    """`y` (± `yerr`) against `x` as points, one colour per `hue` value; optionally y = x (`identity`),
    y = 0 (`zero`), each group joined in x order (`connect`), point names (`annotate`), x `ticks`."""
    fig, ax = _axes(ax)
    groups = list(frame.groupby(hue, sort=False)) if hue else [(None, frame)]
    for i, (name, rows) in enumerate(groups):
        rows = rows.sort_values(x) if connect else rows
        s = style(i)
        ax.errorbar(rows[x], rows[y], yerr=None if yerr is None else rows[yerr],
                    xerr=None if xerr is None else rows[xerr], fmt="o", capsize=3, ms=5, color=s["color"],
                    ls=s["ls"] if connect else "none", label=None if name is None else str(name))
        if annotate:  # names alternate above and below their points in y order, so neighbours overlap less
            below = rows[y].rank(method="first").astype(int) % 2
            for text, px, py, low in zip(rows[annotate], rows[x], rows[y], below):
                ax.annotate(str(text), (px, py), xytext=(4, -3 if low else 3), textcoords="offset points",
                            va="top" if low else "bottom", fontsize=7, color=s["color"])
            ax.margins(x=0.15)  # room for the names of the rightmost points
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if identity:
        values = pd.concat([frame[x], frame[y]]).to_numpy(float)
        values = values[np.isfinite(values) & ((values > 0) if logx or logy else True)]
        lo, hi = values.min(), values.max()
        lo, hi = (lo / 2, hi * 2) if logx or logy else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, label="y = x")
    if zero:
        mark(ax, y=0.0, ls="-")
    if ticks is not None:
        if logx:
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.minorticks_off()
        ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
    elif logx:
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel or _label(x))
    ax.set_ylabel(ylabel or _label(y))
    if hue or identity:
        ax.legend(fontsize=8)
    return fig


def delta_by_bin(table: pd.DataFrame, quantiles=("q50", "q99"), hue: str | None = None, ax: Axes | None = None,
                 yscale: str = "linear", ylabel: str = "quantile of δ = log π_old − log μ (nats)") -> Figure:
    """Quantiles of δ (the `quantiles` columns, one line style each) per confidence bin (`bin`,
    the learner's probability of the sampled token, in table order), one colour per `hue`; on a
    log axis (`yscale="log"`, for |δ|) a zero quantile is left out."""
    fig, ax = _axes(ax)
    groups = list(table.groupby(hue, sort=False)) if hue else [(None, table)]
    bins = list(dict.fromkeys(table["bin"]))
    for i, (name, rows) in enumerate(groups):
        positions = [bins.index(b) for b in rows["bin"]]
        for j, q in enumerate(quantiles):
            words = "median" if q == "q50" else f"{q[1:]}% quantile" if q.startswith("q") else q
            values = rows[q].where(rows[q] > 0) if yscale == "log" else rows[q]
            ax.plot(positions, values, marker="os^vD"[j % 5], color=OKABE_ITO[i % len(OKABE_ITO)],
                    ls=LINESTYLES[j % len(LINESTYLES)],
                    label=words if name is None else str(name) if len(quantiles) == 1 else f"{name}, {words}")
    ax.set_yscale(yscale)
    ax.set_xticks(np.arange(len(bins)), bins)
    ax.set_xlabel("learner's probability of the sampled token (bin)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7 if len(groups) * len(quantiles) > 6 else 8)
    return fig


def mark(ax: Axes, x: float | None = None, y: float | None = None, label: str | None = None, ls: str = "--",
         color: str = "gray") -> Axes:
    """A thin reference line at `x` (vertical) or `y` (horizontal): zero, a margin, a found level;
    with a `label`, it joins the Axes' legend."""
    line = ax.axvline if x is not None else ax.axhline
    line(x if x is not None else y, color=color, ls=ls, lw=0.8, label=label)
    legend = ax.get_legend()
    if label is not None and legend is not None:  # a labelled line joins the legend already drawn
        ax.legend(fontsize=8, title=legend.get_title().get_text() or None, title_fontsize=8)
    return ax


def dose_response(table: pd.DataFrame, x: str, y: str, yerr: str | None = None, by: str | None = None,
                  logx: bool = True, ax: Axes | None = None, xlabel: str | None = None,
                  ylabel: str | None = None) -> Figure:
    """`y` (± `yerr`) against a mismatch level `x`, one series per value of `by`, with 0 marked."""
    fig, ax = _axes(ax)
    groups = table.groupby(by, sort=False) if by else [(None, table)]
    for i, (name, rows) in enumerate(groups):
        rows = rows.sort_values(x)
        ax.errorbar(rows[x], rows[y], yerr=None if yerr is None else rows[yerr], marker="o", capsize=3,
                    label=None if name is None else str(name), **style(i))
    mark(ax, y=0.0, ls="-")
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled decades only: minor labels overlap
    ax.set_xlabel(xlabel or label(x))
    ax.set_ylabel(ylabel or label(y))
    if by:
        ax.legend(fontsize=8)
    return fig


def learning_curves(metrics: pd.DataFrame, smooth: int = 10) -> Figure:
    """Two panels: held-out greedy accuracy and the training reward (rolling mean over `smooth`
    steps) against step, mean ± CI over seeds per cell, individual runs thin on the left."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    curves(metrics, "eval_greedy_accuracy", ax=left)
    curves(metrics, "reward_mean", smooth=smooth, runs=False, ax=right)
    for ax in (left, right):
        ax.set_ylim(-0.02, 1.02)
    right.get_legend().remove()
    return fig


def plot_curves(metrics: pd.DataFrame, path: str | Path, smooth: int = 10) -> Path:
    """`learning_curves`, saved beside the results by `timsim train/sweep`."""
    path = Path(path)
    learning_curves(metrics, smooth).savefig(path, dpi=120)
    return path


def plot_dose_response(table: pd.DataFrame, record: dict, margin_label: str, path: Path) -> Path:
    """A finder's paired accuracy difference (± CI) against the level, with the margin and the
    critical level (`timsim critical`)."""
    table = table[table.level > 0].assign(
        series=lambda t: [a if a == "uncorrected" else record.get("correction", a) for a in t.arm])
    fig = dose_response(table, "level", "paired_diff", "paired_diff_ci", by="series",
                        xlabel=f"mismatch level ({record['target']}, calibrated at the base model)",
                        ylabel="final accuracy minus zero-mismatch twin")
    ax = fig.axes[0]
    mark(ax, y=-record["margin_abs"], label=f"-margin ({margin_label})", color=OKABE_ITO[5])
    for found, ls in ((record.get("uncorrected", {}).get("critical_level"), ":"), (record["critical_level"], "-")):
        if found is not None:
            mark(ax, x=found, label=f"critical {found:.3g}", ls=ls, color=OKABE_ITO[5])
    ax.set_title(f"{record['family']} {record['mode']}, {record['old_logprobs']}, {record['response_len']}-token "
                 f"responses", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path
