"""What `timsim train` and `timsim sweep` do end to end: run, then table and plot."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

import jax

from timsim.base import get_base
from timsim.calibration import calibrate_scale, calibration_table, hyperparams, make_measure
from timsim.config import TARGET_METRICS, Config, ConfigError, config_from_dict, inside, load_config, traced_values
from timsim.finder import FinderSettings, margin_words, run_finder
from timsim.diagnostics import delta_quantiles_by_bin
from timsim.executors import run_cells
from timsim.plan import Cell
from timsim.plots import plot_curves
from timsim.runner import load_trained_params
from timsim.store import Store, atomic_write_parquet, load
from timsim.study import is_study_file, load_study, study_row
from timsim.summary import SUMMARY_METRICS, by_cell, paired_table
from timsim.sweep_spec import estimate_seconds, load_plan

HEADERS = {"final_accuracy": "final acc", "peak_accuracy": "peak acc", "peak_step": "peak step",
           "final_reward": "final reward", "mean_mismatch_k3": "mean k3", "collapsed": "collapsed"}


def _fmt(mean: float, ci: float) -> str:
    return f"{mean:.3g}" if math.isnan(ci) else f"{mean:.3g} ± {ci:.2g}"


def print_summary(summary: pd.DataFrame, console: Console) -> None:
    """Mean ± 95% CI over seeds, one line per cell (held-out accuracy is greedy)."""
    if summary.empty:
        console.print("no finished runs yet")
        return
    cells = by_cell(summary)
    table = Table(title="per cell: mean ± 95% CI over seeds (held-out greedy accuracy)")
    table.add_column("cell", overflow="fold")
    table.add_column("n", justify="right")
    table.add_column("base acc", justify="right")
    for m in SUMMARY_METRICS:
        table.add_column(HEADERS[m], justify="right")
    base = summary.groupby("cell_id", sort=False).base_accuracy.first()
    for _, row in cells.iterrows():
        table.add_row(str(row.cell_id), str(row.n), f"{base[row.cell_id]:.3g}",
                      *(_fmt(row[m], row[f"{m}_ci95"]) for m in SUMMARY_METRICS))
    console.print(table)


def print_paired(table: pd.DataFrame, against: list[str], console: Console) -> None:
    out = Table(title="paired by seed (final held-out greedy accuracy; mismatch and corrections averaged over "
                      "training)")
    heads = ["cell", "n", "final acc", *[f"- {ref}" for ref in against], "collapsed", "token KL", "resp KL",
             "r out [0.5,2]", "rejected", "probe cos"]
    for h in heads:
        out.add_column(h, justify="left" if h == "cell" else "right", overflow="fold")
    num = lambda v: "-" if pd.isna(v) else f"{v:.3g}"  # noqa: E731
    for r in table.to_dict("records"):
        collapsed = f"{r['collapse_rate']:.2f}" + ("" if pd.isna(r["first_collapse_step"]) else
                                                   f" (step {r['first_collapse_step']:.0f})")
        out.add_row(r["cell"], str(r["seeds"]), _fmt(r["final_accuracy"], r["final_accuracy_ci"]),
                    *[("-" if r["cell"] == ref else _fmt(r[f"minus_{ref}"], r[f"minus_{ref}_ci"])) for ref in against],
                    collapsed, num(r["kl_sampler_learner"]), num(r["seq_kl"]), num(r["ratio_out_band_frac"]),
                    num(r["rejected_token_frac"]), num(r["probe_bypass_cos"]))
    console.print(out)


def print_calibration(cfg: Config, targets: list[float], console: Console, metric: str = "token_kl",
                      real_length: int = 4096, bins: bool = False) -> None:
    """`timsim calibrate`: the scale reaching each target on the config's base model, what it
    gives per token and per response, and the per-token KL a real response of `real_length`
    tokens would need to carry the same per-response KL (the equivalent real-engine setting)."""

    if metric not in TARGET_METRICS:
        raise ConfigError(f"--metric {metric!r} is not a calibration target; accepted: {', '.join(TARGET_METRICS)}.")
    graphdef, params, info = get_base(cfg, announce=console.print)
    measure = make_measure(cfg, graphdef)
    family = cfg.perturbation.logit_noise.family
    scales = [calibrate_scale(measure, params, cfg, t, TARGET_METRICS[metric])[0] for t in targets]
    table = Table(title=f"{family} logit noise ({cfg.perturbation.logit_noise.mode}) on base {info['base_key']} "
                        f"(greedy acc {info['greedy_accuracy']:.2f}); {cfg.grpo.prompts_per_step}x"
                        f"{cfg.grpo.group_size} sampled responses to training prompts")
    columns = {"scale": "scale", "kl_sampler_learner": "KL(mu||pi)", "mismatch_k3": "k3", "delta_abs_mean": "mean |delta|",
               "delta_abs_q99": "q99 |delta|", "delta_abs_max": "max |delta|", "ratio_out_band_frac": "r outside [0.5,2]",
               "response_tokens": "tokens/resp", "seq_kl": "per-response KL", "equivalent": f"token KL @ {real_length}"}
    if family == "gaussian":
        columns["closed_form_kl"] = "closed form KL"
    table.add_column(f"target {metric}", justify="right")
    for header in columns.values():
        table.add_column(header, justify="right")
    rows = calibration_table(measure, params, cfg, scales)
    for target, row in zip(targets, rows):
        row["equivalent"] = row["seq_kl"] / real_length
        table.add_row(f"{target:.3g}", *(f"{row[k]:.3g}" for k in columns))
    console.print(table)
    console.print(f"'token KL @ {real_length}': the per-token KL at which a {real_length}-token response carries the "
                  f"same per-response KL. Configs can say perturbation.target.{metric}: <value> instead of a raw "
                  "scale (target.equivalent_length: L turns a token_kl into a per-response target; target.track: "
                  "once | every_chunk).")
    if bins:
        tokens_at = make_measure(cfg, graphdef, per_token=True)
        for target, scale in zip(targets, scales):
            got = jax.device_get(tokens_at(params, hyperparams(cfg, scale)))
            frame = delta_quantiles_by_bin(got["logp_old"], got["logp_sampler"], got["mask"])
            bin_table = Table(title=f"|delta| quantiles by bin at target {metric} {target:.3g} (scale {scale:.3g}): "
                                    "p = learner probability of the sampled token, position in the response")
            for col in frame.columns:
                bin_table.add_column(col, justify="left" if col in ("by", "bin") else "right")
            for rec in frame.itertuples(index=False):
                bin_table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in rec))
            console.print(bin_table)


PRECISION_MODES = {  # label -> perturbation.sampler_precision
    "bf16 all sites": {"dtype": "bf16"},
    **{f"bf16 {site}": {"dtype": "bf16", "sites": [site]}
       for site in ("weights", "matmul_in", "matmul_out", "activations", "logits")},
    "fp16 all sites": {"dtype": "fp16"},
    "split-K 4, fp32 partials": {"split_k": 4},
    "split-K 4, bf16 partials": {"split_k": 4, "partials": "bf16"},
    "softmax 4 blocks, bf16 sums": {"softmax_chunks": 4, "partials": "bf16"},
    "batch-variant split-K 8, bf16": {"split_k": 8, "partials": "bf16", "batch_variant": True},
}


def print_precision_modes(cfg: Config, console: Console, trained: str | None = None) -> None:
    """`timsim calibrate --modes`: the mismatch each sampler precision or reduction-order mode
    produces against an fp32 learner, on the base model and (with `trained`) on a trained run's final weights."""

    graphdef, params, info = get_base(cfg, announce=console.print)
    models = {"base": params}
    if trained:
        models["trained"], step = load_trained_params(trained, params, {**traced_values(cfg), "seed": 0.0},
                                                      lag_steps=cfg.perturbation.lag_steps)
        console.print(f"trained weights: {trained}, step {step}, run 0")
    table = Table(title=f"sampler numerics vs fp32 learner (base {info['base_key']}, greedy acc "
                        f"{info['greedy_accuracy']:.2f}); {cfg.grpo.prompts_per_step}x{cfg.grpo.group_size} responses")
    for col in ["mode", "weights", "KL(mu||pi)", "k3", "mean |delta|", "max |delta|", "argmax flips", "r outside [0.5,2]"]:
        table.add_column(col, justify="left" if col in ("mode", "weights") else "right")
    for label, precision in PRECISION_MODES.items():
        raw = cfg.model_dump()
        raw["perturbation"]["sampler_precision"] = precision
        mode_cfg = config_from_dict(raw)
        measure = make_measure(mode_cfg, graphdef)
        for name, weights in models.items():
            m = {k: float(v) for k, v in measure(weights, hyperparams(mode_cfg, 0.0)).items()}
            table.add_row(label, name, f"{m['kl_sampler_learner']:.3g}", f"{m['mismatch_k3']:.3g}",
                          f"{m['delta_abs_mean']:.3g}", f"{m['delta_abs_max']:.3g}", f"{m['argmax_flip_frac']:.3g}",
                          f"{m['ratio_out_band_frac']:.3g}")
    console.print(table)


