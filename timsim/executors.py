"""Running a set of cells into a results directory, and where its groups run: `local`
(default) runs them one after another in this process; `ray` makes each group a Ray task.

A group (the cells that share one compiled program) is the unit of work: its runs advance
together on the run axis, so splitting it would change the run-axis width and with it the
numbers (DESIGN §8.2). A Ray task runs `runner.run_group` in a worker process and writes
the group's metric parts, checkpoints and progress file straight into the results
directory, which must therefore be on a file system every node sees. The driver only
plans, waits and writes the summary, so killing it (or a worker) loses at most the chunk
in flight: rerunning the same command resumes every group from its last finished chunk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from timsim.config import ConfigError, check_name, to_yaml
from timsim.loop import Hook
from timsim.plan import Cell, check_compatible, plan_groups
from timsim.runner import run_group
from timsim.store import SCHEMA_VERSION, Store, load, provenance
from timsim.summary import summarize_runs
from timsim.step import resolve_batching


def _run_group_task(root: str, gid: str, cells: list) -> str:
    """Body of one Ray task (runs in a worker process)."""
    run_group(gid, cells, Store(root))
    return gid


def run_local(groups: dict[str, list[Cell]], root: Path, log: Callable[[str], None] = print,
              hooks: Sequence[Hook] = ()) -> None:
    """Run every group in this process, one after another."""
    for gid, group_cells in groups.items():
        run_group(gid, group_cells, Store(root), log, hooks)


def run_on_ray(groups: dict[str, list], root: Path, log: Callable[[str], None] = print, address: str | None = None,
               num_cpus: int | None = None, cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> None:
    """Run every group as a Ray task and wait for all of them.

    `address`: an existing cluster (`ray://host:10001`, or `auto`); None connects to the
    cluster named by RAY_ADDRESS if set, else starts a local one with `num_cpus` CPUs
    (default: all). A task's error is re-raised here, after the other tasks finish."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray needs Ray, an optional extra: pip install 'timsim[ray]' "
                          "(or use executor: local).") from None
    if not groups:
        return
    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # A local instance: Ray starts its workers at niceness 15, so beside any other busy
            # process a study's groups would crawl (CI under load took minutes per group).
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)(_run_group_task)
    root_text = str(Path(root).absolute())
    pending = {task.remote(root_text, gid, cells): gid for gid, cells in groups.items()}
    log(f"ray: {len(pending)} group(s) submitted to {ray.cluster_resources().get('CPU', 0):g} CPU(s)")
    errors, waiting = [], list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        gid = pending[done[0]]
        try:
            ray.get(done[0])
            log(f"ray: group {gid} done ({len(pending) - len(waiting)}/{len(pending)})")
        except ray.exceptions.RayTaskError as err:
            errors.append(f"{gid}: {err.cause!r}")
    if errors:
        raise RuntimeError("Ray task(s) failed (finished groups are kept; rerun to resume): " + "; ".join(errors))


EXECUTORS = {"local": run_local, "ray": run_on_ray}


def run_cells(cells: list[Cell], store: Store, log: Callable[[str], None] = print, sweep: dict | None = None,
              restart: bool = False, executor: str = "local", ray: dict | None = None,
              hooks: Sequence[Hook] = ()) -> pd.DataFrame:
    """Run (or resume) all cells into `store` under its lock; returns the per-run summary table.

    `executor`: `local` runs the groups one after another in this process (calling `hooks` too);
    `ray` makes each group a Ray task (options in `ray`; hooks cannot travel to its workers).
    Both write the same files."""
    for cell in cells:
        check_name(cell.cell_id, "cell name")
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be {' or '.join(EXECUTORS)}, got {executor!r}.")
    if hooks and executor != "local":
        raise ConfigError("hooks run in this process: use executor: local with hooks.")
    with store.lock():
        if restart:
            store.clear()
        manifest = store.read_manifest()
        sweep = sweep or {"name": cells[0].cfg.run.name}
        if manifest:
            check_compatible(cells, manifest, sweep)
        else:
            manifest = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "provenance": provenance(),
                        "run_axis_batching": resolve_batching(cells[0].cfg.run.batching), "cells": {}, "groups": {}}
        groups = plan_groups(cells, manifest)
        store.write_manifest(manifest)
        known = [c for c in cells if c.cell_id in manifest["cells"]]
        store.write_text("config.resolved.yaml",
                         "\n---\n".join(f"# cell {c.cell_id}\n{to_yaml(c.cfg)}" for c in known))
        skipped = [c.cell_id for c in cells if manifest["cells"][c.cell_id]["status"] == "done"]
        if skipped:
            log(f"{len(skipped)} finished cell(s) kept, not recomputed: {', '.join(skipped[:6])}"
                f"{' ...' if len(skipped) > 6 else ''}")
        start = time.perf_counter()
        if executor == "ray":
            run_on_ray(groups, store.root, log, **(ray or {}))
        else:
            run_local(groups, store.root, log, hooks)
        manifest = store.read_manifest()
        summary = summarize_runs(load(store.root)[0])
        store.write_summary(summary)
        manifest["seconds_last_invocation"] = round(time.perf_counter() - start, 1)
        store.write_manifest(manifest)
        return summary
