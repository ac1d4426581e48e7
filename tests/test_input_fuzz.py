"""Malformed input, generated from the schema: every one is refused before any compute with
one paragraph that names the field, never a traceback.

The generator walks every field of `Config` and derives bad values from its type and its
declared bounds (wrong types, booleans for numbers, non-finite floats, fractions for
integers, values just outside each bound, unknown names, unsafe path names, repeated seeds),
adds a misspelt key per section, a valid but inert value for every knob the default config
cannot use, and malformed override syntax; then sweep and study files with bad top-level
values. `TIMSIM_FUZZ_LIMIT` caps how many inputs of each kind run (all by default)."""

from __future__ import annotations

import os
import random
import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel

from timsim import cli
from timsim.config import Config, ConfigError, load_config

LIMIT = int(os.environ.get("TIMSIM_FUZZ_LIMIT", "0")) or None


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _kinds(annotation) -> set[str]:
    """'float', 'int', 'bool', 'str', 'literal', 'list' (and 'none') in an annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {"literal"}
    if origin in (list, tuple):
        return {"list"}
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    return {{float: "float", int: "int", bool: "bool", str: "str", type(None): "none"}[annotation]}


def _bounds(field) -> list[tuple[str, float]]:
    out = []
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(at, attr.capitalize())):
                out.append((attr, getattr(m, attr)))
    return out


PATH_NAMES = ("../escape", "a/b", "", ".hidden", "-dash", "x" * 200)


def _bad_values(key: str, field) -> list:
    kinds = _kinds(field.annotation)
    bad: list = [{"a": 1}]  # a mapping where a value belongs
    if kinds & {"float", "int"}:
        bad += ["not-a-number", True, [1.0]]
        for attr, edge in _bounds(field):
            step = 1 if "int" in kinds and "float" not in kinds else max(abs(edge) * 0.5, 0.5)
            bad.append({"ge": edge - step, "gt": edge, "le": edge + step, "lt": edge}[attr])
    if "float" in kinds:
        bad += [".inf", "-.inf", ".nan"]
    if kinds == {"int"} or kinds == {"int", "none"}:
        bad += [1.5]
    if "bool" in kinds:
        bad += ["maybe", 2]
    if "literal" in kinds:
        bad += ["no-such-choice", 7]
    if kinds == {"str"}:
        bad += [[1]]
        if key == "run.name":
            bad += list(PATH_NAMES)
        elif key in ("task.name", "perturbation.logit_noise.family"):
            bad += ["no-such-name"]
    if "list" in kinds:
        bad += ["not-a-list", [{"a": 1}]]
        if key == "run.seeds":
            bad += [[1, 1], [], [True], [-1], [2**24], [0.5]]
        elif key == "correction.kinds":
            bad += [["no-such-correction"], ["token_tis", "token_tis"]]
        else:
            bad += [["no-such-site"], []]
    return bad


NON_FINITE = (".inf", "-.inf", ".nan")  # YAML's spellings: passed raw, they parse as float infinities and NaN


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _inert_candidates(value, annotation=None):
    if typing.get_origin(annotation) is typing.Literal:  # every other accepted value
        return [v for v in typing.get_args(annotation) if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, (int, float)):
        return [type(value)(v) for v in (value * 0.5, value + 1, value * 2, 1, 2, 0.5)
                if type(value)(v) != value]
    if isinstance(value, str):
        return ["context", "state", "every_chunk", "k1", "sum"]
    if isinstance(value, list):
        return [["logits"]]
    return ["examples/engine_pairs.profile.json", 1]  # None: an optional file or number


def _inert_overrides() -> list[list[str]]:
    """For every knob the default config cannot use: candidate settings of it (valid values
    other than the default)."""
    out = []
    default = Config()
    for key, field in _leaves(Config):
        *path, leaf = key.split(".")
        section = default
        for part in path:
            section = getattr(section, part)
        if leaf in section.inert_fields():
            out.append([f"{key}={_yaml(v)}" for v in _inert_candidates(getattr(section, leaf), field.annotation)])
    return out


def _field_cases() -> list[tuple[str, str]]:
    cases = []
    for key, field in _leaves(Config):
        for value in _bad_values(key, field):
            cases.append((key, f"{key}={value if value in NON_FINITE else _yaml(value)}"))
    sections = {key.rsplit(".", 1)[0] for key, _ in _leaves(Config) if "." in key}
    cases += [(f"{s}.no_such_knob", f"{s}.no_such_knob=1") for s in sorted(sections)]
    return cases


MALFORMED_OVERRIDES = ["run.seeds=[0,", "grpo.lr={", "=3", "grpo.lr", "grpo..lr=1", "run.name='x", "run.seeds=[0, 1",
                       "grpo.lr=1e-3: 2", "task=3", ".lr=1", "grpo.lr=\t[", "run.seeds=]"]


def _sample(cases: list, seed: int) -> list:
    if LIMIT is None or len(cases) <= LIMIT:
        return cases
    return random.Random(seed).sample(cases, LIMIT)


def _one_paragraph_error(argv: list[str], capsys) -> str:
    code = cli.main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2, f"{argv} was accepted (exit {code}):\n{text[-1500:]}"
    assert "Traceback" not in text, text
    assert text.strip().startswith("error:"), text
    assert "\n\n" not in text.strip(), f"not one paragraph:\n{text}"
    return " ".join(text.split())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "fuzz", "steps": 10, "chunk_steps": 5}}))
    return str(path)


def test_the_generator_covers_at_least_a_hundred_inputs():
    total = len(_field_cases()) + len(_inert_overrides()) + len(MALFORMED_OVERRIDES) + len(BAD_SWEEPS) + \
        len(BAD_STUDIES)
    assert total >= 100, total


def test_every_malformed_field_value_is_refused_naming_the_field(config_file, capsys):
    cases = _sample(_field_cases(), 0)
    for key, override in cases:
        with pytest.raises(ConfigError):  # refused before the CLI would start any compute
            load_config(config_file, [override])
        message = _one_paragraph_error(["train", config_file, override], capsys)
        assert f"`{key}`" in message or key in message, (override, message)


def test_every_knob_without_effect_is_refused(config_file, capsys):
    inert = _inert_overrides()
    assert len(inert) >= 20, "the default config has many knobs it cannot use"
    for candidates in _sample(inert, 1):
        key = candidates[0].split("=")[0]
        messages = []
        for override in candidates:
            try:
                load_config(config_file, [override])
            except ConfigError as err:
                messages.append(str(err))
                if "has no effect" in str(err):
                    message = _one_paragraph_error(["train", config_file, override], capsys)
                    assert f"`{key}`" in message and "has no effect" in message, message
                    break
            else:
                pytest.fail(f"{override} has no effect on the default config and was accepted")
        else:
            pytest.fail(f"no setting of {key} was refused as inert: {messages}")


def test_malformed_override_syntax_is_refused(config_file, capsys):
    for override in _sample(MALFORMED_OVERRIDES, 2):
        message = _one_paragraph_error(["train", config_file, override], capsys)
        assert "override" in message.lower() or "`" in message, message


TINY_CONFIG = {"run": {"steps": 10, "chunk_steps": 5}}
BAD_SWEEPS = [
    ({"grid": 5}, "grid"), ({"seeds": "x"}, "seeds"), ({"seeds": []}, "seeds"), ({"cells": [1]}, "cells"),
    ({"name": "../x"}, "name"), ({"name": ""}, "name"), ({"executor": "slurm"}, "executor"),
    ({"zip": {"grpo.lr": [1e-3], "grpo.clip_eps_low": [0.1, 0.2]}}, "zip"), ({"grid": {"grpo.nope": [1]}}, "grpo.nope"),
    ({"grid": {"grpo.lr": []}}, "grpo.lr"), ({"base": "missing.yaml"}, "base"), ({"grdi": {}}, "grdi"),
    ({"cells": {"..": {}}}, "cell name"), ({"cells": {"-x": {"grpo.lr": 1e-3}}, "name": "ok"}, "cell name"),
    ({"grid": {"grpo.lr": [".inf"]}}, "grpo.lr"), ({"grid": {"run.seeds": [[0]]}}, "seeds"),
    ({"seeds": [3, 3]}, "run.seeds"), ({"ray": {"num_cpus": 0}}, "num_cpus"),
    ({"config": {"grpo": {"lr": True}}}, "grpo.lr"), ({"cells": {"a": {"perturbation.logit_noise.scale": 0.5}}},
                                                      "perturbation.logit_noise.scale"),
]
BAD_STUDIES = [
    ({"variants": {"../up": {}}}, "run.name"), ({"variants": {"a": {}}, "finder": {"levels": "x"}}, "levels"),
    ({"variants": {"a": {}}, "finder": {"lvels": [0.1]}}, "lvels"), ({"variants": {"a": {}}, "name": "a/b"}, "name"),
    ({"variants": 3}, "variants"), ({"variants": {"a": {"grpo.lr": ".nan"}}}, "grpo.lr"),
]


@pytest.mark.parametrize("spec, field", BAD_SWEEPS, ids=[str(i) for i in range(len(BAD_SWEEPS))])
def test_bad_sweep_files_are_refused_naming_the_field(tmp_path, capsys, spec, field):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"config": TINY_CONFIG, **spec}))
    message = _one_paragraph_error(["sweep", str(path), "--dry-run", "--out-dir", str(tmp_path / "out")], capsys)
    assert field in message, message
    assert not (tmp_path / "out").exists(), "nothing is written for a refused sweep"


@pytest.mark.parametrize("spec, field", BAD_STUDIES, ids=[str(i) for i in range(len(BAD_STUDIES))])
def test_bad_study_files_are_refused_naming_the_field(tmp_path, capsys, spec, field):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"config": TINY_CONFIG, **spec}))
    message = _one_paragraph_error(["critical", str(path), "--out-dir", str(tmp_path / "out")], capsys)
    assert field in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "logp_sampler,logp_trainer\n", "a,b\n1,2\n", "logp_sampler,logp_trainer\nx,1\n",
                                     "logp_sampler,logp_trainer\n0.5,-1\n"])
def test_bad_profile_pairs_are_refused(tmp_path, capsys, content):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    _one_paragraph_error(["profile", str(path), "--out", str(tmp_path / "p.json")], capsys)


def test_results_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys, config_file):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the results directory should go")
    message = _one_paragraph_error(["train", config_file, f"run.out_dir={blocker}"], capsys)
    assert "blocker" in message
    assert Path(blocker).read_text().startswith("a file")
