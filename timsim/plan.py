"""Planning a set of runs: cells, their identity, their groups, and the run axis.

A *cell* is one resolved config with its seeds; its runs are the seeds. Cells whose static
config is the same form a *group*: their runs are stacked on the run axis and advance
together in one compiled program (`timsim.loop`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from timsim import hyper
from timsim.config import Config, ConfigError, static_hash
from timsim.step import padded_width


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


def run_axis_width(cells: list[Cell]) -> int:
    """The run axis of a group: every seed of every cell, padded to a multiple of the device count."""
    return padded_width(sum(len(c.cfg.run.seeds) for c in cells))


def stack_hyperparams(cells: list[Cell]) -> tuple[hyper.Hyper, list[tuple[Cell, int, int]]]:
    """Traced values of every run of `cells` along a leading run axis, and who each run is.
    The axis is padded to a multiple of the device count with copies of the last run, whose
    results are never written."""
    runs = [(cell, i, seed) for cell in cells for i, seed in enumerate(cell.cfg.run.seeds)]
    values = [hyper.of(cell.cfg, seed) for cell, _, seed in runs]
    values += [values[-1]] * (padded_width(len(values)) - len(values))
    return hyper.stack(values), runs


def plan_groups(cells: list[Cell], manifest: dict) -> dict[str, list[Cell]]:
    """Unfinished groups recorded in the manifest keep their cells (same run-axis width);
    cells the manifest does not know yet form new groups by static hash (recorded in it)."""
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
                                            "config_hash": config_hash(c.cfg), "swept": c.swept,
                                            "ratio_denominator": c.cfg.ratio_denominator}
        groups[gid] = group_cells
    return groups


def check_compatible(cells: list[Cell], manifest: dict, sweep: dict) -> None:
    """Refuse to mix these cells into a results directory written for other ones."""
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
