"""What `timsim train` and `timsim sweep` do end to end: run, then table and plot."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from timsim.config import Config
from timsim.finder import margin_words
from timsim.plots import plot_curves
from timsim.store import load
from timsim.summary import SUMMARY_METRICS, by_cell, format_ci
from timsim.sweep_spec import estimate_seconds

HEADERS = {"final_accuracy": "final acc", "peak_accuracy": "peak acc", "peak_step": "peak step",
           "final_reward": "final reward", "mean_mismatch_k3": "mean k3", "collapsed": "collapsed"}


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
                      *(format_ci(row[m], row[f"{m}_ci95"]) for m in SUMMARY_METRICS))
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
        out.add_row(r["cell"], str(r["seeds"]), format_ci(r["final_accuracy"], r["final_accuracy_ci"]),
                    *[("-" if r["cell"] == ref else format_ci(r[f"minus_{ref}"], r[f"minus_{ref}_ci"])) for ref in against],
                    collapsed, num(r["kl_sampler_learner"]), num(r["seq_kl"]), num(r["ratio_out_band_frac"]),
                    num(r["rejected_token_frac"]), num(r["probe_bypass_cos"]))
    console.print(out)


def print_calibration(cfg: Config, info: dict, rows: pd.DataFrame, metric: str, real_length: int,
                      console: Console) -> None:
    """`timsim calibrate`: the scale reaching each target on the config's base model, what it
    gives per token and per response, and the per-token KL a real response of `real_length`
    tokens would need to carry the same per-response KL (the equivalent real-engine setting)."""
    family = cfg.perturbation.logit_noise.family
    table = Table(title=f"{family} logit noise ({cfg.perturbation.logit_noise.mode}) on base {info['base_key']} "
                        f"(greedy acc {info['greedy_accuracy']:.2f}); {cfg.grpo.prompts_per_step}x"
                        f"{cfg.grpo.group_size} sampled responses to training prompts")
    columns = {"scale": "scale", "kl_sampler_learner": "KL(mu||pi)", "mismatch_k3": "k3", "delta_abs_mean": "mean |delta|",
               "delta_abs_q99": "q99 |delta|", "delta_abs_max": "max |delta|", "ratio_out_band_frac": "r outside [0.5,2]",
               "response_tokens": "tokens/resp", "seq_kl": "per-response KL", "equivalent": f"token KL @ {real_length}"}
    if "closed_form_kl" in rows:
        columns["closed_form_kl"] = "closed form KL"
    table.add_column(f"target {metric}", justify="right")
    for header in columns.values():
        table.add_column(header, justify="right")
    for row in rows.assign(equivalent=rows.seq_kl / real_length).to_dict("records"):
        table.add_row(f"{row['target']:.3g}", *(f"{row[k]:.3g}" for k in columns))
    console.print(table)
    console.print(f"'token KL @ {real_length}': the per-token KL at which a {real_length}-token response carries the "
                  f"same per-response KL. Configs can say perturbation.target.{metric}: <value> instead of a raw "
                  "scale (target.equivalent_length: L turns a token_kl into a per-response target; target.track: "
                  "once | every_chunk).")


def print_bins(frame: pd.DataFrame, title: str, console: Console) -> None:
    """|delta| quantiles by token-probability and position bin (`timsim.calibration.delta_bins`)."""
    table = Table(title=title)
    for col in frame.columns:
        table.add_column(col, justify="left" if col in ("by", "bin") else "right")
    for rec in frame.itertuples(index=False):
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in rec))
    console.print(table)


def print_theory(rows: pd.DataFrame, cfg: Config, info: dict, n_prompts: int, console: Console) -> None:
    """`timsim theory`: one line per prediction that applies, then the ones that do not, with why."""
    noise = cfg.perturbation.logit_noise
    table = Table(title=f"theory vs simulation: {noise.family} logit noise (scale {noise.scale:g}, {noise.mode}), "
                        f"sampler precision {cfg.perturbation.sampler_precision.dtype}, temperature "
                        f"{cfg.sampler.temperature:g}; base {info['base_key']}, {n_prompts}x{cfg.grpo.group_size} "
                        "responses")
    for header in ("quantity", "closed form", "predicted", "measured ± SE", "omitted", "z", "agrees"):
        table.add_column(header, justify="left" if header in ("quantity", "closed form") else "right",
                         overflow="fold")
    applies = rows[rows.applies.astype(bool)]
    for row in applies.to_dict("records"):
        table.add_row(escape(row["quantity"]), escape(row["formula"]), f"{row['predicted']:.4g}",
                      f"{row['measured']:.4g} ± {row['se']:.2g}", f"{row['omitted']:.2g}",
                      "bound" if math.isnan(row["z"]) else f"{row['z']:+.2f}", "yes" if row["agrees"] else "NO")
    console.print(table)
    for row in rows[~rows.applies.astype(bool)].to_dict("records"):
        console.print(escape(f"  does not apply: {row['quantity']} ({row['formula']}): {row['reason']}"))
    if set(applies.prediction) <= {"zero_mismatch"}:
        console.print("This config's sampler is the learner: only the zero-mismatch identities apply. For the "
                      "closed forms add e.g. perturbation.logit_noise.family=gaussian perturbation.logit_noise.scale=0.3")
    disagree = int((applies.agrees == False).sum())  # noqa: E712
    console.print(f"{len(applies) - disagree} of {len(applies)} predictions agree (|z| < 3: z = (measured - "
                  "predicted) / sqrt(SE^2 + omitted^2); 'omitted' is the size of the terms the closed form leaves out).")


def print_oracle(table: pd.DataFrame, cfg: Config, info: dict, console: Console) -> None:
    """`timsim oracle`: one line per estimator."""
    facts = table.attrs
    noise = cfg.perturbation.logit_noise
    out = Table(title=f"exact expected updates: {noise.family} logit noise (scale {noise.scale:g}, {noise.mode}); "
                      f"loss {cfg.grpo.loss}, advantage {cfg.grpo.advantage} (population limit), {cfg.grpo.loss_agg}; "
                      f"base {info['base_key']}; {facts['prompts']} prompts x {facts['responses']} responses "
                      f"(prompt mass {facts['prompt_mass']:.2f}), {facts['draws']} noise draw(s)")
    for header in ("estimator", "cos to grad E_pi[R]", "rel. bias vs zero mismatch", "bias along g0", "|g| / |g0|",
                   "per-sample variance"):
        out.add_column(header, justify="left" if header == "estimator" else "right")
    fmt = lambda v: "" if pd.isna(v) else f"{v:.3g}"  # noqa: E731
    for row in table.to_dict("records"):
        bias = "" if pd.isna(row["rel_bias"]) else (f"{row['rel_bias']:.3g} ± {row['rel_bias_se']:.1g}"
                                                    if row["rel_bias_se"] > 0 else f"{row['rel_bias']:.3g}")
        out.add_row(escape(row["estimator"]), fmt(row["cos_true"]), bias, fmt(row["bias_proj"]), fmt(row["norm_ratio"]),
                    fmt(row["variance"]))
    console.print(out)
    console.print("g0: the same loss's expected update at zero mismatch (sampler = learner). 'bias along g0' < 0: "
                  "mismatch shrinks the update along the zero-mismatch direction. Expected updates are -grad of the "
                  "loss at theta = theta_old, before clipping and Adam; group statistics in their G -> infinity limit.")


def print_precision_modes(frame: pd.DataFrame, info: dict, cfg: Config, console: Console) -> None:
    """`timsim calibrate --modes` (`timsim.calibration.precision_modes`)."""
    table = Table(title=f"sampler numerics vs fp32 learner (base {info['base_key']}, greedy acc "
                        f"{info['greedy_accuracy']:.2f}); {cfg.grpo.prompts_per_step}x{cfg.grpo.group_size} responses")
    columns = {"mode": "mode", "weights": "weights", "kl_sampler_learner": "KL(mu||pi)", "mismatch_k3": "k3",
               "delta_abs_mean": "mean |delta|", "delta_abs_max": "max |delta|", "argmax_flip_frac": "argmax flips",
               "ratio_out_band_frac": "r outside [0.5,2]"}
    for key, col in columns.items():
        table.add_column(col, justify="left" if key in ("mode", "weights") else "right")
    for row in frame.to_dict("records"):
        table.add_row(*(row[k] if isinstance(row[k], str) else f"{row[k]:.3g}" for k in columns))
    console.print(table)


def finish(root: Path, summary: pd.DataFrame, console: Console) -> Path:
    metrics, _ = load(root)
    png = plot_curves(metrics, root / "curves.png")
    print_summary(summary, console)
    console.print(f"results: {root}/ (metrics/*.parquet, summary.parquet, manifest.json); plot: {png}")
    return png


def print_plan(plan, root: Path, console: Console) -> None:
    """A sweep's cells, runs and compiled programs, with a rough time estimate."""
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


