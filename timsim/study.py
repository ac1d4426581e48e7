"""Study files: one critical-mismatch finder per variant of a base config
(`timsim critical FILE`), the one-line summary of each variant's result, and running a
config or a study through the finder (`run_critical`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from timsim.config import (Config, ConfigError, check_name, config_from_dict, inside, load_config, parse_overrides,
                           set_dotted)
from timsim.finder import FinderSettings, run_finder
from timsim.store import atomic_write_parquet
from timsim.sweep_spec import read_spec, resolve_base


class StudyFile(BaseModel):
    """A finder study: one finder per variant of a base config (`timsim critical FILE`).

    ```yaml
    base: ../quickstart.yaml          # relative to this file
    config: {grpo: {lr: 3.0e-4}}      # inline changes to the base
    name: critical-gaussian           # results directory (default: the file's stem)
    seeds: [0, 1, 2, 3, 4]
    finder: {levels: [0.01, 0.1, 1.0], target: seq_kl, margin: 0.05, confidence: 0.95, bisect: 2}
    variants:
      fresh-bypass: {perturbation.logit_noise.mode: fresh, grpo.old_logprobs: bypass}
    ```"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    seeds: list[int] | None = Field(None, min_length=1)
    finder: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)


FINDER_KEYS = {"levels", "target", "margin", "margin_of", "confidence", "bisect", "metric"}


def is_study_file(path: str | Path) -> bool:
    raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    return isinstance(raw, dict) and "variants" in raw


def load_study(path: str | Path, overrides: list[str], cli: dict) -> tuple[str, dict[str, Config], FinderSettings]:
    """(study name, {variant: config}, finder settings). The command line wins over the file:
    `overrides` (dotted.key=value) over every variant's own changes, `cli` (the finder options
    given) over the file's `finder:` block."""

    path = Path(path)
    spec = read_spec(path, StudyFile, "study")
    unknown = set(spec.finder) - FINDER_KEYS
    if unknown:
        raise ConfigError(f"Invalid study file {str(path)!r}: unknown finder key(s) {sorted(unknown)}; accepted: "
                          f"{', '.join(sorted(FINDER_KEYS))}.")
    base = resolve_base(path, spec, None)
    name = check_name(path.stem if spec.name is None else spec.name,
                      f"study name (`name:` of {str(path)!r}, default: the file's stem)")
    variants = {}
    for variant, changes in spec.variants.items():
        raw = json.loads(json.dumps(base))
        for key, value in {**changes, **parse_overrides(overrides)}.items():
            set_dotted(raw, key, value)
        set_dotted(raw, "run.name", variant)
        variants[variant] = config_from_dict(raw, f"{str(path)!r}, variant {variant}")
    return name, variants, FinderSettings.from_options(spec.finder, cli)


def study_row(variant: str, record: dict, real_length: int = 4096) -> dict:
    """One line of a study's critical table."""
    seq_kl = record.get("critical_seq_kl", float("nan"))
    return {"variant": variant, "mode": record["mode"], "old_logprobs": record["old_logprobs"],
            "response_len": record["response_len"], "critical_level": record["critical_level"],
            "below": record["below"], "critical_token_kl": record.get("critical_token_kl", float("nan")),
            "critical_seq_kl": seq_kl, f"token_kl_at_{real_length}": seq_kl / real_length,
            "first_significant_step": record.get("first_significant_step", float("nan")),
            "correction": record.get("correction", ""),
            "uncorrected_critical_level": record.get("uncorrected", {}).get("critical_level")}


@dataclasses.dataclass
class CriticalRun:
    """What `run_critical` found: per variant its finder record and results directory, and for a
    study file the critical table (one row per variant, also written as critical_table.parquet)."""

    root: Path
    name: str | None  # the study's name; None for a single config
    settings: FinderSettings
    records: dict[str, tuple[dict, Path]]
    table: pd.DataFrame | None


def run_critical(path: str | Path, overrides: list[str], options: dict, only: str | None = None,
                 out_dir: str | None = None, restart: bool = False, log: Callable[[str], None] = print,
                 after_variant: Callable[[str, dict, Path, FinderSettings], None] | None = None) -> CriticalRun:
    """Run (or resume) the finder on a config file, or on every variant of a study file (`only`:
    comma-separated variants); `after_variant` is called as each variant finishes."""
    if is_study_file(path):
        name, variants, settings = load_study(path, overrides, options)
        if only:
            unknown = set(only.split(",")) - set(variants)
            if unknown:
                raise ConfigError(f"--only names unknown variant(s) {sorted(unknown)}; the study has "
                                  f"{', '.join(variants)}.")
            variants = {k: v for k, v in variants.items() if k in only.split(",")}
    else:
        cfg = load_config(path, overrides)
        name, variants = None, {cfg.run.name: cfg}
        settings = FinderSettings.from_options(options)
    for cfg in variants.values():
        settings.validate(cfg)
    parent = Path(out_dir or next(iter(variants.values())).run.out_dir)
    root = inside(parent, name) if name else parent
    records = {}
    for variant, cfg in variants.items():
        vroot = inside(root, variant if name else f"critical-{variant}")
        log(f"critical finder: {variant}")
        records[variant] = run_finder(cfg, settings, vroot, log, restart=restart), vroot
        if after_variant is not None:
            after_variant(variant, records[variant][0], vroot, settings)
    table = None
    if name:
        table = pd.DataFrame([study_row(variant, record) for variant, (record, _) in records.items()])
        atomic_write_parquet(root / "critical_table.parquet", table)
    return CriticalRun(root, name, settings, records, table)
