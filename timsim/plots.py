"""Standard plots: learning curves with seeds and CIs, paired differences against a reference
cell, dose-response, and the two-panel curves of a results directory.

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


def _axes(ax: Axes | None, size=(6, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def mean_and_ci(wide: pd.DataFrame, confidence: float = 0.95) -> tuple[pd.Series, pd.Series]:
    """Row-wise mean over runs (columns) and its CI half-width (`timsim.summary.ci_half_width`)."""
    return wide.mean(axis=1), wide.apply(lambda row: ci_half_width(row.dropna(), confidence), axis=1)


def curves(metrics: pd.DataFrame, metric: str = "eval_greedy_accuracy", cells=None, smooth: int = 1,
           runs: bool = True, ax: Axes | None = None, confidence: float = 0.95) -> Figure:
    """`metric` against step, one colour per cell: the mean over runs with its CI band over
    seeds, and each run as a thin line (`runs`). `smooth` > 1 takes a rolling mean per run
    first (for per-step metrics such as reward_mean)."""
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
    ax.set_ylabel(label(metric) + (f", rolling mean over {smooth} steps" if smooth > 1 else ""))
    ax.legend(fontsize=8)
    return fig


def paired(table: pd.DataFrame, against: str = "zero", ax: Axes | None = None) -> Figure:
    """Forest plot of `Result.compare(against)`: each cell's final accuracy minus the
    reference cell's on the same seeds, with its paired CI; 0 is no effect."""
    rows = table[table.cell != against].iloc[::-1]
    fig, ax = _axes(ax, (6, 0.45 * len(rows) + 1.4))
    y = np.arange(len(rows))
    ax.errorbar(rows[f"minus_{against}"], y, xerr=rows[f"minus_{against}_ci"], fmt="o", color=OKABE_ITO[4],
                capsize=3)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(rows.cell, rows.seeds)])
    ax.set_xlabel(f"final held-out accuracy minus {against!r} (paired by seed, 95% CI)")
    return fig


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
    ax.axhline(0.0, color="gray", lw=0.8)
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
    ax.axhline(-record["margin_abs"], color=OKABE_ITO[5], ls="--", lw=0.8, label=f"-margin ({margin_label})")
    for found, ls in ((record.get("uncorrected", {}).get("critical_level"), ":"), (record["critical_level"], "-")):
        if found is not None:
            ax.axvline(found, color=OKABE_ITO[5], lw=0.8, ls=ls, label=f"critical {found:.3g}")
    ax.set_title(f"{record['family']} {record['mode']}, {record['old_logprobs']}, {record['response_len']}-token "
                 f"responses", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path
