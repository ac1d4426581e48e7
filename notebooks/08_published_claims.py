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
# # Published claims about how mismatched runs fail, measured
#
# Study S4 (issue 22) tests claims from the training–inference-mismatch literature that users ask
# about, each against the zero-mismatch twin with **10 paired seeds**, on the quickstart task
# (3-digit addition, 5-token responses, 300–400 steps):
#
# - *TIM paper*: bypass gains that do not transfer to the sampler; multi-stage collapse in
#   recompute against a decline to a plateau in bypass; the mismatch KL flat while reward falls;
#   the zero twin still improving where mismatched runs peak.
# - *VeXact*: the mismatch KL and the gradient norm blowing up together before a collapse.
# - timsim's own old claim that fresh noise never degraded a recompute run up to 1 nat per
#   response (5 seeds).
# - Heavy tails hurting more at equal mean |δ| than at equal KL.
# - *R3 paper*: MoE routing flips making extreme tokens that dense noise at equal KL does not.
# - *Score Centering*: collapse sooner as the noise grows; ±1 rewards trained online the least
#   stable; a frozen sampler stable.
#
# Data: study S1 (`configs/sweeps/s1_correction_vs_mode.yaml`: 0.1 and 0.3 nats per response,
# 300 steps), `configs/sweeps/s4_collapse.yaml` (1 and 3 nats per response, 400 steps) and
# `configs/sweeps/s4_heavy_tails.yaml` (three noise shapes, 300 steps), `configs/sweeps/s4_moe_extreme.yaml`
# (a 4-expert policy, router against dense noise, 300 steps), `configs/sweeps/s4_score_centering.yaml`
# (REINFORCE without a baseline, 0/1 against ±1 rewards, online against frozen, 300 steps). Persistent (context-keyed) Gaussian noise on the sampler's logits unless a cell says `fresh`.

# %%
# %matplotlib inline
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

import timsim
from timsim import plots
from timsim.summary import paired_ci, paired_contrast, paired_differences

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
FIGURES = ROOT / "docs" / "figures"
DATA = ROOT / "docs" / "results" / "data"
TOY = os.environ.get("TIMSIM_NOTEBOOK_TOY") == "1"  # CI: everything runs, no tracked figure is rewritten
pd.set_option("display.precision", 3)

s1, s4 = timsim.load(DATA / "s1-correction-vs-mode"), timsim.load(DATA / "s4-collapse")
for name in ("s1-correction-vs-mode", "s4-collapse"):
    print(name, "regenerates with:", json.loads((DATA / name / "manifest.json").read_text())["export"]["command"])


def final_evals(result) -> pd.DataFrame:
    """Each run's evaluation at its last step, indexed by (cell, seed)."""
    m = result.metrics
    return m[m.step == m.step.max()].set_index(["cell_id", "seed"])


def size_and_cost(result, columns, twin: str = "zero") -> pd.DataFrame:
    """Each cell's mean of `columns` over training, and its final accuracy and AUC against
    `twin` (mean and CI half-width, paired by seed)."""
    table = result.metrics[result.metrics.step > 0].groupby("cell_id", sort=False)[columns].mean()
    for cell in table.index.drop(twin):
        table.loc[cell, "final − twin"], table.loc[cell, "±"] = paired_contrast(result.summary, cell, twin)
        table.loc[cell, "AUC − twin"], table.loc[cell, "± "] = paired_contrast(result.summary, cell, twin,
                                                                                "auc_accuracy")
    return table


def base_evals(result) -> pd.DataFrame:
    m = result.metrics
    return m[m.step == 0].set_index(["cell_id", "seed"])


# %% [markdown]
# ## Do bypass gains transfer to the sampler?
#
# `eval_greedy_accuracy` is the learner's held-out accuracy, `eval_sampler_greedy_accuracy` the
# sampler's: the same weights through the mismatched engine, what a deployment would serve. The
# claim: in bypass the learner improves while the sampler does not follow. Per run: the gain of
# each from the base model to the last step, and the learner − sampler gap at the end (mean ±
# 95% CI over seeds; the last column pairs bypass and recompute by seed).

