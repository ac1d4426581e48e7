"""The in-memory Python API: what notebooks, scripts, the CLI and the tests call.

    import timsim
    cfg = timsim.load_config("configs/quickstart.yaml", ["run.steps=50"])
    result = timsim.train(cfg)            # nothing is written unless `out=` is given
    result.metrics                        # one row per (run, step): every timsim.metrics column
    result.summary                        # one row per run (final / peak accuracy, collapse, ...)
    result.by_cell()                      # mean and 95% CI over seeds per cell

Every entry point calls `timsim.setup()` (determinism and fp32 matmuls, DESIGN §8.2, §8.7)
first; importing timsim changes nothing global.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from timsim import hyper, report_html, store
from timsim.base import get_base
from timsim.calibration import calibrate_scale, calibration_table, make_measure
from timsim.config import (TARGET_METRICS, Config, ConfigError, config_from_dict, inside, load_config, parse_overrides,
                            set_dotted)
from timsim.finder import FinderSettings, run_finder
from timsim.determinism import setup
from timsim.exact import estimators, evaluate as evaluate_oracle, make_oracle
from timsim.executors import run_cells
from timsim.loop import FramesHook, Hook, ProgressHook, run
from timsim.plan import Cell
from timsim.predictions import check_names, measure_batch, table as prediction_table
from timsim.store import Store, load as load_store
from timsim.study import FINDER_KEYS
from timsim.summary import SUMMARY_METRICS, by_cell, paired_table, summarize_runs
from timsim.sweep_spec import load_plan
from timsim.step import RunState


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run or a sweep produced: DataFrames, and in memory the final state."""

    metrics: pd.DataFrame  # one row per (cell, run, step); eval_* columns only at chunk ends
    summary: pd.DataFrame  # one row per run (timsim.summary.summarize_runs)
    configs: dict[str, Config] = dataclasses.field(default_factory=dict)  # cell id -> resolved config
    state: dict[str, RunState] = dataclasses.field(default_factory=dict)  # group label -> final state (in memory)
    calibration: dict[str, dict] = dataclasses.field(default_factory=dict)  # cell id -> calibrated scale
    path: Path | None = None  # the results directory, when one was written or loaded

    @property
    def config(self) -> Config:
        """The config of a single-cell result."""
        if len(self.configs) != 1:
            raise ValueError(f"this result has {len(self.configs)} cells; use .configs[cell_id]")
        return next(iter(self.configs.values()))

    def by_cell(self, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
        """Mean, 95% CI half-width (Student t over seeds) and n per cell."""
        return by_cell(self.summary, list(metrics))

    def compare(self, against: str | Sequence[str] = "zero", confidence: float = 0.95) -> pd.DataFrame:
        """Paired by seed against reference cell(s) (by default the zero-mismatch twin `zero`):
        final accuracy differences with their CIs, collapse, mismatch and corrections per cell."""
        return compare(self, against, confidence)


def _config(config: Config | str | Path | dict | None, overrides: Sequence[str] = ()) -> Config:
    """A Config from a Config, a YAML path, a dict or None (the defaults), with `overrides`."""
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, list(overrides))
    if isinstance(config, Config) and not overrides:
        return config
    if isinstance(config, (Config, dict)):
        raw = config.model_dump() if isinstance(config, Config) else json.loads(json.dumps(config))
        for key, value in parse_overrides(list(overrides)).items():
            set_dotted(raw, key, value)
        return config_from_dict(raw, "the config given")
    raise TypeError(f"config must be a timsim.Config, a YAML path, a dict or None; got {type(config).__name__}")


def _log(progress: bool, log: Callable[[str], None] | None = None) -> Callable[[str], None]:
    return (log or print) if progress else (lambda _msg: None)


