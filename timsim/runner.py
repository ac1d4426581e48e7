"""Host loop: runs cells chunk by chunk into the results layout, resumably.

A *cell* is one resolved config with its seeds; its runs are the seeds. Cells whose static
config is the same form a *group*: their runs are stacked on the run axis and advance
together in one compiled program. Metrics come back to the host only between chunks.

Resume: after every chunk the group's metric parts are written, then an orbax checkpoint
of its state, then the group's progress file records the chunk as done. Killed at any moment, the same
command continues every unfinished group from its last recorded chunk with the same
run-axis width (so the tables come out bit-identical, DESIGN §8.2), and skips finished cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from timsim import base as base_lib
from timsim import faults
from timsim.calibrate import resolve_targets
from timsim.config import Config, ConfigError, check_name, static_hash, static_view, to_yaml, traced_values
from timsim.metrics import METRICS
from timsim.store import SCHEMA_VERSION, Store, load, provenance
from timsim.summary import summarize_runs
from timsim.probes import make_probe
from timsim.train import init_state, make_chunk, make_eval, padded_width, place, resolve_batching


@dataclasses.dataclass(frozen=True)
class Cell:
    cell_id: str
    cfg: Config
    swept: dict = dataclasses.field(default_factory=dict)  # dotted key -> value, for the cfg.* columns


def config_hash(cfg: Config) -> str:
    """Identity of a cell's config for resume checks. Defaults are left out, so a new config
    field added with a default does not orphan existing results directories."""
    dump = cfg.model_dump(exclude_defaults=True)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def stack_hyperparams(cells: list[Cell]) -> tuple[dict, list[tuple[Cell, int, int]]]:
    """Traced values of every run of `cells` along a leading run axis, and who each run is.
    The axis is padded to a multiple of the device count with copies of the last run, whose
    results are never written."""
    runs = [(cell, i, seed) for cell in cells for i, seed in enumerate(cell.cfg.run.seeds)]
    values = [{**traced_values(cell.cfg), "seed": seed} for cell, _, seed in runs]
    values += [values[-1]] * (padded_width(len(values)) - len(values))
    hp = {k: jnp.asarray([v[k] for v in values], jnp.float32) for k in values[0]}
    return hp, runs


def _rows(runs, metrics_R: dict, steps: np.ndarray) -> dict[str, pd.DataFrame]:
    """Per-cell DataFrames (rows run x step) from host arrays [R, S]."""
    by_cell: dict[str, list[pd.DataFrame]] = {}
    for r, (cell, run_idx, seed) in enumerate(runs):
        frame = {"cell_id": cell.cell_id, "run_idx": run_idx, "seed": seed, "step": steps}
        frame.update({f"cfg.{k}": [v] * len(steps) for k, v in cell.swept.items()})
        frame.update({name: np.asarray(metrics_R[name][r], np.float64) if name in metrics_R
                      else np.full(len(steps), np.nan) for name in METRICS})
        by_cell.setdefault(cell.cell_id, []).append(pd.DataFrame(frame))
    return {cid: pd.concat(frames, ignore_index=True) for cid, frames in by_cell.items()}


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, disable=not console.is_terminal)


def run_group(gid: str, cells: list[Cell], store: Store, console: Console) -> None:
    """Train every run of `cells` (same static config) together from its last finished chunk.

    Progress goes to the group's own file (`Store.write_group`), never to the shared
    manifest, so groups may run concurrently (the Ray executor)."""
    cfg = cells[0].cfg
    task = cfg.task.build()
    graphdef, base_params, base_info = base_lib.get_base(
        cfg, progress=lambda i: console.print(f"  pretrain step {i['steps']}: loss {i['loss']:.3f}, "
                                              f"greedy held-out accuracy {i['greedy_accuracy']:.2f}"),
        announce=console.print)
    console.print(f"base {base_info['base_key']}: greedy held-out accuracy {base_info['greedy_accuracy']:.2f}, "
                  f"sampled {base_info['sampled_accuracy']:.2f} ({base_info['steps']} supervised steps)")
    group = dict(store.read_manifest()["groups"][gid])
    record = {"group": group, "cells": {c.cell_id: {} for c in cells}}
    group["base"] = {k: base_info[k] for k in ("base_key", "greedy_accuracy", "sampled_accuracy", "steps")}
    cells, calibration = resolve_targets(cells, graphdef, base_params)
    for cell_id, got in calibration.items():
        record["cells"][cell_id]["calibration"] = got
        console.print(f"  {cell_id}: target {got['metric']} {got['target']:.3g} -> noise scale {got['scale']:.4g} "
                      f"(achieved {got['achieved']:.3g} at the base model; per-token KL "
                      f"{got['kl_sampler_learner']:.3g}, per-response KL {got['seq_kl']:.3g})")
    hp, runs = stack_hyperparams(cells)
    n_runs = len(runs)
    width = len(hp["seed"])
    if group.setdefault("padded_width", width) != width:
        raise ConfigError(f"Group {gid} was run with a run axis of {group['padded_width']} (padded to a multiple of "
                          f"that machine's device count); resume it on {group['padded_width']} device(s) or a divisor "
                          f"layout, or pass --restart.")
    tracker = _TargetTracker(cells, runs, graphdef)
    if tracker.runs and "tracked_scales" in group:  # resume with the scales the last finished chunk chose
        hp = tracker.with_scales(hp, group["tracked_scales"])
    hp, base_params = place(hp, over_runs=True), place(base_params, over_runs=False)
    lag = cfg.perturbation.lag_steps
    state = place(jax.vmap(lambda h: init_state(base_params, h, lag))(hp), over_runs=True)
    chunk_steps, n_chunks = cfg.run.chunk_steps, cfg.run.steps // cfg.run.chunk_steps
    chunk_fn, evaluate, probe = _programs(cfg, task, graphdef, width)
    probe_every = cfg.run.probe_every

    def at_boundary(state, step: int) -> dict:
        """Held-out evaluation, and the objective-effect probes when one is due at `step`."""
        out = evaluate(state.params, state.step, hp)
        if probe_every and step % probe_every == 0:
            out |= probe(state.params, state.step, hp, base_params)
        return out

    checkpointer = ocp.StandardCheckpointer()

    done = group["chunks_done"]
    if done:
        restored = checkpointer.restore(store.checkpoint_dir(gid, done * chunk_steps).absolute(),
                                        base_lib.restore_target(state))
        state = place(restored, over_runs=True)
        console.print(f"resuming {gid} at step {done * chunk_steps}/{cfg.run.steps}")
    else:  # step 0: the base model's held-out accuracy, before any update
        for cell_id, df in _rows(runs, jax.device_get(at_boundary(state, 0)), np.array([0])).items():
            store.write_metrics_part(cell_id, 0, df)

    label = ", ".join(c.cell_id for c in cells)
    with _progress(console) as progress:
        bar = progress.add_task(f"{label[:40]} ({n_runs} runs)", total=cfg.run.steps, completed=done * chunk_steps,
                                info="")
        for c in range(done + 1, n_chunks + 1):
            t0 = time.perf_counter()
            state, metrics = chunk_fn(state, hp, base_params)
            ev = at_boundary(state, c * chunk_steps)
            metrics, ev = jax.device_get((metrics, ev))
            steps = np.arange((c - 1) * chunk_steps + 1, c * chunk_steps + 1)
            at_end = {k: np.concatenate([np.full((width, chunk_steps - 1), np.nan), np.asarray(v)[:, None]], 1)
                      for k, v in ev.items()}
            for cell_id, df in _rows(runs, metrics | at_end, steps).items():
                store.write_metrics_part(cell_id, c, df)
            ckpt = store.checkpoint_dir(gid, c * chunk_steps)
            checkpointer.save(ckpt.absolute(), state, force=True)
            faults.reached("checkpoint", ckpt)
            checkpointer.wait_until_finished()
            group["chunks_done"] = c
            if tracker.runs and c < n_chunks:
                scales = tracker.recalibrate(state.params, hp)
                hp, group["tracked_scales"] = place(tracker.with_scales(hp, scales), over_runs=True), scales
            for cell in cells:
                record["cells"][cell.cell_id].update(status="running", steps_done=c * chunk_steps)
            store.write_group(gid, record)
            if c > 1:
                shutil.rmtree(store.checkpoint_dir(gid, (c - 1) * chunk_steps), ignore_errors=True)
            info = (f"held-out acc {np.mean(ev['eval_greedy_accuracy'][:n_runs]):.2f}  "
                    f"reward {np.mean(metrics['reward_mean'][:n_runs, -1]):.2f}")
            progress.update(bar, advance=chunk_steps, info=info)
            if not console.is_terminal:
                console.print(f"  {label[:40]}: step {c * chunk_steps}/{cfg.run.steps}: {info} "
                              f"({time.perf_counter() - t0:.1f}s)")
            faults.reached("chunk_end")
    group["status"] = "done"
    for cell in cells:
        record["cells"][cell.cell_id]["status"] = "done"
    store.write_group(gid, record)


_PROGRAMS: dict[tuple[str, int], tuple] = {}
MAX_PROGRAMS = 6


def _programs(cfg: Config, task, graphdef, width: int) -> tuple:
    """The chunk, evaluation and probe programs of a static config at a run-axis width, built once
    per process: later groups with the same static config and width (a sweep's added cells,
    the finder's bisection rounds) reuse the compiled programs instead of compiling again.

    At most MAX_PROGRAMS configs are kept: each compiled XLA CPU program maps thousands of
    memory sections, and a process may hold ~65k (vm.max_map_count); a sweep of 14 static
    configs in one process hit that limit ("LLVM ERROR: Unable to allocate section memory").
    When full, every compiled program of the process is dropped (`jax.clear_caches`) and the
    next ones compile afresh."""
    key = (static_hash(cfg), width)
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= MAX_PROGRAMS:
            _PROGRAMS.clear()
            jax.clear_caches()
        static = static_view(cfg)
        probe = make_probe(static, task, graphdef) if cfg.run.probe_every else None
        _PROGRAMS[key] = make_chunk(static, task, graphdef), make_eval(static, task, graphdef), probe
    return _PROGRAMS[key]


class _TargetTracker:
    """Re-calibrates, at every chunk boundary, the noise scale of each run whose cell says
    `perturbation.target.track: every_chunk`, on that run's current weights: a fixed scale's
    mismatch shrinks as the policy sharpens (DESIGN §8.5). The scale is a traced value, so
    changing it recompiles nothing; the chosen scales are saved in the manifest with the
    chunk, so a resumed run uses the same ones."""

    def __init__(self, cells: list[Cell], runs: list, graphdef):
        self.runs = [(i, cell) for i, (cell, _, _) in enumerate(runs)
                     if cell.cfg.perturbation.target.metric is not None
                     and cell.cfg.perturbation.target.track == "every_chunk"]
        self.key = cells[0].cfg.perturbation.scale_key  # one static config per group: one scaled source
        self.measure = None
        if self.runs:
            from timsim.calibrate import make_measure

            self.measure = make_measure(self.runs[0][1].cfg, graphdef)

    def recalibrate(self, params, hp) -> list[float]:
        from timsim.calibrate import calibrate_scale

        scales = np.asarray(jax.device_get(hp[self.key]), float).copy()
        host_params = jax.device_get(params)
        for i, cell in self.runs:
            metric, value = cell.cfg.perturbation.target.resolved()
            run_params = jax.tree.map(lambda x: x[i], host_params)
            scales[i] = calibrate_scale(self.measure, run_params, cell.cfg, value, metric, start=float(scales[i]))[0]
        return scales.tolist()

    def with_scales(self, hp: dict, scales: list[float]) -> dict:
        return {**hp, self.key: jnp.asarray(scales, jnp.float32)}


def load_trained_params(root, base_params, hp_template: dict, run: int = 0, lag_steps: int = 0):
    """Parameters of run `run` of the first group of a results directory, at its last checkpoint."""
    store = Store(root)
    groups = [(gid, g) for gid, g in store.read_manifest().get("groups", {}).items() if g["chunks_done"]]
    if not groups:
        raise FileNotFoundError(f"{str(root)!r} holds no checkpoint of a trained run (no finished chunk).")
    gid, group = groups[0]
    steps = sorted(int(p.name) for p in (store.root / "ckpt" / gid).iterdir() if p.name.isdigit())
    width = group.get("padded_width", group["run_axis_width"])
    hp = {k: jnp.full((width,), v, jnp.float32) for k, v in hp_template.items()}
    abstract = jax.eval_shape(lambda: jax.vmap(lambda h: init_state(base_params, h, lag_steps))(hp))
    state = ocp.StandardCheckpointer().restore(store.checkpoint_dir(gid, steps[-1]).absolute(),
                                               base_lib.restore_target(abstract))
    return jax.tree.map(lambda x: x[run], state.params), steps[-1]


def _plan_groups(cells: list[Cell], manifest: dict) -> dict[str, list[Cell]]:
    """Unfinished groups recorded in the manifest keep their cells (same run-axis width);
    cells the manifest does not know yet form new groups by static hash."""
    by_id = {c.cell_id: c for c in cells}
    groups: dict[str, list[Cell]] = {}
    for gid, group in manifest["groups"].items():
        if group["status"] != "done":
            groups[gid] = [by_id[cid] for cid in group["cells"]]
    new = [c for c in cells if c.cell_id not in manifest["cells"]]
    fresh: dict[str, list[Cell]] = {}
    for cell in new:
        fresh.setdefault(static_hash(cell.cfg), []).append(cell)
    for shash, group_cells in fresh.items():
        gid = f"g{len(manifest['groups']):03d}-{shash[:8]}"
        manifest["groups"][gid] = {"cells": [c.cell_id for c in group_cells], "static_hash": shash,
                                   "run_axis_width": sum(len(c.cfg.run.seeds) for c in group_cells),
                                   "chunks_done": 0, "status": "pending"}
        for c in group_cells:
            manifest["cells"][c.cell_id] = {"status": "pending", "group": gid, "seeds": c.cfg.run.seeds,
                                            "config_hash": config_hash(c.cfg), "swept": c.swept}
        groups[gid] = group_cells
    return groups


def _check_compatible(cells: list[Cell], manifest: dict, sweep: dict) -> None:
    if manifest["sweep"]["name"] != sweep["name"]:
        raise ConfigError(f"This results directory belongs to sweep {manifest['sweep']['name']!r}, not "
                          f"{sweep['name']!r}; choose another name or out_dir, or pass --restart to replace it.")
    for cell in cells:
        known = manifest["cells"].get(cell.cell_id)
        if known and known["config_hash"] != config_hash(cell.cfg):
            raise ConfigError(f"Cell {cell.cell_id!r} already has results for a different config (it was "
                              f"{known['status']}); the change is incompatible with them. Revert it, give the "
                              f"cell another name, or pass --restart to discard all results of this directory.")
    for gid, group in manifest["groups"].items():
        missing = [cid for cid in group["cells"] if group["status"] != "done" and
                   cid not in {c.cell_id for c in cells}]
        if missing:
            raise ConfigError(f"Unfinished group {gid} has cells {missing} that the sweep no longer contains; "
                              f"put them back to resume, or pass --restart.")


def run_cells(cells: list[Cell], store: Store, console: Console | None = None, sweep: dict | None = None,
              restart: bool = False, executor: str = "local", ray: dict | None = None) -> pd.DataFrame:
    """Run (or resume) all cells into `store`; returns the per-run summary table.

    `executor`: `local` runs the groups one after another in this process; `ray` makes each
    group a Ray task (`timsim.executors`, options in `ray`). Both write the same files."""
    for cell in cells:
        check_name(cell.cell_id, "cell name")
    with store.lock():
        return _run_locked(cells, store, console or Console(), sweep or {"name": cells[0].cfg.run.name}, restart,
                           executor, ray)


def _run_locked(cells, store, console, sweep, restart, executor, ray) -> pd.DataFrame:
    if restart:
        store.clear()
    manifest = store.read_manifest()
    if manifest:
        _check_compatible(cells, manifest, sweep)
    else:
        manifest = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "provenance": provenance(),
                    "run_axis_batching": resolve_batching(cells[0].cfg.run.batching), "cells": {}, "groups": {}}
    groups = _plan_groups(cells, manifest)
    store.write_manifest(manifest)
    known = [c for c in cells if c.cell_id in manifest["cells"]]
    store.write_text("config.resolved.yaml", "\n---\n".join(f"# cell {c.cell_id}\n{to_yaml(c.cfg)}" for c in known))
    skipped = [c.cell_id for c in cells if manifest["cells"][c.cell_id]["status"] == "done"]
    if skipped:
        console.print(f"{len(skipped)} finished cell(s) kept, not recomputed: {', '.join(skipped[:6])}"
                      f"{' ...' if len(skipped) > 6 else ''}")
    start = time.perf_counter()
    if executor == "ray":
        from timsim.executors import run_on_ray

        run_on_ray(groups, store.root, console, **(ray or {}))
    elif executor == "local":
        for gid, group_cells in groups.items():
            run_group(gid, group_cells, store, console)
    else:
        raise ConfigError(f"executor must be local or ray, got {executor!r}.")
    manifest = store.read_manifest()
    metrics, _ = load(store.root)
    summary = summarize_runs(metrics)
    store.write_summary(summary)
    manifest["seconds_last_invocation"] = round(time.perf_counter() - start, 1)
    store.write_manifest(manifest)
    return summary
