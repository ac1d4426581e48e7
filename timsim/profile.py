"""Engine profiles: the mismatch a real engine pair shows, fitted from paired log-probs.

RL frameworks can export, per generated token, the log-prob the inference engine reported
and the one the trainer computed (and the token's position in the response). `timsim
profile FILE` fits the distribution of delta = logp_trainer - logp_sampler by bins of the
trainer's token probability and of the position, prints the quantiles per bin and plots
fitted against observed quantiles; the logit-noise family `profile` then injects noise whose
delta reproduces the fitted per-probability-bin quantiles on the tiny model.

File format (Parquet or CSV), one row per generated token:
- `logp_sampler`: the inference engine's log-prob of the token (<= 0, finite);
- `logp_trainer`: the trainer's log-prob of the same token under the same weights (<= 0);
- `position` (optional): the token's index in its response (integer >= 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from timsim import plots
from timsim.base import get_base
from timsim.calibration import hyperparams, make_measure
from timsim.config import ConfigError, config_from_dict, load_config
from timsim.noise import LEVELS, PROB_EDGES, load_profile

REQUIRED = ("logp_sampler", "logp_trainer")
POSITION_EDGES = (0, 16, 64, 256, 1024, 4096, 1 << 62)
MIN_TOKENS_PER_BIN = 200


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read and validate a paired log-prob file; every problem is one ConfigError paragraph."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Profile file {str(path)!r} does not exist.")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
        raise ConfigError(f"Profile file {str(path)!r} could not be read as Parquet or CSV: {err}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError(f"Profile file {str(path)!r} lacks column(s) {missing}; required: {', '.join(REQUIRED)} "
                          f"(log-probs, <= 0), optional: position (integer >= 0). Found: {list(df.columns)}.")
    problems = []
    for col in [*REQUIRED, *(["position"] if "position" in df.columns else [])]:
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
        if not np.isfinite(values).all():
            problems.append(f"column `{col}` has {int((~np.isfinite(values)).sum())} non-finite or non-numeric "
                            f"value(s)")
        elif col != "position" and (values > 0).any():
            problems.append(f"column `{col}` has {int((values > 0).sum())} log-prob(s) > 0 (max {values.max():.3g})")
        elif col == "position" and ((values < 0).any() or (values != np.round(values)).any()):
            problems.append("column `position` must hold integers >= 0")
    if problems:
        raise ConfigError(f"Profile file {str(path)!r}: " + "; ".join(problems) + ".")
    return df


def _bins(values: np.ndarray, edges) -> np.ndarray:
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def fit(df: pd.DataFrame, min_tokens: int = MIN_TOKENS_PER_BIN) -> dict:
    """Quantiles of delta (LEVELS) per bin of the trainer's probability and per position bin.
    A bin with fewer than `min_tokens` tokens is not fitted; if no probability bin has enough,
    the fit is refused (its quantiles would be noise)."""
    delta = df.logp_trainer.to_numpy(float) - df.logp_sampler.to_numpy(float)
    prob = np.exp(df.logp_trainer.to_numpy(float))
    out = {"levels": list(LEVELS), "tokens": int(delta.size), "by_prob": [], "by_position": []}
    for by, values, edges in [("by_prob", prob, PROB_EDGES),
                              *([("by_position", df.position.to_numpy(float), POSITION_EDGES)]
                                if "position" in df.columns else [])]:
        index = _bins(values, edges)
        for b in range(len(edges) - 1):
            sel = delta[index == b]
            row = {"lo": edges[b], "hi": edges[b + 1], "tokens": int(sel.size)}
            row["quantiles"] = np.quantile(sel, LEVELS).tolist() if sel.size >= min_tokens else None
            out[by].append(row)
    fitted = [r for r in out["by_prob"] if r["quantiles"] is not None]
    if not fitted:
        counts = ", ".join(f"[{r['lo']:g}, {r['hi']:g}): {r['tokens']}" for r in out["by_prob"])
        raise ConfigError(f"Too few tokens per probability bin to fit a profile (need {min_tokens}; have {counts}).")
    return out


def example_pairs(n_tokens: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """A synthetic engine pair with a known conditional distribution: delta | p-bin is Laplace
    with a scale that grows as p falls (rare tokens disagree more, as in real bf16 engines),
    truncated to delta >= logp_trainer (the sampler's probability cannot exceed 1: this only
    bites in the top bins, where the Laplace tail reaches past log p)."""
    rng = np.random.default_rng(seed)
    prob = np.clip(rng.beta(0.6, 0.3, n_tokens), 1e-6, 1 - 1e-7)
    scale = EXAMPLE_SCALES[_bins(prob, PROB_EDGES)]
    logp_trainer = np.log(prob)
    delta = rng.laplace(0.0, scale)
    while (bad := delta < logp_trainer).any():  # redraw: a truncated Laplace, not a pile-up at the bound
        delta[bad] = rng.laplace(0.0, scale[bad])
    return pd.DataFrame({"logp_sampler": logp_trainer - delta, "logp_trainer": logp_trainer,
                         "position": rng.integers(0, 4096, n_tokens)})


EXAMPLE_SCALES = np.asarray([0.08, 0.03, 0.01, 0.003, 0.001])  # Laplace scale of delta per PROB_EDGES bin


def table(profile: dict, by: str = "by_prob") -> pd.DataFrame:
    rows = []
    for r in profile[by]:
        row = {"bin": f"[{r['lo']:g}, {r['hi']:g})" if r["hi"] < 1 << 61 else f">= {r['lo']:g}", "tokens": r["tokens"]}
        qs = r["quantiles"] or [float("nan")] * len(LEVELS)
        row.update({f"q{100 * q:g}": v for q, v in zip(LEVELS, qs)})
        rows.append(row)
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path) -> Path:
    """Left: the 1%, 50% and 99% quantiles of delta per probability bin, fitted on one half of
    the tokens and observed on the other; right: every fitted quantile against the observed
    one, so a bin too thin for a stable fit shows off the diagonal."""
    fitted = table(fit(df.iloc[::2], min_tokens=MIN_TOKENS_PER_BIN // 2))
    observed = table(fit(df.iloc[1::2], min_tokens=10))
    halves = pd.concat([fitted.assign(half="fitted (one half)"), observed.assign(half="observed (other half)")])
    columns = [f"q{100 * q:g}" for q in LEVELS]
    qq = pd.DataFrame([{"bin": f"p in {b}", "fitted": f, "observed": o}
                       for b, fr, ob in zip(fitted.bin, fitted[columns].to_numpy(), observed[columns].to_numpy())
                       for f, o in zip(fr, ob) if np.isfinite(f) and np.isfinite(o)])
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    plots.delta_by_bin(halves, ("q1", "q50", "q99"), hue="half", ax=left)
    plots.against(qq, "fitted", "observed", hue="bin", ax=right, identity=True, connect=True,
                  xlabel="fitted quantile of δ, one half (nats)", ylabel="observed quantile, other half (nats)")
    fig.savefig(path, dpi=120)
    return path


def achieved(cfg, profile_path: str, graphdef, params) -> pd.DataFrame:
    """Inject the profile into `cfg`'s sampler (scale 1) at the base model and compare the
    delta quantiles per probability bin with the profile's: target against achieved."""
    import jax


    raw = cfg.model_dump()
    raw["perturbation"]["logit_noise"].update(family="profile", profile=str(profile_path), scale=1.0)
    raw["perturbation"]["target"] = {}
    run_cfg = config_from_dict(raw)
    out = jax.device_get(make_measure(run_cfg, graphdef, per_token=True)(params, hyperparams(run_cfg, 1.0)))
    mask = np.asarray(out["mask"]) > 0
    delta = (np.asarray(out["logp_old"]) - np.asarray(out["logp_sampler"]))[mask]
    index = _bins(np.exp(np.asarray(out["logp_old"])[mask]), PROB_EDGES)
    target = load_profile(profile_path)
    rows = []
    for b, row in enumerate(target["by_prob"]):
        sel = delta[index == b]
        entry = {"bin": f"[{row['lo']:g}, {row['hi']:g})", "tokens": int(sel.size)}
        for q in (0.01, 0.5, 0.99):
            k = LEVELS.index(q)
            entry[f"target q{100 * q:g}"] = row["quantiles"][k] if row["quantiles"] else float("nan")
            entry[f"achieved q{100 * q:g}"] = float(np.quantile(sel, q)) if sel.size >= 20 else float("nan")
        rows.append(entry)
    return pd.DataFrame(rows)


