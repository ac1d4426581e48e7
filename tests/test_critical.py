"""The critical-mismatch finder: statistics and search on synthetic dose-responses (no
training), plus one tiny end-to-end run that checks the study's files and resume."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from timsim.config import ConfigError, load_config
from timsim.finder import FinderSettings, critical_shift, degrades, find_critical
from timsim.summary import crossing_level, crossing_with_ci, paired_ci


def synthetic(threshold: float, seeds: int = 8, noise: float = 0.01, calls: list | None = None):
    """A monotone dose-response: no effect below `threshold`, a drop of 0.3 per decade above it,
    plus seed noise; returns paired differences per level as `evaluate` would."""
    rng = np.random.default_rng(0)

    def evaluate(levels):
        if calls is not None:
            calls.append(list(levels))
        return {lv: -0.3 * max(0.0, math.log10(lv / threshold)) + noise * rng.standard_normal(seeds) for lv in levels}

    return evaluate


def test_paired_ci_matches_the_t_interval():
    diffs = np.array([-0.1, -0.2, 0.0, -0.15, -0.05])
    mean, half = paired_ci(diffs, 0.95)
    assert mean == pytest.approx(-0.1)
    assert half == pytest.approx(2.776 * diffs.std(ddof=1) / math.sqrt(5), rel=1e-3)
    assert degrades(diffs, 0.05, 0.95) and not degrades(diffs, 0.15, 0.95)
    assert not degrades(np.array([-0.3, 0.3, -0.3, 0.3, -0.31]), 0.0, 0.95)  # not significant


def test_crossing_level_interpolates_in_log_level():
    levels = [0.01, 0.02, 0.04, 0.08]
    # -0.02 at 0.02, -0.08 at 0.04: -0.05 is half way in log, at 0.02 * sqrt(2)
    assert np.isclose(crossing_level(levels, [0.0, -0.02, -0.08, -0.2], 0.05), 0.02 * np.sqrt(2))
    assert np.isnan(crossing_level(levels, [0.0, -0.01, -0.02, -0.049], 0.05))
    assert crossing_level(levels, [-0.06, -0.1, -0.2, -0.3], 0.05) == 0.01  # at most the first level
    assert np.isclose(crossing_level(levels, [0.0, -0.06, 0.0, -0.2], 0.05), crossing_level(levels[:2], [0.0, -0.06], 0.05))


def test_crossing_ci_brackets_the_crossing_and_tightens_with_seeds():
    levels = np.array([0.005, 0.01, 0.02, 0.04, 0.08])
    truth = -0.05 * levels / 0.02  # crosses -0.05 at exactly 0.02
    rng = np.random.default_rng(3)
    wide, narrow = (crossing_with_ci(levels, truth[:, None] + rng.normal(scale=0.02, size=(5, n)), 0.05)
                    for n in (10, 200))
    for ci in (wide, narrow):
        assert ci["low"] <= ci["level"] <= ci["high"] and ci["low"] < 0.02 < ci["high"]
    assert narrow["high"] / narrow["low"] < wide["high"] / wide["low"]
    never = crossing_with_ci(levels, np.zeros((5, 10)) + rng.normal(scale=0.001, size=(5, 10)), 0.05)
    assert np.isnan(never["level"]) and never["not_crossed"] == 1.0



@pytest.mark.parametrize("threshold", [3e-3, 2e-2])
def test_finder_recovers_a_known_threshold(threshold):
    """With margin m the true critical level is threshold * 10^(m / 0.3); after the grid and
    `rounds` bisections the bracket is (grid step)^(1/2^rounds) wide and contains it."""
    margin, rounds = 0.05, 4
    truth = threshold * 10 ** (margin / 0.3)
    calls = []
    found = find_critical(synthetic(threshold, calls=calls), [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rounds, margin, 0.95)
    assert found.below < truth <= found.critical * 1.02
    assert found.critical / found.below <= 10 ** (1 / 2**rounds) * 1.0001
    assert len(calls) == 1 + rounds and all(len(c) == 1 for c in calls[1:])  # one new level per round


def test_a_rerun_replays_the_search_and_trains_nothing_new():
    """A store that holds every level of an earlier invocation must not steer the search: a
    second run of a finished finder asks for the same levels and finds them all stored."""
    trained: dict[float, np.ndarray] = {}
    truth = synthetic(0.02, noise=0.0)

    def evaluate_with_store(levels):
        for lv in levels:
            trained.setdefault(lv, truth([lv])[lv])
        return dict(trained)  # like run_cells on a resumed store: every level ever run

    first = find_critical(evaluate_with_store, [1e-3, 1e-2, 1e-1, 1.0], 3, 0.05, 0.95)
    ran = set(trained)
    second = find_critical(evaluate_with_store, [1e-3, 1e-2, 1e-1, 1.0], 3, 0.05, 0.95)
    assert set(trained) == ran  # nothing new trained
    assert (second.critical, second.below, sorted(second.diffs)) == (first.critical, first.below, sorted(first.diffs))


def test_finder_reports_no_critical_level_when_nothing_degrades():
    found = find_critical(synthetic(10.0), [1e-3, 1e-2], 3, 0.05, 0.95)
    assert found.critical is None and set(found.diffs) == {1e-3, 1e-2}


def test_finder_says_when_even_the_smallest_level_degrades():
    found = find_critical(synthetic(1e-6), [1e-3, 1e-2], 3, 0.05, 0.95)
    assert found.critical == 1e-3 and found.below is None


def _summary(twin_final: list[float], level_final: list[float], base: float = 0.4) -> pd.DataFrame:
    seeds = range(len(twin_final))
    return pd.DataFrame({"cell_id": ["zero"] * len(twin_final) + ["level=0.1"] * len(level_final),
                         "seed": [*seeds, *seeds], "base_accuracy": base,
                         "final_accuracy": [*twin_final, *level_final]})


def test_a_margin_relative_to_the_twins_gain_scales_with_what_the_run_learns():
    """The same paired drop (0.03) is most of what a run gaining 0.05 learns and a small part
    of a 0.5 gain: with margin_of twin_gain it degrades in the first run only; an absolute
    margin of 0.05 calls neither."""
    from timsim.finder import margin_unit, twin_gain
    from timsim.summary import paired_differences

    jitter = np.array([0.0, 0.004, -0.004, 0.002, -0.002])
    small = _summary(list(0.45 + jitter), list(0.42 + jitter))  # twin gains 0.05, level loses 0.03
    large = _summary(list(0.90 + jitter), list(0.87 + jitter))  # twin gains 0.50, level loses 0.03
    relative = FinderSettings([0.1], margin=0.25, margin_of="twin_gain")
    assert twin_gain(small) == pytest.approx(0.05) and twin_gain(large) == pytest.approx(0.5)
    calls = {}
    for name, summary in (("small", small), ("large", large)):
        diffs = paired_differences(summary, "level=0.1")
        assert diffs == pytest.approx(-0.03)
        calls[name] = (degrades(diffs / margin_unit(summary, relative), relative.margin, 0.95),
                       degrades(diffs / margin_unit(summary, FinderSettings([0.1])), 0.05, 0.95))
    assert calls == {"small": (True, False), "large": (False, False)}


def test_a_relative_margin_needs_a_twin_that_learns_and_an_accuracy_metric():
    from timsim.finder import margin_unit

    flat = _summary([0.40, 0.41, 0.39, 0.40, 0.39], [0.35] * 5)
    with pytest.raises(ConfigError, match=r"did not improve on the base.*--margin-of absolute"):
        margin_unit(flat, FinderSettings([0.1], margin_of="twin_gain"))
    cfg = load_config(None, ["perturbation.logit_noise.family=gaussian", "run.seeds=[0,1,2,3,4]"])
    with pytest.raises(ConfigError, match="--margin-of twin_gain needs an accuracy --metric"):
        FinderSettings([0.1], margin_of="twin_gain", metric="final_reward").validate(cfg)


@pytest.mark.parametrize("flag, value, match", [
    ("margin", 1.5, "--margin"), ("confidence", 1.0, "--confidence"), ("levels", [0.0, 1e-2], "--levels"),
    ("target", "kl", "--target"), ("metric", "accuracy", "--metric"), ("margin_of", "relative", "--margin-of"),
])
def test_bad_finder_settings_name_the_option(flag, value, match):
    cfg = load_config(None, ["perturbation.logit_noise.family=gaussian", "run.seeds=[0,1,2,3,4]"])
    kwargs = {"levels": [1e-3, 1e-2], flag: value}
    with pytest.raises(ConfigError, match=match):
        FinderSettings(**kwargs).validate(cfg)


def test_finder_needs_five_seeds_and_a_scaled_family():
    with pytest.raises(ConfigError, match="at least 5 seeds"):
        FinderSettings([1e-2]).validate(load_config(None, ["perturbation.logit_noise.family=gaussian"]))
    with pytest.raises(ConfigError, match="with a scale"):
        FinderSettings([1e-2]).validate(load_config(None, ["run.seeds=[0,1,2,3,4]"]))


def test_finder_end_to_end_writes_the_study_and_resumes(tmp_path, tiny_overrides, tiny_base, monkeypatch):
    """Tiny and short: checks the files, the twin pairing and that a rerun recomputes nothing."""

    from timsim.finder import run_finder
    from timsim.store import load

    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian", "run.seeds=[0,1,2,3,4]",
                                              "run.steps=2", "run.chunk_steps=2", "run.name=tiny"])
    settings = FinderSettings([1e-2, 1.0], bisect_rounds=1)
    record = run_finder(cfg, settings, tmp_path / "crit")
    for name in ("critical.parquet", "critical.json", "critical.png", "manifest.json"):
        assert (tmp_path / "crit" / name).exists(), name
    assert json.loads((tmp_path / "crit" / "critical.json").read_text()) == record
    _, summary = load(tmp_path / "crit")
    assert set(summary.cell_id) >= {"zero", "level=0.01", "level=1"}
    assert summary.groupby("cell_id").seed.apply(sorted).map(tuple).nunique() == 1  # every level is paired
    parts = sorted(p.name for p in (tmp_path / "crit" / "metrics").iterdir())
    assert run_finder(cfg, settings, tmp_path / "crit") == record
    assert sorted(p.name for p in (tmp_path / "crit" / "metrics").iterdir()) == parts  # nothing recomputed
    with pytest.raises(ConfigError, match=r"levels in token_kl, not 'seq_kl'.*--restart"):
        run_finder(cfg, dataclasses.replace(settings, target="seq_kl"), tmp_path / "crit")
    # re-deciding the finished runs with a relative margin trains nothing; the tiny twin's real
    # gain after 2 steps may be <= 0 (that error is tested above), so it is set here
    monkeypatch.setattr("timsim.finder.twin_gain", lambda summary, metric="final_accuracy": 0.1)
    relative = dataclasses.replace(settings, margin=0.5, margin_of="twin_gain", bisect_rounds=0)
    again = run_finder(cfg, relative, tmp_path / "crit")
    assert (again["margin_abs"], again["twin_gain"]) == (pytest.approx(0.05), 0.1)
    assert sorted(p.name for p in (tmp_path / "crit" / "metrics").iterdir()) == parts
    levels = pd.read_parquet(tmp_path / "crit" / "critical.parquet").query("level > 0")
    assert list(levels.gain_lost) == pytest.approx(list(-levels.paired_diff / 0.1))
    bad = levels[levels.degrades].level  # the record's critical level is the table's smallest degrading one
    assert again["critical_level"] == (float(bad.min()) if len(bad) else None)


def test_finder_with_a_correction_runs_both_arms_against_one_twin(tmp_path, tiny_overrides, tiny_base):

    from timsim.finder import run_finder
    from timsim.store import load

    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian", "run.seeds=[0,1,2,3,4]",
                                              "run.steps=2", "run.chunk_steps=2", "run.name=tiny",
                                              "correction.kinds=[token_tis]"])
    record = run_finder(cfg, FinderSettings([1e-2, 1.0], bisect_rounds=0), tmp_path / "crit")
    _, summary = load(tmp_path / "crit")
    assert set(summary.cell_id) == {"zero", "level=0.01", "level=1", "corrected level=0.01", "corrected level=1"}
    table = pd.read_parquet(tmp_path / "crit" / "critical.parquet")
    assert (table.arm == "uncorrected").sum() == 3 and (table.arm == "corrected").sum() == 2  # one shared twin
    assert record["correction"] == "token_tis" and "critical_level" in record["uncorrected"]
    assert record["critical_shift"] == critical_shift(record["uncorrected"]["critical_level"],
                                                      record["critical_level"])


def test_critical_shift_in_each_case():
    assert critical_shift(1e-2, 1e-1) == pytest.approx(10.0)  # the correction tolerates 10x more
    assert critical_shift(1e-1, 1e-2) == pytest.approx(0.1)
    assert critical_shift(1e-2, None) == "up"  # only the uncorrected arm degrades within the levels
    assert critical_shift(None, 1e-2) == "down"
    assert critical_shift(None, None) is None


def test_study_finder_block_is_kept_unless_the_command_line_sets_an_option(tmp_path):
    """The CLI passes every finder option, None when not given: those must not erase the
    study file's `finder:` block, and a given option wins over it."""
    from timsim.study import load_study

    study = tmp_path / "study.yaml"
    study.write_text("base: " + str(Path(__file__).parent.parent / "configs" / "quickstart.yaml") + "\n"
                     "finder: {levels: [0.01, 0.1], target: seq_kl, margin: 0.1}\n"
                     "variants: {a: {perturbation.logit_noise.family: gaussian}}\n")
    unset = {"levels": None, "target": None, "margin": None, "confidence": None, "bisect": None, "metric": None}
    settings = load_study(study, [], unset)[2]
    assert (settings.levels, settings.target, settings.margin) == ([0.01, 0.1], "seq_kl", 0.1)
    settings = load_study(study, [], {**unset, "margin": 0.02})[2]
    assert (settings.target, settings.margin) == ("seq_kl", 0.02)


def test_study_command_line_overrides_win_over_a_variants_own_changes(tmp_path):
    """`timsim critical study.yaml grpo.lr=1e-4` must run every variant at lr 1e-4, also one
    that sets its own lr (an override applied to the base alone would be silently undone)."""
    from timsim.study import load_study

    study = tmp_path / "study.yaml"
    study.write_text("base: " + str(Path(__file__).parent.parent / "configs" / "quickstart.yaml") + "\n"
                     "variants: {own: {grpo.lr: 3.0e-5}, inherited: {grpo.group_size: 4}}\n")
    variants = load_study(study, [], {})[1]
    assert (variants["own"].grpo.lr, variants["inherited"].grpo.lr) == (3.0e-5, 3.0e-4)
    variants = load_study(study, ["grpo.lr=1e-4"], {})[1]
    assert variants["own"].grpo.lr == variants["inherited"].grpo.lr == 1e-4
    assert variants["inherited"].grpo.group_size == 4