def finish(root: Path, summary: pd.DataFrame, console: Console) -> Path:
    metrics, _ = load(root)
    png = plot_curves(metrics, root / "curves.png")
    print_summary(summary, console)
    console.print(f"results: {root}/ (metrics/*.parquet, summary.parquet, manifest.json); plot: {png}")
    return png


def train(cfg: Config, console: Console, restart: bool = False) -> Path:
    """`timsim train`: one cell (the config's seeds) into out_dir/name; rerunning resumes."""
    root = inside(cfg.run.out_dir, cfg.run.name)
    summary = run_cells([Cell(cfg.run.name, cfg)], Store(root), console.print, restart=restart)
    finish(root, summary, console)
    return root


def sweep(path: str, overrides: list[str], console: Console, dry_run: bool = False, restart: bool = False,
          out_dir: str | None = None, executor: str | None = None, ray_address: str | None = None) -> Path | None:
    """`timsim sweep`: print the plan, then run (or resume) it."""

    plan = load_plan(path, overrides)
    root = inside(out_dir or plan.cells[0].cfg.run.out_dir, plan.name)
    groups = plan.groups()
    table = Table(title=f"sweep {plan.name}: {len(plan.cells)} cells, {plan.n_runs} runs, "
                        f"{len(groups)} compiled program(s) -> {root}")
    for col in ["cell", "seeds", "program", "swept values"]:
        table.add_column(col, overflow="fold")
    estimate = 0.0
    for shash, cells in groups.items():
        estimate += estimate_seconds(cells[0].cfg, sum(len(c.cfg.run.seeds) for c in cells))
        for c in cells:
            table.add_row(c.cell_id, str(c.cfg.run.seeds), shash[:8],
                          ", ".join(f"{k}={v}" for k, v in c.swept.items()))
    console.print(table)
    console.print(f"estimated time on a 2-core CPU: ~{estimate / 60:.1f} min (rough; finished cells are skipped)")
    if dry_run:
        return None
    ray = plan.ray.model_dump() | ({"address": ray_address} if ray_address else {})
    summary = run_cells(plan.cells, Store(root), console.print, sweep={"name": plan.name, "sweep_hash": plan.sweep_hash},
                        restart=restart, executor=executor or plan.executor, ray=ray)
    finish(root, summary, console)
    return root


