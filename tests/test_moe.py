"""Mixture-of-experts policy, router perturbation, routing metrics and R2/R3 replay."""

import numpy as np
import pytest

from timsim.config import ConfigError, load_config
from test_core import assert_same_training, train_metrics

MOE = ["model.experts=4", "model.expert_top_k=2", "pretrain.max_steps=50", "run.steps=5", "run.chunk_steps=5"]
NOISE = ["perturbation.router_noise.family=gaussian"]


@pytest.fixture(scope="module")
def moe_base(tiny_overrides):
    from timsim.base import get_base

    return get_base(load_config(None, tiny_overrides + MOE), announce=lambda msg: None)


def _run(tiny_overrides, moe_base, extra):
    return train_metrics(load_config(None, tiny_overrides + MOE + extra), moe_base)[1]


@pytest.mark.bits
def test_zero_mismatch_moe_is_exact_and_agrees_on_every_route(tiny_overrides, moe_base):
    m = _run(tiny_overrides, moe_base, [])
    assert np.all(m["delta_abs_max"] == 0.0)
    assert np.all(m["route_flip_frac"] == 0.0) and np.all(m["route_any_layer_frac"] == 0.0)
    assert np.all(np.isfinite(m["loss"]))


@pytest.mark.bits
def test_zero_router_noise_flips_nothing_and_r3_is_then_the_identity(tiny_overrides, moe_base):
    plain = _run(tiny_overrides, moe_base, NOISE + ["perturbation.router_noise.scale=0"])
    replayed = _run(tiny_overrides, moe_base, NOISE + ["perturbation.router_noise.scale=0",
                                                        "correction.routing_replay=r3"])
    assert np.all(plain["route_flip_frac"] == 0.0) and np.all(plain["delta_abs_max"] == 0.0)
    assert_same_training(plain, replayed)


def test_router_noise_flips_experts_and_r3_removes_every_flip(tiny_overrides, moe_base):
    noisy = NOISE + ["perturbation.router_noise.scale=1.0"]
    plain = _run(tiny_overrides, moe_base, noisy)
    assert np.all(plain["route_flip_frac"] > 0.01) and np.all(plain["delta_abs_mean"] > 0.0)
    assert np.all(plain["route_any_layer_frac"] >= plain["route_flip_l0"])
    # the decode path and the teacher-forced forward draw the same router noise per position
    assert np.all(plain["delta_floor_max"] < 1e-3)
    r3 = _run(tiny_overrides, moe_base, noisy + ["correction.routing_replay=r3"])
    assert np.all(r3["route_flip_frac"] == 0.0) and np.all(r3["route_any_layer_frac"] == 0.0)
    assert np.all(r3["delta_abs_mean"] < plain["delta_abs_mean"])  # only the gates' values still differ
    r2 = _run(tiny_overrides, moe_base, noisy + ["correction.routing_replay=r2"])
    assert np.all(r2["route_flip_frac"] > 0.01)  # R2 fixes the update's routing, not the sampler's


@pytest.mark.parametrize("override, field", [
    (["correction.routing_replay=r3"], "correction.routing_replay"),
    (["perturbation.router_noise.family=gaussian"], "perturbation.router_noise.family"),
    (["model.experts=2", "model.expert_top_k=3"], "model.expert_top_k"),
    (["model.experts=4", "model.expert_top_k=0"], "model.expert_top_k"),
])
def test_bad_moe_settings_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert field in str(err.value)


def test_router_noise_calibrates_to_a_kl_target(tiny_overrides, moe_base):
    """With router noise as the only scaled source, perturbation.target sets its scale."""
    from timsim.loop import resolve_targets
    from timsim.plan import Cell

    cfg = load_config(None, tiny_overrides + MOE + NOISE + ["perturbation.target.token_kl=0.01"])
    assert cfg.perturbation.scale_key == "perturbation.router_noise.scale"
    (cell,), report = resolve_targets([Cell("c", cfg)], *moe_base[:2])
    assert cell.cfg.perturbation.router_noise.scale == report["c"]["scale"] > 0
    assert abs(report["c"]["achieved"] / 0.01 - 1) < 0.05
