"""Per-run summaries and per-cell means with 95% confidence intervals over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; beyond, the normal 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]

SUMMARY_METRICS = ["final_accuracy", "peak_accuracy", "peak_step", "final_reward", "mean_mismatch_k3", "collapsed"]
COLLAPSE_FRACTION = 0.5  # a run has collapsed when its smoothed reward stays below this fraction of its peak
COLLAPSE_WINDOW = 20  # steps of the rolling mean that smooths the reward


def t_quantile_975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def collapse(trained: pd.DataFrame, fraction: float = COLLAPSE_FRACTION, window: int = COLLAPSE_WINDOW) -> dict:
    """Peak of the smoothed reward (rolling mean over `window` steps) and its step; the collapse
    step: the first step after the peak whose smoothed reward is below `fraction` of the peak,
    or the first step with a non-finite loss or gradient norm; and whether the run ends
    recovered (smoothed reward back above that level, last step finite)."""
    smooth = trained.reward_mean.rolling(window, min_periods=1).mean().to_numpy()
    steps = trained.step.to_numpy()
    peak_i = int(smooth.argmax())
    below = np.flatnonzero(smooth[peak_i:] < fraction * smooth[peak_i]) + peak_i
    bad = ~np.isfinite(trained.loss.to_numpy()) | ~np.isfinite(trained.grad_norm.to_numpy())
    candidates = [i for i in (below[0] if below.size else None, np.flatnonzero(bad)[0] if bad.any() else None)
                  if i is not None]
    out = {"peak_reward": float(smooth[peak_i]), "peak_reward_step": int(steps[peak_i]),
           "collapsed": float(bool(candidates)), "collapse_step": float("nan"), "recovered": float("nan"),
           "nonfinite_steps": int(bad.sum())}
    if candidates:
        first = min(candidates)
        out["collapse_step"] = float(steps[first])
        out["recovered"] = float(bool(smooth[-1] >= fraction * smooth[peak_i] and not bad[-1]))
    return out


def summarize_runs(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run: base / final / peak held-out greedy accuracy, final reward (mean over the
    last 10% of steps), mean per-token mismatch k3, and collapse (`collapse`)."""
    rows = []
    for (cell_id, run_idx), df in metrics.groupby(["cell_id", "run_idx"], sort=False):
        ev = df.dropna(subset=["eval_greedy_accuracy"])
        trained = df[df.step > 0]
        if trained.empty:
            continue
        tail = trained[trained.step > trained.step.max() * 0.9]
        peak = ev.loc[ev.eval_greedy_accuracy.idxmax()]
        cfg_cols = {c: df[c].iloc[0] for c in df.columns if c.startswith("cfg.")}
        rows.append({"cell_id": cell_id, "run_idx": run_idx, "seed": int(df.seed.iloc[0]), **cfg_cols,
                     "steps": int(df.step.max()),
                     "base_accuracy": float(ev.eval_greedy_accuracy.iloc[0]),
                     "final_accuracy": float(ev.eval_greedy_accuracy.iloc[-1]),
                     "peak_accuracy": float(peak.eval_greedy_accuracy), "peak_step": int(peak.step),
                     "final_reward": float(tail.reward_mean.mean()),
                     "mean_mismatch_k3": float(trained.mismatch_k3.mean()), **collapse(trained)})
    return pd.DataFrame(rows)


def by_cell(summary: pd.DataFrame, metrics: list[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Mean, 95% CI half-width (Student t over seeds) and n per cell for each metric."""
    rows = []
    for cell_id, df in summary.groupby("cell_id", sort=False):
        row = {"cell_id": cell_id, "n": len(df)}
        for m in metrics:
            values = df[m].astype(float)
            row[m] = values.mean()
            row[f"{m}_ci95"] = (t_quantile_975(len(df) - 1) * values.std(ddof=1) / math.sqrt(len(df))
                                if len(df) > 1 else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)