# %%
rows = []
for result in (s1, s4):
    last, first = final_evals(result), base_evals(result)
    for kl in sorted({c.split("kl=")[1] for c in result.summary.cell_id.unique() if "kl=" in c}, key=float):
        gaps = {}
        for mode in ("bypass", "recompute"):
            cell = f"{mode},kl={kl}"
            learner = last.loc[cell].eval_greedy_accuracy - first.loc[cell].eval_greedy_accuracy
            sampler = last.loc[cell].eval_sampler_greedy_accuracy - first.loc[cell].eval_sampler_greedy_accuracy
            gaps[mode] = last.loc[cell].eval_greedy_accuracy - last.loc[cell].eval_sampler_greedy_accuracy
            rows.append({"nats per response": float(kl), "mode": mode,
                         "learner gain": paired_ci(learner.to_numpy(), 0.95)[0],
                         "sampler gain": paired_ci(sampler.to_numpy(), 0.95)[0],
                         "sampler / learner gain": sampler.mean() / learner.mean(),
                         "learner − sampler at the end": gaps[mode].mean(),
                         "±": paired_ci(gaps[mode].to_numpy(), 0.95)[1]})
        rows[-1]["gap: bypass − recompute"] = "{:+.3f} ± {:.3f}".format(
            *paired_ci((gaps["bypass"] - gaps["recompute"]).to_numpy(), 0.95))
transfer = pd.DataFrame(rows)
display(transfer)

# %% [markdown]
# ## Every S4 arm against the twin
#
# Final held-out greedy accuracy and AUC minus the zero twin's on the same seed (mean ± 95%
# CI), how many of the 10 runs collapsed (smoothed reward below half its peak after the peak),
# and when.

# %%
summary4 = s4.summary
rows = []
for cell in summary4.cell_id.unique():
    runs = summary4[summary4.cell_id == cell]
    row = {"arm": cell, "final": runs.final_accuracy.mean(), "collapsed": int(runs.collapsed.sum()),
           "collapse step (median)": runs.collapse_step.median(), "peak step (median)": runs.peak_step.median()}
    if cell != "zero":
        row["final − twin"], row["±"] = paired_contrast(summary4, cell, "zero")
        row["AUC − twin"], row["± "] = paired_contrast(summary4, cell, "zero", "auc_accuracy")
    rows.append(row)
arms = pd.DataFrame(rows)
display(arms)

# %% [markdown]
# ## How do the runs fail? Recompute against bypass
#
# Each run's training reward (rolling mean over 20 steps), thin, with the mean over seeds thick,
# at 3 nats per response. The TIM paper's picture: recompute runs collapse in stages (drops with
# plateaus between), bypass runs decline to a plateau.

# %%
trained4 = s4.metrics[s4.metrics.step > 0]
fig = Figure(figsize=(12, 4), layout="constrained")
axes = fig.subplots(1, 3, sharey=True)
for ax, cell in zip(axes, ["recompute,kl=3", "bypass,kl=3", "reinforce,kl=3"]):
    plots.curves(trained4, "reward_mean", cells=["zero", cell], smooth=20, ax=ax)
    ax.set_title(cell)
if not TOY:
    fig.savefig(FIGURES / "s4_collapse.png", dpi=110)
fig

# %% [markdown]
# ## Does the mismatch KL stay flat while reward falls, and does it lead a collapse?
#
# For every run the collapse criterion flags (smoothed training reward below half its peak after
# the peak): the step of its reward peak and of its collapse, and the first step (after the
# first 50) at which the per-token mismatch KL and the gradient norm exceed twice their median
# over steps 1–50 (the VeXact signature: both blow up before the collapse). A positive lead
# means the signal came first. Read the figure above first: the flagged runs are bypass runs at
# 3 nats whose reward never rose, flagged because an early noisy peak is twice their plateau.

# %%
lead_rows = []
for (cell, seed), run in trained4.groupby(["cell_id", "seed"]):
    record = summary4[(summary4.cell_id == cell) & (summary4.seed == seed)].iloc[0]
    if not record.collapsed:
        continue
    early, later = run[run.step <= 50], run[run.step > 50]
    row = {"arm": cell, "seed": seed, "peak step": record.peak_reward_step, "collapse step": record.collapse_step}
    for signal in ("kl_sampler_learner", "grad_norm"):
        above = later[later[signal] > 2 * early[signal].median()]
        first = float(above.step.iloc[0]) if len(above) else np.nan
        row[f"{signal} ×2 at"] = first
        row[f"{signal} lead"] = record.collapse_step - first
    window = run[(run.step >= record.peak_reward_step) & (run.step <= record.collapse_step)]
    row["KL change peak→collapse"] = (window.kl_sampler_learner.iloc[-5:].mean() / window.kl_sampler_learner.iloc[:5].mean()
                                      if len(window) >= 10 else np.nan)
    lead_rows.append(row)
