"""Sweep files: a base config plus axes, expanded into cells.

```yaml
base: ../quickstart.yaml        # optional, relative to this file
config: {grpo: {lr: 3.0e-4}}    # optional inline changes to the base
name: lr-study                  # results directory name (default: the file's stem)
seeds: [0, 1, 2]                # every cell runs these seeds (default: the base's run.seeds)
grid:                           # product of all grid axes
  grpo.lr: [1.0e-4, 3.0e-4]
zip:                            # paired axes (equal lengths), crossed with the grid
  grpo.clip_eps_low: [0.1, 0.2]
  grpo.clip_eps_high: [0.2, 0.3]
cells:                          # optional named cells, crossed with grid and zip
  recompute: {grpo.old_logprobs: recompute}
  bypass: {grpo.old_logprobs: bypass}
executor: local                 # or ray: one Ray task per compiled program (timsim.executors)
ray: {address: null, cpus_per_task: 1}
```

Every cell is validated before any compute, so a bad axis fails at once with the field named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from timsim.config import (Config, ConfigError, check_name, config_from_dict, get_dotted, parse_overrides, set_dotted,
                           static_hash)
from timsim.plan import Cell


class RaySettings(BaseModel):
    """`ray:` block of a sweep file (used with `executor: ray`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray instance
    num_cpus: int | None = Field(None, ge=1)  # CPUs of a local instance (default: all)
    cpus_per_task: float = Field(1.0, gt=0)  # CPUs reserved per group (one Ray task per group)
    gpus_per_task: float = Field(0.0, ge=0)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    seeds: list[int] | None = Field(None, min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = Field(default_factory=dict)
    executor: Literal["local", "ray"] = "local"
    ray: RaySettings = RaySettings()


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    cells: list[Cell]
    sweep_hash: str  # identity of the sweep's base config: a directory belongs to one sweep
    executor: str = "local"
    ray: RaySettings = RaySettings()

    @property
    def n_runs(self) -> int:
        return sum(len(c.cfg.run.seeds) for c in self.cells)

    def groups(self) -> dict[str, list[Cell]]:
        """Cells sharing one compiled program, by static hash."""
        out: dict[str, list[Cell]] = {}
        for cell in self.cells:
            out.setdefault(static_hash(cell.cfg), []).append(cell)
        return out


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_id(name: str | None, assignment: dict[str, Any]) -> str:
    """Readable, filename-safe id: `name` then `leaf=value` pairs (`leaf` = last key part)."""
    parts = [name] if name else []
    parts += [f"{key.split('.')[-1]}={_label(v)}" for key, v in assignment.items()]
    text = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _deep_merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _check_axes(spec: SweepFile) -> None:
    seen: dict[str, str] = {}
    for section in ("grid", "zip"):
        for key, values in getattr(spec, section).items():
            if key in seen:
                raise ConfigError(f"Invalid sweep: `{key}` is an axis twice ({seen[key]} and {section}); "
                                  f"each key may be swept by one axis only.")
            seen[key] = section
            if not values:
                raise ConfigError(f"Invalid sweep: axis `{section}.{key}` is empty; give at least one value.")
            if key in ("run.seeds", "seed"):
                raise ConfigError("Invalid sweep: sweep seeds with the top-level `seeds:` list, not as an axis.")
    lengths = {k: len(v) for k, v in spec.zip.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"Invalid sweep: zip axes must have equal lengths, got {lengths}.")


def read_spec(path: str | Path | dict, model: type[BaseModel], kind: str) -> BaseModel:
    """A sweep-like YAML file (or its content as a dict) validated by `model`, every problem as
    one `ConfigError`."""
    content = path if isinstance(path, dict) else None
    path = Path(f"<{kind} given as a dict>") if content is not None else Path(path)
    if content is None and not path.is_file():
        raise ConfigError(f"{kind.capitalize()} file {str(path)!r} does not exist.")
    try:
        return model.model_validate(content if content is not None else yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind.capitalize()} file {str(path)!r} is not valid YAML: {err}") from None
    except ValidationError as err:
        fields = "; ".join(f"`{'.'.join(map(str, e['loc']))}`: {e['msg']}" for e in err.errors())
        raise ConfigError(f"Invalid {kind} file {str(path)!r}: {fields}. Accepted top-level keys: "
                          f"{', '.join(model.model_fields)}.") from None


def resolve_base(path: Path, spec, overrides: list[str] | None) -> dict:
    """The raw config every cell starts from: `spec.base` (relative to the file), then
    `spec.config`, then command-line overrides, then `spec.seeds`."""
    base: dict = {}
    if spec.base:
        base_path = path.parent / spec.base
        if not base_path.is_file():
            raise ConfigError(f"Invalid file {str(path)!r}: `base` {spec.base!r} does not exist "
                              f"(paths are relative to the file).")
        base = yaml.safe_load(base_path.read_text()) or {}
    base = _deep_merge(json.loads(json.dumps(base)), spec.config)
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(base, key, value)
    if spec.seeds is not None:
        set_dotted(base, "run.seeds", spec.seeds)
    return base


def load_plan(path: str | Path | dict, overrides: list[str] | None = None) -> Plan:
    """Expand a sweep file (or its content as a dict: `base` is then relative to the working
    directory, and the name defaults to "sweep") into validated cells (no compute)."""
    spec = read_spec(path, SweepFile, "sweep")
    path = Path.cwd() / "sweep" if isinstance(path, dict) else Path(path)
    _check_axes(spec)
    base = resolve_base(path, spec, overrides)
    name = check_name(path.stem if spec.name is None else spec.name,
                      f"sweep name (`name:` of {str(path)!r}, default: the file's stem)")
    set_dotted(base, "run.name", name)
    config_from_dict(base, f"{str(path)!r} (base)")

    grid = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zipped = [{k: v[i] for k, v in spec.zip.items()} for i in range(n_zip)]
    named = list(spec.cells.items()) or [(None, {})]
    cells, ids = [], set()
    for (cell_name, fixed), g, z in itertools.product(named, grid, zipped):
        raw_cell = json.loads(json.dumps(base))
        assignment = {**g, **z}
        for key, value in {**fixed, **assignment}.items():
            set_dotted(raw_cell, key, value)
        cid = check_name(cell_id(cell_name, assignment), "cell name")
        cfg = config_from_dict(raw_cell, f"{str(path)!r}, cell {cid}")
        if cid in ids:
            raise ConfigError(f"Invalid sweep: two cells have the id {cid!r}; give named cells distinct names.")
        ids.add(cid)
        cells.append(Cell(cid, cfg, {key: _as_validated(cfg, key, value) for key, value in {**fixed, **assignment}.items()}))
    sweep_hash = hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Plan(name=name, cells=cells, sweep_hash=sweep_hash, executor=spec.executor, ray=spec.ray)


def _as_validated(cfg: Config, key: str, raw):
    """A swept value as the config holds it, for the results' cfg.* columns: YAML 1.1 reads
    `1.0e6` as a string that validation turns into 1e6, and a column mixing the string with
    other cells' floats cannot be written to Parquet. Non-scalar values stay as written."""
    value = get_dotted(cfg, key)
    return value if isinstance(value, (bool, int, float, str)) else raw


def estimate_seconds(cfg: Config, n_runs: int) -> float:
    """Rough wall time on this 2-core CPU class: ~75 ms per run-step at the standard shape
    (256 sequences x 32 positions, d_model 64, 2 layers; `timsim bench`), scaled by positions x
    width^2 x depth, plus ~10 s compile and pretraining per program."""
    positions = cfg.grpo.prompts_per_step * cfg.grpo.group_size * (cfg.task.build().prompt_len + cfg.response_len)
    scale = positions / (256 * 32) * (cfg.model.d_model / 64) ** 2 * cfg.model.n_layers / 2
    return 10.0 + n_runs * cfg.run.steps * 0.075 * scale * cfg.grpo.epochs
