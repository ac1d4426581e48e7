"""The plots, the HTML report and published data, on a small synthetic results directory
(no JAX): what is drawn is the data's mean and CI, the report shows every section, and an
exported copy reloads with the same numbers."""

import json
from pathlib import Path

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


def test_against_draws_each_group_in_its_palette_colour_with_its_error_bars():
    frame = pd.DataFrame({"kl_sampler_learner": [0.01, 0.03, 0.01, 0.03, 0.1],
                          "delta_abs_q99": [0.2, 0.5, 0.3, 0.6, 1.0], "se": [0.01, 0.02, 0.03, 0.04, 0.05],
                          "family": ["gaussian", "gaussian", "spikes", "spikes", "spikes"]})
    fig = plots.against(frame, "kl_sampler_learner", "delta_abs_q99", yerr="se", hue="family", identity=True)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "kl_sampler_learner (nats)" and ax.get_ylabel() == "delta_abs_q99 (nats)"
    first, second = ax.containers
    np.testing.assert_allclose(np.asarray(second.lines[0].get_ydata(), float), [0.3, 0.6, 1.0])
    assert [c.lines[0].get_color() for c in (first, second)] == list(plots.OKABE_ITO[:2])
    bar = second.lines[2][0].get_segments()[2]  # the third point's error bar: 1.0 +- 0.05
    np.testing.assert_allclose(bar[:, 1], [0.95, 1.05])
    identity = [line for line in ax.get_lines() if line.get_label() == "y = x"]
    assert len(identity) == 1 and np.array_equal(identity[0].get_xdata(), identity[0].get_ydata())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["y = x", "gaussian", "spikes"]


def test_against_marks_zero_and_labels_only_the_given_ticks_on_a_log_axis():
    frame = pd.DataFrame({"x": [0.003, 0.01, 0.03], "y": [-0.1, 0.0, 0.2], "arm": ["a", "b", "c"]})
    ax = plots.against(frame, "x", "y", zero=True, logx=True, ticks=[0.003, 0.01, 0.03], annotate="arm",
                       connect=True).axes[0]
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_color() == "gray"] == [0.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.003", "0.01", "0.03"]
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c"] and ax.get_legend() is None
    assert ax.containers[0].lines[0].get_linestyle() == "-"  # connected


def test_forest_puts_the_first_label_on_top_and_sets_shared_rows_side_by_side():
    frame = pd.DataFrame({"estimator": ["recompute", "bypass", "recompute", "bypass"], "sigma": [0.5, 0.5, 1, 1],
                          "rel_bias": [0.1, 0.3, 0.3, 0.4], "ci": [0.01, 0.02, 0.03, 0.04]})
    ax = plots.forest(frame, "rel_bias", "ci", label="estimator", hue="sigma", xlabel="relative bias").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["bypass", "recompute"]  # bottom to top
    low, high = ax.containers
    np.testing.assert_allclose(np.asarray(low.lines[0].get_xdata(), float), [0.3, 0.1])  # bypass, then recompute
    y_low, y_high = low.lines[0].get_ydata(), high.lines[0].get_ydata()
    assert (y_low > y_high).all() and (np.round(y_low) == [0, 1]).all()  # side by side within each row
    assert [c.lines[0].get_color() for c in (low, high)] == list(plots.OKABE_ITO[:2])
    assert ax.get_xlabel() == "relative bias"
    assert any(line.get_xdata()[0] == 0.0 and line.get_color() == "gray" for line in ax.get_lines())


def test_delta_by_bin_draws_each_quantile_per_bin_and_group():
    rng = np.random.default_rng(0)
    bins = ["[0, 0.1)", "[0.1, 0.5)", "[0.5, 1)"]
    table = pd.DataFrame({"bin": bins * 2, "family": ["gaussian"] * 3 + ["spikes"] * 3,
                          "q50": rng.random(6), "q99": rng.random(6) + 1})
    ax = plots.delta_by_bin(table, ("q50", "q99"), hue="family").axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["gaussian, median", "gaussian, 99% quantile", "spikes, median",
                                                   "spikes, 99% quantile"]
    np.testing.assert_allclose(lines[3].get_ydata(), table.q99[3:])
    assert list(lines[3].get_xdata()) == [0, 1, 2] and [t.get_text() for t in ax.get_xticklabels()] == bins
    assert lines[0].get_color() == plots.OKABE_ITO[0] and lines[2].get_color() == plots.OKABE_ITO[1]
    assert lines[0].get_linestyle() != lines[1].get_linestyle()
    assert "(nats)" in ax.get_ylabel() and "probability" in ax.get_xlabel()


def test_engine_profile_plot_shows_delta_by_bin_and_the_held_out_check(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from timsim import profile

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append(fig) or Path(path).write_bytes(b""))
    profile.plot(profile.example_pairs(n_tokens=4_000), tmp_path / "fit.png")
    left, right = saved[0].axes
    assert [line.get_label() for line in left.get_lines()][:3] == ["fitted (one half), 1% quantile",
                                                                   "fitted (one half), median",
                                                                   "fitted (one half), 99% quantile"]
    assert len(left.get_lines()) == 6  # two halves x three quantiles
    fitted = profile.table(profile.fit(profile.example_pairs(n_tokens=4_000).iloc[::2], min_tokens=100))
    np.testing.assert_allclose(left.get_lines()[1].get_ydata(), fitted.q50)
    assert "y = x" in [t.get_text() for t in right.get_legend().get_texts()]


def test_a_labelled_mark_joins_the_legend_drawn_before_it():
    table = pd.DataFrame({"level": [0.01, 0.1] * 2, "diff": [-0.01, -0.1, 0.0, -0.2], "L": ["8", "8", "16", "16"]})
    ax = plots.dose_response(table, "level", "diff", by="L").axes[0]
    plots.mark(ax, y=-0.05, label="margin")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["margin", "8", "16"]
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label() == "margin"] == [-0.05]
