"""Every CLI command at toy size: exit codes, what it prints and what it writes (`bench`, which
times three programs at the standard shape, and `calibrate --modes`, eleven precision
programs, are left to their functions and the fuzz test's argument checks)."""

import pytest
import yaml

from timsim.cli import main
from timsim.metrics import METRICS


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_overrides):
    """The tiny test config as a YAML file, results under a temporary directory."""
    root = tmp_path_factory.mktemp("cli")
    raw = {}
    for item in tiny_overrides + ["run.steps=5", "run.chunk_steps=5", f"run.out_dir={root / 'runs'}"]:
        key, value = item.split("=", 1)
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_metrics_lists_every_registered_metric(capsys):
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{name}`" in out for name in METRICS)


def test_catalogue_lists_every_registered_name(capsys):
    from timsim.catalogue import CATALOGUES

    assert main(["catalogue"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{name}`" in out for registry, _ in CATALOGUES for name in registry)


def test_pretrain_reports_the_base(tiny_file, tiny_base, capsys):
    assert main(["pretrain", str(tiny_file)]) == 0
    assert f"base {tiny_base[2]['base_key']}" in capsys.readouterr().out


def test_train_then_summarize(tiny_file, capsys):
    assert main(["train", str(tiny_file), "run.name=cli"]) == 0
    root = tiny_file.parent / "runs" / "cli"
    assert (root / "manifest.json").exists() and (root / "summary.parquet").exists()
    assert (root / "curves.png").stat().st_size > 10_000  # the plot was drawn
    capsys.readouterr()
    assert main(["summarize", str(root), "--against", "cli"]) == 0
    out = capsys.readouterr().out
    assert "cli" in out and "paired by seed" in out
    assert main(["summarize", str(root), "--against", "nope"]) == 2
    assert "unknown cell" in capsys.readouterr().out
    assert main(["report", str(root)]) == 0
    page = (root / "report.html").read_text()  # one zero-mismatch cell: the table and the curves
    assert "Summary per cell" in page and page.count("<img") == 1
    assert main(["export", str(root), str(tiny_file.parent / "published"), "--command", "timsim train tiny.yaml",
                 "--every", "2"]) == 0
    assert "reload with timsim.load" in " ".join(capsys.readouterr().out.split())  # the console wraps long paths
    assert main(["export", str(root), str(tiny_file.parent / "x"), "--command", "c", "--every", "0"]) == 2
    assert "--every takes a positive number" in capsys.readouterr().out


def test_sweep_dry_run_prints_the_plan_and_runs_nothing(tiny_file, tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(tiny_file), "name": "dry",
                                     "grid": {"grpo.lr": [1e-3, 3e-3]}}))
    assert main(["sweep", str(sweep), "--dry-run", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 cells, 4 runs, 1 compiled" in " ".join(out.split())
    assert not (tmp_path / "out").exists()


def test_bench_study_times_a_whole_sweep_in_a_fresh_process(tiny_file, tiny_base, tmp_path, capsys):
    """`timsim bench --study FILE` (what `make bench` adds for the quickstart study): a sweep's
    wall time end to end, nothing compiled yet; a file that is not there is a clear error."""
    import json

    from timsim.bench import StudyFailed, time_study

    assert main(["bench", "--study", str(tmp_path / "none.yaml")]) == 2
    assert "--study takes a sweep file" in capsys.readouterr().out
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(tiny_file), "name": "timed", "seeds": [0]}))
    timed = time_study(str(sweep))
    assert timed["wall_s"] > 0 and timed["base_pretrained"] is False  # the session's tiny base is cached
    sweep.write_text("name: broken\ncells: {a: {grpo.lr: -1}}\n")
    with pytest.raises(StudyFailed, match="exited 2"):
        time_study(str(sweep))
    json.dumps(timed)  # reported under --json as it is


def test_calibrate_prints_the_scale_per_target(tiny_file, capsys):
    assert main(["calibrate", str(tiny_file), "perturbation.logit_noise.family=gaussian", "--targets", "1e-2,1e-1",
                 "--bins"]) == 0
    out = capsys.readouterr().out
    assert "0.01" in out and "scale" in out
    assert out.count("quantiles by bin at target token_kl") == 2  # one |delta| table per target


