"""The run loop: one group of runs (cells with one static config), chunk by chunk, with hooks.

Every way of running timsim goes through `run`: the in-memory API (`timsim.train`), the
results directory with resume (`timsim.runner`), the CLI, notebooks and the tests. What
differs between them is only the hooks it calls at each chunk boundary (brax's `progress_fn`
and nanodo's periodic actions are the models): keep the frames in memory, write them and a
checkpoint to a store, draw a progress bar, log to an experiment tracker.

One chunk is one compiled program (`timsim.step.make_chunk`); metrics come back to the host
only between chunks. Before the first chunk, cells with a `perturbation.target` are calibrated
at the base model; with `track: every_chunk` they are re-calibrated at every boundary.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from timsim import faults, hyper
from timsim.calibration import calibrate_scale, make_measure
from timsim.config import Config, static_hash, static_view
from timsim.metrics import METRICS
from timsim.plan import Cell, stack_hyperparams
from timsim.exact import make_oracle_probe
from timsim.probes import make_probe
from timsim.step import RunState, init_states, make_chunk, make_eval, place

REPORTED = ("kl_sampler_learner", "mismatch_k3", "seq_kl", "delta_abs_mean", "delta_abs_max", "response_tokens")


@dataclasses.dataclass
class GroupRun:
    """What hooks see of the group being run."""

    label: str
    cells: list[Cell]
    runs: list[tuple[Cell, int, int]]  # (cell, run index in the cell, seed) per run-axis slot
    total_steps: int
    chunk_steps: int
    start_step: int  # > 0 when resumed
    calibration: dict[str, dict]  # cell id -> what its target calibration achieved


@dataclasses.dataclass
class Boundary:
    """A chunk boundary: chunk 0 is the base model (step 0, held-out evaluation only)."""

    chunk: int
    step: int
    frames: dict[str, pd.DataFrame]  # cell id -> rows run x step of this chunk
    state: RunState  # on the devices, run axis first
    tracked_scales: list[float] | None  # re-calibrated noise scales for the next chunk
    seconds: float
    summary: str  # one line: held-out accuracy and reward of the chunk's last step


class Hook:
    """Called by `run` at the start, at every chunk boundary (chunk 0 = step 0) and at the end."""

    def start(self, group: GroupRun) -> None:
        pass

    def boundary(self, group: GroupRun, at: Boundary) -> None:
        pass

    def end(self, group: GroupRun) -> None:
        pass


def interactive() -> bool:
    """A terminal or a notebook: a live progress bar is wanted (else one log line per chunk)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class ProgressHook(Hook):
    """A progress bar in a terminal or notebook (tqdm), one log line per chunk elsewhere (CI logs)."""

    def __init__(self, log: Callable[[str], None] = print, bar: bool | None = None):
        self.log, self.bar_wanted, self.bar = log, interactive() if bar is None else bar, None

    def start(self, group: GroupRun) -> None:
        for cell_id, c in group.calibration.items():
            self.log(f"  {cell_id}: target {c['metric']} {c['target']:.3g} -> noise scale {c['scale']:.4g} "
                     f"(achieved {c['achieved']:.3g} at the base model; per-token KL {c['kl_sampler_learner']:.3g}, "
                     f"per-response KL {c['seq_kl']:.3g})")
        if self.bar_wanted:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=group.total_steps, initial=group.start_step, unit="step",
                            desc=f"{group.label[:40]} ({len(group.runs)} runs)", dynamic_ncols=True)

    def boundary(self, group: GroupRun, at: Boundary) -> None:
        if at.chunk == 0:
            return
        if self.bar is not None:
            self.bar.update(group.chunk_steps)
            self.bar.set_postfix_str(at.summary)
        else:
            self.log(f"  {group.label[:40]}: step {at.step}/{group.total_steps}: {at.summary} ({at.seconds:.1f}s)")

    def end(self, group: GroupRun) -> None:
        if self.bar is not None:
            self.bar.close()


class FramesHook(Hook):
    """Keeps every boundary's rows in memory (the in-memory API's result)."""

    def __init__(self):
        self.frames: list[pd.DataFrame] = []

    def boundary(self, group: GroupRun, at: Boundary) -> None:
        self.frames.extend(at.frames.values())

    def metrics(self) -> pd.DataFrame:
        """Rows by cell (in the order the cells were run), run and step."""
        frame = pd.concat(self.frames, ignore_index=True)
        order = {cell: i for i, cell in enumerate(dict.fromkeys(frame.cell_id))}
        return frame.sort_values(["cell_id", "run_idx", "step"], key=lambda c: c.map(order) if c.name == "cell_id"
                                 else c, kind="stable", ignore_index=True)


