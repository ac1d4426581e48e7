"""Per-run summaries and per-cell means with 95% confidence intervals over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import stdtrit  # the t quantile; scipy.stats alone costs 0.5 s of every import

from timsim.config_types import ConfigError

SUMMARY_METRICS = ["final_accuracy", "peak_accuracy", "peak_step", "final_reward", "mean_mismatch_k3", "collapsed"]
# What each column of a run's summary row means (the tables, the report and the notebooks show these).
SUMMARY_COLUMNS = {
    "base_accuracy": "held-out greedy accuracy of the base policy (step 0)",
    "final_accuracy": "held-out greedy accuracy at the last step",
    "peak_accuracy": "highest held-out greedy accuracy at any evaluation",
    "peak_step": "step of peak_accuracy",
    "auc_accuracy": "area under the held-out accuracy curve divided by its length in steps (trapezoid over "
                    "evaluations): the mean accuracy over training, which rewards learning early",
    "final_reward": "mean training reward over the last 10% of steps (sampled responses, T = sampler.temperature)",
    "mean_mismatch_k3": "mean over steps of the per-token k3 estimate of KL(mu || pi_old) on the training batch",
    "peak_reward": "peak of the training reward smoothed over 20 steps",
    "peak_reward_step": "step of peak_reward",
    "collapsed": "1 if the smoothed reward fell below half its peak after the peak, or a loss or gradient was not finite",
    "collapse_step": "first step of that collapse (NaN: none)",
    "recovered": "after a collapse: 1 if the run ended back above half its peak",
    "nonfinite_steps": "steps whose loss or gradient norm was not finite (their update was skipped)",
}
COLLAPSE_FRACTION = 0.5  # a run has collapsed when its smoothed reward stays below this fraction of its peak
COLLAPSE_WINDOW = 20  # steps of the rolling mean that smooths the reward


def ci_half_width(values, confidence: float = 0.95) -> float:
    """Two-sided Student-t confidence half-width of the mean of `values` (the one place timsim
    computes it: per-cell CIs over seeds and paired differences alike); NaN below 2 values."""
    values = np.asarray(values, float)
    if values.size < 2:
        return float("nan")
    return float(stdtrit(values.size - 1, 0.5 + confidence / 2) * values.std(ddof=1) / math.sqrt(values.size))


def format_ci(mean: float, ci: float) -> str:
    """'mean ± ci' to 3 and 2 significant digits ('mean' alone when the CI is NaN): the one
    format of an interval in timsim's tables and reports."""
    return f"{mean:.3g}" if math.isnan(ci) else f"{mean:.3g} ± {ci:.2g}"


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