def train(config: Config | str | Path | dict | None = None, overrides: Sequence[str] = (), *,
          out: str | Path | None = None, restart: bool = False, evaluate: bool = True, progress: bool = True,
          base: tuple | None = None, hooks: Sequence[Hook] = (), log: Callable[[str], None] | None = None) -> Result:
    """Train `config` (a Config, a YAML path, a dict, or None for the defaults; `overrides` as on
    the command line) for `run.steps` steps, every seed of `run.seeds` on the run axis.

    In memory by default. With `out`, the run goes to that results directory instead, with
    checkpoints, and rerunning resumes it (`restart=True` starts over). `evaluate=False` skips
    the held-out evaluation at chunk ends. `base`: a `(graphdef, params)` base policy to start
    from instead of the config's cached pretrained one. `hooks`: extra `timsim.Hook`s."""
    setup()
    cfg = _config(config, overrides)
    log = _log(progress, log)
    if out is not None:
        if base is not None or not evaluate:
            raise ConfigError("train(out=...) writes a full results directory: it starts from the config's own "
                              "base and evaluates at every chunk end; drop `base` / `evaluate=False`, or train in "
                              "memory (out=None).")
        root = Path(out)
        run_cells([Cell(cfg.run.name, cfg)], Store(root), log, restart=restart, hooks=hooks)
        return load(root)
    graphdef, params = base if base is not None else get_base(cfg, announce=log)[:2]
    frames = FramesHook()
    state, group = run([Cell(cfg.run.name, cfg)], graphdef, params,
                       [frames, ProgressHook(log, bar=None if progress else False), *hooks], evaluate=evaluate)
    metrics = frames.metrics()
    return Result(metrics, summarize_runs(metrics), {cfg.run.name: cfg}, {group.label: state}, group.calibration)


def sweep(spec: str | Path | dict, overrides: Sequence[str] = (), *, out: str | Path | None = None,
          restart: bool = False, executor: str | None = None, ray: dict | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None) -> Result:
    """Run a sweep (a sweep file's path, or the same content as a dict): every cell, grouped by
    compiled program. In memory by default; with `out`, into that results directory with resume
    (and the file's executor and `ray:` options, or `executor` and `ray`)."""
    setup()
    plan = load_plan(spec, list(overrides))
    log = _log(progress, log)
    configs = {c.cell_id: c.cfg for c in plan.cells}
    if out is not None:
        root = Path(out)
        run_cells(plan.cells, Store(root), log, sweep={"name": plan.name, "sweep_hash": plan.sweep_hash},
                  restart=restart, executor=executor or plan.executor, ray=ray or plan.ray.model_dump())
        return dataclasses.replace(load(root), configs=configs)
    frames, states, calibration = FramesHook(), {}, {}
    for cells in plan.groups().values():
        graphdef, params, _ = get_base(cells[0].cfg, announce=log)
        state, group = run(cells, graphdef, params, [frames, ProgressHook(log, bar=None if progress else False)])
        states[group.label] = state
        calibration |= group.calibration
    metrics = frames.metrics()
    return Result(metrics, summarize_runs(metrics), configs, states, calibration)


def load(path: str | Path) -> Result:
    """A results directory written by `train(out=...)`, `sweep(out=...)` or the CLI (readable
    while it runs)."""
    metrics, summary = load_store(path)
    return Result(metrics, summary, path=Path(path))


def write_report(path: str | Path, out: str | Path | None = None, against: str | None = None) -> Path:
    """A self-contained HTML report of a results directory (`timsim.report_html`)."""
    return report_html.write_report(path, out, against)


def export(path: str | Path, dest: str | Path, command: str, every: int = 1) -> Path:
    """Compact, reloadable data of a results directory, with the command that regenerates it
    (`timsim.store.export`); `load(dest)` reads it."""
    return store.export(path, dest, command, every)


def compare(result: Result | pd.DataFrame, against: str | Sequence[str] = "zero",
            confidence: float = 0.95) -> pd.DataFrame:
    """Paired-by-seed comparison of every cell against reference cell(s) (`Result.compare`)."""
    against = [against] if isinstance(against, str) else list(against)
    if isinstance(result, Result):
        return paired_table(result.metrics, result.summary, against, confidence)
    raise TypeError("compare takes a timsim.Result (from train, sweep or load)")


def calibrate(config: Config | str | Path | dict | None = None, targets: Sequence[float] = (),
              metric: str = "token_kl", scales: Sequence[float] = (), overrides: Sequence[str] = (),
              base: tuple | None = None) -> pd.DataFrame:
    """At the config's base model (or `base`, a `(graphdef, params)` pair): the noise scale that
    reaches each mismatch `target` of `metric` (a `perturbation.target` field), then the
    mismatch metrics measured at those scales and at each of `scales` (with the Gaussian closed
    form where it applies). One row per target, then per scale."""
    setup()
    cfg = _config(config, overrides)
    if metric not in TARGET_METRICS:
        raise ConfigError(f"metric {metric!r} is not a calibration target; accepted: {', '.join(TARGET_METRICS)}.")
    graphdef, params = base if base is not None else get_base(cfg, announce=lambda _msg: None)[:2]
    measure = make_measure(cfg, graphdef)
    found = [calibrate_scale(measure, params, cfg, float(t), TARGET_METRICS[metric])[0] for t in targets]
    rows = calibration_table(measure, params, cfg, found + [float(s) for s in scales])
    for row, target in zip(rows, targets):
        row.update(target_metric=metric, target=float(target))
    return pd.DataFrame(rows)