class ScalarHook(Hook):
    """Sends every step's metrics to an experiment tracker through one callable,
    `write(tag, value, step)`: TensorBoard's `SummaryWriter(...).add_scalar`, or
    `lambda tag, value, step: wandb.log({tag: value}, step=step)` for W&B. Tags are
    "{cell}/seed{seed}/{metric}"; `metrics` limits which (default: all); NaN values (metrics a
    program does not compute, eval_* between chunk ends) are skipped."""

    def __init__(self, write: Callable[[str, float, int], None], metrics: Sequence[str] | None = None):
        self.write, self.metrics = write, list(metrics) if metrics is not None else list(METRICS)

    def boundary(self, group: GroupRun, at: Boundary) -> None:
        for cell_id, frame in at.frames.items():
            for name in self.metrics:
                for seed, step, value in zip(frame.seed, frame.step, frame[name]):
                    if not np.isnan(value):
                        self.write(f"{cell_id}/seed{seed}/{name}", float(value), int(step))


def metric_rows(runs, metrics_R: dict, steps: np.ndarray) -> dict[str, pd.DataFrame]:
    """Per-cell DataFrames (rows run x step) from host arrays [R, S]; every `timsim.metrics`
    column is present (NaN where this program does not compute it). A metric the program
    emits that is not registered is an error, not a silently dropped column."""
    unknown = sorted(set(metrics_R) - set(METRICS))
    if unknown:
        raise RuntimeError(f"the run emitted metric(s) {unknown} that timsim.metrics does not register; "
                           "register each (name, formula, unit) in timsim/metrics.py")
    by_cell: dict[str, list[pd.DataFrame]] = {}
    for r, (cell, run_idx, seed) in enumerate(runs):
        frame = {"cell_id": cell.cell_id, "run_idx": run_idx, "seed": seed, "step": steps}
        frame.update({f"cfg.{k}": [v] * len(steps) for k, v in cell.swept.items()})
        frame.update({name: np.asarray(metrics_R[name][r], np.float64) if name in metrics_R
                      else np.full(len(steps), np.nan) for name in METRICS})
        by_cell.setdefault(cell.cell_id, []).append(pd.DataFrame(frame))
    return {cid: pd.concat(frames, ignore_index=True) for cid, frames in by_cell.items()}


def resolve_targets(cells: list[Cell], graphdef, params) -> tuple[list[Cell], dict[str, dict]]:
    """Replace each cell's `perturbation.target` by the calibrated scale (at the base model);
    returns the new cells and what was achieved per cell (for the manifest)."""
    out, report, measure = [], {}, None
    for cell in cells:
        target = cell.cfg.perturbation.target
        if target.metric is None:
            out.append(cell)
            continue
        metric, value = target.resolved()
        measure = measure or make_measure(cell.cfg, graphdef)
        scale, got = calibrate_scale(measure, params, cell.cfg, value, metric)
        section = cell.cfg.perturbation.scale_key.split(".")[1]  # logit_noise or router_noise
        noise = getattr(cell.cfg.perturbation, section).model_copy(update={"scale": scale})
        perturbation = cell.cfg.perturbation.model_copy(update={section: noise})
        out.append(Cell(cell.cell_id, cell.cfg.model_copy(update={"perturbation": perturbation}), cell.swept))
        report[cell.cell_id] = {"track": target.track, "metric": metric, "target": value, "scale": scale,
                                "achieved": got[metric], **{k: got[k] for k in REPORTED}}
    return out, report


class TargetTracker:
    """Re-calibrates, at every chunk boundary, the noise scale of each run whose cell says
    `perturbation.target.track: every_chunk`, on that run's current weights: a fixed scale's
    mismatch shrinks as the policy sharpens (DESIGN §8.5). The scale is a traced value, so
    changing it recompiles nothing; the chosen scales go to the hooks with the boundary (the
    store saves them with the chunk, so a resumed run uses the same ones)."""

    def __init__(self, cells: list[Cell], runs: list, graphdef):
        self.runs = [(i, cell) for i, (cell, _, _) in enumerate(runs)
                     if cell.cfg.perturbation.target.metric is not None
                     and cell.cfg.perturbation.target.track == "every_chunk"]
        self.key = cells[0].cfg.perturbation.scale_key  # one static config per group: one scaled source
        self.measure = make_measure(self.runs[0][1].cfg, graphdef) if self.runs else None

    def recalibrate(self, params, hp) -> list[float]:
        scales = np.asarray(jax.device_get(hyper.get(hp, self.key)), float).copy()
        host_params = jax.device_get(params)
        for i, cell in self.runs:
            metric, value = cell.cfg.perturbation.target.resolved()
            run_params = jax.tree.map(lambda x: x[i], host_params)
            scales[i] = calibrate_scale(self.measure, run_params, cell.cfg, value, metric, start=float(scales[i]))[0]
        return scales.tolist()

    def with_scales(self, hp: hyper.Hyper, scales: list[float]) -> hyper.Hyper:
        return hyper.replace(hp, self.key, jnp.asarray(scales, jnp.float32))


_PROGRAMS: dict[tuple[str, int], tuple] = {}
MAX_PROGRAMS = 6


