"""Base policy checkpoints: reuse, and clear errors for missing, corrupt or mismatched ones."""

import json
import shutil

import jax
import numpy as np
import pytest

from timsim.base import CheckpointError, base_key, base_path, get_base, load_base
from timsim.cli import main
from timsim.config import load_config


def test_base_is_reused_not_retrained(tiny_cfg, tiny_base):
    announced = []
    graphdef, params, info = get_base(tiny_cfg, announce=announced.append)
    assert announced == [], "an existing base must be restored, not pretrained again"
    assert info == tiny_base[2]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny_base[1])):
        assert np.array_equal(a, b)


def test_a_base_pretrained_by_other_code_says_so_when_reused(tiny_overrides, tiny_cfg, tiny_base, tmp_path):
    """The base key leaves the code out, so a base outlives an upgrade; reusing one that other
    code pretrained must say so (its runs are not bit-identical to a fresh base's) and name the
    fields that differ and what to delete."""
    assert tiny_base[2]["pretrained_by"]["jax"] == jax.__version__
    cfg = load_config(None, tiny_overrides + [f"pretrain.cache_dir={tmp_path}"])
    shutil.copytree(base_path(tiny_cfg), base_path(cfg))
    info_file = base_path(cfg) / "base.json"
    info = json.loads(info_file.read_text())
    info["pretrained_by"] = {**info["pretrained_by"], "jax": "0.0.1", "git_commit": "0123abc"}
    info_file.write_text(json.dumps(info))
    announced = []
    _, params, _ = get_base(cfg, announce=announced.append)
    assert len(announced) == 1 and "jax 0.0.1 (now " in announced[0] and str(base_path(cfg)) in announced[0]
    assert ("git_commit 0123abc" in announced[0]) == (tiny_base[2]["pretrained_by"]["git_commit"] is not None)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny_base[1])):
        assert np.array_equal(a, b), "the weights are reused as they are"
    del info["pretrained_by"]
    info_file.write_text(json.dumps(info))
    announced.clear()
    get_base(cfg, announce=announced.append)
    assert len(announced) == 1 and "recorded no provenance" in announced[0]


def test_base_reached_partial_competence(tiny_cfg, tiny_base):
    info = tiny_base[2]
    assert info["reached_target"] and info["greedy_accuracy"] >= tiny_cfg.pretrain.target_accuracy
    assert info["greedy_accuracy"] < 1.0
    assert 0.0 <= info["sampled_accuracy"] <= 1.0


def test_base_key_depends_on_what_determines_the_weights(tiny_overrides):
    key = base_key(load_config(None, tiny_overrides))
    assert key == base_key(load_config(None, tiny_overrides + ["grpo.lr=1e-2", "run.seeds=[5]"]))
    assert key != base_key(load_config(None, tiny_overrides + ["pretrain.seed=1"]))
    assert key != base_key(load_config(None, tiny_overrides + ["model.d_mlp=32"]))
    assert key == base_key(load_config(None, tiny_overrides + ["pretrain.stop_on=greedy"]))  # the default
    assert key != base_key(load_config(None, tiny_overrides + ["pretrain.stop_on=sampled"]))


def test_pretraining_can_stop_on_the_sampled_accuracy(tiny_overrides):
    """`pretrain.stop_on=sampled` stops at the first evaluation whose T = 1 accuracy (the reward
    rate GRPO starts from) reaches the target, however far greedy accuracy has gone."""
    from timsim.base import pretrain

    seen = []
    cfg = load_config(None, tiny_overrides + ["pretrain.stop_on=sampled", "pretrain.target_accuracy=0.05"])
    _, info = pretrain(cfg, progress=seen.append)
    assert info["reached_target"] and info["sampled_accuracy"] >= 0.05
    assert all(s["sampled_accuracy"] < 0.05 for s in seen[:-1]) and seen[-1]["steps"] == info["steps"]


def test_other_shape_gives_a_clear_error(tiny_overrides, tiny_cfg, tiny_base):
    other = load_config(None, tiny_overrides + ["model.d_mlp=32"])
    with pytest.raises(CheckpointError, match="cannot be restored for model"):
        load_base(other, base_path(tiny_cfg))


def test_missing_checkpoint_gives_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="No base checkpoint"):
        load_base(tiny_cfg, tmp_path / "nothing")


def test_corrupt_checkpoint_gives_a_clear_error(tiny_cfg, tiny_base, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(base_path(tiny_cfg), copy)
    (copy / "base.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_base(tiny_cfg, copy)
    (copy / "base.json").write_text(json.dumps(tiny_base[2]))
    shutil.rmtree(copy / "params")
    with pytest.raises(CheckpointError):
        load_base(tiny_cfg, copy)


def test_cli_reports_bad_config_without_traceback(capsys):
    assert main(["train", "configs/quickstart.yaml", "grpo.group_size=1"]) == 2
    out = capsys.readouterr().out
    assert "grpo.group_size" in out and "Traceback" not in out


def test_cli_help_says_what_to_run_first(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "timsim train configs/quickstart.yaml" in capsys.readouterr().out
