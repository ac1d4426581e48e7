"""Shared fixtures: one tiny base policy per test session (DESIGN §8.6)."""

import pytest

import timsim
from timsim.config import load_config

# The explicit determinism setup the API and CLI make (tests also drive the lower layers directly).
timsim.setup()

TINY = [
    "task.name=sort", "task.n_digits=4", "task.eval_prompts=128",
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_mlp=64", "model.max_len=12",
    "pretrain.target_accuracy=0.25", "pretrain.eval_every=25", "pretrain.batch_size=64", "pretrain.lr=3e-3",
    "grpo.prompts_per_step=16", "grpo.group_size=8", "grpo.lr=1e-3",
    "run.steps=10", "run.chunk_steps=5", "run.seeds=[0,1]",
]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(scope="session")
def tiny_overrides(base_dir):
    return TINY + [f"pretrain.cache_dir={base_dir}"]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    return load_config(None, tiny_overrides)


@pytest.fixture(scope="session")
def tiny_base(tiny_cfg):
    from timsim.base import get_base

    return get_base(tiny_cfg, announce=lambda msg: None)
