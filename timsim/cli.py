"""Command line: a thin layer over importable functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = """\
timsim: training-inference mismatch, as a controlled variable.

First run:   timsim train configs/quickstart.yaml        (or `make quickstart`)
Then:        timsim summarize runs/quickstart             (the summary table again)
Studies:     timsim sweep configs/sweeps/FILE.yaml --dry-run   (plan), then without --dry-run
Rerunning the same command resumes an interrupted run or sweep; finished cells are kept.
Python:      python -c "import timsim; print(timsim.load('runs/quickstart').by_cell())"

Configs are YAML files with sections task, model, pretrain, sampler, grpo, run; any key can
be overridden on the command line as dotted.key=value (e.g. grpo.lr=1e-4 run.seeds=[0,1,2]).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timsim", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="GRPO from the base policy (pretrained on first use); writes runs/<run.name>/")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    train.add_argument("--restart", action="store_true", help="discard existing results of this run and start over")

    sweep = sub.add_parser("sweep", help="expand a sweep file into cells, print the plan, run or resume it")
    sweep.add_argument("file", help="sweep YAML (see configs/sweeps/)")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the sweep's base config")
    sweep.add_argument("--dry-run", action="store_true", help="only print the plan")
    sweep.add_argument("--restart", action="store_true", help="discard existing results of this sweep first")
    sweep.add_argument("--out-dir", default=None, help="parent directory of the results (default: run.out_dir)")
    sweep.add_argument("--executor", choices=["local", "ray"], default=None,
                       help="where the groups run (default: the file's `executor:`, else local)")
    sweep.add_argument("--ray-address", default=None, help="with --executor ray: an existing cluster "
                       "(default: RAY_ADDRESS, else a local Ray instance)")

    pretrain = sub.add_parser("pretrain", help="create (or report) the supervised base policy of a config")
    pretrain.add_argument("config")
    pretrain.add_argument("overrides", nargs="*")

    summarize = sub.add_parser("summarize", help="print the per-run summary of a results directory")
    summarize.add_argument("path")
    summarize.add_argument("--against", nargs="+", default=None, metavar="CELL",
                           help="also print each cell paired by seed against these reference cells (e.g. zero)")

    report = sub.add_parser("report", help="write a self-contained HTML report of a results directory (summary, "
                            "curves, mismatch, paired differences, dose-response)")
    report.add_argument("path")
    report.add_argument("--against", default=None, metavar="CELL",
                        help="reference cell of the paired differences (default: zero, when present)")
    report.add_argument("--out", default=None, help="HTML file to write (default: PATH/report.html)")

    export = sub.add_parser("export", help="copy a results directory as compact, reloadable data to publish "
                            "(float32 metrics in one Parquet part, summary, manifest, config, the command)")
    export.add_argument("path")
    export.add_argument("dest")
    export.add_argument("--command", required=True, dest="regenerate",
                        help="the command that regenerates these results, recorded in the manifest")
    export.add_argument("--every", type=int, default=1,
                        help="keep every N-th step (evaluation and probe steps are always kept)")

    calibrate = sub.add_parser("calibrate", help="map mismatch targets (mean per-token KL) to noise scales on the base model")
    calibrate.add_argument("config")
    calibrate.add_argument("overrides", nargs="*")
    calibrate.add_argument("--targets", default="1e-4,1e-3,1e-2,1e-1", help="comma-separated target values")
    calibrate.add_argument("--metric", default="token_kl",
                           help="what the targets measure: token_kl (default), token_k3, delta_abs_mean, "
                                "delta_abs_q99, seq_kl, seq_delta_var")
    calibrate.add_argument("--real-length", type=int, default=4096,
                           help="response length of the real engine the equivalent per-token KL refers to")
    calibrate.add_argument("--bins", action="store_true", help="also print |delta| quantiles by probability and position")
    calibrate.add_argument("--modes", action="store_true",
                           help="instead: the mismatch each sampler precision and reduction-order mode produces (base model)")
    calibrate.add_argument("--trained", default=None, metavar="RUN_DIR",
                           help="with --modes: also on the final weights of a results directory's first run")

    critical = sub.add_parser("critical", help="find the smallest mismatch at which training degrades against "
                                               "its zero-mismatch twin (paired over seeds); CONFIG may be a "
                                               "study file with variants")
    critical.add_argument("config", help="a config, or a study file (base + finder + variants)")
    critical.add_argument("overrides", nargs="*")
    critical.add_argument("--levels", default=None, help="initial log-spaced target values (default 1e-3,1e-2,1e-1)")
    critical.add_argument("--target", default=None, help="what a level measures, a perturbation.target key "
                                                         "(default token_kl)")
    critical.add_argument("--margin", type=float, default=None, help="accuracy drop that counts (default 0.05)")
    critical.add_argument("--margin-of", default=None, choices=["absolute", "twin_gain"],
                          help="--margin is an accuracy difference (absolute, the default) or a fraction of what "
                               "the zero-mismatch twin learns (twin_gain: its final minus the base's accuracy)")
    critical.add_argument("--confidence", type=float, default=None, help="of the paired interval (default 0.95)")
    critical.add_argument("--bisect", type=int, default=None, help="bisection rounds after the grid (default 2)")
    critical.add_argument("--metric", default=None, help="compared with the twin: final_accuracy (default), "
                                                         "peak_accuracy or final_reward (partial-credit tasks)")
    critical.add_argument("--only", default=None, help="study file: comma-separated variants to run")
    critical.add_argument("--out-dir", default=None, help="results parent directory (default: run.out_dir)")
    critical.add_argument("--restart", action="store_true", help="discard earlier results of this study")

    theory = sub.add_parser("theory", help="closed-form predictions against what the config's sampler measures "
                                           "on its base model: prediction, measurement ± SE, z, agreement")
    theory.add_argument("config")
    theory.add_argument("overrides", nargs="*")
    theory.add_argument("--prompts", type=int, default=512, help="prompts sampled (x group size responses)")
    theory.add_argument("--only", default=None, help="comma-separated predictions (default: all)")

    oracle = sub.add_parser("oracle", help="the exact-gradient oracle on an enumerable task: every estimator's "
                                           "expected update against the true gradient, at the base model")
    oracle.add_argument("config")
    oracle.add_argument("overrides", nargs="*")
    oracle.add_argument("--draws", type=int, default=16, help="noise draws averaged when the noise is fresh")
    oracle.add_argument("--prompts", type=int, default=128, help="most likely training prompts enumerated")
    oracle.add_argument("--only", default=None, help="comma-separated estimators (default: all)")

    metrics = sub.add_parser("metrics", help="list every metric with its formula")
    metrics.add_argument("--as", dest="framework", default=None, metavar="FRAMEWORK",
                         help="instead, each dashboard metric of FRAMEWORK (verl, trl) as a timsim metric; "
                              "timsim.metrics.framework_view renames a run's columns")
    sub.add_parser("catalogue", help="list every noise family, correction, loss, advantage, aggregation, KL "
                   "estimator and task, with its knobs")

    bench = sub.add_parser("bench", help="time one GRPO step (standard shape: 32 prompts x 8 samples x 16 tokens), "
                           "alternating with a hand-written PyTorch step when torch is installed")
    bench.add_argument("overrides", nargs="*")
    bench.add_argument("--runs", type=int, default=4, help="runs on the run axis for the vmap/map comparison "
                       "(1: skip it)")
    bench.add_argument("--rounds", type=int, default=7, help="A B rounds against the PyTorch reference")
    bench.add_argument("--reference-python", default=None, help="interpreter with torch for the reference "
                       "(default: this one, if it has torch)")
    bench.add_argument("--threads", type=int, default=2, help="the PyTorch reference's intra-op threads")
    bench.add_argument("--json", action="store_true", help="print the results as one JSON object only")
    bench.add_argument("--lengths", type=int, nargs=2, metavar=("SHORT", "LONG"), default=None,
                       help="instead: the step at two response lengths of the short-prompt task (recurrence), "
                            "alternated, and their paired ratio (e.g. --lengths 16 128)")
    bench.add_argument("--study", default=None, metavar="SWEEP_FILE",
                       help="also: the wall time of `timsim sweep SWEEP_FILE` in a fresh process with an empty "
                            "compilation cache (make bench: the quickstart study)")

    prof = sub.add_parser("profile", help="fit an engine profile from paired sampler/trainer log-probs (Parquet/CSV)")
    prof.add_argument("pairs", nargs="?", help="file with columns logp_sampler, logp_trainer[, position]")
    prof.add_argument("--out", default=None, help="profile JSON to write (default: PAIRS with .profile.json)")
    prof.add_argument("--example", default=None, help="write a synthetic example pairs file here and exit")
    prof.add_argument("--config", default=None, help="also inject the fit into this config's tiny model (family "
                      "profile, scale 1) and report achieved against target per probability bin")
    prof.add_argument("overrides", nargs="*", help="overrides of --config")
    return parser


