"""Precision sites and weight noise on the sampler side."""

import jax
import numpy as np
import pytest
from flax import nnx

from timsim.calibrate import hyperparams, make_measure
from timsim.config import load_config
from timsim.model import response_logits
from timsim.numerics import Numerics
from test_core import _train_chunks


@pytest.fixture(scope="module")
def batch(tiny_cfg, tiny_base):
    graphdef, params, _ = tiny_base
    prompts = tiny_cfg.task.build().sample(jax.random.key(0), 32)
    responses = tiny_cfg.task.build().target(prompts, tiny_cfg.response_len)
    return nnx.merge(graphdef, params), prompts, responses


def test_bf16_rounding_survives_jit(batch):
    """The compiled program really contains the rounding (an astype round trip could vanish)."""
    model, prompts, responses = batch
    fn = jax.jit(lambda p, r: response_logits(model, p, r, Numerics("bf16")))
    hlo = fn.lower(prompts, responses).compile().as_text()
    assert "reduce-precision" in hlo
    clean = jax.jit(lambda p, r: response_logits(model, p, r)).lower(prompts, responses).compile().as_text()
    assert "reduce-precision" not in clean


@pytest.mark.parametrize("dtype, mantissa_bits", [("bf16", 7), ("fp16", 10)])
def test_logit_rounding_is_within_the_format_bound(batch, dtype, mantissa_bits):
    model, prompts, responses = batch
    clean = np.asarray(jax.jit(lambda: response_logits(model, prompts, responses))())
    rounded = np.asarray(jax.jit(lambda: response_logits(model, prompts, responses, Numerics(dtype, ("logits",))))())
    err = np.abs(rounded - clean)
    assert err.max() > 0, "the rounding changed something"
    assert np.all(err <= 2.0 ** -(mantissa_bits + 1) * np.abs(clean) + 1e-30)


def _kl(cfg_overrides, tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + cfg_overrides)
    got = make_measure(cfg, tiny_base[0])(tiny_base[1], hyperparams(cfg, 0.0))
    return float(got["kl_sampler_learner"])


def test_fp16_mismatch_is_smaller_than_bf16(tiny_overrides, tiny_base):
    bf16 = _kl(["perturbation.sampler_precision.dtype=bf16"], tiny_overrides, tiny_base)
    fp16 = _kl(["perturbation.sampler_precision.dtype=fp16"], tiny_overrides, tiny_base)
    assert 0 < fp16 < bf16


def test_same_numerics_on_both_sides_is_no_mismatch(tiny_overrides, tiny_base):
    both = ["perturbation.sampler_precision.dtype=bf16", "perturbation.learner_precision.dtype=bf16"]
    assert _kl(both, tiny_overrides, tiny_base) == 0.0


def test_weight_noise_creates_mismatch_and_scale_zero_does_not(tiny_overrides, tiny_base):
    noisy = _kl(["perturbation.weight_noise.family=gaussian", "perturbation.weight_noise.scale=0.05"],
                tiny_overrides, tiny_base)
    assert noisy > 0
    cfg = load_config(None, tiny_overrides + ["perturbation.weight_noise.family=gaussian"])
    _, metrics = _train_chunks(cfg, *tiny_base[:2], 1)
    assert np.all(metrics["delta_abs_max"] == 0.0)


def test_bf16_sampler_run_reports_mismatch(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["perturbation.sampler_precision.dtype=bf16"])
    _, metrics = _train_chunks(cfg, *tiny_base[:2], 1)
    assert np.all(metrics["kl_sampler_learner"] > 0)
    assert np.all(np.isfinite(metrics["loss"]))