def critical(path: str, overrides: list[str], cli: dict, console: Console, only: str | None = None,
             out_dir: str | None = None, restart: bool = False) -> Path:
    """`timsim critical`: run (or resume) the finder on a config, or on every variant of a
    study file; print the dose-response table(s) and, for a study, the critical table."""

    if is_study_file(path):
        name, variants, settings = load_study(path, overrides, cli)
        if only:
            unknown = set(only.split(",")) - set(variants)
            if unknown:
                raise ConfigError(f"--only names unknown variant(s) {sorted(unknown)}; the study has "
                                  f"{', '.join(variants)}.")
            variants = {k: v for k, v in variants.items() if k in only.split(",")}
    else:
        cfg = load_config(path, overrides)
        name, variants = None, {cfg.run.name: cfg}
        settings = FinderSettings.from_options(cli)
    for cfg in variants.values():
        settings.validate(cfg)
    first = next(iter(variants.values()))
    parent = Path(out_dir or first.run.out_dir)
    root = inside(parent, name) if name else parent
    rows = []
    for variant, cfg in variants.items():
        vroot = inside(root, variant if name else f"critical-{variant}")
        console.rule(f"critical finder: {variant}")
        record = run_finder(cfg, settings, vroot, console.print, restart=restart)
        _print_dose_response(pd.read_parquet(vroot / "critical.parquet"), record, max(settings.levels), vroot, console)
        rows.append(study_row(variant, record))
    if name:
        table = pd.DataFrame(rows)

        atomic_write_parquet(root / "critical_table.parquet", table)
        margin = f"{settings.margin:g}" + (" of the twin's gain" if settings.margin_of == "twin_gain" else "")
        out = Table(title=f"study {name}: critical mismatch per variant (levels in {settings.target}, margin "
                          f"{margin}, {settings.confidence:.0%} paired CI)")
        corrected = bool(table.correction.any())
        for col in ["variant", "mode", "pi_old", "resp len", *(["correction", "uncorrected"] if corrected else []),
                    "critical level", "bracket", "token KL", "per-resp KL", "token KL @ 4096", "first signif. step"]:
            out.add_column(col, justify="left" if col in ("variant", "mode", "pi_old", "correction") else "right")
        for r in table.itertuples():
            found = r.critical_level is not None and not pd.isna(r.critical_level)
            base = r.uncorrected_critical_level
            extra = ([r.correction or "-", "-" if not r.correction else "none" if base is None or pd.isna(base)
                      else f"{base:.3g}"] if corrected else [])
            out.add_row(r.variant, r.mode, r.old_logprobs, str(r.response_len), *extra,
                        f"{r.critical_level:.3g}" if found else "none",
                        (f"({r.below:.3g}, {r.critical_level:.3g}]" if found and not pd.isna(r.below) else "-"),
                        f"{r.critical_token_kl:.3g}", f"{r.critical_seq_kl:.3g}", f"{r.token_kl_at_4096:.3g}",
                        "-" if pd.isna(r.first_significant_step) else f"{r.first_significant_step:g}")
        console.print(out)
        console.print("'token KL @ 4096': the per-token KL at which a 4,096-token response carries the critical "
                      "per-response KL. Real bf16/fp8 engines are reported at per-token KL 1e-4 to 1e-2.")
    return root


