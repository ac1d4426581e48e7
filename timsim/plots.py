"""Standard plots: training curves of a results directory, a finder's dose-response.

Figures are drawn with matplotlib's object-oriented API (`matplotlib.figure.Figure`) and
saved to files: no pyplot, so importing or calling timsim never changes the matplotlib backend
of the process (a notebook keeps its inline plots).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure


def plot_curves(metrics: pd.DataFrame, path: str | Path, smooth: int = 10) -> Path:
    """Held-out greedy accuracy and (smoothed) training reward vs step: one colour per cell,
    thin lines per run, a thick line for the mean over runs."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = [("eval_greedy_accuracy", "held-out greedy accuracy", 1), ("reward_mean", "training reward", smooth)]
    for (cell_id, cell), color in zip(metrics.groupby("cell_id", sort=False), colormaps["tab10"].colors * 10):
        for ax, (name, title, window) in zip(axes, panels):
            data = cell.dropna(subset=[name])
            wide = data.pivot(index="step", columns="run_idx", values=name).rolling(window, min_periods=1).mean()
            ax.plot(wide.index, wide.values, color=color, alpha=0.25, lw=0.8)
            ax.plot(wide.index, wide.mean(axis=1), color=color, lw=2, label=f"{cell_id} (n={wide.shape[1]})")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(loc="lower right", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_dose_response(table: pd.DataFrame, record: dict, margin_label: str, path: Path) -> Path:
    """Paired accuracy difference (± CI) against the level, with the margin and the critical level."""
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for arm, levels in table[table.level > 0].groupby("arm", sort=False):
        label = arm if arm == "uncorrected" else record.get("correction", arm)
        ax.errorbar(levels.level, levels.paired_diff, yerr=levels.paired_diff_ci, marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.axhline(-record["margin_abs"], color="red", ls="--", lw=0.8, label=f"-margin ({margin_label})")
    for found, style in ((record.get("uncorrected", {}).get("critical_level"), ":"), (record["critical_level"], "-")):
        if found is not None:
            ax.axvline(found, color="red", lw=0.8, ls=style, label=f"critical {found:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"mismatch level ({record['target']}, calibrated at the base model)")
    ax.set_ylabel("final accuracy minus zero-mismatch twin")
    ax.set_title(f"{record['family']} {record['mode']}, {record['old_logprobs']}, {record['response_len']}-token "
                 f"responses", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path