leads = pd.DataFrame(lead_rows)
display(leads if len(leads) else "no run collapsed")

# %% [markdown]
# ## Is the zero twin still improving where mismatched runs peak?
#
# For each arm: the median step of its runs' accuracy peak, and the twin's gain after that step
# (its final accuracy minus its accuracy at the evaluation nearest the peak; mean ± CI over seeds).

# %%
ev4 = s4.metrics.dropna(subset=["eval_greedy_accuracy"])
twin_curve = ev4[ev4.cell_id == "zero"].pivot(index="step", columns="seed", values="eval_greedy_accuracy")
rows = []
for cell in summary4.cell_id.unique():
    if cell == "zero":
        continue
    peak = summary4[summary4.cell_id == cell].peak_step.median()
    at = twin_curve.index[np.abs(twin_curve.index - peak).argmin()]
    gain = twin_curve.iloc[-1] - twin_curve.loc[at]
    rows.append({"arm": cell, "median peak step": peak, "twin gain after it": gain.mean(),
                 "±": paired_ci(gain.to_numpy(), 0.95)[1]})
display(pd.DataFrame(rows))

# %% [markdown]
# ## Heavy tails: does matching by mean |δ| hide them, and matching by KL not?
#
# `configs/sweeps/s4_heavy_tails.yaml`: bypass, persistent noise, 300 steps, 10 paired seeds.
# Student-t (ν 2.2) and sparse spikes are each set once to the Gaussian's per-response KL
# (0.3 nats) and once to its mean |δ| (0.187 nats); the Gaussian at 0.7 nats per response is the
# KL-matched control for the equal-|δ| arms (whose KL calibration put at 0.56 and 0.70). First
# the size of each arm's mismatch over training, then each arm's final accuracy and AUC against
# the twin, and the contrasts the claim is about (paired by seed).

# %%
tails = timsim.load(DATA / "s4-heavy-tails")
print("regenerates with:", json.loads((DATA / "s4-heavy-tails" / "manifest.json").read_text())["export"]["command"])
SIZE = ["seq_kl", "kl_sampler_learner", "delta_abs_mean", "delta_abs_q99", "ratio_out_band_frac", "extreme_token_frac"]
summary_t = tails.summary
display(size_and_cost(tails, SIZE))

CONTRASTS = [  # (arm, reference, what the pair holds equal)
    ("student_t,kl=0.3", "gaussian,kl=0.3", "KL"), ("spikes,kl=0.3", "gaussian,kl=0.3", "KL"),
    ("student_t,abs=0.187", "gaussian,kl=0.3", "mean |δ|"), ("spikes,abs=0.187", "gaussian,kl=0.3", "mean |δ|"),
    ("student_t,abs=0.187", "gaussian,kl=0.7", "≈ KL (0.56 against 0.7)"),
    ("spikes,abs=0.187", "gaussian,kl=0.7", "KL (0.70 against 0.7)"),
]
rows = []
for arm, reference, equal in CONTRASTS:
    final = "{:+.3f} ± {:.3f}".format(*paired_contrast(summary_t, arm, reference))
    auc = "{:+.3f} ± {:.3f}".format(*paired_contrast(summary_t, arm, reference, "auc_accuracy"))
    rows.append({"arm − reference": f"{arm} − {reference}", "held equal": equal, "final": final, "AUC": auc})
display(pd.DataFrame(rows))

# %%
fig = Figure(figsize=(12, 4), layout="constrained")
axes = fig.subplots(1, 2, sharey=True)
plots.curves(tails.metrics.dropna(subset=["eval_greedy_accuracy"]), "eval_greedy_accuracy",
             cells=["zero", "gaussian,kl=0.3", "student_t,kl=0.3", "spikes,kl=0.3"], runs=False, ax=axes[0])
axes[0].set_title("equal KL (0.3 nats per response)")
plots.curves(tails.metrics.dropna(subset=["eval_greedy_accuracy"]), "eval_greedy_accuracy",
             cells=["zero", "gaussian,kl=0.3", "student_t,abs=0.187", "spikes,abs=0.187", "gaussian,kl=0.7"],
             runs=False, ax=axes[1])
