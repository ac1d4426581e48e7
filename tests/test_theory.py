"""Theory against simulation: every closed form of `timsim.theory` against what the real sampler
(its noise families, numerics, temperature) measures, with tolerances from the sample size and
the size of the omitted terms (`timsim.predictions`); and tests that the comparison has the
power to catch a wrong formula or a wrong simulator."""

import dataclasses

import jax
import numpy as np
import pytest

from timsim import predictions, theory
from timsim.config import load_config

PROMPTS = 256  # x group size 8: 2,048 responses per measurement


def _measure(tiny_overrides, tiny_base, *overrides):
    cfg = load_config(None, tiny_overrides + list(overrides))
    return predictions.measure_batch(cfg, tiny_base[0], tiny_base[1], n_prompts=PROMPTS)


def _rows(measured, name):
    rows = predictions.PREDICTIONS[name](measured)
    assert rows and all(r.applies for r in rows), [r.reason for r in rows]
    return rows


def _tolerance(row) -> float:
    """The largest |measured - predicted| the row accepts."""
    return predictions.AGREE_Z * float(np.hypot(row.se, row.omitted))


@pytest.fixture(scope="module")
def gaussian(tiny_overrides, tiny_base):
    """sigma = 0.3 (the omitted orders are ~s^2 = 9% for the first-order forms), token TIS with cap 1.1."""
    return _measure(tiny_overrides, tiny_base, "perturbation.logit_noise.family=gaussian",
                    "perturbation.logit_noise.scale=0.3", "correction.kinds=[token_tis]", "correction.tis_cap=1.1")


@pytest.fixture(scope="module")
def gaussian_small(tiny_overrides, tiny_base):
    """sigma = 0.15: the first-order forms' omitted terms are ~2%. The same program as `gaussian`
    (the scale is traced)."""
    return _measure(tiny_overrides, tiny_base, "perturbation.logit_noise.family=gaussian",
                    "perturbation.logit_noise.scale=0.15")


@pytest.mark.parametrize("name, max_relative_tolerance", [
    ("gaussian_kl", 0.03), ("abs_delta_by_confidence", 0.1), ("seq_log_ratio_var", 0.25), ("flattening", 0.1),
    ("ratio_mean", 0.01), ("delta_mean", 0.6)])
def test_gaussian_noise_agrees_with_its_closed_forms(gaussian_small, name, max_relative_tolerance):
    """Each prediction agrees (|z| < 3), and its tolerance is tight enough that an error of
    `max_relative_tolerance` in the formula would be caught (for the flattening: of tau - 1).
    delta_mean is the exact identity E_mu[delta] = -KL: its tolerance is the sampling error of
    a mean of delta, large next to the KL itself at this noise."""
    for row in _rows(gaussian_small, name):
        assert row.agrees, row
        size = abs(row.predicted - 1.0) if name == "flattening" else abs(row.predicted)
        assert _tolerance(row) < max_relative_tolerance * size, row


def test_token_tis_weight_bias_has_the_predicted_size(gaussian):
    """E[min(r, C)] = E[r] - E[(r - C)_+]: at C = 1.1 and sigma = 0.3 the cap removes ~4% of the
    weight. The lognormal tail's omitted terms are O(sigma) of it, so the tolerance only just
    separates the prediction from "the cap changes nothing"; the measurement agreed to 0.1%."""
    [row] = _rows(gaussian, "token_tis_weight")
    assert row.agrees, row
    bias = 1.0 - row.predicted
    assert bias > 0.02 and _tolerance(row) < bias


def test_the_clip_drops_more_negative_advantage_tokens(gaussian):
    """DESIGN §8.1's sign-dependent skew: predicted per token from log r ~ N(m_y, v_y), and the
    measured fractions agree on each side and on their difference."""
    positive, negative = _rows(gaussian, "clip_skew")
    assert positive.agrees and negative.agrees, (positive, negative)
    assert negative.predicted > 1.5 * positive.predicted
    diff_se = np.hypot(_tolerance(positive), _tolerance(negative)) / predictions.AGREE_Z
    assert negative.measured - positive.measured > 2 * np.hypot(positive.se, negative.se)
    assert abs((negative.measured - positive.measured) - (negative.predicted - positive.predicted)) < 3 * diff_se


def test_sequence_log_ratio_variance_grows_linearly_with_length(gaussian_small):
    rows = _rows(gaussian_small, "seq_log_ratio_var")
    measured = np.array([r.measured for r in rows])
    increments = np.diff(measured[:4])  # the first 4 positions: nearly every response is still running
    assert np.all(increments > 0) and increments.max() < 2 * increments.min()


