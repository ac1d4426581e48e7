"""Faults: a process killed at exact points (between chunks, in the middle of a Parquet or
JSON write, during a checkpoint), a full or read-only disk, two processes on one results
directory, a run that goes non-finite, and names that would write outside the results root.
Every fault is forced deterministically (`timsim.faults`), never by a timer; after each the
results stay readable and the same command finishes with tables bit-identical to a run that
never failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from timsim import cli, faults
from timsim.config import ConfigError, inside, load_config
from timsim.executors import run_cells
from timsim.plan import Cell
from timsim.store import LOCK_NAME, TMP_SUFFIX, Store, load
from timsim.sweep_spec import load_plan
from test_sweep import _nested

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop(faults.FAULT_ENV, None)


def _sweep_argv(path, out_dir):
    return ["sweep", str(path), "--out-dir", str(out_dir)]


def _temporaries(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TMP_SUFFIX}"))


@pytest.fixture(scope="module")
def sweep_file(tiny_overrides, tiny_base, tmp_path_factory):
    """Two cells x two seeds, 3 chunks of 5 steps; and its uninterrupted tables."""
    tmp = tmp_path_factory.mktemp("faults")
    config = _nested(tiny_overrides)
    config["run"].update(steps=15, chunk_steps=5)
    path = tmp / "kr.yaml"
    path.write_text(yaml.safe_dump({"name": "kr", "config": config, "seeds": [0, 1], "grid": {"grpo.lr": [1e-3, 2e-3]}}))
    assert cli.main(_sweep_argv(path, tmp / "clean")) == 0
    return path, load(tmp / "clean" / "kr")


@pytest.mark.parametrize("fault", [
    "chunk_end:2",  # between chunks, after the second chunk's progress is recorded
    "write_parquet:3",  # inside the first metrics part of chunk 1 (parts 1-2 are the cells' step 0)
    "checkpoint:2",  # while orbax writes chunk 2's checkpoint
])  # (a failed JSON progress write, and its resume, is in the read-only disk test below)
def test_a_kill_at_any_point_resumes_to_identical_tables(sweep_file, tmp_path, capsys, fault):
    path, (clean_metrics, clean_summary) = sweep_file
    killed = subprocess.run([sys.executable, "-m", "timsim.cli", *_sweep_argv(path, tmp_path)],
                            env={**ENV, faults.FAULT_ENV: fault}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    load(tmp_path / "kr")  # what a kill leaves is readable, never torn
    groups = Store(tmp_path / "kr").read_manifest()["groups"]
    assert not all(g["status"] == "done" for g in groups.values()), "the kill came before the end"
    assert cli.main(_sweep_argv(path, tmp_path)) == 0
    assert not _temporaries(tmp_path / "kr"), "the resumed run removed what the kill left half-written"
    metrics, summary = load(tmp_path / "kr")
    pd.testing.assert_frame_equal(clean_metrics, metrics, check_exact=True)
    pd.testing.assert_frame_equal(clean_summary, summary, check_exact=True)
    # a rerun of the finished sweep recomputes nothing
    assert cli.main(_sweep_argv(path, tmp_path)) == 0
    assert "finished cell(s) kept" in capsys.readouterr().out


@pytest.mark.parametrize("fault, words", [("write_parquet:4:enospc", "No space left on device"),
                                          ("write_bytes:6:erofs", "Read-only file system")])
def test_a_full_or_read_only_disk_is_a_clear_error_and_resumable(sweep_file, tmp_path, capsys, monkeypatch, fault,
                                                                  words):
    path, (clean_metrics, clean_summary) = sweep_file
    monkeypatch.setenv(faults.FAULT_ENV, fault)
    faults.reset()
    assert cli.main(_sweep_argv(path, tmp_path)) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert words in out and "rerun the same command to resume" in out and "Traceback" not in out
    assert not _temporaries(tmp_path / "kr"), "a failed write leaves no temporary file"
    load(tmp_path / "kr")  # the state before the failed write is readable
    monkeypatch.delenv(faults.FAULT_ENV)
    assert cli.main(_sweep_argv(path, tmp_path)) == 0
    metrics, summary = load(tmp_path / "kr")
    pd.testing.assert_frame_equal(clean_metrics, metrics, check_exact=True)
    pd.testing.assert_frame_equal(clean_summary, summary, check_exact=True)


def test_a_second_process_on_the_same_results_directory_is_refused(sweep_file, tmp_path, capsys):
    """Another process holds the directory (as a running sweep does): this one stops at once
    with a clear error and writes nothing; once the holder exits, the directory is free."""
    path, _ = sweep_file
    root = tmp_path / "kr"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from timsim.store import Store\n"
                               f"with Store({str(root)!r}).lock():\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(_sweep_argv(path, tmp_path)) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"pid {holder.pid}" in out and "in use" in out
        assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME], "nothing written beside the holder"
    finally:
        holder.communicate("")
    with Store(root).lock():  # released when the holder exited
        pass


def test_restart_clears_everything_but_the_lock_it_holds(tmp_path):
    store = Store(tmp_path / "r")
    with store.lock():
        (store.root / "metrics").mkdir()
        (store.root / "metrics" / "part-a-00001.parquet").write_bytes(b"old")
        (store.root / "manifest.json").write_text("{}")
        store.clear()
        assert [p.name for p in store.root.iterdir()] == [LOCK_NAME]
        with store.lock():  # re-entrant within the holding process (the finder's rounds)
            pass


def test_a_run_is_independent_of_its_neighbours_even_a_non_finite_one(tiny_overrides, tiny_base, tmp_path):
    """Same program, same run-axis width (DESIGN §8.2): the first and last runs come out bit
    for bit the same whether the middle run trains normally or blows up (lr 1e30 -> inf
    weights -> NaN losses). The blown-up run is recorded as collapsed with its non-finite
    steps; the sweep finishes. (Checked with the CPU default, lax.map over runs; vmap passed the
    same check when it was written.)"""
    base = tiny_overrides + ["run.seeds=[0]"]

    def cells(middle_lr):
        return [Cell("a", load_config(None, base)), Cell("b", load_config(None, base + [f"grpo.lr={middle_lr}"])),
                Cell("c", load_config(None, base + ["run.seeds=[1]"]))]

    sound = run_cells(cells(3e-3), Store(tmp_path / "sound"))
    broken = run_cells(cells(1e30), Store(tmp_path / "broken"))
    m_sound, _ = load(tmp_path / "sound")
    m_broken, _ = load(tmp_path / "broken")
    for cell in ("a", "c"):
        pd.testing.assert_frame_equal(m_sound[m_sound.cell_id == cell].reset_index(drop=True),
                                      m_broken[m_broken.cell_id == cell].reset_index(drop=True), check_exact=True)
    bad = broken.set_index("cell_id").loc["b"]
    assert bad.nonfinite_steps > 0 and bad.collapsed == 1.0
    assert sound.set_index("cell_id").loc["b"].nonfinite_steps == 0


@pytest.mark.parametrize("name", ["../up", "a/b", "", ".hidden", "..", "/abs"])
def test_names_that_would_leave_the_results_root_are_refused(tiny_cfg, tmp_path, name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, [f"run.name={name!r}"] if name else ["run.name=''"])
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "config": {"run": {"steps": 10, "chunk_steps": 5}}}))
    with pytest.raises(ConfigError, match="name"):
        load_plan(spec)
    with pytest.raises(ConfigError, match="cell name"):
        run_cells([Cell(name, tiny_cfg)], Store(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_a_symlink_cannot_lead_a_name_outside_the_root(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    assert inside(root, "ok") == root / "ok"
    with pytest.raises(ConfigError, match="outside the results root"):
        inside(root, "link")
