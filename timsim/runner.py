"""Host loop: runs cells chunk by chunk, writes the results layout, shows progress.

A *cell* is one resolved config (with its seeds); its runs are the seeds. Cells whose static
config is the same share one compiled program: their runs are stacked on the run axis and
advance together. Metrics come back to the host only between chunks.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from timsim import base as base_lib
from timsim.config import Config, static_hash, static_view, to_yaml, traced_values
from timsim.metrics import METRICS
from timsim.store import SCHEMA_VERSION, Store, load, provenance
from timsim.train import init_state, make_chunk, make_eval, resolve_batching


@dataclasses.dataclass(frozen=True)
class Cell:
    cell_id: str
    cfg: Config
    swept: dict = dataclasses.field(default_factory=dict)  # dotted key -> value, for the cfg.* columns


def stack_hyperparams(cells: list[Cell]) -> tuple[dict, list[tuple[Cell, int, int]]]:
    """Traced values of every run of `cells` along a leading run axis, and who each run is."""
    runs = [(cell, i, seed) for cell in cells for i, seed in enumerate(cell.cfg.run.seeds)]
    values = [{**traced_values(cell.cfg), "seed": seed} for cell, _, seed in runs]
    hp = {k: jnp.asarray([v[k] for v in values], jnp.float32) for k in values[0]}
    return hp, runs


def _rows(runs, metrics_R: dict, steps: np.ndarray) -> dict[str, pd.DataFrame]:
    """Per-cell DataFrames (rows run x step) from host arrays [R, S]."""
    by_cell = defaultdict(list)
    for r, (cell, run_idx, seed) in enumerate(runs):
        frame = {"cell_id": cell.cell_id, "run_idx": run_idx, "seed": seed, "step": steps}
        frame.update({f"cfg.{k}": [v] * len(steps) for k, v in cell.swept.items()})
        frame.update({name: np.asarray(metrics_R[name][r], np.float64) if name in metrics_R
                      else np.full(len(steps), np.nan) for name in METRICS})
        by_cell[cell.cell_id].append(pd.DataFrame(frame))
    return {cid: pd.concat(frames, ignore_index=True) for cid, frames in by_cell.items()}


def summarize_runs(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run: base / final / peak held-out accuracy, final reward, mean mismatch."""
    rows = []
    for (cell_id, run_idx), df in metrics.groupby(["cell_id", "run_idx"], sort=False):
        ev = df.dropna(subset=["eval_greedy_accuracy"])
        trained = df[df.step > 0]
        tail = trained[trained.step > trained.step.max() * 0.9]
        peak = ev.loc[ev.eval_greedy_accuracy.idxmax()]
        cfg_cols = {c: df[c].iloc[0] for c in df.columns if c.startswith("cfg.")}
        rows.append({"cell_id": cell_id, "run_idx": run_idx, "seed": int(df.seed.iloc[0]), **cfg_cols,
                     "steps": int(df.step.max()),
                     "base_accuracy": float(ev.eval_greedy_accuracy.iloc[0]),
                     "final_accuracy": float(ev.eval_greedy_accuracy.iloc[-1]),
                     "peak_accuracy": float(peak.eval_greedy_accuracy), "peak_step": int(peak.step),
                     "final_reward": float(tail.reward_mean.mean()),
                     "mean_mismatch_k3": float(trained.mismatch_k3.mean())})
    return pd.DataFrame(rows)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, disable=not console.is_terminal)