def programs(cfg: Config, task, graphdef, width: int) -> tuple:
    """The chunk, evaluation and probe programs of a static config at a run-axis width, built once
    per process: later groups with the same static config and width (a sweep's added cells,
    the finder's bisection rounds, a notebook's next `timsim.train`) reuse the compiled programs.

    At most MAX_PROGRAMS configs are kept: each compiled XLA CPU program maps thousands of
    memory sections, and a process may hold ~65k (vm.max_map_count); a sweep of 14 static
    configs in one process hit that limit ("LLVM ERROR: Unable to allocate section memory").
    When full, every compiled program of the process is dropped (`jax.clear_caches`) and the
    next ones compile afresh."""
    steps_blind = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": cfg.run.chunk_steps})})
    key = (static_hash(steps_blind), width)  # the run's length selects no program: chunks are chunk_steps long
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= MAX_PROGRAMS:
            _PROGRAMS.clear()
            jax.clear_caches()
        static = static_view(cfg)
        probe = make_probe(static, task, graphdef) if cfg.run.probe_every else None
        oracle = make_oracle_probe(static, graphdef) if cfg.run.oracle_every else None
        _PROGRAMS[key] = make_chunk(static, task, graphdef), make_eval(static, task, graphdef), probe, oracle
    return _PROGRAMS[key]


@dataclasses.dataclass
class Resume:
    """Where a resumed group starts: chunks already done, the scales the last one chose, and
    how to restore the state (given a template of its structure)."""

    chunks_done: int
    tracked_scales: list[float] | None
    restore: Callable[[RunState], RunState]


def run(cells: list[Cell], graphdef, base_params, hooks: Sequence[Hook] = (), evaluate: bool = True,
        resume: Resume | None = None, label: str | None = None) -> tuple[RunState, GroupRun]:
    """Train every run of `cells` (one static config) for `run.steps` steps; returns the final
    state (run axis first) and the group's description. `evaluate=False` skips the held-out
    evaluation at chunk boundaries (its columns are NaN), for tests and quick looks."""
    cfg = cells[0].cfg
    task = cfg.task.build()
    cells, calibration = resolve_targets(cells, graphdef, base_params)
    hp, runs = stack_hyperparams(cells)
    width = hp.seed.shape[0]
    tracker = TargetTracker(cells, runs, graphdef)
    if resume and tracker.runs and resume.tracked_scales:
        hp = tracker.with_scales(hp, resume.tracked_scales)
    hp, base_params = place(hp, over_runs=True), place(base_params, over_runs=False)
    lag = cfg.perturbation.lag_steps
    state = place(init_states(base_params, hp, lag), over_runs=True)
    chunk_steps, n_chunks = cfg.run.chunk_steps, cfg.run.steps // cfg.run.chunk_steps
    chunk_fn, evaluate_fn, probe, oracle = programs(cfg, task, graphdef, width)
    done = resume.chunks_done if resume else 0
    if done:
        state = place(resume.restore(state), over_runs=True)
    group = GroupRun(label or ", ".join(c.cell_id for c in cells), cells, runs, cfg.run.steps, chunk_steps,
                     done * chunk_steps, calibration)
    n_runs = len(runs)

    def at_boundary(state, step: int) -> dict:
        """Held-out evaluation, and the objective-effect probes when one is due at `step`."""
        out = evaluate_fn(state.params, state.step, hp) if evaluate else {}
        if probe is not None and step % cfg.run.probe_every == 0:
            out |= probe(state.params, state.step, hp, base_params)
        if oracle is not None and step % cfg.run.oracle_every == 0:
            out |= oracle(state.params, state.lagged, jax.device_get(state.step), hp, n_runs, base_params)
        return out

    for hook in hooks:
        hook.start(group)
    if not done:  # step 0: the base model's held-out accuracy, before any update
        t0 = time.perf_counter()
        frames = metric_rows(runs, jax.device_get(at_boundary(state, 0)), np.array([0]))
        for hook in hooks:
            hook.boundary(group, Boundary(0, 0, frames, state, None, time.perf_counter() - t0, ""))
    for c in range(done + 1, n_chunks + 1):
        t0 = time.perf_counter()
        state, metrics = chunk_fn(state, hp, base_params)
        ev = at_boundary(state, c * chunk_steps)
        metrics, ev = jax.device_get((metrics, ev))
        steps = np.arange((c - 1) * chunk_steps + 1, c * chunk_steps + 1)
        at_end = {k: np.concatenate([np.full((width, chunk_steps - 1), np.nan), np.asarray(v)[:, None]], 1)
                  for k, v in ev.items()}
        frames = metric_rows(runs, metrics | at_end, steps)
        scales = None
        if tracker.runs and c < n_chunks:
            scales = tracker.recalibrate(state.params, hp)
            hp = place(tracker.with_scales(hp, scales), over_runs=True)
        accuracy = (f"held-out acc {np.mean(ev['eval_greedy_accuracy'][:n_runs]):.2f}  "
                    if "eval_greedy_accuracy" in ev else "")
        summary = f"{accuracy}reward {np.mean(metrics['reward_mean'][:n_runs, -1]):.2f}"
        at = Boundary(c, c * chunk_steps, frames, state, scales, time.perf_counter() - t0, summary)
        for hook in hooks:
            hook.boundary(group, at)
        faults.reached("chunk_end")
    for hook in hooks:
        hook.end(group)
    return state, group
