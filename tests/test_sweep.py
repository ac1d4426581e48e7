"""Sweep files, plan expansion, batching equivalence and concurrent reads (faults: test_faults.py)."""

import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import yaml

from timsim.config import ConfigError, load_config
from timsim import loop
from timsim.executors import run_cells
from timsim.plan import Cell
from timsim.store import Store, atomic_write_parquet, load, read_parquet
from timsim.sweep_spec import load_plan


def _write(tmp_path, spec, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_zip_seeds_and_named_cells_expand(tmp_path):
    path = _write(tmp_path, {
        "seeds": [3, 4],
        "grid": {"grpo.lr": [1e-4, 3e-4], "grpo.advantage": ["zscore", "rloo"]},
        "zip": {"grpo.clip_eps_low": [0.1, 0.2], "grpo.clip_eps_high": [0.3, 0.4]},
        "cells": {"a": {"grpo.old_logprobs": "recompute"}, "b": {"grpo.old_logprobs": "bypass"}}})
    plan = load_plan(path)
    assert len(plan.cells) == 2 * 2 * 2 * 2
    assert plan.n_runs == 32
    ids = [c.cell_id for c in plan.cells]
    assert len(set(ids)) == len(ids)
    first = plan.cells[0]
    assert first.cell_id == "a,lr=0.0001,advantage=zscore,clip_eps_low=0.1,clip_eps_high=0.3"
    assert first.cfg.run.seeds == [3, 4] and first.cfg.grpo.old_logprobs == "recompute"
    # zip pairs values, it does not cross them
    assert {(c.cfg.grpo.clip_eps_low, c.cfg.grpo.clip_eps_high) for c in plan.cells} == {(0.1, 0.3), (0.2, 0.4)}
    # traced axes (lr) share a program; static ones (advantage, old_logprobs) do not
    assert len(plan.groups()) == 2 * 2


def test_swept_values_are_recorded_as_the_config_holds_them(tmp_path):
    """YAML 1.1 reads `1.0e6` as a string; the cfg.* column holds the validated 1e6, so cells
    with written-out and plain floats share one numeric column (a sweep once failed to write its
    summary on a column mixing '1.0e6' with floats)."""
    path = tmp_path / "s.yaml"
    path.write_text("cells:\n  wide: {grpo.clip_eps_high: 1.0e6, correction.kinds: [token_tis]}\n"
                    "  plain: {grpo.clip_eps_high: 0.3}\n")
    wide, plain = load_plan(path).cells
    assert wide.swept["grpo.clip_eps_high"] == 1e6 and isinstance(wide.swept["grpo.clip_eps_high"], float)
    assert wide.swept["correction.kinds"] == ["token_tis"]  # non-scalars stay as written
    column = pd.DataFrame([{f"cfg.{k}": v for k, v in c.swept.items() if k.startswith("grpo.")} for c in (wide, plain)])
    atomic_write_parquet(tmp_path / "t.parquet", column)
    assert read_parquet(tmp_path / "t.parquet")["cfg.grpo.clip_eps_high"].tolist() == [1e6, 0.3]


def test_base_file_inline_config_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"grpo": {"lr": 1e-3}, "run": {"steps": 40}}))
    path = _write(tmp_path, {"base": "base.yaml", "config": {"run": {"chunk_steps": 20}}, "name": "x"})
    (cell,) = load_plan(path, ["grpo.group_size=4"]).cells
    assert cell.cfg.grpo.lr == 1e-3 and cell.cfg.run.chunk_steps == 20 and cell.cfg.grpo.group_size == 4
    assert cell.cfg.run.name == "x"


@pytest.mark.parametrize("spec, words", [
    ({"grid": {"grpo.nope": [1]}}, ["grpo.nope", "unknown key"]),
    ({"grid": {"grpo.group_size": ["many"]}}, ["grpo.group_size", "integer"]),
    ({"grid": {"grpo.lr": [1e-3]}, "zip": {"grpo.lr": [1e-4]}}, ["grpo.lr", "axis twice"]),
    ({"grid": {"grpo.lr": []}}, ["grid.grpo.lr", "empty"]),
    ({"zip": {"grpo.lr": [1e-3, 1e-4], "grpo.clip_eps_low": [0.1]}}, ["equal lengths"]),
    ({"grdi": {"grpo.lr": [1e-3]}}, ["grdi", "Accepted top-level keys"]),
    ({"base": "missing.yaml"}, ["base", "does not exist"]),
])
def test_bad_sweep_files_fail_before_compute(tmp_path, spec, words):
    with pytest.raises(ConfigError) as err:
        load_plan(_write(tmp_path, spec))
    for word in words:
        assert word in str(err.value)


