"""The in-memory API: `timsim.train` / `timsim.sweep` return DataFrames, call hooks, write
nothing unless asked, and give the same numbers as the results-directory path."""

import os

import jax
import numpy as np
import pandas as pd
import pytest

import timsim
from timsim.determinism import in_force
from timsim.loop import ProgressHook, metric_rows
from timsim.metrics import METRICS
from timsim.plan import Cell


class Recorder(timsim.Hook):
    def __init__(self):
        self.events = []

    def start(self, group):
        self.events.append(("start", group.total_steps, len(group.runs)))

    def boundary(self, group, at):
        self.events.append(("boundary", at.chunk, at.step, sorted(at.frames)))

    def end(self, group):
        self.events.append(("end",))


@pytest.fixture(scope="module")
def in_memory(tiny_cfg, tiny_base, tmp_path_factory):
    lines, recorder, scalars = [], Recorder(), []
    cwd, before = tmp_path_factory.mktemp("cwd"), os.getcwd()
    os.chdir(cwd)  # an in-memory run writes nothing, not even into the working directory
    try:
        result = timsim.train(tiny_cfg, ["run.steps=10"], base=tiny_base[:2], progress=False,
                              hooks=[recorder, ProgressHook(lines.append, bar=False),
                                     timsim.ScalarHook(lambda *a: scalars.append(a), ["reward_mean", "eval_greedy_accuracy"])])
    finally:
        os.chdir(before)
    return result, recorder.events, lines, cwd, scalars


def test_train_returns_dataframes_state_and_calls_hooks(in_memory, tiny_cfg):
    result, events, lines = in_memory[:3]
    seeds, steps = tiny_cfg.run.seeds, 10
    assert isinstance(result.metrics, pd.DataFrame) and isinstance(result.summary, pd.DataFrame)
    assert len(result.metrics) == len(seeds) * (steps + 1)  # step 0 (the base model) and every step
    assert set(METRICS) <= set(result.metrics.columns)
    ends = result.metrics.dropna(subset=["eval_greedy_accuracy"]).step.unique().tolist()
    assert ends == [0, 5, 10]  # held-out evaluation at step 0 and at each chunk end
    assert list(result.summary.seed) == seeds and result.summary.final_accuracy.between(0, 1).all()
    state = next(iter(result.state.values()))
    assert jax.tree.leaves(state.params)[0].shape[0] == len(seeds) and int(state.step[0]) == steps
    assert events == [("start", steps, len(seeds)), ("boundary", 0, 0, ["run"]), ("boundary", 1, 5, ["run"]),
                      ("boundary", 2, 10, ["run"]), ("end",)]
    assert len(lines) == 2 and "step 10/10" in lines[-1]
    assert in_force()  # the determinism setup is in force once the API ran


def test_scalar_hook_sends_every_step_to_a_tracker(in_memory, tiny_cfg):
    result, scalars = in_memory[0], in_memory[4]
    rewards = {(tag, step): value for tag, value, step in scalars if tag.endswith("/reward_mean")}
    assert len(rewards) == len(tiny_cfg.run.seeds) * 10  # every run and step (step 0 has no reward)
    row = result.metrics[(result.metrics.seed == 1) & (result.metrics.step == 7)].iloc[0]
    assert rewards[("run/seed1/reward_mean", 7)] == row.reward_mean
    evals = sorted({step for tag, _, step in scalars if tag.endswith("eval_greedy_accuracy")})
    assert evals == [0, 5, 10]


def test_in_memory_and_results_directory_give_the_same_numbers(in_memory, tiny_cfg, tmp_path):
    result = in_memory[0]
    recorder = Recorder()
    stored = timsim.train(tiny_cfg, ["run.steps=10"], out=tmp_path / "r", progress=False, hooks=[recorder])
    assert [e[:2] for e in recorder.events] == [("start", 10), ("boundary", 0), ("boundary", 1), ("boundary", 2),
                                                ("end",)]  # hooks run on the results-directory path too
    with pytest.raises(timsim.ConfigError, match="full results directory"):
        timsim.train(tiny_cfg, out=tmp_path / "x", evaluate=False, progress=False)
    assert stored.path == tmp_path / "r" and (tmp_path / "r" / "manifest.json").exists()
    columns = [c for c in result.metrics.columns if c in stored.metrics.columns]
    pd.testing.assert_frame_equal(result.metrics[columns], stored.metrics[columns], check_exact=True)
    again = timsim.load(tmp_path / "r")
    pd.testing.assert_frame_equal(again.summary, stored.summary)


