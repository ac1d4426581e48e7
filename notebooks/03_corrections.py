# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Corrections against mode: what does a correction buy once the switch to recompute is taken out?
#
# In bypass mode (π_old = the sampler's log-probs) the PPO ratio π_θ/μ already carries the
# mismatch r_corr = π_old/μ. A weighting correction (TIS, MIS, ...) then has two readings:
# **replace** the ratio's denominator with the learner's π_old so the weight replaces r_corr
# (verl's decoupled mode, which is *recompute plus the weight*), or **multiply** the weight onto
# π_θ/μ, counting the mismatch twice. timsim used to do "replace" silently, which made every
# earlier "weighting recovers, rejection does not" a comparison of modes (issue 22a).
#
# Study S1 (`configs/sweeps/s1_correction_vs_mode.yaml`): the quickstart task (5-token
# responses), persistent (context-keyed) Gaussian logit noise calibrated at the base model to
# 0.1 and 0.3 nats per response, eight named arms, 300 steps, **10 paired seeds** against one
# zero-mismatch twin. Every cell's `ratio_denominator` (pi_old or mu) comes from the manifest,
# so the mode each arm really trained in is on every row.

# %%
# %matplotlib inline
import json
import os
from pathlib import Path

import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

import timsim
from timsim import plots
from timsim.summary import paired_contrast, paired_differences

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
TOY = os.environ.get("TIMSIM_NOTEBOOK_TOY") == "1"  # only reads published data: toy keeps the tracked figure as is
FIGURES = ROOT / "docs" / "figures"
DATA = ROOT / "docs" / "results" / "data" / "s1-correction-vs-mode"
pd.set_option("display.precision", 3)

s1 = timsim.load(DATA)
manifest = json.loads((DATA / "manifest.json").read_text())
print("regenerate with:", manifest["export"]["command"])
cells = pd.DataFrame([{"cell": cell, "arm": cell.split(",kl=")[0] if ",kl=" in cell else cell,
                       "level": float(cell.split(",kl=")[1]) if ",kl=" in cell else 0.0,
                       "ratio_denominator": info.get("ratio_denominator")} for cell, info in manifest["cells"].items()])
cells

# %% [markdown]
# ## Every arm against the zero-mismatch twin
#
# Final held-out greedy accuracy and the area under the accuracy curve (mean accuracy over
# training), each minus the zero twin's on the same seed, mean ± 95% paired CI over 10 seeds.

# %%
rows = []
for c in cells[cells.cell != "zero"].itertuples():
    final, final_ci = paired_contrast(s1.summary, c.cell, "zero", "final_accuracy")
    auc, auc_ci = paired_contrast(s1.summary, c.cell, "zero", "auc_accuracy")
    trained = s1.metrics[(s1.metrics.cell_id == c.cell) & (s1.metrics.step > 0)]
    rows.append({"arm": c.arm, "level (nats/response)": c.level, "ratio denominator": c.ratio_denominator,
                 "final − zero": final, "±": final_ci, "AUC − zero": auc, "± ": auc_ci,
                 "rejected tokens": trained.rejected_token_frac.mean(),
                 "probe cos (bypass)": trained.probe_bypass_cos.mean()})
table = pd.DataFrame(rows)
display(table)

fig = Figure(figsize=(11, 5), layout="constrained")
axes = fig.subplots(1, 2, sharey=True)
for ax, (level, part) in zip(axes, table.groupby("level (nats/response)")):
    plots.forest(part.assign(denominator=part["ratio denominator"].map(lambda d: f"ratio against {d}")),
                 "final − zero", "±", label="arm", hue="denominator", ax=ax,
                 xlabel="final accuracy − zero twin (paired, 95% CI)")
    ax.set_title(f"{level:g} nats per response")
axes[1].get_legend().remove()
if not TOY:
    fig.savefig(FIGURES / "s1_correction_vs_mode.png", dpi=110)
fig

# %% [markdown]
# ## What the corrections did to the batch, against what they recovered
#
# The same paired final-accuracy differences against the two batch measures in the table:
# the fraction of response tokens the correction removed from the loss (left, mean over
# training), and the probe's cosine between the bypass-mode gradient under the arm's mismatch
# and correction and the zero-mismatch twin's gradient at the same parameters (right, 1: the
# same direction; mean over the probe steps). One row per noise level, each point one arm,
# coloured by the ratio's denominator as above; closer to 0 on the vertical axis is more
# recovered. On the left only the arms that reject tokens are named; the rest sit at 0.