def test_context_noise_obeys_the_same_per_token_forms(tiny_overrides, tiny_base):
    """Persistence is across steps: within one batch the per-token forms still hold, with a
    prompt's group as the independent unit (its responses share the prompt's draws). State-keyed
    noise shares draws across unrelated positions, so its rows say they do not apply."""
    measured = _measure(tiny_overrides, tiny_base, "perturbation.logit_noise.family=gaussian",
                        "perturbation.logit_noise.scale=0.15", "perturbation.logit_noise.mode=context")
    for name in ("gaussian_kl", "seq_log_ratio_var", "delta_mean", "abs_delta_by_confidence"):
        assert all(r.agrees for r in _rows(measured, name)), name
    state = dataclasses.replace(measured, cfg=load_config(None, tiny_overrides + [
        "perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.scale=0.15",
        "perturbation.logit_noise.mode=state"]))
    [row] = predictions.PREDICTIONS["gaussian_kl"](state)
    assert not row.applies and "state" in row.reason


def test_a_wrong_simulator_or_a_wrong_formula_is_caught(gaussian_small, tiny_overrides, tiny_base, monkeypatch):
    """Power: a sampler that injects 5% more noise than the config says, or a closed form
    missing its fourth-order term's sign, disagrees."""
    louder = _measure(tiny_overrides, tiny_base, "perturbation.logit_noise.family=gaussian",
                      "perturbation.logit_noise.scale=0.1575")
    [row] = _rows(dataclasses.replace(louder, sigma=gaussian_small.sigma), "gaussian_kl")
    assert not row.agrees and row.z > 3
    leading, fourth = theory.gaussian_kl_leading, theory.gaussian_kl
    monkeypatch.setattr(theory, "gaussian_kl", lambda p, s: 1.05 * fourth(p, s))
    [row] = _rows(gaussian_small, "gaussian_kl")
    assert not row.agrees
    assert leading is theory.gaussian_kl_leading


def test_report_only_noise_has_ratio_above_one(tiny_overrides, tiny_base):
    measured = _measure(tiny_overrides, tiny_base, "perturbation.logit_noise.family=gaussian",
                        "perturbation.logit_noise.scale=0.3", "perturbation.logit_noise.report_only=true")
    [row] = _rows(measured, "report_only_ratio")
    assert row.agrees and row.measured > 1 + 3 * row.se  # E[r] > 1: report-only breaks E_mu[r] = 1
    assert not predictions.PREDICTIONS["ratio_mean"](measured)[0].applies


@pytest.mark.parametrize("family, knob", [("top_k", "top_k=3"), ("top_p", "top_p=0.8")])
def test_truncated_support_is_exact(tiny_overrides, tiny_base, family, knob):
    measured = _measure(tiny_overrides, tiny_base, f"perturbation.logit_noise.family={family}",
                        f"perturbation.logit_noise.{knob}")
    rows = _rows(measured, "truncation")
    for row in rows:
        assert row.agrees, row
        assert abs(row.measured - row.predicted) < 1e-5
    assert rows[1].predicted > 1e-3  # the truncation removed real mass


@pytest.fixture(scope="module")
def rounded(tiny_overrides, tiny_base):
    return {dtype: _measure(tiny_overrides, tiny_base, f"perturbation.sampler_precision.dtype={dtype}",
                            "perturbation.sampler_precision.sites=[logits]") for dtype in ("bf16", "fp16")}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rounding_the_logits_obeys_its_bound_and_kl(rounded, dtype):
    bound, kl = _rows(rounded[dtype], "rounding")
    assert bound.agrees and bound.measured > 0.5 * bound.predicted  # the bound is attained, nearly
    assert kl.agrees, kl
    assert _tolerance(kl) < 0.35 * kl.predicted  # the rounding model is allowed 10%


def test_bf16_over_fp16_kl_ratio_is_four_to_the_mantissa_difference(rounded):
    """4^(10 - 7) = 64 when the same logits are rounded; the measured ratio's error comes from
    both measurements' standard errors and the rounding model's 10% allowance each."""
    (_, bf16), (_, fp16) = (_rows(rounded[d], "rounding") for d in ("bf16", "fp16"))
    ratio = bf16.measured / fp16.measured
    predicted = theory.rounding_kl_ratio(7, 10)
    assert predicted == 64.0
    relative = np.hypot(bf16.se / bf16.measured, fp16.se / fp16.measured)
    assert abs(ratio / predicted - 1) < 3 * relative + 0.2
    assert theory.rounding_kl_ratio(7, 10, floor=4.0**-7) < 2  # a shared floor as large as bf16's own error


