"""Precision sites and weight noise on the sampler side."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from timsim import hyper
from timsim.calibration import hyperparams, make_measure
from timsim.config import load_config
from timsim.model import response_logits
from timsim.numerics import Numerics
from test_core import train_metrics


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


@pytest.mark.bits
def test_weight_noise_creates_mismatch_and_scale_zero_does_not(tiny_overrides, tiny_base):
    """One compiled measurement (the scale is traced): at 0.05 the sampler disagrees, at 0 it
    is the learner exactly, on every token of the batch."""
    cfg = load_config(None, tiny_overrides + ["perturbation.weight_noise.family=gaussian"])
    measure = make_measure(cfg, tiny_base[0])
    at = lambda scale: measure(tiny_base[1], hyper.replace(hyper.of(cfg), "perturbation.weight_noise.scale",  # noqa: E731
                                                           jnp.float32(scale)))
    noisy, zero = at(0.05), at(0.0)
    assert float(noisy["kl_sampler_learner"]) > 0 and float(noisy["delta_abs_max"]) > 0
    assert float(zero["delta_abs_max"]) == 0.0 and float(zero["kl_sampler_learner"]) == 0.0


def test_bf16_sampler_run_reports_mismatch(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["perturbation.sampler_precision.dtype=bf16"])
    _, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["kl_sampler_learner"] > 0)
    assert np.all(np.isfinite(metrics["loss"]))


def _dense_inputs(dtype, rows=64, depth=256, out=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, depth)).astype(dtype), rng.normal(size=(depth, out)).astype(dtype)


def test_split_k_is_exact_in_float64_and_differs_with_bf16_partials():
    with jax.enable_x64(True):
        x, w = _dense_inputs(np.float64)
        plain = np.asarray(jax.jit(Numerics().matmul)(x, w))
        split = np.asarray(jax.jit(Numerics(split_k=8).matmul)(x, w))
        np.testing.assert_allclose(split, x @ w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(plain, x @ w, rtol=0, atol=1e-12)
    x, w = _dense_inputs(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bf16 = np.asarray(jax.jit(Numerics(split_k=8, partials="bf16").matmul)(x, w))
    err = np.abs(bf16 - exact)
    assert err.max() > 1e-3, "bf16 partials must change the result"
    # each of the 8 partials is off by at most half a bf16 ulp of itself
    partials = np.abs(np.einsum("rck,ckm->crm", x.reshape(64, 8, 32), w.reshape(8, 32, 32)))
    assert np.all(err <= 2.0**-8 * partials.sum(0) + 1e-4)


def test_chunked_softmax_is_exact_in_float64_and_differs_with_bf16_block_sums():
    scores = np.random.default_rng(1).normal(size=(4, 2, 5, 23)) * 3
    with jax.enable_x64(True):
        chunked = np.asarray(jax.jit(Numerics(softmax_chunks=4).softmax)(scores))
        np.testing.assert_allclose(chunked, np.asarray(jax.nn.softmax(scores, -1)), rtol=1e-13, atol=0)
    bf16 = np.asarray(jax.jit(Numerics(softmax_chunks=4, partials="bf16").softmax)(scores.astype(np.float32)))
    assert np.abs(bf16 - np.asarray(jax.nn.softmax(scores, -1))).max() > 1e-4


def test_batch_variant_numerics_depend_on_the_batch_size():
    """batch_variant picks the split count from the row count, so the same 16 rows get other
    numbers in a batch of 4,096: every entry moves by bf16-partial rounding. Without it both
    sizes use the same split; what XLA's own fp32 kernels do at two shapes is not timsim's to
    promise (DESIGN §8.2: bits only at the same shapes), so that side is bounded in mean, where a
    rare last-bit flip of one partial cannot reach the variant's systematic change."""
    varying = Numerics(split_k=8, partials="bf16", batch_variant=True)
    fixed = Numerics(split_k=8, partials="bf16")
    assert (varying.splits_for(16, 256), varying.splits_for(4096, 256)) == (8, 2)
    assert (fixed.splits_for(16, 256), fixed.splits_for(4096, 256)) == (8, 8)
    x, w = _dense_inputs(np.float32, rows=4096)

    def gap(nm):
        small = np.asarray(jax.jit(nm.matmul)(x[:16], w))
        large = np.asarray(jax.jit(nm.matmul)(x, w))[:16]
        return np.abs(small - large)

    scale = np.abs(x[:16] @ w).mean()
    assert gap(varying).mean() > 1e-3 * scale, "a bf16 partial is off by ~2^-9 of itself"
    assert gap(fixed).mean() < gap(varying).mean() / 10


def test_reordered_sampler_forward_creates_mismatch(tiny_overrides, tiny_base):
    plain = _kl(["perturbation.sampler_precision.split_k=4"], tiny_overrides, tiny_base)
    bf16_partials = _kl(["perturbation.sampler_precision.split_k=4", "perturbation.sampler_precision.partials=bf16"],
                        tiny_overrides, tiny_base)
    softmax = _kl(["perturbation.sampler_precision.softmax_chunks=4", "perturbation.sampler_precision.partials=bf16"],
                  tiny_overrides, tiny_base)
    # fp32 reordering alone changes the last bits only; bf16 partials change far more
    assert abs(plain) < bf16_partials / 100  # the exact KL of a ~1e-7 change can round below 0
    assert softmax > 0
