"""Objective-effect probes: exactly no effect at zero mismatch, a measured one under mismatch."""

import jax
import numpy as np
import pytest

from timsim.config import ConfigError, load_config, static_view
from timsim.probes import PROBE_METRICS, make_probe
from timsim.plan import stack_hyperparams
from timsim.plan import Cell


def _probe(cfg, tiny_base):
    graphdef, params, _ = tiny_base
    hp, _ = stack_hyperparams([Cell("c", cfg)])
    params_R = jax.tree.map(lambda x: np.broadcast_to(x, (hp.seed.shape[0], *x.shape)), params)
    probe = make_probe(static_view(cfg), cfg.task.build(), graphdef)
    return jax.device_get(probe(params_R, np.zeros(hp.seed.shape[0], np.int32), hp, params))


@pytest.mark.parametrize("extra", [[], ["perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.scale=0"],
                                   ["correction.kinds=[token_tis,seq_mask]"]])
@pytest.mark.bits
def test_probe_difference_is_exactly_zero_at_zero_mismatch(tiny_overrides, tiny_base, extra):
    """DESIGN §8.1: assert the difference of the two update vectors is exactly zero."""
    out = _probe(load_config(None, tiny_overrides + extra), tiny_base)
    assert set(out) == set(PROBE_METRICS)
    for mode in ("recompute", "bypass"):
        for name in ("rel_diff", "diff_proj_pos", "diff_proj_neg"):
            assert np.all(out[f"probe_{mode}_{name}"] == 0.0), (mode, name)
        np.testing.assert_allclose(out[f"probe_{mode}_cos"], 1.0, atol=1e-5)
        np.testing.assert_allclose(out[f"probe_{mode}_proj"], 1.0, atol=1e-5)


def test_probe_sees_the_mismatch_and_its_parts_add_up(tiny_overrides, tiny_base):
    out = _probe(load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian",
                                                     "perturbation.logit_noise.scale=1.0"]), tiny_base)
    for mode in ("recompute", "bypass"):
        assert np.all(out[f"probe_{mode}_rel_diff"] > 1e-3) and np.all(out[f"probe_{mode}_cos"] < 1.0)
        # the A > 0 and A < 0 parts are the whole policy gradient (no entropy or KL term here)
        np.testing.assert_allclose(out[f"probe_{mode}_diff_proj_pos"] + out[f"probe_{mode}_diff_proj_neg"],
                                   out[f"probe_{mode}_proj"] - 1.0, atol=1e-4)


def test_probe_every_must_fall_on_chunk_boundaries():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.chunk_steps=50", "run.probe_every=30"])
    assert "`run.probe_every`" in str(err.value) or "run.probe_every" in str(err.value)


def test_a_run_records_probes_at_probe_steps_only(tiny_overrides, tmp_path):
    from timsim.executors import run_cells
    from timsim.store import Store, load

    cfg = load_config(None, tiny_overrides + ["run.probe_every=10", "perturbation.logit_noise.family=gaussian",
                                              "perturbation.logit_noise.scale=0.5"])
    run_cells([Cell("c", cfg)], Store(tmp_path / "probe"))
    metrics, _ = load(tmp_path / "probe")
    probed = metrics.dropna(subset=["probe_bypass_cos"])
    assert sorted(probed["step"].unique()) == [0, 10]  # step 0 and every probe_every steps, not step 5
    assert np.all(probed["probe_bypass_rel_diff"] > 0) and np.all(probed["probe_recompute_rel_diff"] > 0)