def test_dirichlet_noise_does_not_flatten_and_gaussian_does(tiny_overrides, tiny_base, gaussian):
    measured = _measure(tiny_overrides, tiny_base, "perturbation.logit_noise.family=dirichlet",
                        "perturbation.logit_noise.scale=0.1")
    [dirichlet] = _rows(measured, "flattening")
    [flattened] = _rows(gaussian, "flattening")
    assert dirichlet.agrees and dirichlet.predicted == 1.0
    assert flattened.measured - 1.0 > 10 * flattened.se  # the Gaussian's flattening is real


@pytest.mark.bits
def test_zero_mismatch_is_exact_and_every_other_row_says_why_it_does_not_apply(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides)
    measured = predictions.measure_batch(cfg, tiny_base[0], tiny_base[1], n_prompts=16)
    frame = predictions.table(measured)
    applies = frame[frame.applies]
    assert set(applies.prediction) == {"zero_mismatch"} and (applies.measured == 0.0).all() and applies.agrees.all()
    assert frame[~frame.applies].reason.str.len().min() > 10


# ----------------------------------------------------------------------------- the closed forms alone


def test_fourth_order_kl_and_expected_mu_against_float64_monte_carlo():
    """Gaussian noise on a fixed 16-token distribution, 200k draws in float64: the fourth-order
    KL and the second-order E[mu] and tau are within their omitted orders; the leading-order
    KL is not (at sigma = 0.3 its error is ~12 standard errors)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        z = rng.normal(size=16) * 2.0
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        sigma = 0.3
        eta = rng.normal(size=(200_000, 16)) * sigma
        logits = z + eta
        mu = np.exp(logits - logits.max(-1, keepdims=True))
        mu /= mu.sum(-1, keepdims=True)
        kl = (mu * (np.log(mu) - np.log(p))).sum(-1)
        se = kl.std() / np.sqrt(len(kl))
        fourth = float(theory.gaussian_kl(p, sigma))
        leading = float(theory.gaussian_kl_leading(p, sigma))
        sixth = abs(fourth - leading) * sigma**2
        assert abs(kl.mean() - fourth) < 3 * np.hypot(se, sixth)
        assert abs(kl.mean() - leading) > 5 * se
        np.testing.assert_allclose(mu.mean(0), theory.expected_mu_gaussian(p, sigma), atol=3e-4)


def test_update_split_adds_up_and_centering_removes_the_drift():
    rng = np.random.default_rng(3)
    mu, reward, score = rng.dirichlet(np.ones(6)), rng.uniform(size=6), rng.normal(size=(6, 4))
    split = theory.update_split(mu, reward, score, baseline=0.2)
    np.testing.assert_allclose(split["cov"] + split["drift"], split["total"], atol=1e-12)
    centered = theory.update_split(mu, reward, score - mu @ score, baseline=0.2)
    np.testing.assert_allclose(centered["drift"], 0.0, atol=1e-12)
    np.testing.assert_allclose(centered["total"], split["cov"], atol=1e-12)


def test_rounding_forms():
    assert theory.rounding_relative_bound(7) == 2.0**-8
    rng = np.random.default_rng(0)
    x = np.exp(rng.uniform(-5, 5, 200_000))  # log-uniform magnitudes
    import jax.numpy as jnp

    from timsim.numerics import round_to
    rel = (np.asarray(round_to(jnp.asarray(x, jnp.float32), "bf16"), np.float64) - x) / x
    assert np.abs(rel).max() <= theory.rounding_relative_bound(7)
    assert np.mean(rel**2) == pytest.approx(theory.rounding_mean_square_relative(7), rel=0.03)


def test_capped_weight_and_clip_probabilities_against_lognormal_samples():
    rng = np.random.default_rng(1)
    mean, var = -0.05, 0.09
    r = np.exp(rng.normal(mean, np.sqrt(var), 400_000))
    assert float(theory.capped_weight_mean(mean, var, 1.2)) == pytest.approx(np.minimum(r, 1.2).mean(), abs=1e-3)
    high, low = theory.clip_drop_probability(mean, var, 0.2, 0.28)
    assert float(high) == pytest.approx((r > 1.28).mean(), abs=2e-3)
    assert float(low) == pytest.approx((r < 0.8).mean(), abs=2e-3)
