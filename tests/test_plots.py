"""The plots, the HTML report and published data, on a small synthetic results directory
(no JAX): what is drawn is the data's mean and CI, the report shows every section, and an
exported copy reloads with the same numbers."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import timsim
from timsim import plots
from timsim.store import atomic_write_parquet
from timsim.summary import SUMMARY_COLUMNS, summarize_runs

STEPS, EVAL_EVERY, SEEDS = 40, 10, (0, 1, 2)
CELLS = {"zero": None, "kl=1e-2": 1e-2, "kl=1e-1": 1e-1}


def synthetic_metrics() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for cell, level in CELLS.items():
        for run_idx, seed in enumerate(SEEDS):
            for step in range(STEPS + 1):
                skill = 0.3 + 0.01 * step * (1 - 3 * (level or 0)) + 0.02 * rng.normal()
                rows.append({"cell_id": cell, "run_idx": run_idx, "seed": seed, "step": step,
                             "cfg.perturbation.target.token_kl": np.nan if level is None else level,
                             "reward_mean": skill, "loss": 0.1, "grad_norm": 1.0, "mismatch_k3": level or 0.0,
                             "kl_sampler_learner": level or 0.0,
                             "eval_greedy_accuracy": skill if step % EVAL_EVERY == 0 else np.nan})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results") / "synthetic"
    metrics = synthetic_metrics()
    (root / "metrics").mkdir(parents=True)
    metrics.to_parquet(root / "metrics" / "part-all-0.parquet", index=False)
    atomic_write_parquet(root / "summary.parquet", summarize_runs(metrics))
    (root / "manifest.json").write_text(json.dumps({"sweep": {"name": "synthetic"}, "provenance": {"backend": "cpu"},
                                                    "cells": {c: {} for c in CELLS}}))
    return root


def test_curves_draw_the_mean_over_seeds_and_its_t_interval():
    metrics = synthetic_metrics()
    fig = plots.curves(metrics, "eval_greedy_accuracy", cells=["kl=1e-1"], runs=False)
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    wide = metrics[metrics.cell_id == "kl=1e-1"].dropna(subset=["eval_greedy_accuracy"]).pivot(
        index="step", columns="run_idx", values="eval_greedy_accuracy")
    np.testing.assert_allclose(line.get_ydata(), wide.mean(axis=1))
    half = stats.t.ppf(0.975, 2) * wide.std(axis=1, ddof=1) / np.sqrt(3)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose([band.min(), band.max()],
                               [(wide.mean(axis=1) - half).min(), (wide.mean(axis=1) + half).max()], rtol=1e-6)
    assert ax.get_xlabel() == "step" and line.get_label() == "kl=1e-1 (n=3)"


def test_axis_labels_carry_the_registered_unit():
    assert plots.label("entropy") == "entropy (nats)"
    assert plots.label("reward_mean") == "reward_mean"
    assert plots.label("not a metric") == "not a metric"  # a derived column: its own name


def test_paired_forest_plots_each_cell_against_the_reference(results):
    table = timsim.load(results).compare("zero")
    fig = plots.paired(table, "zero")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["kl=1e-1 (n=3)", "kl=1e-2 (n=3)"]  # top to bottom in plan order, reference left out
    points = np.asarray(ax.containers[0].lines[0].get_xdata(), float)
    np.testing.assert_allclose(points, table.set_index("cell").loc[["kl=1e-1", "kl=1e-2"], "minus_zero"])


def test_report_has_every_section_and_the_paired_numbers(results):
    page = timsim.write_report(results).read_text()
    assert page.count("<img") == 4  # curves, mismatch, paired differences, dose-response
    for heading in ("Summary per cell", "Learning curves", "Mismatch during training", "Paired by seed against zero",
                    "Dose-response", "Provenance"):
        assert heading in page
    table = timsim.load(results).compare("zero").round(4)
    assert f"<td>{table.set_index('cell').loc['kl=1e-1', 'minus_zero']}</td>" in page


def test_report_of_a_directory_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"cells": {}}))
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        timsim.write_report(tmp_path)


def test_exported_data_reload_with_the_same_numbers(results, tmp_path):
    dest = timsim.export(results, tmp_path / "published", "make synthetic", every=4)
    original, published = timsim.load(results), timsim.load(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["export"]["command"] == "make synthetic" and manifest["provenance"] == {"backend": "cpu"}
    kept = original.metrics[(original.metrics.step % 4 == 0) | original.metrics.eval_greedy_accuracy.notna()]
    assert len(published.metrics) == len(kept) and set(published.metrics.step) == set(kept.step)
    np.testing.assert_allclose(published.metrics.reward_mean, kept.reward_mean.to_numpy(), rtol=1e-6)
    assert published.metrics.reward_mean.dtype == np.float32
    pd.testing.assert_frame_equal(published.summary, original.summary)


def test_every_summary_column_is_explained():
    columns = set(summarize_runs(synthetic_metrics()).columns)
    identity = {"cell_id", "run_idx", "seed", "steps"} | {c for c in columns if c.startswith("cfg.")}
    assert columns - identity == set(SUMMARY_COLUMNS)


def test_auc_is_the_mean_accuracy_over_training():
    steps = np.arange(0, 41, 10)
    frame = pd.DataFrame({"cell_id": "c", "run_idx": 0, "seed": 0, "step": np.arange(41), "reward_mean": 0.5,
                          "loss": 0.0, "grad_norm": 1.0, "mismatch_k3": 0.0})
    frame["eval_greedy_accuracy"] = np.where(frame.step.isin(steps), frame.step / 40, np.nan)  # 0 -> 1 linearly
    row = summarize_runs(frame).iloc[0]
    assert row.auc_accuracy == pytest.approx(0.5) and row.final_accuracy == 1.0
    late = frame.assign(eval_greedy_accuracy=np.where(frame.step.isin(steps), (frame.step == 40) * 1.0, np.nan))
    assert summarize_runs(late).iloc[0].auc_accuracy == pytest.approx(0.125)  # learning late scores lower