def run_group(cells: list[Cell], store: Store, console: Console, on_chunk: Callable[[str, int], None]) -> None:
    """Train every run of `cells` (same static config) together and write their metrics."""
    cfg = cells[0].cfg
    static = static_view(cfg)
    task = cfg.task.build()
    graphdef, base_params, base_info = base_lib.get_base(
        cfg, progress=lambda i: console.print(f"  pretrain step {i['steps']}: loss {i['loss']:.3f}, "
                                            f"greedy held-out accuracy {i['greedy_accuracy']:.2f}"),
        announce=console.print)
    console.print(f"base {base_info['base_key']}: greedy held-out accuracy {base_info['greedy_accuracy']:.2f}, "
                  f"sampled {base_info['sampled_accuracy']:.2f} ({base_info['steps']} supervised steps)")
    hp, runs = stack_hyperparams(cells)
    n_runs = len(runs)
    state = jax.vmap(lambda h: init_state(base_params, h))(hp)
    chunk_fn, evaluate = make_chunk(static, task, graphdef), make_eval(static, task, graphdef)
    chunk_steps, n_chunks = cfg.run.chunk_steps, cfg.run.steps // cfg.run.chunk_steps

    ev = jax.device_get(evaluate(state.params, hp))
    for cell_id, df in _rows(runs, ev, np.array([0])).items():
        # step 0: the base model's held-out accuracy, before any update
        store.write_metrics_part(cell_id, 0, df)
    label = ", ".join(c.cell_id for c in cells)
    with _progress(console) as progress:
        bar = progress.add_task(f"{label[:40]} ({n_runs} runs)", total=cfg.run.steps, info="")
        for c in range(1, n_chunks + 1):
            t0 = time.perf_counter()
            state, metrics = chunk_fn(state, hp, base_params)
            ev = evaluate(state.params, hp)
            metrics, ev = jax.device_get((metrics, ev))
            steps = np.arange((c - 1) * chunk_steps + 1, c * chunk_steps + 1)
            last = {k: np.concatenate([np.full((n_runs, chunk_steps - 1), np.nan), np.asarray(v)[:, None]], 1)
                    for k, v in ev.items()}
            for cell_id, df in _rows(runs, metrics | last, steps).items():
                store.write_metrics_part(cell_id, c, df)
            acc = float(np.mean(ev["eval_greedy_accuracy"]))
            info = f"held-out acc {acc:.2f}  reward {np.mean(metrics['reward_mean'][:, -1]):.2f}"
            progress.update(bar, advance=chunk_steps, info=info)
            if not console.is_terminal:
                console.print(f"  step {c * chunk_steps}/{cfg.run.steps}: {info} "
                              f"({time.perf_counter() - t0:.1f}s)")
            for cell in cells:
                on_chunk(cell.cell_id, c)


def run_cells(cells: list[Cell], store: Store, console: Console | None = None) -> pd.DataFrame:
    """Run all cells into `store`; returns the per-run summary table."""
    console = console or Console()
    manifest = {"schema_version": SCHEMA_VERSION, "provenance": provenance(),
                "run_axis_batching": resolve_batching(cells[0].cfg.run.batching),
                "cells": {c.cell_id: {"status": "pending", "seeds": c.cfg.run.seeds, "static_hash": static_hash(c.cfg),
                                      "swept": c.swept} for c in cells}}
    store.write_manifest(manifest)
    store.write_text("config.resolved.yaml", "\n---\n".join(f"# cell {c.cell_id}\n{to_yaml(c.cfg)}" for c in cells))
    groups: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[static_hash(cell.cfg)].append(cell)
    start = time.perf_counter()

    def on_chunk(cell_id: str, chunk: int):
        status = manifest["cells"][cell_id]
        status["status"] = "running"
        status["chunks_done"] = chunk
        store.write_manifest(manifest)

    for group_cells in groups.values():
        width = sum(len(c.cfg.run.seeds) for c in group_cells)
        for c in group_cells:
            manifest["cells"][c.cell_id]["run_axis_width"] = width
        run_group(group_cells, store, console, on_chunk)
        for c in group_cells:
            manifest["cells"][c.cell_id]["status"] = "done"
        store.write_manifest(manifest)
    metrics, _ = load(store.root)
    summary = summarize_runs(metrics)
    store.write_summary(summary)
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    store.write_manifest(manifest)
    return summary