def print_study_table(run, console: Console) -> None:
    """A study's critical table: one row per variant (`timsim.study.run_critical`)."""
    settings, table = run.settings, run.table
    margin = f"{settings.margin:g}" + (" of the twin's gain" if settings.margin_of == "twin_gain" else "")
    out = Table(title=f"study {run.name}: critical mismatch per variant (levels in {settings.target}, margin "
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


def _critical_sentence(found: dict, record: dict, top_level: float) -> str:
    if found["critical_level"] is None:
        return (f"no level degrades by more than {margin_words(record)} at {record['confidence']:.0%} confidence: "
                f"the critical level lies above {top_level:g} (try larger --levels).")
    where = (f"between {found['below']:.3g} and {found['critical_level']:.3g}" if found["below"] is not None
             else f"at or below {found['critical_level']:.3g} (the smallest level tried; try smaller --levels)")
    return (f"critical {record['target']} {where} (per-token KL {found['critical_token_kl']:.3g}, per-response KL "
            f"{found['critical_seq_kl']:.3g} at the base model); degradation significant from step "
            f"{found['first_significant_step']:g}.")


def print_dose_response(table: pd.DataFrame, record: dict, top_level: float, root: Path, console: Console) -> None:
    """One finder's dose-response table and what it found."""
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
                    f"{r.mean_k3_training:.3g}", format_ci(r.final_accuracy, r.final_accuracy_ci),
                    format_ci(r.peak_accuracy, r.peak_accuracy_ci), f"{r.collapse_rate:.2f}",
                    format_ci(r.paired_diff, r.paired_diff_ci), "-" if math.isnan(r.gain_lost) or not r.level else
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