axes[1].set_title("equal mean |δ| (0.187 nats), and the Gaussian at their KL")
if not TOY:
    fig.savefig(FIGURES / "s4_heavy_tails.png", dpi=110)
fig


# %% [markdown]
# ## MoE routing flips against dense noise at equal KL (the R3 paper's extreme tokens)
#
# `configs/sweeps/s4_moe_extreme.yaml`: a 4-expert, top-2 policy; Gaussian noise on the
# sampler's router logits or on its output logits (both drawn afresh every step), each
# calibrated at the base to a per-token KL of 0.01 (router σ 0.18, about the published ~10%
# flip rate) and 0.05; R3 replays the sampler's routing in the learner at the 0.05 arm's σ.
# Bypass, 300 steps, 10 paired seeds. The claim: routing flips make *extreme* tokens
# (|π_old(y) − μ(y)| > 0.5) that dense noise at the same KL does not.

# %%
moe = timsim.load(DATA / "s4-moe-extreme")
print("regenerates with:", json.loads((DATA / "s4-moe-extreme" / "manifest.json").read_text())["export"]["command"])
trained_m = moe.metrics[moe.metrics.step > 0]
MOE_SIZE = ["kl_sampler_learner", "delta_abs_mean", "delta_abs_q99", "delta_abs_max", "extreme_token_frac",
            "ratio_out_band_frac", "route_flip_frac", "route_any_layer_frac"]
summary_m = moe.summary
display(size_and_cost(moe, MOE_SIZE))

# Per seed: each arm's extreme-token fraction over training, router minus dense at equal KL.
per_run = trained_m.groupby(["cell_id", "seed"]).extreme_token_frac.mean().unstack("cell_id")
rows = []
for kl in ("0.01", "0.05"):
    router, dense = f"router,kl={kl}", f"dense,kl={kl}"
    extreme = paired_ci((per_run[router] - per_run[dense]).to_numpy(), 0.95)
    rows.append({"per-token KL": float(kl), "extreme tokens: router": per_run[router].mean(),
                 "dense": per_run[dense].mean(), "router − dense": "{:+.4f} ± {:.4f}".format(*extreme),
                 "final: router − dense": "{:+.3f} ± {:.3f}".format(*paired_contrast(summary_m, router, dense)),
                 "AUC: router − dense": "{:+.3f} ± {:.3f}".format(
                     *paired_contrast(summary_m, router, dense, "auc_accuracy"))})
display(pd.DataFrame(rows))

# %%
fig = Figure(figsize=(12, 4), layout="constrained")
axes = fig.subplots(1, 2)
plots.curves(trained_m, "extreme_token_frac", cells=["zero", "router,kl=0.05", "dense,kl=0.05", "router,kl=0.05,R3"],
             smooth=10, runs=False, ax=axes[0])
axes[0].set_title("tokens with |π_old − μ| > 0.5, per-token KL 0.05")
plots.curves(moe.metrics.dropna(subset=["eval_greedy_accuracy"]), "eval_greedy_accuracy",
             cells=["zero", "router,kl=0.05", "dense,kl=0.05", "router,kl=0.05,R3"], runs=False, ax=axes[1])
if not TOY:
    fig.savefig(FIGURES / "s4_moe_extreme.png", dpi=110)
fig

# %% [markdown]
# ## Score Centering: ±1 rewards, a frozen sampler, and what centring removes
#
# `configs/sweeps/s4_score_centering.yaml`: REINFORCE (no ratio, no clip) with no baseline
# (`grpo.advantage: none`), persistent Gaussian noise calibrated at the base to 0.3, 1 and 3
# nats per response, 0/1 against ±1 rewards (`grpo.reward_wrong: -1`), online against a sampler
# frozen at the base weights (`perturbation.frozen_sampler`), and score centering on the ±1
# arm; every arm has its own zero twin; 300 steps, 10 paired seeds. The theory (DESIGN §8.1):
# under μ ≠ π the update is Cov_μ(R, s) + (E_μ[R] − b)·E_μ[s]; with b = 0 the drift term pulls
# π towards μ when E_μ[R] > 0 (0/1) and pushes it away when E_μ[R] < 0 (±1 below half
# accuracy: at the base E_μ[R] ≈ 2·0.17 − 1 = −0.66, four times 0/1's pull); centring removes
# the drift, not the covariance's bias.

