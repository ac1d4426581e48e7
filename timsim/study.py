"""Study files: one critical-mismatch finder per variant of a base config
(`timsim critical FILE`), and the one-line summary of each variant's result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from timsim.config import Config, ConfigError, check_name, config_from_dict, parse_overrides, set_dotted
from timsim.finder import FinderSettings
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
