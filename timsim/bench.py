"""`timsim bench`: time the GRPO step at the standard shape and compare run-axis batchings.

Standard shape (DESIGN §8.8): 32 prompts x 8 samples x 16 response tokens, vocabulary 16,
d_model 64, 2 layers, 4 heads, MLP 256 — the reverse task with 15 digits (15 answer tokens +
<eos>). Weights are freshly initialised: step cost does not depend on them (shapes are fixed).
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from timsim.config import load_config, static_view
from timsim.model import init_model
from timsim.rollout import sample
from timsim.plan import Cell, stack_hyperparams
from timsim.tasks import VOCAB_SIZE
from timsim.step import init_state, make_chunk, place

STANDARD = ["task.name=reverse", "task.n_digits=15", "model.max_len=32", "grpo.prompts_per_step=32",
            "grpo.group_size=8", "run.chunk_steps=10", "run.steps=10"]


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def time_chunk(overrides: list[str], runs: int, batching: str, repeats: int = 2) -> dict:
    """Compile time and steady-state seconds per run-step of one chunk program."""
    cfg = load_config(None, [*overrides, f"run.seeds={list(range(runs))}", f"run.batching={batching}"])
    graphdef, params = nnx.split(init_model(cfg.model, VOCAB_SIZE, 0), nnx.Param)
    hp, _ = stack_hyperparams([Cell("bench", cfg)])
    hp, params = place(hp, over_runs=True), place(params, over_runs=False)
    state = place(jax.vmap(lambda h: init_state(params, h, cfg.perturbation.lag_steps))(hp), over_runs=True)
    chunk = make_chunk(static_view(cfg), cfg.task.build(), graphdef)
    (state, _), first = _timed(chunk, state, hp, params)
    times = []
    for _ in range(repeats):
        (state, metrics), t = _timed(chunk, state, hp, params)
        times.append(t)
    per_step = min(times) / (cfg.run.chunk_steps * runs)
    return {"compile_s": first - min(times), "step_s": per_step,
            "tokens": float(np.mean(metrics["response_len"])) * cfg.grpo.prompts_per_step * cfg.grpo.group_size}


def time_sampler(overrides: list[str], repeats: int = 3) -> float:
    cfg = load_config(None, overrides)
    model = init_model(cfg.model, VOCAB_SIZE, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = cfg.task.build().sample(jax.random.key(0), cfg.grpo.prompts_per_step * cfg.grpo.group_size)
    fn = jax.jit(lambda p, k: sample(nnx.merge(graphdef, p), prompts, k, 1.0, cfg.response_len))
    _timed(fn, params, jax.random.key(0))
    return min(_timed(fn, params, jax.random.key(i))[1] for i in range(repeats))


def bench(user_overrides: list[str], runs: int, console: Console) -> dict:
    overrides = STANDARD + list(user_overrides)
    cfg = load_config(None, overrides)
    n_tokens = cfg.grpo.prompts_per_step * cfg.grpo.group_size * cfg.response_len
    console.print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); shape "
                  f"{cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size} samples x {cfg.response_len} "
                  f"response tokens, d_model {cfg.model.d_model}, {cfg.model.n_layers} layers")
    single = time_chunk(overrides, 1, "map")
    sampler_s = time_sampler(overrides)
    results = {"single": single, "sampler_s": sampler_s}
    table = Table(title="GRPO step (one run)")
    for col in ["compile (s)", "step (ms)", "sampler (ms)", "response token slots/s", "generated tokens/s"]:
        table.add_column(col, justify="right")
    table.add_row(f"{single['compile_s']:.1f}", f"{single['step_s'] * 1e3:.0f}", f"{sampler_s * 1e3:.0f}",
                  f"{n_tokens / single['step_s']:,.0f}", f"{single['tokens'] / single['step_s']:,.0f}")
    console.print(table)
    batch_table = Table(title=f"{runs} runs on the run axis: seconds per run-step")
    batch_table.add_column("batching")
    batch_table.add_column("ms per run-step", justify="right")
    batch_table.add_column("compile (s)", justify="right")
    for batching in ["map", "vmap"]:
        res = time_chunk(overrides, runs, batching)
        results[batching] = res
        batch_table.add_row(batching, f"{res['step_s'] * 1e3:.0f}", f"{res['compile_s']:.1f}")
    console.print(batch_table)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["peak_rss_gib"] = peak
    console.print(f"peak resident memory of this process: {peak:.2f} GiB")
    return results