# %%
centring = timsim.load(DATA / "s4-score-centering")
print("regenerates with:",
      json.loads((DATA / "s4-score-centering" / "manifest.json").read_text())["export"]["command"])
summary_c = centring.summary
ARMS = {"01": "online, 0/1", "pm": "online, ±1", "frozen-01": "frozen, 0/1", "frozen-pm": "frozen, ±1",
        "centred-pm": "online, ±1, score centering"}
rows = []
for arm, label in ARMS.items():
    for level in ("0.3", "1", "3"):
        cell = f"{arm},kl={level}"
        if cell not in set(summary_c.cell_id):
            continue
        runs = summary_c[summary_c.cell_id == cell]
        rows.append({"arm": label, "nats per response": float(level),
                     "final − own twin": "{:+.3f} ± {:.3f}".format(*paired_contrast(summary_c, cell, f"{arm},zero")),
                     "AUC − own twin": "{:+.3f} ± {:.3f}".format(
                         *paired_contrast(summary_c, cell, f"{arm},zero", "auc_accuracy")),
                     "collapsed": runs.collapsed.mean(), "median collapse step": runs.collapse_step.median()})
display(pd.DataFrame(rows))
print("each twin against the online 0/1 twin (final):")
display(pd.DataFrame([{"twin": t, "final − online 0/1 twin": "{:+.3f} ± {:.3f}".format(
    *paired_contrast(summary_c, t, "01,zero"))} for t in ("pm,zero", "frozen-01,zero", "frozen-pm,zero",
                                                          "centred-pm,zero")]))


def damage_contrast(arm, reference, level, column="final_accuracy"):
    """(arm's loss to mismatch) − (reference's), each against its own twin, paired by seed."""
    d = (paired_differences(summary_c, f"{arm},kl={level}", column, f"{arm},zero")
         - paired_differences(summary_c, f"{reference},kl={level}", column, f"{reference},zero"))
    return "{:+.3f} ± {:.3f}".format(*paired_ci(d, 0.95))


display(pd.DataFrame([
    {"contrast": "±1 − 0/1 online (damage)", "level": lv, "final": damage_contrast("pm", "01", lv),
     "AUC": damage_contrast("pm", "01", lv, "auc_accuracy")} for lv in ("0.3", "1", "3")] + [
    {"contrast": "frozen − online, 0/1 (damage)", "level": "1", "final": damage_contrast("frozen-01", "01", "1"),
     "AUC": damage_contrast("frozen-01", "01", "1", "auc_accuracy")}] + [
    {"contrast": "centred − plain ±1 (final accuracy)", "level": lv,
     "final": "{:+.3f} ± {:.3f}".format(*paired_contrast(summary_c, f"centred-pm,kl={lv}", f"pm,kl={lv}")),
     "AUC": "{:+.3f} ± {:.3f}".format(*paired_contrast(summary_c, f"centred-pm,kl={lv}", f"pm,kl={lv}",
                                                      "auc_accuracy"))} for lv in ("1", "3")]))

# The drift's signature: the learner's entropy moves with the sign of E_mu[R] (pulled towards the
# noisier mu it rises, pushed away from it it falls), and centring takes away the fall.
trained_c = centring.metrics[centring.metrics.step > 0]
display(trained_c.groupby("cell_id", sort=False)[["kl_sampler_learner", "entropy_learner", "grad_norm"]].mean())

# %%
held_out = centring.metrics.dropna(subset=["eval_greedy_accuracy"])
fig = Figure(figsize=(15, 4), layout="constrained")
axes = fig.subplots(1, 3, sharey=True)
plots.curves(held_out, "eval_greedy_accuracy", cells=["01,zero", "01,kl=0.3", "01,kl=1", "01,kl=3"], runs=False,
             ax=axes[0])
axes[0].set_title("online, 0/1 rewards, no baseline")
plots.curves(held_out, "eval_greedy_accuracy", cells=["pm,zero", "pm,kl=0.3", "pm,kl=1", "pm,kl=3"], runs=False,
             ax=axes[1])
axes[1].set_title("online, ±1 rewards, no baseline")
plots.curves(held_out, "eval_greedy_accuracy", cells=["frozen-01,zero", "frozen-01,kl=1", "frozen-pm,zero",
                                                      "centred-pm,kl=1", "centred-pm,kl=3"], runs=False, ax=axes[2])