def test_a_run_alone_matches_its_batched_self_and_reuses_compiled_programs(tiny_overrides, tiny_base, tmp_path,
                                                                           monkeypatch):
    """A cell run alone has another run-axis width than in a two-cell program, so bits are not
    promised (DESIGN §8.2; the same-width property is in test_faults): the first step, before
    any token can flip, agrees to float precision. A second one-run group with the same static
    config reuses the first one's compiled programs. The program cache starts empty here: one
    left full by earlier tests in this worker would be cleared mid-test (MAX_PROGRAMS)."""
    monkeypatch.setattr(loop, "_PROGRAMS", {})
    cfgs = [load_config(None, tiny_overrides + ["run.batching=map", "run.seeds=[0]", "run.steps=5", f"grpo.lr={lr}"])
            for lr in (1e-3, 3e-3)]
    cells = [Cell(f"lr{i}", cfg) for i, cfg in enumerate(cfgs)]
    run_cells(cells, Store(tmp_path / "batched"))
    batched, _ = load(tmp_path / "batched")
    programs = len(loop._PROGRAMS)
    for cell in cells:
        run_cells([cell], Store(tmp_path / cell.cell_id))
        alone, _ = load(tmp_path / cell.cell_id)
        together = batched[(batched.cell_id == cell.cell_id) & (batched.step == 1)]
        for col in ("reward_mean", "loss", "grad_norm", "entropy"):
            np.testing.assert_allclose(together[col].to_numpy(), alone[alone.step == 1][col].to_numpy(), rtol=1e-4,
                                       atol=1e-6, err_msg=col)
    assert len(loop._PROGRAMS) == programs + 1


def test_vmap_batching_matches_map_statistically(tiny_overrides, tiny_base, tmp_path):
    """vmap turns matmuls into batched matmuls: not bitwise (DESIGN §8.2), but the first step,
    before any token can flip, agrees to float precision."""
    out = {}
    for batching in ("map", "vmap"):
        cfg = load_config(None, tiny_overrides + [f"run.batching={batching}", "run.steps=5"])
        run_cells([Cell(batching, cfg)], Store(tmp_path / batching))
        out[batching], _ = load(tmp_path / batching)
    a, b = (out[k][out[k].step == 1] for k in ("map", "vmap"))
    np.testing.assert_allclose(a.reward_mean.to_numpy(), b.reward_mean.to_numpy())
    np.testing.assert_allclose(a.loss.to_numpy(), b.loss.to_numpy(), rtol=1e-4, atol=1e-6)


def _nested(overrides):
    """`["a.b=1", ...]` -> {"a": {"b": 1}, ...}: the tiny config as a sweep file's `config:`."""
    config = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, leaf = key.split(".")
        config.setdefault(section, {})[leaf] = yaml.safe_load(value)
    return config


def _sweep_cmd(path, out_dir):
    return [sys.executable, "-m", "timsim.cli", "sweep", str(path), "--out-dir", str(out_dir)]


def test_incompatible_change_to_a_finished_cell_is_refused(tiny_overrides, tiny_base, tmp_path):
    cfg = load_config(None, tiny_overrides + ["run.steps=5"])
    run_cells([Cell("c", cfg)], Store(tmp_path / "r"))
    changed = load_config(None, tiny_overrides + ["run.steps=5", "grpo.group_size=4"])
    with pytest.raises(ConfigError, match="different config"):
        run_cells([Cell("c", changed)], Store(tmp_path / "r"))
    with pytest.raises(ConfigError, match="belongs to sweep"):
        run_cells([Cell("c", cfg)], Store(tmp_path / "r"), sweep={"name": "other"})


def test_concurrent_reader_never_sees_a_torn_file(tmp_path):
    path = tmp_path / "part.parquet"
    frames = [pd.DataFrame({"x": np.arange(n, dtype=float)}) for n in (50_000, 80_000)]
    atomic_write_parquet(path, frames[0])
    stop, errors, reads = threading.Event(), [], []

    def writer():
        i = 0
        while not stop.is_set():
            atomic_write_parquet(path, frames[i % 2])
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            try:
                reads.append(len(read_parquet(path)))
            except Exception as err:  # a torn file would raise here
                errors.append(err)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert set(reads) <= {50_000, 80_000}