def _floats(text: str, option: str) -> list[float]:
    from timsim.config import ConfigError

    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated positive numbers, e.g. 1e-3,1e-2; got {text!r}.") from None
    if not all(v > 0 for v in values):
        raise ConfigError(f"{option} takes positive numbers; got {text!r}.")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides (key=value) may also follow the options
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from rich.console import Console

    from timsim.base import CheckpointError
    from timsim.config import ConfigError
    from timsim.determinism import setup
    from timsim.store import ResultsBusy

    setup()
    console = Console() if sys.stdout.isatty() else Console(width=200)  # logs: tables unwrapped
    try:
        return COMMANDS[args.command](args, console)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ResultsBusy) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2
    except OSError as err:  # a full or read-only disk, a path that is not a directory, ...
        console.print(f"[bold red]error:[/] could not read or write {err.filename or 'the results'!s}: "
                      f"{err.strerror or err}. Every chunk recorded before this point is intact on disk (files are "
                      "written to a temporary name and renamed); fix the cause, e.g. free space or make the "
                      "directory writable, and rerun the same command to resume.", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished chunks are on disk")
        return 130


# Each command parses, calls the library and prints; no simulation logic lives here. Library
# modules are imported inside the handlers so that `timsim --help` starts without JAX.


def _metrics(args, console) -> int:
    from timsim.metrics import describe, describe_framework

    console.print(describe() if args.framework is None else describe_framework(args.framework), highlight=False)
    return 0


def _catalogue(args, console) -> int:
    from timsim.catalogue import markdown

    console.print(markdown(), highlight=False, markup=False)
    return 0


def _summarize(args, console) -> int:
    import timsim
    from timsim import report

    result = timsim.load(args.path)
    report.print_summary(result.summary, console)
    if args.against:
        report.print_paired(result.compare(args.against), args.against, console)
    return 0


def _report(args, console) -> int:
    import timsim

    console.print(f"report: {timsim.write_report(args.path, args.out, args.against)}")
    return 0


def _export(args, console) -> int:
    import timsim

    dest = timsim.export(args.path, args.dest, args.regenerate, args.every)
    console.print(f"exported {args.path} -> {dest} (reload with timsim.load({str(dest)!r}))")
    return 0


def _sweep(args, console) -> int:
    import timsim
    from timsim import report
    from timsim.config import inside
    from timsim.sweep_spec import load_plan

    plan = load_plan(args.file, args.overrides)
    root = inside(args.out_dir or plan.cells[0].cfg.run.out_dir, plan.name)
    report.print_plan(plan, root, console)
    if not args.dry_run:
        ray = plan.ray.model_dump() | ({"address": args.ray_address} if args.ray_address else {})
        result = timsim.sweep(args.file, args.overrides, out=root, restart=args.restart, executor=args.executor,
                              ray=ray, log=console.print)
        report.finish(root, result.summary, console)
    return 0


def _train(args, console) -> int:
    import timsim
    from timsim import report
    from timsim.config import inside, load_config

    cfg = load_config(args.config, args.overrides)
    root = inside(cfg.run.out_dir, cfg.run.name)
    result = timsim.train(cfg, out=root, restart=args.restart, log=console.print)
    report.finish(root, result.summary, console)
    return 0


def _bench(args, console) -> int:
    from timsim.bench import ReferenceUnavailable, StudyFailed, bench, bench_lengths, time_study

    for name in ("runs", "rounds", "threads"):
        if getattr(args, name) < 1:
            console.print(f"[red]--{name} must be at least 1, got {getattr(args, name)}[/red]")
            return 2
    if args.study and not Path(args.study).is_file():
        console.print(f"[red]--study takes a sweep file; {args.study!r} is not a file[/red]")
        return 2
    if args.lengths is not None:
        short, long = args.lengths
        if not 2 <= short < long:
            console.print(f"[red]--lengths takes two response lengths SHORT < LONG, each at least 2 (the answer "
                          f"and its <eos>), got {short} {long}[/red]")
            return 2
        if args.overrides:
            console.print(f"[red]--lengths times the recurrence task at its standard batch; drop the overrides "
                          f"({' '.join(args.overrides)})[/red]")
            return 2
        results = bench_lengths(short, long, args.rounds, console, quiet=args.json)
    else:
        try:
            results = bench(args.overrides, args.runs, console, rounds=args.rounds,
                            reference=args.reference_python, threads=args.threads, quiet=args.json)
        except ReferenceUnavailable as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            return 2
    if args.study:
        if not args.json:
            console.print(f"timing `timsim sweep {args.study}` in a fresh process, nothing compiled yet ...")
        try:
            results["study"] = time_study(args.study)
        except StudyFailed as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            return 2
        if not args.json:
            base = "base pretrained" if results["study"]["base_pretrained"] else "base cached"
            console.print(f"study wall time: {results['study']['wall_s'] / 60:.1f} min ({base})")
    if args.json:
        print(json.dumps(results))
    return 0


def _profile(args, console) -> int:
    from timsim.profile import command

    return command(args.pairs, args.out, args.example, args.config, args.overrides, console)


def _critical(args, console) -> int:
    import pandas as pd

    from timsim import report
    from timsim.study import run_critical

    options = {"levels": _floats(args.levels, "--levels") if args.levels else None, "target": args.target,
               "margin": args.margin, "margin_of": args.margin_of, "confidence": args.confidence,
               "bisect": args.bisect, "metric": args.metric}

    def show(variant, record, root, settings):
        report.print_dose_response(pd.read_parquet(root / "critical.parquet"), record, max(settings.levels), root,
                                   console)

    run = run_critical(args.config, args.overrides, options, only=args.only, out_dir=args.out_dir,
                       restart=args.restart, log=console.print, after_variant=show)
    if run.table is not None:
        report.print_study_table(run, console)
    return 0


def _base(args, console):
    from timsim.base import get_base
    from timsim.config import load_config

    cfg = load_config(args.config, args.overrides)
    progress = lambda i: console.log(f"step {i['steps']}: loss {i['loss']:.3f}, held-out accuracy greedy "  # noqa: E731
                                     f"{i['greedy_accuracy']:.2f}, sampled {i['sampled_accuracy']:.2f}")
    return (cfg, *get_base(cfg, progress=progress, announce=console.print))


def _pretrain(args, console) -> int:
    *_, info = _base(args, console)
    console.print(f"base {info['base_key']}: greedy held-out accuracy {info['greedy_accuracy']:.2f}, "
                  f"sampled {info['sampled_accuracy']:.2f} after {info['steps']} supervised steps")
    return 0


def _calibrate(args, console) -> int:
    import timsim
    from timsim import calibration, hyper, report
    from timsim.runner import load_trained_params

    cfg, graphdef, params, info = _base(args, console)
    if args.modes:
        weights = {"base": params}
        if args.trained:
            weights["trained"], step = load_trained_params(args.trained, params, hyper.of(cfg),
                                                           lag_steps=cfg.perturbation.lag_steps)
            console.print(f"trained weights: {args.trained}, step {step}, run 0")
        report.print_precision_modes(calibration.precision_modes(cfg, graphdef, weights), info, cfg, console)
        return 0
    rows = timsim.calibrate(cfg, _floats(args.targets, "--targets"), args.metric, base=(graphdef, params))
    report.print_calibration(cfg, info, rows, args.metric, args.real_length, console)
    bins = calibration.delta_bins(cfg, graphdef, params, list(rows.scale)) if args.bins else []
    for row, frame in zip(rows.to_dict("records"), bins):
        report.print_bins(frame, f"|delta| quantiles by bin at target {args.metric} {row['target']:.3g} (scale "
                          f"{row['scale']:.3g}): p = learner probability of the sampled token, position in the "
                          "response", console)
    return 0


def _theory(args, console) -> int:
    import timsim
    from timsim import report

    from timsim.predictions import check_names

    names = [n.strip() for n in args.only.split(",")] if args.only else None
    check_names(names)  # before pretraining a base
    cfg, graphdef, params, info = _base(args, console)
    rows = timsim.theory_table(cfg, base=(graphdef, params), n_prompts=args.prompts, names=names)
    report.print_theory(rows, cfg, info, args.prompts, console)
    return 0


def _oracle(args, console) -> int:
    import timsim
    from timsim import report

    only = [n.strip() for n in args.only.split(",")] if args.only else None
    cfg, graphdef, params, info = _base(args, console)
    table = timsim.oracle(cfg, base=(graphdef, params), draws=args.draws, max_prompts=args.prompts, only=only)
    report.print_oracle(table, cfg, info, console)
    return 0


COMMANDS = {"metrics": _metrics, "catalogue": _catalogue, "summarize": _summarize, "sweep": _sweep, "train": _train,
            "bench": _bench, "profile": _profile, "critical": _critical, "pretrain": _pretrain,
            "calibrate": _calibrate, "theory": _theory, "oracle": _oracle, "report": _report, "export": _export}


if __name__ == "__main__":
    sys.exit(main())