def _print_frame(frame: pd.DataFrame, title: str, console) -> None:
    from rich.table import Table

    view = Table(title=title)
    for col in frame.columns:
        view.add_column(col, justify="right")
    for r in frame.itertuples(index=False):
        view.add_row(*[str(v) if isinstance(v, (str, int)) else f"{v:.3g}" for v in r])
    console.print(view)


def command(pairs: str | None, out: str | None, example: str | None, config: str | None, overrides: list[str],
            console) -> int:
    """`timsim profile`: write the example pairs file, or fit a pairs file (and with --config,
    inject the fit into that config's tiny model and report achieved against target)."""
    if example:
        path = Path(example)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = example_pairs()
        frame.to_parquet(path, index=False) if path.suffix == ".parquet" else frame.to_csv(path, index=False)
        console.print(f"wrote {len(frame):,} synthetic paired tokens to {path} (delta | p-bin ~ Laplace with scales "
                      f"{', '.join(f'{s:g}' for s in EXAMPLE_SCALES)} for p-bins {PROB_EDGES})")
        return 0
    if not pairs:
        raise ConfigError("timsim profile needs a pairs file (or --example OUT to write one).")
    df = read_pairs(pairs)
    profile = fit(df)
    out_path = Path(out or Path(pairs).with_suffix(".profile.json"))
    out_path.write_text(json.dumps(profile, indent=2))
    for by in ("by_prob", "by_position") if "position" in df.columns else ("by_prob",):
        _print_frame(table(profile, by), f"delta = logp_trainer - logp_sampler, quantiles {by.replace('_', ' ')} "
                                         f"({profile['tokens']:,} tokens)", console)
    png = plot(df, out_path.with_suffix(".png"))
    console.print(f"profile: {out_path}; plot (fitted vs held-out quantiles): {png}")
    if config:

        cfg = load_config(config, overrides)
        graphdef, params, _ = get_base(cfg, announce=console.print)
        _print_frame(achieved(cfg, str(out_path), graphdef, params),
                     "family profile (scale 1) on the tiny model at the base: target against achieved delta", console)
        console.print(f"use it: perturbation.logit_noise.family=profile perturbation.logit_noise.profile={out_path}")
    return 0