def theory_table(config: Config | str | Path | dict | None = None, overrides: Sequence[str] = (), *,
                 base: tuple | None = None, params=None, n_prompts: int = 512,
                 names: Sequence[str] | None = None) -> pd.DataFrame:
    """Theory against simulation for one config (`timsim.predictions`): each closed form of
    `timsim.theory` beside what the config's sampler measures on `n_prompts` x group-size
    responses of the base model (or of `params`, e.g. trained weights), with the standard
    error, the size of the omitted terms, z and whether they agree. Rows that do not apply to
    the config say why. `names`: only these predictions (`timsim.predictions.PREDICTIONS`)."""
    setup()
    cfg = _config(config, overrides)
    check_names(names)
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts < 1:
        raise ConfigError(f"theory: n_prompts must be a positive integer, got {n_prompts!r}.")
    graphdef, base_params = base if base is not None else get_base(cfg, announce=lambda _msg: None)[:2]
    measured = measure_batch(cfg, graphdef, base_params if params is None else params, n_prompts)
    return prediction_table(measured, list(names) if names else None)


def oracle(config: Config | str | Path | dict | None = None, overrides: Sequence[str] = (), *,
           base: tuple | None = None, params=None, draws: int = 16, max_prompts: int = 128,
           only: Sequence[str] | None = None, variance: bool = True) -> pd.DataFrame:
    """The exact-gradient oracle (`timsim.exact`) at the base model (or at `params`): for every
    estimator (or those named in `only`), its expected update's cosine to the true gradient
    grad E_pi[R], relative bias against the zero-mismatch update, the bias's projection on it,
    and the per-sample variance; averaged over `draws` noise draws when the sampler's noise is
    fresh. The task must be enumerable (responses of at most 4 tokens, at most 4 free digits).
    `table.attrs` holds the facts (draws, prompts, responses, prompt mass covered)."""
    setup()
    cfg = _config(config, overrides)
    for name, value, low in (("draws", draws, 1), ("max_prompts", max_prompts, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"oracle: {name} must be a positive integer, got {value!r}.")
    known = [e.name for e in estimators(cfg)]
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise ConfigError(f"oracle: unknown estimator(s) {unknown}; accepted: {', '.join(known)}.")
    graphdef, base_params = base if base is not None else get_base(cfg, announce=lambda _msg: None)[:2]
    params = base_params if params is None else params
    built = make_oracle(cfg, graphdef, max_prompts, tuple(only) if only else None, variance)
    table, facts = evaluate_oracle(built, cfg, params, params, hyper.of(cfg, seed=cfg.run.seeds[0]), 0, draws)
    table.attrs.update(facts)
    return table


def critical(config: Config | str | Path | dict | None = None, overrides: Sequence[str] = (), *,
             out: str | Path | None = None, restart: bool = False, progress: bool = True,
             **finder: Any) -> pd.DataFrame:
    """Find the critical mismatch level of `config` (DESIGN §6): the dose-response table, one row
    per level with the paired accuracy difference against the zero-mismatch twin and its CI.
    `finder` takes the finder's options (levels, target, margin, margin_of, confidence,
    bisect, metric); the runs go to `out` (default: run.out_dir / run.name-critical)."""
    setup()
    cfg = _config(config, overrides)
    unknown = sorted(set(finder) - FINDER_KEYS)
    if unknown:
        raise ConfigError(f"critical: unknown finder option(s) {unknown}; accepted: {', '.join(sorted(FINDER_KEYS))}.")
    settings = FinderSettings.from_options(finder)
    root = Path(out) if out is not None else inside(cfg.run.out_dir, f"{cfg.run.name}-critical")
    run_finder(cfg, settings, root, _log(progress), restart=restart)
    return pd.read_parquet(root / "critical.parquet")
