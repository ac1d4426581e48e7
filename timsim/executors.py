"""Executors: where a sweep's groups run. `local` (default) runs them one after another in
this process (`runner.run_cells`); `ray` makes each group a Ray task.

A group (the cells that share one compiled program) is the unit of work: its runs advance
together on the run axis, so splitting it would change the run-axis width and with it the
numbers (DESIGN §8.2). A Ray task runs `runner.run_group` in a worker process and writes
the group's metric parts, checkpoints and progress file straight into the results
directory, which must therefore be on a file system every node sees. The driver only
plans, waits and writes the summary, so killing it (or a worker) loses at most the chunk
in flight: rerunning the same command resumes every group from its last finished chunk.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from timsim.config import ConfigError


def _run_group_task(root: str, gid: str, cells: list) -> str:
    """Body of one Ray task (runs in a worker process)."""
    from timsim.runner import run_group
    from timsim.store import Store

    run_group(gid, cells, Store(root), Console(width=120, force_terminal=False))
    return gid


def run_on_ray(groups: dict[str, list], root: Path, console: Console, address: str | None = None,
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
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)(_run_group_task)
    root_text = str(Path(root).absolute())
    pending = {task.remote(root_text, gid, cells): gid for gid, cells in groups.items()}
    console.print(f"ray: {len(pending)} group(s) submitted to {ray.cluster_resources().get('CPU', 0):g} CPU(s)")
    errors, waiting = [], list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        gid = pending[done[0]]
        try:
            ray.get(done[0])
            console.print(f"ray: group {gid} done ({len(pending) - len(waiting)}/{len(pending)})")
        except ray.exceptions.RayTaskError as err:
            errors.append(f"{gid}: {err.cause!r}")
    if errors:
        raise RuntimeError("Ray task(s) failed (finished groups are kept; rerun to resume): " + "; ".join(errors))