def test_sharded_run_axis_matches_one_device(tiny_overrides, tiny_base, tmp_path):
    """With 2 (forced host) devices the run axis is split by shard_map and padded to a
    multiple of the device count. Each device has its own thread pool, so reductions may
    round differently (DESIGN §8.2 promises bits only at the same device and thread count):
    the first step agrees to float precision, and so do the sampled rewards, which depend only
    on prompts, uniforms and the same weights (up to a token flipped by a last-bit difference)."""
    config = _nested(tiny_overrides)
    config["run"].update(steps=5, chunk_steps=5)
    path = _write(tmp_path, {"name": "sh", "config": config, "seeds": [0, 1, 2]})
    # one device: this process; two: a process started with two host devices
    run_cells(load_plan(path).cells, Store(tmp_path / "one" / "sh"), sweep={"name": "sh"})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    two = {**env, "XLA_FLAGS": env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    done = subprocess.run(_sweep_cmd(path, tmp_path / "two"), env=two, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    m1, _ = load(tmp_path / "one" / "sh")
    m2, _ = load(tmp_path / "two" / "sh")
    assert len(m1) == len(m2) == 3 * 6  # the padded fourth run is never written
    a, b = m1[m1.step == 1], m2[m2.step == 1]
    # one sampled token of 128 may flip on a last-bit difference: 1/128 of a run's mean reward
    np.testing.assert_allclose(a.reward_mean.to_numpy(), b.reward_mean.to_numpy(), atol=1.5 / 128)
    for col in ("loss", "grad_norm", "entropy", "eval_greedy_accuracy"):
        np.testing.assert_allclose(m1[col].to_numpy(), m2[col].to_numpy(), rtol=1e-4, atol=1e-6, err_msg=col)
    manifest = Store(tmp_path / "two" / "sh").read_manifest()
    assert manifest["provenance"]["device_count"] == 2
    assert manifest["groups"][next(iter(manifest["groups"]))]["padded_width"] == 4


def test_every_shipped_config_sweep_and_study_file_is_valid():
    """The files under configs/ load and expand (no compute): a renamed key fails here."""
    from pathlib import Path

    from timsim.study import load_study

    root = Path(__file__).parent.parent / "configs"
    configs, sweeps, studies = (sorted((root / sub).glob("*.yaml")) for sub in (".", "sweeps", "studies"))
    assert configs and sweeps and studies
    for path in configs:
        load_config(path)
    for path in sweeps:
        assert load_plan(path).cells
    for path in studies:
        assert load_study(path, [], {})[1]


def test_ray_executor_matches_the_local_executor(tiny_overrides, tiny_base, tmp_path):
    """Two groups (two compiled programs) as two Ray tasks give the same tables, bit for bit,
    as the local executor (same run-axis width per group). The local Ray instance has one CPU,
    so one worker process runs both tasks: with two, Ray's extra processes made this test take
    250 s on cores shared with a busy neighbour (25 s on idle ones)."""
    pytest.importorskip("ray", reason="the Ray executor is an optional extra (pip install 'timsim[ray]')")
    config = _nested(tiny_overrides)
    config["run"].update(steps=5, chunk_steps=5)
    spec = {"name": "ex", "config": config, "seeds": [0, 1], "grid": {"grpo.old_logprobs": ["recompute", "bypass"]},
            "ray": {"num_cpus": 1}}
    path = _write(tmp_path, spec)
    plan = load_plan(path)
    local = run_cells(plan.cells, Store(tmp_path / "local"), sweep={"name": "ex"})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_ADDRESS": ""}
    on_ray = subprocess.run(_sweep_cmd(path, tmp_path / "ray") + ["--executor", "ray"], env=env,
                            capture_output=True, text=True)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "ray: 2 group(s) submitted" in on_ray.stdout
    m1, s1 = load(tmp_path / "local")
    m2, s2 = load(tmp_path / "ray" / "ex")
    assert len(m1) and set(m1.cell_id) == set(m2.cell_id)
    pd.testing.assert_frame_equal(m1, m2, check_exact=True)
    pd.testing.assert_frame_equal(s1, s2, check_exact=True)
    pd.testing.assert_frame_equal(local, s2, check_exact=True)
    groups = Store(tmp_path / "ray" / "ex").read_manifest()["groups"]
    assert len(groups) == 2 and all(g["status"] == "done" and g["chunks_done"] == 1 for g in groups.values())


def test_program_cache_is_bounded_and_rebuilds_after_clearing(tiny_overrides, tiny_base, tmp_path, monkeypatch):
    """A sweep with more static configs than MAX_PROGRAMS drops compiled programs (memory maps
    are a finite resource) and compiles again when an old config comes back, without tripping
    the no-silent-recompile guard."""
    monkeypatch.setattr(loop, "MAX_PROGRAMS", 1)
    monkeypatch.setattr(loop, "_PROGRAMS", {})
    base = tiny_overrides + ["run.steps=5", "run.seeds=[0]"]
    a, b = load_config(None, base), load_config(None, base + ["grpo.old_logprobs=bypass"])
    first = run_cells([Cell("a", a)], Store(tmp_path / "a1"))
    run_cells([Cell("b", b)], Store(tmp_path / "b"))
    assert len(loop._PROGRAMS) == 1
    again = run_cells([Cell("a", a)], Store(tmp_path / "a2"))
    pd.testing.assert_frame_equal(first, again, check_exact=True)


def test_paired_table_pairs_by_seed_and_names_unknown_cells():
    from timsim.summary import paired_table

    summary = pd.DataFrame({"cell_id": ["zero"] * 3 + ["noisy"] * 3, "seed": [0, 1, 2, 2, 1, 0],
                            "final_accuracy": [0.5, 0.6, 0.7, 0.6, 0.5, 0.3], "collapsed": [0.0] * 6,
                            "collapse_step": [np.nan] * 6})
    metrics = pd.DataFrame({"cell_id": ["zero", "noisy"], "step": [1, 1], "kl_sampler_learner": [0.0, 0.02]})
    table = paired_table(metrics, summary, ["zero"]).set_index("cell")
    # noisy minus zero by seed: 0.3-0.5, 0.5-0.6, 0.6-0.7 -> mean -0.133
    assert np.isclose(table.loc["noisy", "minus_zero"], -0.4 / 3)
    assert table.loc["noisy", "kl_sampler_learner"] == 0.02 and np.isnan(table.loc["noisy", "probe_bypass_cos"])
    with pytest.raises(ConfigError, match="unknown cell"):
        paired_table(metrics, summary, ["nope"])


def test_by_cell_mean_and_student_t_interval_over_seeds():
    """Known values: [0.2, 0.4, 0.6] has mean 0.4 and sd 0.2; t_{0.975, 2} = 4.3027 (tables),
    so the half-width is 4.3027 * 0.2 / sqrt(3) = 0.4968. One seed has no interval."""
    from timsim.summary import by_cell

    summary = pd.DataFrame({"cell_id": ["a"] * 3 + ["b"], "final_accuracy": [0.2, 0.4, 0.6, 0.9]})
    table = by_cell(summary, ["final_accuracy"]).set_index("cell_id")
    assert table.loc["a", "n"] == 3 and table.loc["a", "final_accuracy"] == pytest.approx(0.4)
    assert table.loc["a", "final_accuracy_ci95"] == pytest.approx(0.4968, abs=1e-4)
    assert table.loc["b", "n"] == 1 and np.isnan(table.loc["b", "final_accuracy_ci95"])


def test_summarize_runs_reads_base_final_peak_and_the_reward_tail():
    from timsim.summary import summarize_runs

    steps = np.arange(0, 21)
    acc = np.where(steps % 10 == 0, [0.3 if s == 0 else 0.8 if s == 10 else 0.6 for s in steps], np.nan)
    metrics = pd.DataFrame({"cell_id": "c", "run_idx": 0, "seed": 7, "step": steps, "eval_greedy_accuracy": acc,
                            "reward_mean": np.where(steps > 18, 1.0, 0.5), "mismatch_k3": 0.01,
                            "loss": np.where(steps == 15, np.nan, 0.1), "grad_norm": 1.0})
    row = summarize_runs(metrics).iloc[0]
    assert (row.base_accuracy, row.final_accuracy, row.peak_accuracy, row.peak_step) == (0.3, 0.6, 0.8, 10)
    assert row.final_reward == pytest.approx(1.0)  # the last 10% of steps: 19 and 20
    assert row.mean_mismatch_k3 == pytest.approx(0.01) and row.seed == 7
    # a non-finite loss at step 15 is a collapse; the run ends finite, with its reward above half its peak
    assert (row.collapsed, row.collapse_step, row.nonfinite_steps, row.recovered) == (1.0, 15.0, 1, 1.0)


def test_a_compiled_chunk_refuses_to_recompile(tiny_cfg, tiny_base):
    """The recompile guard: a chunk fed a run axis of another width would silently compile a
    second program; it raises instead."""
    import jax

    from timsim.config import static_view
    from timsim.plan import Cell, stack_hyperparams
    from timsim.step import RecompileError, init_states, make_chunk, place

    graphdef, params, _ = tiny_base
    chunk = make_chunk(static_view(tiny_cfg), tiny_cfg.task.build(), graphdef)

    def state_and_hp(seeds):
        hp, _ = stack_hyperparams([Cell("c", tiny_cfg.model_copy(
            update={"run": tiny_cfg.run.model_copy(update={"seeds": seeds})}))])
        hp = place(hp, over_runs=True)
        return place(init_states(params, hp), over_runs=True), hp

    state, hp = state_and_hp([0, 1])
    chunk(state, hp, place(params, over_runs=False))
    state, hp = state_and_hp([0, 1, 2])
    with pytest.raises(RecompileError, match="chunk was traced a second time"):
        chunk(state, hp, place(params, over_runs=False))