def _critical_sentence(found: dict, record: dict, top_level: float) -> str:
    if found["critical_level"] is None:
        return (f"no level degrades by more than {margin_words(record)} at {record['confidence']:.0%} confidence: "
                f"the critical level lies above {top_level:g} (try larger --levels).")
    where = (f"between {found['below']:.3g} and {found['critical_level']:.3g}" if found["below"] is not None
             else f"at or below {found['critical_level']:.3g} (the smallest level tried; try smaller --levels)")
    return (f"critical {record['target']} {where} (per-token KL {found['critical_token_kl']:.3g}, per-response KL "
            f"{found['critical_seq_kl']:.3g} at the base model); degradation significant from step "
            f"{found['first_significant_step']:g}.")


def _print_dose_response(table: pd.DataFrame, record: dict, top_level: float, root: Path, console: Console) -> None:
    out = Table(title=f"dose-response: {record['family']} ({record['mode']}), {record['old_logprobs']}, "
                      f"{record['response_len']}-token responses, {len(record['seeds'])} paired seeds, "
                      f"{record['steps']} steps (final = held-out greedy accuracy)")
    arms = "correction" in record
    for col in (["arm"] if arms else []) + ["level", "scale", "token KL", "per-resp KL", "mean k3 (train)",
                                            "final acc", "peak acc", "collapsed", "paired diff", "of gain",
                                            "degrades", "first signif. step"]:
        out.add_column(col, justify="left" if col == "arm" else "right")
    for r in table.itertuples():
        arm = [record["correction"] if r.arm == "corrected" else r.arm] if arms else []
        out.add_row(*arm, f"{r.level:.3g}", f"{r.scale:.3g}", f"{r.token_kl_base:.3g}", f"{r.seq_kl_base:.3g}",
                    f"{r.mean_k3_training:.3g}", _fmt(r.final_accuracy, r.final_accuracy_ci),
                    _fmt(r.peak_accuracy, r.peak_accuracy_ci), f"{r.collapse_rate:.2f}",
                    _fmt(r.paired_diff, r.paired_diff_ci), "-" if math.isnan(r.gain_lost) or not r.level else
                    f"{-r.gain_lost:+.0%}", "yes" if r.degrades else "no",
                    "-" if math.isnan(r.first_significant_step) else f"{r.first_significant_step:g}")
    console.print(out)
    if arms:
        console.print(f"[bold]uncorrected[/]: {_critical_sentence(record['uncorrected'], record, top_level)}")
        console.print(f"[bold]with {record['correction']}[/]: {_critical_sentence(record, record, top_level)}")
        shift = record["critical_shift"]
        console.print(f"The correction moves the critical level {shift if isinstance(shift, str) else f'x{shift:.3g}'}"
                      if shift is not None else "Neither arm degrades in the levels tried.")
    else:
        console.print(_critical_sentence(record, record, top_level))
    console.print(f"results: {root}/ (critical.parquet, critical.json, critical.png, metrics/)")