axes[2].set_title("frozen sampler, and ±1 with score centering")
if not TOY:
    fig.savefig(FIGURES / "s4_score_centering.png", dpi=110)
fig

# %% [markdown]
# ## What S4 says (10 paired seeds)
#
# - **Bypass gains transfer to the sampler as well as recompute's** (TIM paper: refuted at this
#   scale). The learner − sampler gap at the end is the same in both modes at every level
#   (bypass − recompute: +0.010 ± 0.017, −0.003 ± 0.027, +0.023 ± 0.019, −0.003 ± 0.047 at 0.1,
#   0.3, 1 and 3 nats per response), and the sampler gains more than the learner from the base
#   on (it starts lower, under its own noise).
# - **No multi-stage collapse in recompute** (not reproduced): at 1 and 3 nats per response no
#   recompute run collapsed in 400 steps; they learn steadily, slower (−0.098 ± 0.034 and
#   −0.178 ± 0.030 final accuracy against the twin).
# - **Bypass declines to a plateau** (reproduced): at 3 nats held-out accuracy falls from 0.35
#   to 0.21 in the first 50 steps and stays at 0.22–0.25 while the training reward sits at
#   ~0.07; at 1 nat it falls to 0.28 and then climbs slowly (0.40 at step 400).
# - **The mismatch KL stays flat while the run fails** (partly: seen in bypass, where runs fail;
#   recompute runs did not fail): in the bypass runs at 3 nats the per-token KL stays at
#   0.64–0.67 for 400 steps.
# - **KL and gradient norm blowing up before a collapse** (VeXact): not measurable here. No
#   run fell from a learned level (REINFORCE at 3 nats makes exactly recompute's updates and
#   learns); in the three flagged bypass runs the KL never doubled.
# - **The zero twin still improving where mismatched runs peak** (reproduced where runs fail):
#   bypass at 3 nats peaks at the base, and the twin gains +0.37 ± 0.02 after that; every other
#   arm still improves at step 400.
# - **Fresh noise in recompute at 1 nat per response does not degrade a run** (timsim's old
#   claim, now with power): +0.023 ± 0.018 final and −0.002 ± 0.009 AUC against the twin, while
#   persistent noise at the same level costs −0.098 ± 0.034.
# - **Heavy tails hurt more at equal mean |δ| than at equal KL**: refuted here. Sparse spikes
#   cost −0.026 ± 0.020 against the twin where Gaussian noise at the same KL costs −0.169 ±
#   0.035 (spikes − Gaussian +0.143 ± 0.040), and at the Gaussian's mean |δ| (2.3× its KL)
#   still only −0.023 ± 0.014. Neither KL nor mean |δ| ranks the damage across shapes; top-token
#   flips and the clip fraction do (Gaussian 6.7% and 7.3%, spikes 1.0% and 1.0%). The
#   Student-t arms trained at a third of their calibrated KL (one calibration batch estimates a
#   ν = 2.2 tail poorly), so their contrasts are not at equal KL.
# - **MoE routing flips make extreme tokens that dense noise at equal KL does not** (R3 paper):
#   reproduced for the tokens (router − dense: +0.0019 ± 0.0001 of tokens at per-token KL 0.01,
#   +0.0069 ± 0.0005 at 0.05, six times the dense arm's), not for their cost: final accuracy
#   router − dense −0.015 ± 0.014 and +0.025 ± 0.012. R3 removes every flip and most extreme
#   tokens and recovers little (+0.011 ± 0.006 AUC).
# - **Score Centering** (10 paired seeds, REINFORCE without a baseline): *±1 rewards online are
#   the least stable*: reproduced. Their loss to mismatch exceeds 0/1's by −0.155 ± 0.056 final
#   accuracy at 1 nat per response and −0.371 ± 0.056 at 3, and only they collapse (8 of 10 runs
#   at 3 nats, median step 80). *Collapse sooner as the noise grows*: partly. Every arm's loss
#   grows with the level, but only the top level collapses within 300 steps. *A frozen sampler
#   is stable*: refuted here. With 0/1 rewards it loses as much to mismatch as the online
#   sampler (difference +0.003 ± 0.022); with ±1 rewards it falls to 0 held-out accuracy within
#   25 steps even at zero mismatch. Score centering removes the ±1 collapse (+0.242 ± 0.052
#   final at 3 nats against plain ±1) but not the covariance's bias: −0.324 ± 0.015 against its
#   own twin.
