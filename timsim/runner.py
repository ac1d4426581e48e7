"""A group of runs into a results directory, resumably (`timsim.store` holds the layout).

After every chunk the group's metric parts are written, then an orbax checkpoint of its
state, then the group's progress file records the chunk as done. Killed at any moment, the
same command continues every unfinished group from its last recorded chunk with the same
run-axis width (so the tables come out bit-identical, DESIGN §8.2), and skips finished cells.
"""

from __future__ import annotations

import shutil
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from timsim import base as base_lib
from timsim import faults
from timsim.config import ConfigError
from timsim.loop import Boundary, GroupRun, Hook, ProgressHook, Resume, run
from timsim.plan import Cell, run_axis_width
from timsim.store import Store
from timsim.step import init_states


class StoreHook(Hook):
    """Writes each boundary's metric parts, checkpoint and progress record into `store`.

    Progress goes to the group's own file (`Store.write_group`), never to the shared
    manifest, so groups may run concurrently (the Ray executor)."""

    def __init__(self, store: Store, gid: str, group: dict, record: dict):
        self.store, self.gid, self.group, self.record = store, gid, group, record
        self.checkpointer = ocp.StandardCheckpointer()

    def start(self, run: GroupRun) -> None:
        for cell_id, got in run.calibration.items():
            self.record["cells"][cell_id]["calibration"] = got

    def boundary(self, run: GroupRun, at: Boundary) -> None:
        for cell_id, df in at.frames.items():
            self.store.write_metrics_part(cell_id, at.chunk, df)
        if at.chunk == 0:
            return
        ckpt = self.store.checkpoint_dir(self.gid, at.step)
        self.checkpointer.save(ckpt.absolute(), at.state, force=True)
        faults.reached("checkpoint", ckpt)
        self.checkpointer.wait_until_finished()
        self.group["chunks_done"] = at.chunk
        if at.tracked_scales is not None:
            self.group["tracked_scales"] = at.tracked_scales
        for cell in run.cells:
            self.record["cells"][cell.cell_id].update(status="running", steps_done=at.step)
        self.store.write_group(self.gid, self.record)
        if at.chunk > 1:
            shutil.rmtree(self.store.checkpoint_dir(self.gid, at.step - run.chunk_steps), ignore_errors=True)

    def end(self, run: GroupRun) -> None:
        self.group["status"] = "done"
        for cell in run.cells:
            self.record["cells"][cell.cell_id]["status"] = "done"
        self.store.write_group(self.gid, self.record)


def run_group(gid: str, cells: list[Cell], store: Store, log: Callable[[str], None] = print,
              hooks: Sequence[Hook] = ()) -> None:
    """Train every run of `cells` (same static config) into `store` from its last finished chunk."""
    cfg = cells[0].cfg
    graphdef, base_params, base_info = base_lib.get_base(
        cfg, progress=lambda i: log(f"  pretrain step {i['steps']}: loss {i['loss']:.3f}, "
                                    f"held-out accuracy greedy {i['greedy_accuracy']:.2f}, "
                                    f"sampled {i['sampled_accuracy']:.2f}"),
        announce=log)
    log(f"base {base_info['base_key']}: greedy held-out accuracy {base_info['greedy_accuracy']:.2f}, "
        f"sampled {base_info['sampled_accuracy']:.2f} ({base_info['steps']} supervised steps)")
    group = dict(store.read_manifest()["groups"][gid])
    record = {"group": group, "cells": {c.cell_id: {} for c in cells}}
    group["base"] = {k: base_info.get(k) for k in ("base_key", "greedy_accuracy", "sampled_accuracy", "steps",
                                                    "pretrained_by")}
    width = run_axis_width(cells)
    if group.setdefault("padded_width", width) != width:
        raise ConfigError(f"Group {gid} was run with a run axis of {group['padded_width']} (padded to a multiple of "
                          f"that machine's device count); resume it on {group['padded_width']} device(s) or a divisor "
                          f"layout, or pass --restart.")
    resume = None
    if group["chunks_done"]:
        step = group["chunks_done"] * cfg.run.chunk_steps
        ckpt = store.checkpoint_dir(gid, step).absolute()
        resume = Resume(group["chunks_done"], group.get("tracked_scales"),
                        lambda template: ocp.StandardCheckpointer().restore(ckpt, base_lib.restore_target(template)))
        log(f"resuming {gid} at step {step}/{cfg.run.steps}")
    run(cells, graphdef, base_params, [StoreHook(store, gid, group, record), ProgressHook(log), *hooks],
        resume=resume)


def load_trained_params(root, base_params, hp_template, run: int = 0, lag_steps: int = 0):
    """Parameters of run `run` of the first group of a results directory, at its last checkpoint;
    `hp_template`: one run's `timsim.hyper.Hyper` (for the state's structure)."""
    store = Store(root)
    groups = [(gid, g) for gid, g in store.read_manifest().get("groups", {}).items() if g["chunks_done"]]
    if not groups:
        raise FileNotFoundError(f"{str(root)!r} holds no checkpoint of a trained run (no finished chunk).")
    gid, group = groups[0]
    steps = sorted(int(p.name) for p in (store.root / "ckpt" / gid).iterdir() if p.name.isdigit())
    width = group.get("padded_width", group["run_axis_width"])
    hp = jax.tree.map(lambda v: jnp.full((width,), v, jnp.float32), hp_template)
    abstract = jax.eval_shape(init_states, base_params, hp, lag_steps)
    state = ocp.StandardCheckpointer().restore(store.checkpoint_dir(gid, steps[-1]).absolute(),
                                               base_lib.restore_target(abstract))
    return jax.tree.map(lambda x: x[run], state.params), steps[-1]