# %%
fig = Figure(figsize=(12, 8.5), layout="constrained")
axes = fig.subplots(2, 2)
for (left, right), (level, part) in zip(axes, table.groupby("level (nats/response)")):
    part = part.assign(denominator=part["ratio denominator"].map(lambda d: f"ratio against {d}"),
                       rejecting=part.arm.where(part["rejected tokens"] > 0, ""))  # named on the right
    plots.against(part, "rejected tokens", "final − zero", "±", hue="denominator", ax=left, zero=True,
                  annotate="rejecting", xlabel="fraction of tokens the correction rejected (mean over training)",
                  ylabel="final accuracy − zero twin (paired, 95% CI)")
    plots.against(part, "probe cos (bypass)", "final − zero", "±", hue="denominator", ax=right, zero=True,
                  annotate="arm", xlabel="probe: cos(bypass-mode gradient, zero-mismatch gradient), mean over probes",
                  ylabel="final accuracy − zero twin (paired, 95% CI)")
    left.set_title(f"{level:g} nats per response: recovery against the rejected fraction")
    right.set_title(f"{level:g} nats per response: recovery against the probe cosine")
    right.get_legend().remove()
fig

# %% [markdown]
# ## The contrasts that separate the correction from the mode
#
# Paired by seed within a level:
# - **bypass+tis-replace − recompute**: what TIS adds to recompute when it is reached through
#   bypass (the old confounded arm against the mode it really ran in);
# - **recompute+tis − recompute**: TIS on top of recompute, stated honestly;
# - **bypass+tis-multiply − bypass**: what multiplying the weight onto the bypass ratio does;
# - **recompute − bypass**: the switch of mode alone.

# %%
contrasts = [("bypass+tis-replace", "recompute"), ("recompute+tis", "recompute"), ("bypass+tis-multiply", "bypass"),
             ("recompute", "bypass"), ("bypass+dual_clip", "bypass"), ("bypass+seq_mask", "bypass"),
             ("recompute+mis", "recompute")]
out = []
for level in sorted(cells.level[cells.level > 0].unique()):
    for arm, reference in contrasts:
        cell, ref = f"{arm},kl={level:g}", f"{reference},kl={level:g}"
        final, final_ci = paired_contrast(s1.summary, cell, ref, "final_accuracy")
        auc, auc_ci = paired_contrast(s1.summary, cell, ref, "auc_accuracy")
        out.append({"level": level, "contrast": f"{arm} − {reference}", "final": final, "±": final_ci,
                    "AUC": auc, "± ": auc_ci, "seeds": len(paired_differences(s1.summary, cell, "final_accuracy", ref))})
pd.DataFrame(out)

# %% [markdown]
# ## Over training: the corrections' effective sample size and the mismatch
#
# `corr_ess` is the normalised effective sample size of the correction weights (1: no
# reweighting); `is_ess` that of r_corr itself. Rolling means over 20 steps, 95% CI bands.

# %%
fig = Figure(figsize=(11, 4), layout="constrained")
left, right = fig.subplots(1, 2)
level = cells.level.max()
shown = [f"{arm},kl={level:g}" for arm in ("recompute+tis", "bypass+tis-replace", "bypass+tis-multiply",
                                            "recompute+mis")]
plots.curves(s1.metrics[s1.metrics.step > 0], "corr_ess", cells=shown, smooth=20, runs=False, ax=left)
plots.curves(s1.metrics[s1.metrics.step > 0], "is_ess", cells=[f"bypass,kl={level:g}", f"recompute,kl={level:g}"],
             smooth=20, runs=False, ax=right)
fig

# %% [markdown]
# ## What S1 says (the tables above, 10 paired seeds)
#
# - **The mode recovers**: recompute − bypass is +0.07 (0.1 nats) and +0.13 (0.3 nats) of final
#   accuracy, nearly all of the bypass loss at 0.1 and four fifths of it at 0.3.
# - **Token TIS adds nothing measurable on top of recompute** (−0.017 ± 0.017, −0.003 ± 0.023),
#   and the old "bypass + TIS" is recompute + TIS, indistinguishable from plain recompute: the
#   earlier "weighting recovers, rejection does not" was the mode.
# - **Multiplying the weight onto the bypass ratio hurts** (−0.09, −0.10 against plain bypass).
# - Dual-clip and sequence masking do not rescue bypass; MIS on recompute is neutral to
#   slightly harmful.
# - **Neither batch measure orders the arms** (the recovery figure): bypass+seq_mask rejects 8%
#   and 28% of tokens and does no better than bypass (−0.101 against −0.071 at 0.1, −0.164
#   against −0.158 at 0.3); the TIS arms have the highest probe cosine (0.84–0.91) yet recover
#   no more than plain recompute, whose cosine is plain bypass's (0.77 and 0.66 against 0.78
#   and 0.64). `docs/results/s1-correction-vs-mode-cpu.md` has the scope and caveats.