def _accuracies(ev: pd.DataFrame) -> dict:
    """Base, final and peak held-out accuracy of one run (NaN when it ran without evaluation)."""
    if ev.empty:
        return dict.fromkeys(("base_accuracy", "final_accuracy", "peak_accuracy", "peak_step", "auc_accuracy"),
                             float("nan"))
    peak = ev.loc[ev.eval_greedy_accuracy.idxmax()]
    steps, accuracy = ev.step.to_numpy(float), ev.eval_greedy_accuracy.to_numpy(float)
    span = steps[-1] - steps[0]
    auc = float(np.trapezoid(accuracy, steps) / span) if span > 0 else float(accuracy[-1])
    return {"base_accuracy": float(accuracy[0]), "final_accuracy": float(accuracy[-1]),
            "peak_accuracy": float(peak.eval_greedy_accuracy), "peak_step": int(peak.step), "auc_accuracy": auc}


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
        cfg_cols = {c: df[c].iloc[0] for c in df.columns if c.startswith("cfg.")}
        rows.append({"cell_id": cell_id, "run_idx": run_idx, "seed": int(df.seed.iloc[0]), **cfg_cols,
                     "steps": int(df.step.max()),
                     **_accuracies(ev),
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
            row[f"{m}_ci95"] = ci_half_width(values)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_ci(diffs: np.ndarray, confidence: float) -> tuple[float, float]:
    """Mean and two-sided confidence half-width (Student t) of paired differences."""
    diffs = np.asarray(diffs, float)
    if diffs.size < 2:
        return float(diffs.mean()), math.inf
    return float(diffs.mean()), ci_half_width(diffs, confidence)


def paired_differences(summary: pd.DataFrame, cell_id: str, column: str = "final_accuracy",
                       reference: str = "zero") -> np.ndarray:
    """Per seed both cells ran: `column` of `cell_id`'s run minus `reference`'s (by default the
    zero-mismatch twin's)."""
    twin = summary[summary.cell_id == reference].set_index("seed")[column]
    runs = summary[summary.cell_id == cell_id].set_index("seed")[column]
    common = runs.index.intersection(twin.index)
    return (runs.loc[common] - twin.loc[common]).to_numpy(float)


def paired_contrast(summary: pd.DataFrame, cell_id: str, reference: str = "zero", column: str = "final_accuracy",
                    confidence: float = 0.95) -> tuple[float, float]:
    """Mean and CI half-width of `cell_id` minus `reference`, paired by seed."""
    return paired_ci(paired_differences(summary, cell_id, column, reference), confidence)


def crossing_level(levels, mean_diffs, margin: float) -> float:
    """The mismatch level at which a dose-response curve (mean paired difference against the
    twin at each of the increasing `levels`) first falls below -`margin`, interpolated linearly
    in log(level) between the grid points around the crossing. NaN when it never does; the
    first level when it is already below there (read as "at most")."""
    levels, mean_diffs = np.asarray(levels, float), np.asarray(mean_diffs, float)
    below = np.flatnonzero(mean_diffs < -margin)
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(levels[0])
    (x0, x1), (y0, y1) = np.log(levels[i - 1:i + 1]), mean_diffs[i - 1:i + 1]
    return float(np.exp(x0 + (x1 - x0) * (-margin - y0) / (y1 - y0)))


def crossing_with_ci(levels, diffs_LS, margin: float, confidence: float = 0.95, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """`crossing_level` of the mean over seeds of paired differences `diffs_LS` [level, seed],
    with a percentile bootstrap over seeds (each resample draws seeds with replacement and
    keeps every level of a seed together, so the pairing survives). `not_crossed` is the
    fraction of resamples that never cross; the CI is over those that do."""
    diffs_LS = np.asarray(diffs_LS, float)
    rng = np.random.default_rng(seed)
    n_seeds = diffs_LS.shape[1]
    boot = np.array([crossing_level(levels, diffs_LS[:, rng.integers(0, n_seeds, n_seeds)].mean(1), margin)
                     for _ in range(n_boot)])
    finite = boot[np.isfinite(boot)]
    tail = (1.0 - confidence) / 2
    low, high = (np.quantile(finite, [tail, 1.0 - tail]) if finite.size else (math.nan, math.nan))
    return {"level": crossing_level(levels, diffs_LS.mean(1), margin), "low": float(low), "high": float(high),
            "not_crossed": float(1.0 - finite.size / n_boot), "boot": boot}


def paired_table(metrics: pd.DataFrame, summary: pd.DataFrame, against: list[str],
                 confidence: float = 0.95) -> pd.DataFrame:
    """Per cell: final held-out accuracy, its paired difference (same seeds) against each
    reference cell, collapse rate and first collapse step, and means over training of the
    mismatch (per-token KL, per-response KL, r_corr outside [0.5, 2]), of the corrections'
    rejected fraction and of the bypass probe cosine where the sweep has them."""

    unknown = [ref for ref in against if ref not in set(summary.cell_id)]
    if unknown:
        raise ConfigError(f"--against names unknown cell(s) {unknown}; the results have "
                          f"{', '.join(summary.cell_id.unique())}.")
    rows = []
    for cell, runs in summary.groupby("cell_id", sort=False):
        acc, acc_ci = paired_ci(runs.final_accuracy.to_numpy(), confidence)
        row = {"cell": cell, "seeds": len(runs), "final_accuracy": acc, "final_accuracy_ci": acc_ci}
        for ref in against:
            row[f"minus_{ref}"], row[f"minus_{ref}_ci"] = (0.0, 0.0) if cell == ref else paired_contrast(
                summary, cell, ref, "final_accuracy", confidence)
        row["collapse_rate"] = float(runs.collapsed.mean())
        row["first_collapse_step"] = float(runs.collapse_step.min())
        trained = metrics[(metrics.cell_id == cell) & (metrics.step > 0)]
        for name in ("kl_sampler_learner", "seq_kl", "ratio_out_band_frac", "rejected_token_frac"):
            row[name] = float(trained[name].mean()) if name in trained else float("nan")
        probes = trained.probe_bypass_cos.dropna() if "probe_bypass_cos" in trained else pd.Series(dtype=float)
        row["probe_bypass_cos"] = float(probes.mean()) if len(probes) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
