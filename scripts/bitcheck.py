"""Same numbers before and after a refactor: a tiny sweep over eight sampler sources (zero,
fresh and context Gaussian, weight noise, bf16, temperature, a calibrated target, TIS) with
held-out evaluation and gradient probes, 2 seeds x 4 steps, into a Parquet file.

    python scripts/bitcheck.py before.parquet      # on the old commit
    python scripts/bitcheck.py after.parquet       # on the new one
    python scripts/bitcheck.py --compare before.parquet after.parquet

A refactor that keeps every compiled computation the same reports no differing column.
"""
import sys

import numpy as np
import pandas as pd

import timsim

if sys.argv[1] == "--compare":
    a, b = pd.read_parquet(sys.argv[2]), pd.read_parquet(sys.argv[3])
    columns = [c for c in a.columns if c in b.columns]
    differ = {c: float(np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float))))
              for c in columns if not a[c].equals(b[c])}
    print(f"{len(a)} rows, {len(columns)} common columns; differing: {differ or 'none'}")
    sys.exit(1 if differ else 0)
TINY = ["task.name=sort", "task.n_digits=4", "task.eval_prompts=128", "model.d_model=32", "model.n_layers=1",
        "model.n_heads=2", "model.d_mlp=64", "model.max_len=12", "pretrain.target_accuracy=0.25",
        "pretrain.eval_every=25", "pretrain.batch_size=64", "pretrain.lr=3e-3", "grpo.prompts_per_step=16",
        "grpo.group_size=8", "grpo.lr=1e-3", "run.steps=4", "run.chunk_steps=2", "run.seeds=[0,1]",
        "run.probe_every=2", "pretrain.cache_dir=runs/bitcheck-bases"]
cells = {
    "zero": {},
    "gauss": {"perturbation.logit_noise.family": "gaussian", "perturbation.logit_noise.scale": 0.5},
    "ctx": {"perturbation.logit_noise.family": "gaussian", "perturbation.logit_noise.scale": 0.5,
            "perturbation.logit_noise.mode": "context"},
    "weights": {"perturbation.weight_noise.family": "gaussian", "perturbation.weight_noise.scale": 0.01},
    "bf16": {"perturbation.sampler_precision.dtype": "bf16"},
    "temp": {"perturbation.logit_noise.family": "temperature", "perturbation.logit_noise.temperature": 0.8},
    "target": {"perturbation.logit_noise.family": "gaussian", "perturbation.target.token_kl": 0.01},
    "tis": {"perturbation.logit_noise.family": "gaussian", "perturbation.logit_noise.scale": 0.5,
            "correction.kinds": ["token_tis"]},
}
r = timsim.sweep({"name": "bitcheck", "cells": cells}, TINY, progress=False)
r.metrics.to_parquet(sys.argv[1])
print(r.summary[["cell_id", "seed", "final_accuracy"]].to_string())
