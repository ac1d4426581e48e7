"""Per-cell table of a finished sweep, paired by seed against reference cells (Markdown).

    python scripts/paired_table.py runs/corrections --against zero none

Columns: final held-out greedy accuracy (mean ± 95% CI over seeds), the paired difference
against each reference cell (same seeds, common random numbers), collapse rate and first
collapse step, mean fraction of response tokens the corrections rejected, and the mean
probe cosine (bypass mode) over the probe steps after step 0, when the sweep has probes.
"""

import argparse

import numpy as np

import timsim
from timsim.critical import paired_ci


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--against", nargs="+", default=["zero"])
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args()
    metrics, summary = timsim.load(args.path)
    fmt = lambda m, h: f"{m:.3f} ± {h:.3f}"  # noqa: E731
    head = ["cell", "final acc", *[f"− {ref} (paired)" for ref in args.against], "collapsed", "rejected tokens",
            "probe cos (bypass)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for cell, runs in summary.groupby("cell_id", sort=False):
        row = [cell, fmt(*paired_ci(runs.final_accuracy.to_numpy(), args.confidence))]
        for ref in args.against:
            twin = summary[summary.cell_id == ref].set_index("seed").final_accuracy
            diffs = (runs.set_index("seed").final_accuracy - twin.loc[runs.seed]).to_numpy(float)
            row.append("–" if cell == ref else fmt(*paired_ci(diffs, args.confidence)))
        steps = runs.collapse_step.dropna()
        row.append(f"{runs.collapsed.mean():.2f}" + (f" (step {steps.min():.0f})" if len(steps) else ""))
        m = metrics[(metrics.cell_id == cell) & (metrics.step > 0)]
        row.append(f"{m.rejected_token_frac.mean():.3f}" if "rejected_token_frac" in m else "–")
        probe = m.dropna(subset=["probe_bypass_cos"]).probe_bypass_cos if "probe_bypass_cos" in m else []
        row.append(f"{np.mean(probe):.3f}" if len(probe) else "–")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