def test_in_memory_train_writes_nothing(in_memory):
    assert list(in_memory[3].iterdir()) == []


def test_sweep_from_a_dict_and_paired_comparison(tiny_overrides, tiny_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {"config": {"perturbation": {"logit_noise": {"family": "gaussian"}}}, "name": "api",
            "cells": {"zero": {"perturbation.logit_noise.scale": 0.0}, "noisy": {"perturbation.logit_noise.scale": 2.0}}}
    result = timsim.sweep(spec, tiny_overrides + ["run.steps=5", "run.chunk_steps=5"], progress=False)
    assert list(tmp_path.iterdir()) == []
    assert list(result.configs) == ["zero", "noisy"] and len(result.state) == 1  # one program for both cells
    assert list(result.summary.cell_id.unique()) == ["zero", "noisy"]  # the plan's order, as on disk
    table = result.compare("zero").set_index("cell")
    assert table.loc["zero", "minus_zero"] == 0.0
    noisy = result.summary[result.summary.cell_id == "noisy"].set_index("seed").final_accuracy
    zero = result.summary[result.summary.cell_id == "zero"].set_index("seed").final_accuracy
    assert table.loc["noisy", "minus_zero"] == pytest.approx((noisy - zero).mean())
    kl = result.metrics.groupby("cell_id").kl_sampler_learner.max()
    assert kl["zero"] == 0.0 and kl["noisy"] > 0.0


def test_an_unregistered_metric_is_an_error(tiny_cfg):
    runs = [(Cell("c", tiny_cfg), 0, 0)]
    with pytest.raises(RuntimeError, match="not_a_metric"):
        metric_rows(runs, {"reward_mean": np.zeros((1, 2)), "not_a_metric": np.zeros((1, 2))}, np.arange(1, 3))


def test_bad_config_given_to_the_api_is_one_config_error():
    with pytest.raises(timsim.ConfigError, match="grpo.lr"):
        timsim.train(None, ["grpo.lr=-1"], progress=False)
    with pytest.raises(TypeError, match="config must be"):
        timsim.train(42, progress=False)


def test_theory_table_from_the_api(tiny_cfg, tiny_base):
    rows = timsim.theory_table(tiny_cfg, ["perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.scale=0.2"],
                               base=tiny_base[:2], n_prompts=32, names=["delta_mean", "rounding"])
    assert list(rows.prediction) == ["delta_mean", "rounding"]
    assert rows.set_index("prediction").applies.to_dict() == {"delta_mean": True, "rounding": False}
    with pytest.raises(timsim.ConfigError, match="n_prompts"):
        timsim.theory_table(tiny_cfg, base=tiny_base[:2], n_prompts=0)


def test_lr_zero_logs_everything_and_moves_nothing(tiny_cfg, tiny_base):
    """The check users run on a real framework before training ("is my mismatch normal?"):
    with grpo.lr=0 the parameters stay the base's bit for bit while every metric is logged."""
    result = timsim.train(tiny_cfg, ["grpo.lr=0", "run.steps=5", "perturbation.logit_noise.family=gaussian",
                                     "perturbation.logit_noise.scale=0.5"], base=tiny_base[:2], progress=False)
    state = next(iter(result.state.values()))
    for trained, base in zip(jax.tree.leaves(state.params), jax.tree.leaves(tiny_base[1])):
        assert np.array_equal(np.asarray(trained), np.broadcast_to(np.asarray(base), trained.shape))
    steps = result.metrics[result.metrics.step > 0]
    assert (steps.update_norm == 0).all() and (steps.grad_norm > 0).all() and (steps.mismatch_k3 > 0).all()
    accuracy = result.metrics.dropna(subset=["eval_greedy_accuracy"]).groupby("seed").eval_greedy_accuracy
    assert (accuracy.nunique() == 1).all()  # the same policy at step 0 and at the end