def test_theory_prints_predictions_against_measurements(tiny_file, capsys):
    assert main(["theory", str(tiny_file), "perturbation.logit_noise.family=gaussian",
                 "perturbation.logit_noise.scale=0.2", "--prompts", "32", "--only", "gaussian_kl,truncation"]) == 0
    out = capsys.readouterr().out
    assert "KL(mu || pi) per token" in out and "1 of 1 predictions agree" in out
    assert "does not apply: top-k / top-p" in out
    assert main(["theory", str(tiny_file), "--only", "gaussian_kll"]) == 2
    err = capsys.readouterr().out
    assert "unknown prediction(s) ['gaussian_kll']; accepted: zero_mismatch" in err and "Traceback" not in err


def test_oracle_prints_every_estimator(tmp_path, base_dir, capsys):
    from test_exact import ENUMERABLE

    config = tmp_path / "enumerable.yaml"
    config.write_text("{}\n")
    assert main(["oracle", str(config), *ENUMERABLE, f"pretrain.cache_dir={base_dir}",
                 "perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.scale=0.5", "--draws", "2",
                 "--prompts", "8", "--only", "recompute,bypass"]) == 0
    out = capsys.readouterr().out
    assert "recompute" in out and "bypass" in out and "true gradient" in out and "2 noise draw(s)" in out


def test_profile_example_then_fit(tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    assert main(["profile", "--example", str(pairs)]) == 0
    assert main(["profile", str(pairs), "--out", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "p.json").exists() and (tmp_path / "p.png").exists()
    assert "quantiles by prob" in capsys.readouterr().out


def test_critical_on_a_config_prints_the_dose_response(tiny_file, capsys):
    argv = ["critical", str(tiny_file), "perturbation.logit_noise.family=gaussian", "run.seeds=[0,1,2,3,4]",
            "run.steps=2", "run.chunk_steps=2", "run.name=crit", "--levels", "1e-2,1", "--bisect", "0"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "dose-response" in out and "5 paired seeds" in out
    root = tiny_file.parent / "runs" / "critical-crit"
    assert (root / "critical.parquet").exists() and (root / "critical.png").exists()
    assert main([*argv[:-4], "--levels", "0,1"]) == 2  # a bad option is one clear error
    assert "--levels takes positive numbers" in capsys.readouterr().out


def test_every_command_has_a_handler():
    import argparse

    from timsim.cli import COMMANDS, _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)


BENCH_TOY = ["model.d_model=16", "model.d_mlp=32", "model.max_len=8", "task.n_digits=3", "grpo.prompts_per_step=4",
             "grpo.group_size=2", "run.chunk_steps=2", "run.steps=2"]


def test_bench_json_reports_the_step_and_a_missing_reference_is_a_clear_error(capsys):
    """`timsim bench --json` at a toy shape: one JSON object with the step times and the
    compile time; an interpreter that cannot start is named in a one-paragraph error."""
    import json

    assert main(["bench", "--json", "--reference-python", "/no/such/python"]) == 2  # fails before compiling
    out = capsys.readouterr().out
    assert "--reference-python '/no/such/python' cannot be started" in out and "Traceback" not in out
    assert main(["bench", "--reference-python", "/no/such/python", *BENCH_TOY]) == 2
    assert "runs the standard shape only" in capsys.readouterr().out
    assert main(["bench", "--json", "--runs", "1", "--rounds", "2", *BENCH_TOY]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["shape"]["response_len"] == 4 and results["shape"]["d_model"] == 16
    assert len(results["timsim_step_s"]) == 2 and all(s > 0 for s in results["timsim_step_s"])
    assert results["compile_s"] > 0 and results["sampler_s"] > 0
    assert ("paired" in results) == ("torch" in results)
    assert main(["bench", "--rounds", "0"]) == 2
    # --lengths: the short-prompt task at two response lengths, alternated, and their ratio
    assert main(["bench", "--lengths", "4", "2"]) == 2 and "SHORT < LONG" in capsys.readouterr().out
    assert main(["bench", "--json", "--lengths", "2", "4", "--rounds", "2"]) == 0
    scaling = json.loads(capsys.readouterr().out)
    assert scaling["response_lens"] == [2, 4] and len(scaling["ratio"]) == 2
    assert scaling["ratio"] == [b / a for a, b in zip(scaling["short_step_s"], scaling["long_step_s"])]
