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
# # Quickstart tour: what does sampler–learner mismatch cost GRPO here, and how sure are we?
#
# The sampler (an inference engine) and the learner (a training engine) should assign the
# same log-probabilities to the same tokens; in practice they differ a little. timsim injects
# that difference as a controlled variable: the same base model, prompts and random numbers,
# and only the mismatch changes between two cells. This notebook
#
# 1. runs a small study from Python and reads its DataFrames,
# 2. reloads the published quickstart study (`make quickstart`, data in the repository) and
#    plots learning curves with seeds and confidence intervals,
# 3. compares every cell with its **zero-mismatch twin**, paired by seed,
# 4. says what each summary column means.
#
# `TIMSIM_NOTEBOOK_TOY=1` (what CI sets) shrinks the study in part 1 to a seconds-long model;
# the published data in parts 2–4 are the same either way.

# %%
# %matplotlib inline
import json
import os
from pathlib import Path

import pandas as pd
from IPython.display import display

import timsim
from timsim import plots
from timsim.config import SMOKE
from timsim.summary import SUMMARY_COLUMNS

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
TOY = os.environ.get("TIMSIM_NOTEBOOK_TOY") == "1"
FIGURES = ROOT / "docs" / "figures"
pd.set_option("display.precision", 3)

# %% [markdown]
# ## 1. A study from Python
#
# A sweep is a dict (or a YAML file) of cells over one base config. Here: the quickstart task
# (3-digit addition, 5-token responses), bypass mode (π_old = the sampler's log-probs),
# Gaussian noise on the sampler's logits. `zero` is the scale-0 twin; `kl=1e-1` calibrates
# the noise scale at the base model to a mean per-token KL(μ‖π) of 0.1. Both cells share one
# compiled program and the same seeds, so their difference is the mismatch alone. Nothing is
# written to disk unless you pass `out=`.

# %%
spec = {
    "base": str(ROOT / "configs" / "quickstart.yaml"),
    "name": "tour",
    "seeds": [0, 1, 2],
    "config": {"perturbation": {"logit_noise": {"family": "gaussian"}}, "grpo": {"old_logprobs": "bypass"},
               "run": {"steps": 100, "chunk_steps": 25}},
    "cells": {"zero": {"perturbation.logit_noise.scale": 0.0}, "kl=1e-1": {"perturbation.target.token_kl": 0.1}},
}
overrides = [f"pretrain.cache_dir={ROOT / 'runs' / 'bases'}"] + (SMOKE if TOY else [])
tour = timsim.sweep(spec, overrides)
tour.by_cell()

# %% [markdown]
# `tour.metrics` has one row per (cell, run, step) with every logged metric; `tour.summary`
# one row per run. `compare()` pairs each cell with `zero` seed by seed: the same prompts and
# random numbers, so the difference's CI is far tighter than the two cells' CIs would suggest.

# %%
tour.compare("zero")

# %% [markdown]
# ## 2. The published quickstart study
#
# `make quickstart` runs `configs/sweeps/quickstart.yaml`: zero mismatch against three
# calibrated levels (per-token KL 1e-3, 1e-2, 1e-1), 400 steps, 3 seeds. Its data live in
# `docs/results/data/quickstart/` with the manifest that says which machine, backend and
# versions produced them and the command that regenerates them.

# %%
quickstart = timsim.load(ROOT / "docs" / "results" / "data" / "quickstart")
manifest = json.loads((quickstart.path / "manifest.json").read_text())
print("regenerate with:", manifest["export"]["command"])
print({k: manifest["provenance"][k] for k in ("git_commit", "jax", "backend", "platform")})
quickstart.by_cell()

# %% [markdown]
# Held-out greedy accuracy (left; evaluated every 25 steps) and the training reward (right;
# sampled responses, rolling mean over 10 steps). Thick lines are the mean over seeds, bands
# its 95% Student-t interval, thin lines the individual runs.

# %%
fig = plots.learning_curves(quickstart.metrics)
if not TOY:
    fig.savefig(FIGURES / "quickstart_curves.png", dpi=110)
fig

# %% [markdown]
# ## 3. Paired against the zero-mismatch twin
#
# Each point is a cell's final accuracy minus `zero`'s on the same seed, averaged over seeds,
# with its paired 95% CI. An interval that crosses 0 is *not* evidence of no effect: with 3
# seeds it is often simply too wide. DESIGN asks for ≥ 10 paired seeds before a claim.

# %%
paired = quickstart.compare("zero")
display(paired)
plots.paired(paired, "zero")

# %% [markdown]
# The mismatch each cell actually carried during training (per-token KL(μ‖π) on the training
# batch). It was calibrated once, at the base model; as the policy sharpens the same noise
# scale gives a smaller KL (DESIGN §8.5), which is why the curves drift down.

# %%
fig = plots.curves(quickstart.metrics[quickstart.metrics.cell_id != "zero"], "kl_sampler_learner", smooth=10,
                   runs=False)
fig.axes[0].set_yscale("log")
fig

# %% [markdown]
# ## 4. What each summary column means

# %%
pd.DataFrame({"meaning": SUMMARY_COLUMNS}).rename_axis("column")
