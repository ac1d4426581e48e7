"""Tests for timsim/config.py: loading, overrides, validation messages, static / traced split."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from timsim import config as C
from timsim import tasks as T
from timsim.grpo import ADVANTAGES, AGGREGATIONS, LOSSES
from timsim.kl import KL_ESTIMATORS

REPO = Path(__file__).resolve().parents[1]


def _error(path=None, overrides=None) -> str:
    with pytest.raises(C.ConfigError) as err:
        C.load_config(path, overrides)
    # Reported as one paragraph, not a chained traceback.
    assert err.value.__cause__ is None
    return str(err.value)


# ----------------------------------------------------------------------------- loading


def test_defaults_load():
    cfg = C.load_config(None)
    assert isinstance(cfg, C.Config)
    assert cfg == C.Config()
    assert cfg.task.name == "add" and cfg.task.n_digits == 3
    assert cfg.grpo.lr == 3e-4 and cfg.grpo.group_size == 8 and cfg.grpo.advantage == "zscore"
    assert cfg.sampler.temperature == 1.0 and cfg.sampler.max_response_len is None
    assert cfg.run.seeds == [0]
    assert cfg.run.steps % cfg.run.chunk_steps == 0
    # Default response length: answer + <eos>.
    assert cfg.response_len == T.make_task("add", n_digits=3).answer_len + 1 == 5
    assert C.load_config(None, []) == cfg


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"name": "modmul", "n_digits": 2, "modulus": 13},
        "grpo": {"lr": 5e-4, "group_size": 4},
        "run": {"name": "exp", "steps": 100, "chunk_steps": 25},
    }))
    cfg = C.load_config(path, ["grpo.lr=1e-3", "run.seeds=[0,1]", "sampler.temperature=0.7"])
    assert cfg.task.name == "modmul" and cfg.task.n_digits == 2 and cfg.task.modulus == 13
    assert cfg.grpo.lr == pytest.approx(1e-3)  # override beats the file
    assert isinstance(cfg.grpo.lr, float)
    assert cfg.grpo.group_size == 4  # from the file
    assert cfg.run.seeds == [0, 1]
    assert cfg.sampler.temperature == pytest.approx(0.7)
    assert cfg.run.name == "exp" and cfg.run.steps == 100 and cfg.run.chunk_steps == 25
    assert cfg.model == C.ModelConfig()  # untouched sections keep their defaults
    assert cfg.grpo.advantage == "zscore"
    # The same config from a str path, and the file alone without overrides.
    assert C.load_config(str(path), ["grpo.lr=1e-3", "run.seeds=[0,1]", "sampler.temperature=0.7"]) == cfg
    assert C.load_config(path).grpo.lr == pytest.approx(5e-4)


def test_overrides_without_file_and_with_spaces():
    cfg = C.load_config(None, ["grpo.lr = 0.002", "task.name=reverse", "task.n_digits=5", "grpo.advantage=rloo"])
    assert cfg.grpo.lr == pytest.approx(2e-3)
    assert cfg.task.name == "reverse" and cfg.task.n_digits == 5
    assert cfg.grpo.advantage == "rloo"
    assert cfg.response_len == 6


def test_quickstart_config_loads():
    cfg = C.load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.task.name == "add" and cfg.task.n_digits == 3
    assert cfg.model.max_len == 16
    assert cfg.run.seeds == [0, 1] and cfg.run.name == "quickstart"


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert C.load_config(path) == C.Config()


def test_to_yaml_round_trips(tmp_path):
    cfg = C.load_config(None, ["grpo.lr=1e-3", "run.seeds=[3,4]", "task.name=count", "task.n_digits=12"])
    path = tmp_path / "resolved.yaml"
    path.write_text(C.to_yaml(cfg))
    assert C.load_config(path) == cfg


def test_parse_overrides():
    parsed = C.parse_overrides(["grpo.lr=1e-3", "run.seeds=[0,1]", "task.name=sort", "task.partial_credit=true"])
    assert parsed["run.seeds"] == [0, 1]
    assert parsed["task.name"] == "sort"
    assert parsed["task.partial_credit"] is True
    assert float(parsed["grpo.lr"]) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize("overrides,must_contain", [
    (["grpo.lrr=1"], ["grpo.lrr", "unknown key"]),
    (["nosection.x=1"], ["nosection", "unknown key"]),
    (["grpo.group_size=abc"], ["grpo.group_size", "abc"]),
    (["grpo.group_size=1"], ["grpo.group_size"]),
    (["grpo.lr=-1"], ["grpo.lr"]),
    (["correction.bypass_weights=multiply"], ["correction.bypass_weights", "grpo.old_logprobs='recompute'",
                                               "token_tis"]),
    (["grpo.old_logprobs=bypass", "correction.kinds=[seq_mask]", "correction.bypass_weights=multiply"],
     ["correction.bypass_weights", "seq_mask"]),
    (["correction.bypass_weights=twice"], ["correction.bypass_weights", "replace", "multiply"]),
    (["model.max_len=5"], ["model.max_len"]),
    (["task.name=nope"], ["task.name", "nope", *T.TASKS]),
    (["grpo.advantage=zz"], ["grpo.advantage", "'zz'", ", ".join(ADVANTAGES)]),
    (["grpo.loss=zz"], ["grpo.loss", "'zz'", ", ".join(LOSSES)]),
    (["grpo.loss_agg=zz"], ["grpo.loss_agg", ", ".join(AGGREGATIONS)]),
    (["grpo.kl_ref=k4"], ["grpo.kl_ref", ", ".join(KL_ESTIMATORS)]),
    (["correction.kinds=[kl_rejection]", "correction.kl_estimator=k4"], ["correction.kl_estimator", "k1, k2, k3"]),
    (["run.steps=301"], ["run.steps", "run.chunk_steps"]),
    (["run.steps=100", "run.chunk_steps=30"], ["run.steps", "run.chunk_steps"]),
    (["task.n_digits=9"], ["task.n_digits"]),  # add allows at most 8
    (["task.name=modmul", "task.n_digits=5"], ["task.n_digits"]),
    (["task.name=modmul", "task.modulus=20000"], ["task.modulus"]),
    (["task.modulus=1"], ["task.modulus"]),
    (["sampler.temperature=0"], ["sampler.temperature"]),
    (["sampler.max_response_len=2"], ["sampler.max_response_len"]),
    (["grpo.minibatches=3"], ["grpo.minibatches"]),
    (["model.n_heads=3"], ["model.n_heads"]),
    (["run.seeds=[]"], ["run.seeds"]),
    (["run.batching=pmap"], ["run.batching"]),
    (["grpo.clip_eps_low=1.0"], ["grpo.clip_eps_low"]),
    (["task.eval_prompts=4"], ["task.eval_prompts"]),
    (["grpo.lr=1", "grpo.lr.x=2"], ["grpo.lr"]),  # a value used as a section
    (["grpo.reward_wrong=-1"], ["grpo.reward_wrong", "has no effect", "zscore"]),  # z-scoring undoes the pair
    (["grpo.advantage=none", "grpo.reward_wrong=1"], ["grpo.reward_correct", "grpo.reward_wrong", "greater"]),
    (["perturbation.frozen_sampler=true", "perturbation.lag_steps=2"], ["perturbation.frozen_sampler",
                                                                         "perturbation.lag_steps"]),
])
def test_bad_values_raise_config_error_naming_the_field(overrides, must_contain):
    msg = _error(None, overrides)
    for text in must_contain:
        assert text in msg, f"{text!r} not in {msg!r}"


def test_unknown_task_message_lists_accepted_names():
    msg = _error(None, ["task.name=nope"])
    assert "accepted" in msg
    assert ", ".join(T.TASKS) in msg


def test_error_in_file_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  group_size: 1\n")
    msg = _error(path)
    assert "grpo.group_size" in msg and str(path) in msg


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  lrr: 0.1\n")
    assert "grpo.lrr" in _error(path)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _error(missing)
    assert str(missing) in msg and "does not exist" in msg


def test_config_path_that_is_a_directory(tmp_path):
    assert str(tmp_path) in _error(tmp_path)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("grpo: [unclosed\n")
    msg = _error(path)
    assert str(path) in msg and "YAML" in msg


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    msg = _error(path)
    assert "mapping" in msg and "list" in msg


@pytest.mark.parametrize("override", ["grpo.lr", "=3", ""])
def test_malformed_override_without_equals(override):
    msg = _error(None, [override])
    assert repr(override) in msg
    assert "dotted.key=value" in msg


def test_config_error_is_a_value_error():
    assert issubclass(C.ConfigError, ValueError)


# ----------------------------------------------------------------------------- immutability


def test_config_objects_are_immutable():
    cfg = C.load_config(None)
    with pytest.raises(pydantic.ValidationError):
        cfg.grpo.lr = 1.0
    with pytest.raises(pydantic.ValidationError):
        cfg.grpo = C.GRPOConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.task.name = "sort"
    assert cfg.grpo.lr == 3e-4 and cfg.task.name == "add"
    hash(cfg.grpo)  # frozen sections are hashable


# ----------------------------------------------------------------------------- static / traced


STATIC_KEYS = ["grpo.group_size", "grpo.prompts_per_step", "grpo.advantage", "grpo.epochs", "task.n_digits",
               "task.name", "model.max_len", "model.d_model", "sampler.max_response_len", "run.steps"]


def test_traced_keys():
    keys = C.traced_keys()
    assert "grpo.lr" in keys and "sampler.temperature" in keys
    for key in ("grpo.clip_eps_low", "grpo.clip_eps_high", "grpo.kl_coef", "grpo.entropy_coef",
                "grpo.weight_decay", "grpo.max_grad_norm"):
        assert key in keys
    for key in STATIC_KEYS:
        assert key not in keys
    assert len(keys) == len(set(keys))


def test_traced_values():
    cfg = C.load_config(None, ["grpo.lr=1e-3", "sampler.temperature=0.5", "grpo.kl_ref=k3", "grpo.kl_coef=0.1"])
    values = C.traced_values(cfg)
    assert set(values) == set(C.traced_keys())
    assert values["grpo.lr"] == pytest.approx(1e-3) == cfg.grpo.lr
    assert values["sampler.temperature"] == 0.5
    assert values["grpo.kl_coef"] == pytest.approx(0.1)
    assert all(isinstance(v, float) for v in values.values())
    for key, value in values.items():
        assert C.get_dotted(cfg, key) == value


def test_host_values_select_no_program_and_reach_none():
    """A calibration target is resolved on the host: cells that differ only by it share a program."""
    host = C.traced_keys(kind=C.HOST)
    assert "perturbation.target.token_kl" in host and not set(host) & set(C.traced_keys())
    a = C.load_config(None, ["perturbation.logit_noise.family=gaussian", "perturbation.target.token_kl=1e-3"])
    b = C.load_config(None, ["perturbation.logit_noise.family=gaussian", "perturbation.target.seq_kl=0.5",
                             "perturbation.target.track=every_chunk"])
    assert C.static_hash(a) == C.static_hash(b)
    assert C.traced_values(a) == C.traced_values(b)


@pytest.mark.parametrize("overrides, match", [
    (["perturbation.target.token_kl=1e-3", "perturbation.target.seq_kl=1"], "set one target metric"),
    (["perturbation.target.seq_kl=1", "perturbation.target.equivalent_length=4096"], "use it with token_kl"),
    (["perturbation.target.token_kl=-1"], "perturbation.target.token_kl"),
    (["perturbation.target.track=always"], "perturbation.target.track"),
])
def test_bad_targets_name_the_field(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(None, ["perturbation.logit_noise.family=gaussian"] + overrides)


def test_equivalent_length_arithmetic():
    cfg = C.load_config(None, ["perturbation.logit_noise.family=gaussian", "perturbation.target.token_kl=1e-3",
                               "perturbation.target.equivalent_length=4096"])
    metric, value = cfg.perturbation.target.resolved()
    assert metric == "seq_kl" and value == pytest.approx(4.096)


def test_static_view_blanks_traced_fields():
    cfg = C.load_config(None, ["grpo.lr=1e-3", "run.seeds=[0,1]", "grpo.group_size=4"])
    view = C.static_view(cfg)
    for key in C.traced_keys():
        assert C.get_dotted(view, key) is None, key
    assert view.run.seeds == []
    for key in STATIC_KEYS:
        assert C.get_dotted(view, key) == C.get_dotted(cfg, key), key
    assert view.grpo.group_size == 4
    # The original is untouched.
    assert cfg.grpo.lr == pytest.approx(1e-3) and cfg.run.seeds == [0, 1]


def test_static_hash_ignores_traced_fields_seeds_and_names():
    base = C.static_hash(C.load_config(None))
    assert isinstance(base, str) and len(base) == 12
    assert C.static_hash(C.load_config(None)) == base  # deterministic
    for override in (["grpo.lr=1e-3"], ["sampler.temperature=0.5"], ["grpo.clip_eps_high=0.28"],
                     ["run.seeds=[0,1,2]"], ["run.name=other"], ["run.out_dir=/tmp/x"],
                     ["pretrain.cache_dir=/tmp/bases"]):
        assert C.static_hash(C.load_config(None, override)) == base, override


def test_static_hash_changes_with_static_fields():
    base = C.static_hash(C.load_config(None))
    for override in (["grpo.group_size=4"], ["grpo.advantage=rloo"], ["task.n_digits=4"],
                     ["task.name=sort"], ["model.d_model=128"], ["sampler.max_response_len=6"],
                     ["run.steps=100"], ["grpo.old_logprobs=bypass"]):
        assert C.static_hash(C.load_config(None, override)) != base, override


def test_static_hash_lr_vs_group_size():
    a = C.load_config(None, ["grpo.lr=1e-3"])
    b = C.load_config(None, ["grpo.lr=2e-4"])
    c = C.load_config(None, ["grpo.lr=1e-3", "grpo.group_size=16"])
    assert C.static_hash(a) == C.static_hash(b)
    assert C.static_hash(a) != C.static_hash(c)
