"""Standard plots of a results directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_curves(metrics: pd.DataFrame, path: str | Path, smooth: int = 10) -> Path:
    """Held-out greedy accuracy and (smoothed) training reward vs step: one colour per cell,
    thin lines per run, a thick line for the mean over runs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    panels = [("eval_greedy_accuracy", "held-out greedy accuracy", 1), ("reward_mean", "training reward", smooth)]
    for (cell_id, cell), color in zip(metrics.groupby("cell_id", sort=False), plt.cm.tab10.colors * 10):
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
    plt.close(fig)
    return path
