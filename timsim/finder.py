"""The critical-mismatch finder: how much mismatch can a run take before it degrades?

A dose-response study for one noise family and mode. A zero-mismatch twin and each mismatch
level (a calibrated `perturbation.target`, per-token KL by default) run over the same seeds,
so each seed's level run shares prompts, sampling uniforms and noise draws with its twin
(common random numbers) and the final held-out accuracies can be compared seed by seed.

A level *degrades* when the mean paired difference (level minus twin) of final held-out
accuracy (or `metric`: final_reward for partial-credit tasks) is below -margin and
the upper end of its confidence interval (Student t over seeds) is below 0: worse by more
than the margin on average, and significantly worse. The margin is an accuracy difference,
or (`margin_of: twin_gain`) a fraction of what the twin learns (its final accuracy minus the
base's): a fixed 0.05 is most of what a run that gains 0.07 learns and a small part of
what one that gains 0.65 learns, so only a relative margin compares tasks of different
headroom. The finder starts on a log-spaced grid
and bisects geometrically between the highest level below the first degrading one and that
level. All levels share one static config, so the runs of a round batch on the run axis of
one compiled program. The study is a sweep directory: interrupt it and rerun the same
command, and finished levels are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from timsim.config import TARGET_METRICS, Config, ConfigError, config_from_dict, set_dotted
from timsim.executors import run_cells
from timsim.noise import LOGIT_NOISE
from timsim.plots import plot_dose_response
from timsim.plan import Cell
from timsim.store import Store, atomic_write_bytes, atomic_write_parquet, load
from timsim.summary import paired_ci, paired_differences

MIN_SEEDS = 5
ZERO_CELL = "zero"
MARGIN_OF = ("absolute", "twin_gain")


def degrades(diffs: np.ndarray, margin: float, confidence: float) -> bool:
    mean, half = paired_ci(diffs, confidence)
    return mean < -margin and mean + half < 0


@dataclasses.dataclass
class Finding:
    """The finder's answer: per-level paired differences, the critical level (None when no
    level degrades) and the bracket it was narrowed to (`below`: highest non-degrading level
    under it, None when even the smallest level degrades)."""

    diffs: dict[float, np.ndarray]
    critical: float | None
    below: float | None


def find_critical(evaluate: Callable[[list[float]], dict[float, np.ndarray]], levels: list[float],
                  bisect_rounds: int, margin: float, confidence: float) -> Finding:
    """`evaluate(levels) -> {level: paired differences per seed}`; grid first, then
    `bisect_rounds` geometric bisections of the bracket.

    Only the levels asked for enter the search, even when `evaluate` also returns others (a
    resumed study's store holds every level any earlier invocation ran): a rerun, finished or
    interrupted, then replays the same path, reuses its runs and trains nothing new."""
    def ask(asked: list[float]) -> dict[float, np.ndarray]:
        found = evaluate(asked)
        return {lv: found[lv] for lv in asked}

    diffs = ask(sorted(levels))
    for _ in range(bisect_rounds):
        critical, below = _bracket(diffs, margin, confidence)
        if critical is None or below is None:
            break
        diffs.update(ask([math.sqrt(critical * below)]))
    critical, below = _bracket(diffs, margin, confidence)
    return Finding(dict(sorted(diffs.items())), critical, below)


def _bracket(diffs, margin, confidence) -> tuple[float | None, float | None]:
    bad = [lv for lv in sorted(diffs) if degrades(diffs[lv], margin, confidence)]
    if not bad:
        return None, None
    below = [lv for lv in sorted(diffs) if lv < bad[0]]
    return bad[0], (below[-1] if below else None)


# ----------------------------------------------------------------------------- on real runs


@dataclasses.dataclass(frozen=True)
class FinderSettings:
    levels: list[float]
    target: str = "token_kl"
    margin: float = 0.05
    confidence: float = 0.95
    bisect_rounds: int = 2
    metric: str = "final_accuracy"  # the summary column compared with the twin (final_reward: partial credit)
    margin_of: str = "absolute"  # or "twin_gain": margin is a fraction of the twin's gain over the base

    @classmethod
    def from_options(cls, *layers: dict) -> "FinderSettings":
        """From a study's `finder:` block and/or the command line; a later layer wins, and a
        None value (an option not given) keeps the earlier layer's value or the default."""
        given = {k: v for layer in layers for k, v in layer.items() if v is not None}
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        levels = given.pop("levels", [1e-3, 1e-2, 1e-1])
        if not isinstance(levels, (list, tuple)) or not levels or not all(number(v) and v > 0 for v in levels):
            raise ConfigError(f"Finder `levels` must be a non-empty list of positive numbers, e.g. [0.01, 0.1, 1.0] "
                              f"(got {levels!r}).")
        bisect = given.pop("bisect", 2)
        if not isinstance(bisect, int) or isinstance(bisect, bool) or bisect < 0:
            raise ConfigError(f"Finder `bisect` must be a whole number of rounds >= 0 (got {bisect!r}).")
        for key in ("margin", "confidence"):
            if key in given and not number(given[key]):
                raise ConfigError(f"Finder `{key}` must be a finite number (got {given[key]!r}).")
        for key in ("target", "metric", "margin_of"):
            if key in given and not isinstance(given[key], str):
                raise ConfigError(f"Finder `{key}` must be a name (got {given[key]!r}).")
        return cls(levels=[float(v) for v in levels], bisect_rounds=bisect, **given)

    def validate(self, cfg: Config) -> None:
        problems = []
        if self.target not in TARGET_METRICS:
            problems.append(f"--target must be one of {', '.join(TARGET_METRICS)} (got {self.target!r})")
        if not 0.0 <= self.margin < 1.0:
            problems.append(f"--margin is an accuracy difference, or with --margin-of twin_gain a fraction of the "
                            f"twin's gain, in [0, 1) (got {self.margin})")
        if self.margin_of not in MARGIN_OF:
            problems.append(f"--margin-of must be {' or '.join(MARGIN_OF)} (got {self.margin_of!r})")
        elif self.margin_of == "twin_gain" and self.metric == "final_reward":
            problems.append("--margin-of twin_gain needs an accuracy --metric (final_accuracy or peak_accuracy): "
                            "the base's reward is not recorded")
        if not 0.5 <= self.confidence < 1.0:
            problems.append(f"--confidence must be in [0.5, 1) (got {self.confidence})")
        if not self.levels or min(self.levels) <= 0:
            problems.append(f"--levels must be positive target values (got {self.levels})")
        if self.metric not in ("final_accuracy", "peak_accuracy", "final_reward"):
            problems.append(f"--metric must be final_accuracy, peak_accuracy or final_reward (got {self.metric!r})")
        if self.bisect_rounds < 0:
            problems.append(f"--bisect must be >= 0 (got {self.bisect_rounds})")
        if cfg.perturbation.scaled_source is None:
            problems.append(f"perturbation.logit_noise.family must be a family with a scale "
                            f"({', '.join(LOGIT_NOISE.names(scaled=True))}) "
                            f"or perturbation.router_noise.family gaussian; got {cfg.perturbation.logit_noise.family!r}")
        if len(cfg.run.seeds) < MIN_SEEDS:
            problems.append(f"run.seeds needs at least {MIN_SEEDS} seeds for a paired confidence interval "
                            f"(got {len(cfg.run.seeds)}; e.g. run.seeds=[0,1,2,3,4])")
        if cfg.perturbation.target.metric is not None:
            problems.append("perturbation.target must be unset: the finder sets it per level")
        if problems:
            raise ConfigError("Invalid critical-mismatch finder settings: " + "; ".join(problems) + ".")


CORRECTED = "corrected "  # cell-id prefix of the corrected arm


def level_cell_id(level: float, arm: str = "") -> str:
    return f"{arm}level={level:.4g}"


def uncorrected(cfg: Config) -> Config:
    """`cfg` without its corrections (the finder's reference arm and its zero-mismatch twin)."""
    return cfg.model_copy(update={"correction": cfg.correction.without_corrections()})


def make_cells(cfg: Config, settings: FinderSettings, levels: list[float], arm: str = "") -> list:
    """The zero-mismatch twin (always uncorrected: every correction is the identity at zero
    mismatch) and one cell per level of `cfg` (same seeds, same static config per arm)."""

    zero = uncorrected(cfg).model_dump()
    set_dotted(zero, cfg.perturbation.scale_key, 0.0)
    cells = [Cell(ZERO_CELL, config_from_dict(zero), {f"perturbation.target.{settings.target}": 0.0})]
    for level in levels:
        raw = cfg.model_dump()
        set_dotted(raw, f"perturbation.target.{settings.target}", level)
        cells.append(Cell(level_cell_id(level, arm), config_from_dict(raw),
                          {f"perturbation.target.{settings.target}": level}))
    return cells


def twin_gain(summary: pd.DataFrame, metric: str = "final_accuracy") -> float:
    """What the zero-mismatch twin learns: its accuracy `metric` minus the base's greedy accuracy,
    mean over seeds (NaN for final_reward: the base's reward is not recorded)."""
    if metric == "final_reward":
        return math.nan
    twin = summary[summary.cell_id == ZERO_CELL]
    return float((twin[metric] - twin.base_accuracy).mean())


def margin_unit(summary: pd.DataFrame, settings: "FinderSettings") -> float:
    """The accuracy difference that one unit of `settings.margin` stands for: 1, or the twin's
    gain with `margin_of: twin_gain` (a ConfigError when the twin learned nothing)."""
    if settings.margin_of == "absolute":
        return 1.0
    gain = twin_gain(summary, settings.metric)
    if not gain > 0:
        raise ConfigError(f"--margin-of twin_gain: the zero-mismatch twin did not improve on the base (mean "
                          f"{settings.metric} minus base accuracy {gain:+.3g}), so a margin relative to its gain is "
                          f"undefined; use --margin-of absolute (the finished runs are kept and reused).")
    return gain


def first_significant_step(metrics: pd.DataFrame, cell_id: str, margin: float, confidence: float) -> float:
    """The first evaluation step at which the level degrades against its twin (NaN: never)."""
    ev = metrics.dropna(subset=["eval_greedy_accuracy"])
    wide = ev.pivot_table(index="step", columns=["cell_id", "seed"], values="eval_greedy_accuracy")
    if cell_id not in wide.columns.get_level_values(0):
        return float("nan")
    diff = wide[cell_id] - wide[ZERO_CELL][wide[cell_id].columns]
    for step, row in diff.iterrows():
        if step > 0 and degrades(row.to_numpy(float), margin, confidence):
            return float(step)
    return float("nan")


def dose_response(finding: Finding, metrics: pd.DataFrame, summary: pd.DataFrame, manifest: dict,
                  settings: FinderSettings, margin_abs: float, arm: str = "") -> pd.DataFrame:
    """One row per level (the twin first): calibration, accuracy, collapse rate, paired difference
    (in accuracy, and as the fraction of the twin's gain it costs); `margin_abs` is the margin as
    an accuracy difference."""
    gain = twin_gain(summary, settings.metric)
    rows = []
    for level in [0.0, *finding.diffs]:
        cell_id = ZERO_CELL if level == 0.0 else level_cell_id(level, arm)
        runs = summary[summary.cell_id == cell_id]
        calib = manifest["cells"][cell_id].get("calibration", {})
        acc, acc_ci = paired_ci(runs.final_accuracy.to_numpy(), settings.confidence)
        peak, peak_ci = paired_ci(runs.peak_accuracy.to_numpy(), settings.confidence)
        row = {"arm": arm.strip() or "uncorrected", "level": level, "scale": calib.get("scale", 0.0),
               "token_kl_base": calib.get("kl_sampler_learner", 0.0), "seq_kl_base": calib.get("seq_kl", 0.0),
               "mean_k3_training": float(runs.mean_mismatch_k3.mean()), "seeds": len(runs),
               "final_accuracy": acc, "final_accuracy_ci": acc_ci, "peak_accuracy": peak, "peak_accuracy_ci": peak_ci,
               "collapse_rate": float(runs.collapsed.mean())}
        if level == 0.0:
            row.update(paired_diff=0.0, paired_diff_ci=0.0, gain_lost=0.0, degrades=False,
                       first_significant_step=float("nan"))
        else:
            diffs = paired_differences(summary, cell_id, settings.metric)
            mean, half = paired_ci(diffs, settings.confidence)
            row.update(paired_diff=mean, paired_diff_ci=half, gain_lost=-mean / gain if gain > 0 else math.nan,
                       degrades=degrades(diffs, margin_abs, settings.confidence),
                       first_significant_step=first_significant_step(metrics, cell_id, margin_abs,
                                                                     settings.confidence))
        rows.append(row)
    return pd.DataFrame(rows)


def run_finder(cfg: Config, settings: FinderSettings, root: Path, log: Callable[[str], None] = print,
               restart: bool = False) -> dict:
    """Run (or resume) the finder into `root`; writes critical.parquet, critical.json and
    critical.png there and returns the record of critical.json.

    With a correction configured the finder runs twice against the same zero-mismatch twin,
    without and with the correction, and records how far the correction moves the critical
    level (`critical_shift`: corrected / uncorrected critical level)."""

    settings.validate(cfg)
    store = Store(root)
    with store.lock():  # held across every round, so a second finder on `root` stops at once
        if restart:
            store.clear()
        arms = [("", uncorrected(cfg)), (CORRECTED, cfg)] if cfg.correction.active else [("", cfg)]
        sweep = {"name": f"critical-{cfg.run.name}", "sweep_hash": None}
        findings = {}
        earlier = {cid: c for cid, c in store.read_manifest().get("cells", {}).items() if cid != ZERO_CELL}
        other_targets = {k.removeprefix("perturbation.target.") for c in earlier.values() for k in c["swept"]
                         if k.startswith("perturbation.target.")} - {settings.target}
        if other_targets:
            raise ConfigError(f"{root} holds a finder run with levels in {', '.join(sorted(other_targets))}, not "
                              f"{settings.target!r} (--target): rerun with that target to resume it, add --restart to "
                              f"discard it, or give another --out-dir.")
        for arm, arm_cfg in arms:
            known = sorted(c["swept"][f"perturbation.target.{settings.target}"] for cid, c in earlier.items()
                           if cid.startswith(arm) and (arm or not cid.startswith(CORRECTED)))
            tried: list[float] = []

            def evaluate(levels: list[float]) -> dict[float, np.ndarray]:
                nonlocal tried
                tried = sorted(set(tried) | set(levels))
                plan = sorted(set(tried) | set(known))  # levels an interrupted invocation started stay in the plan
                log(f"critical finder{' (' + arm.strip() + ')' if arm else ''}: levels "
                              f"{', '.join(f'{lv:.3g}' for lv in plan)} ({settings.target}) x {len(cfg.run.seeds)} "
                              f"seeds, against the zero-mismatch twin")
                summary = run_cells(make_cells(arm_cfg, settings, plan, arm), store, log, sweep=sweep)
                unit = margin_unit(summary, settings)  # the decisions compare diffs / unit with settings.margin
                return {lv: paired_differences(summary, level_cell_id(lv, arm), settings.metric) / unit for lv in plan}

            findings[arm] = find_critical(evaluate, settings.levels, settings.bisect_rounds, settings.margin,
                                          settings.confidence)
        metrics, summary = load(root)
        manifest = store.read_manifest()
        margin_abs = settings.margin * margin_unit(summary, settings)
        gain = twin_gain(summary, settings.metric)
        tables = [dose_response(findings[arm], metrics, summary, manifest, settings, margin_abs, arm) for arm, _ in arms]
        table = pd.concat([tables[0], *[t[t.level > 0] for t in tables[1:]]], ignore_index=True)
        atomic_write_parquet(root / "critical.parquet", table)
        record = {"target": settings.target, "margin": settings.margin, "margin_of": settings.margin_of,
                  "margin_abs": margin_abs, "twin_gain": None if math.isnan(gain) else gain,
                  "confidence": settings.confidence,
                  "metric": settings.metric, "seeds": list(cfg.run.seeds),
                  "family": cfg.perturbation.scaled_source, "mode": cfg.perturbation.logit_noise.mode,
                  "old_logprobs": cfg.grpo.old_logprobs, "response_len": cfg.response_len, "steps": cfg.run.steps,
                  **_critical_fields(findings[arms[-1][0]], tables[-1])}
        if cfg.correction.active:
            base = _critical_fields(findings[""], tables[0])
            record["correction"] = correction_label(cfg)
            record["uncorrected"] = base
            record["critical_shift"] = critical_shift(base["critical_level"], record["critical_level"])
        atomic_write_bytes(root / "critical.json", json.dumps(record, indent=2).encode())
        plot_dose_response(table, record, margin_words(record), root / "critical.png")
        return record


def critical_shift(uncorrected: float | None, corrected: float | None) -> float | str | None:
    """How far a correction moves the critical level: the factor corrected / uncorrected when
    both arms degrade somewhere, "up" when only the uncorrected arm degrades within the levels
    (the correction pushes it beyond them), "down" when only the corrected arm does, None when
    neither degrades."""
    if uncorrected is not None and corrected is not None:
        return corrected / uncorrected
    if uncorrected is None and corrected is None:
        return None
    return "up" if corrected is None else "down"


def margin_words(record: dict) -> str:
    """'0.05', or '0.25 of the twin's gain 0.07 = 0.0175'."""
    if record.get("margin_of", "absolute") == "absolute":
        return f"{record['margin']:g}"
    return f"{record['margin']:g} of the twin's gain {record['twin_gain']:.3g} = {record['margin_abs']:.3g}"


def correction_label(cfg: Config) -> str:
    parts = list(cfg.correction.kinds) + (["score_centering"] if cfg.correction.score_centering else [])
    return "+".join(parts) + (" (batch-normalised)" if cfg.correction.batch_normalize else "")


def _critical_fields(finding: Finding, table: pd.DataFrame) -> dict:
    out = {"critical_level": finding.critical, "below": finding.below}
    if finding.critical is not None:
        row = table[table.level == finding.critical].iloc[0]
        out.update(critical_token_kl=float(row.token_kl_base), critical_seq_kl=float(row.seq_kl_base),
                   first_significant_step=float(row.first_significant_step))
    return out
