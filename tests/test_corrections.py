"""Corrections: each against a hand-computed example, identity at zero mismatch, and in a run."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from timsim import hyper
from timsim.config import ConfigError, load_config
from timsim.corrections import CORRECTIONS, apply_corrections, make_inputs
from timsim.collect import Collected
from timsim.step import learner_batch
from test_core import SIDE_METRICS, assert_same_training, train_metrics

KNOBS = hyper.of(load_config()).correction  # the default thresholds


def _inputs(ratios, mask=None, adv=(1.0,), p_old=None):
    """Responses of the given per-token r_corr (pi_old / mu); pi_old = 0.5 unless given."""
    r = np.asarray(ratios, np.float64)
    mask = np.ones_like(r) if mask is None else np.asarray(mask, np.float64)
    logp_old = np.log(np.full_like(r, 0.5) if p_old is None else np.asarray(p_old, np.float64))
    logp_sampler = logp_old - np.log(r)
    return make_inputs(jnp.asarray(logp_old, jnp.float32), jnp.asarray(logp_sampler, jnp.float32),
                       jnp.asarray(mask, jnp.float32), jnp.asarray(adv, jnp.float32))


def _apply(kinds, x, **knobs):
    estimator = knobs.pop("est", "k3")
    w, keep = apply_corrections(tuple(kinds), x, KNOBS.replace(**{k: jnp.float32(v) for k, v in knobs.items()}),
                                estimator)
    return np.asarray(w), np.asarray(keep)


def test_token_tis_caps_the_weight():
    w, keep = _apply(["token_tis"], _inputs([[0.5, 2.0, 3.0]]), tis_cap=2.0)
    np.testing.assert_allclose(w, [[0.5, 2.0, 2.0]], rtol=1e-6)  # exactly at the cap stays 2
    assert keep.tolist() == [[1, 1, 1]]


def test_seq_tis_uses_the_product_over_real_tokens():
    x = _inputs([[1.5, 1.2, 10.0], [0.5, 0.5, 1.0]], mask=[[1, 1, 0], [1, 1, 1]], adv=(1.0, -1.0))
    w, keep = _apply(["seq_tis"], x, tis_cap=10.0)
    np.testing.assert_allclose(w[0, :2], 1.8, rtol=1e-5)  # 1.5 * 1.2, the padded 10 ignored
    np.testing.assert_allclose(w[1], 0.25, rtol=1e-5)
    assert keep[0].tolist() == [1, 1, 0], "padding is never kept"


def test_token_mis_rejects_outside_the_band_and_keeps_the_edges():
    w, keep = _apply(["token_mis"], _inputs([[0.4, 0.5, 1.0, 5.0, 6.0]]), mis_low=0.5, mis_high=5.0)
    assert keep.tolist() == [[0, 1, 1, 1, 0]]
    np.testing.assert_allclose(w[keep > 0], [0.5, 1.0, 5.0], rtol=1e-5)


def test_sequence_mask_and_mis():
    x = _inputs([[2.0, 1.5], [0.9, 1.0]], adv=(1.0, 1.0))
    w, keep = _apply(["seq_mask"], x, seq_low=0.5, seq_high=2.0)
    assert keep.tolist() == [[0, 0], [1, 1]] and np.all(w == 1.0)  # product 3 rejected, 0.9 kept
    w, keep = _apply(["seq_mis"], x, seq_low=0.5, seq_high=2.0)
    np.testing.assert_allclose(w[1], 0.9, rtol=1e-5)


def test_geometric_rejection_is_length_invariant():
    long = _inputs([[1.01] * 4 + [1.0]], mask=[[1, 1, 1, 1, 0]])
    w, keep = _apply(["geometric"], long, geo_low=0.99, geo_high=1.02)
    assert keep.sum() == 4  # geometric mean 1.01 in the band though the product is 1.04
    _, keep = _apply(["geometric"], long, geo_low=0.99, geo_high=1.005)
    assert keep.sum() == 0


@pytest.mark.parametrize("est, agg, expected_kept", [("k3", "mean", [1, 0]), ("k3", "max", [1, 0]),
                                                     ("k2", "sum", [1, 0]), ("k1", "max", [1, 0]),
                                                     ("k1", "sum", [1, 1])])
def test_kl_rejection_aggregates(est, agg, expected_kept):
    """Response 0: r = (1.1, 1.0), every estimate below 0.05. Response 1: r = (2, 0.5): k3 =
    (0.307, 0.193), k2 = (0.24, 0.24), k1 = -delta = (-0.693, 0.693): only the k1 sum (0) passes."""
    x = _inputs([[1.1, 1.0], [2.0, 0.5]], adv=(1.0, 1.0))
    w, keep = apply_corrections(("kl_rejection",), x, KNOBS.replace(kl_threshold=jnp.float32(0.05)), est, agg)
    assert np.asarray(keep)[:, 0].tolist() == expected_kept


def test_veto_offpolicy_mask_and_cis():
    x = _inputs([[1.0, 1e-5], [1.0, 0.5]], adv=(1.0, -1.0), p_old=[[0.99, 0.5], [0.5, 0.01]])
    _, keep = _apply(["veto"], x, veto_threshold=1e-4)
    assert keep[:, 0].tolist() == [0, 1]
    # mean log(mu/pi) of response 1 = -mean log r = log(2)/2 = 0.35: dropped at 0.3 (A < 0), kept at 0.4
    assert _apply(["offpolicy_mask"], x, offpolicy_threshold=0.3)[1][:, 0].tolist() == [1, 0]
    assert _apply(["offpolicy_mask"], x, offpolicy_threshold=0.4)[1][:, 0].tolist() == [1, 1]
    big = _inputs([[10.0, 10.0]], p_old=[[0.99, 0.01]])
    w, _ = _apply(["cis"], big, cis_lambda=2.0, cis_kappa=0.05)
    np.testing.assert_allclose(w, [[1 + 2 * 0.05, 1 + 2 * 0.99]], rtol=1e-5)  # the cap grows as p falls


def test_composition_multiplies_weights_and_intersects_masks():
    x = _inputs([[3.0, 0.4, 1.0]])
    w, keep = _apply(["token_tis", "token_mis"], x, tis_cap=2.0, mis_low=0.5, mis_high=5.0)
    assert keep.tolist() == [[1, 0, 1]]
    np.testing.assert_allclose(w[0, [0, 2]], [2.0 * 3.0, 1.0], rtol=1e-5)


def test_batch_normalization_of_weights():
    w, keep = apply_corrections(("token_tis",), _inputs([[0.5, 1.5]]), KNOBS.replace(tis_cap=jnp.float32(2.0)),
                                batch_normalize=True)
    np.testing.assert_allclose(np.asarray(w), [[0.5, 1.5]], rtol=1e-6)  # mean already 1
    w, _ = apply_corrections(("token_tis",), _inputs([[0.5, 0.5]]), KNOBS, batch_normalize=True)
    np.testing.assert_allclose(np.asarray(w), [[1.0, 1.0]], rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(CORRECTIONS))
def test_every_correction_is_the_identity_at_zero_mismatch(kind):
    x = _inputs([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], mask=[[1, 1, 0], [1, 1, 1]], adv=(1.0, -1.0),
                p_old=[[0.9, 0.1, 0.5], [0.3, 0.3, 0.3]])
    w, keep = _apply([kind], x)
    assert np.all(w[keep > 0] == 1.0)
    assert keep.tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("override, field", [
    ("correction.kinds=[tis]", "correction.kinds"), ("correction.mis_low=1.5", "correction.mis_low"),
    ("correction.seq_high=0.5", "correction.seq_high"), ("correction.tis_cap=0", "correction.tis_cap"),
    ("correction.kl_aggregate=median", "correction.kl_aggregate"),
])
def test_bad_corrections_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"`{field}`" in str(err.value)


@pytest.mark.parametrize("mode, kinds, bypass_weights, denominator", [
    ("recompute", [], "replace", "pi_old"), ("bypass", [], "replace", "mu"),
    ("bypass", ["seq_mask"], "replace", "mu"),  # a mask changes no ratio
    ("bypass", ["token_tis"], "replace", "pi_old"),  # verl's decoupled mode: recompute plus the weight
    ("bypass", ["token_tis"], "multiply", "mu"),  # the weight multiplies pi_theta / mu: mismatch counted twice
    ("bypass", ["token_tis"], "current", "mu"),  # verl's bypass: the weight of pi_theta / mu, recomputed per minibatch
    ("recompute", ["token_tis"], "replace", "pi_old"),
])
@pytest.mark.bits
def test_the_ratio_denominator_follows_mode_and_bypass_weights(mode, kinds, bypass_weights, denominator):
    """The PPO ratio's denominator in the loss's batch is what `Config.ratio_denominator` (and so
    the manifest) says, and the correction's weight is the same whichever denominator is used."""
    cfg = load_config(None, [f"grpo.old_logprobs={mode}", f"correction.kinds=[{','.join(kinds)}]",
                             f"correction.bypass_weights={bypass_weights}"])
    assert cfg.ratio_denominator == denominator
    rng = np.random.default_rng(0)
    learner, sampler = (jnp.asarray(-rng.uniform(0.1, 2.0, (4, 3)), jnp.float32) for _ in range(2))
    mask = jnp.ones((4, 3))
    collected = Collected(None, None, mask, learner, sampler, None, None, None, None,
                          jnp.asarray([1.0, -1.0, 0.5, -0.5]), None, None)
    batch = learner_batch(collected, hyper.of(cfg), mode, cfg.correction)
    expected = learner if denominator == "pi_old" else sampler
    assert np.array_equal(np.asarray(batch.logp_old_NT), np.asarray(expected))
    if kinds == ["token_tis"]:  # the verdict at pi_old; `current` recomputes it in the loss, per minibatch
        np.testing.assert_allclose(batch.verdict.weight_NT, np.minimum(np.exp(learner - sampler), 2.0), rtol=1e-6)
        loss_weight = np.ones((4, 3)) if bypass_weights == "current" else batch.verdict.weight_NT
        np.testing.assert_array_equal(np.asarray(batch.weight_NT), loss_weight)


@pytest.mark.bits
def test_corrected_run_at_zero_mismatch_is_the_plain_run(tiny_overrides, tiny_base):
    """Every correction at once, bypass mode, zero mismatch: every weight is exactly 1 and no
    token is rejected at any step, so the run samples the same tokens and logs the same
    rewards and mismatch as no correction, bit for bit. The loss and its gradient pass through
    twelve more (identity) factors, a different program that XLA may fuse differently: at
    -O0 their last bit differs (DESIGN §8.2 promises bits within one program)."""
    base = tiny_overrides + ["grpo.old_logprobs=bypass"]
    plain = train_metrics(load_config(None, base), tiny_base)[1]
    corrected = train_metrics(load_config(None, base + [f"correction.kinds=[{','.join(CORRECTIONS)}]"]),
                              tiny_base)[1]
    assert_same_training(plain, corrected,
                         rounding=("loss", "grad_norm", "update_norm", "entropy", "ratio_first_dev_max", *SIDE_METRICS))
    assert np.all(corrected["rejected_token_frac"] == 0.0) and np.all(corrected["corr_weight_mean"] == 1.0)


@pytest.mark.bits
def test_a_step_that_rejects_every_token_is_skipped(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian",
                                              "perturbation.logit_noise.scale=3", "correction.kinds=[geometric]",
                                              "correction.geo_low=0.9999999", "correction.geo_high=1.0000001"])
    state, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["update_skipped"] == 1.0) and np.all(metrics["rejected_token_frac"] == 1.0)
    assert np.all(np.isfinite(metrics["loss"]))
    assert np.all(metrics["update_norm"] == 0.0)


def _enumerated_estimators():
    """A tabular autoregressive policy over 3 tokens and 2 positions: all 9 responses are
    enumerated, so expectations are exact sums, not samples. Returns the true gradient of
    E_pi[R] and the expected REINFORCE updates under mu with sequence and token IS weights
    (computed by `timsim.corrections`), in float64."""
    import jax

    vocab, length = 3, 2
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=(length, vocab + 1, vocab)))  # [position, previous token (3 = start), v]
    mu_logits = theta + jnp.asarray(rng.normal(size=theta.shape)) * 0.7  # the sampler's perturbed policy
    responses = jnp.asarray([[a, b] for a in range(vocab) for b in range(vocab)])
    reward = jnp.asarray(rng.uniform(size=len(responses)))
    baseline = 0.3

    def token_logp(table):
        prev = jnp.concatenate([jnp.full((len(responses), 1), vocab), responses[:, :-1]], 1)
        logits = table[jnp.arange(length)[None, :], prev]  # [9, T, V]
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), responses[..., None], -1)[..., 0]

    mask = jnp.ones((len(responses), length))
    true_grad = jax.grad(lambda t: (jnp.exp(token_logp(t).sum(-1)) * reward).sum())(theta)
    logp_mu = token_logp(mu_logits)
    mu_seq = jnp.exp(logp_mu.sum(-1))

    def expected_update(kind):
        x = make_inputs(token_logp(theta), logp_mu, mask, reward - baseline)
        weight, _ = apply_corrections((kind,), x, SimpleNamespace(tis_cap=jnp.float64(1e12)))
        surrogate = lambda t: (mu_seq[:, None] * weight * (reward - baseline)[:, None] * token_logp(t)).sum()  # noqa: E731
        return jax.grad(surrogate)(theta)

    return true_grad, expected_update("seq_tis"), expected_update("token_tis")


def test_sequence_is_is_unbiased_and_token_tis_is_not_on_an_enumerable_task():
    """DESIGN §8.1: with REINFORCE at theta = theta_old, a constant baseline and a sequence-sum
    loss, E_mu[prod_t r_t (R - b) grad log pi(y)] equals grad E_pi[R] exactly; per-token
    weights leave the prefix distribution mu's, so they are biased."""
    import jax

    with jax.enable_x64(True):
        true_grad, seq_is, token_is = (np.asarray(g) for g in _enumerated_estimators())
    scale = np.abs(true_grad).max()
    np.testing.assert_allclose(seq_is, true_grad, rtol=0, atol=1e-12 * scale)
    assert np.abs(token_is - true_grad).max() > 1e-2 * scale


def test_prefix_is_and_minpro_by_hand():
    x = _inputs([[2.0, 0.5, 4.0, 3.0]], mask=[[1, 1, 1, 0]])
    w, keep = _apply(["prefix_is"], x, prefix_cap=3.0)
    np.testing.assert_allclose(w[0, :3], [2.0, 1.0, 3.0], rtol=1e-5)  # products 2, 1, 4 -> capped at 3
    w, _ = _apply(["minpro"], x, prefix_cap=1e4)
    # token ratio times min(1, smallest earlier ratio): 2 * 1, 0.5 * 1 (the 2 does not compound), 4 * 0.5
    np.testing.assert_allclose(w[0, :3], [2.0, 0.5, 2.0], rtol=1e-5)
    assert keep[0].tolist() == [1, 1, 1, 0]


def test_score_centering_leaves_the_covariance_and_removes_the_baseline_drift():
    """One position, every token enumerated: sum_y mu_y (R_y - b) grad centered_logp(y) equals
    Cov_mu(R, s) for every baseline b, while the plain score gives Cov_mu(R, s) + (E_mu R - b) E_mu s
    (DESIGN §8.1)."""
    import jax

    from timsim.corrections import centered_score_logp

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        theta = jnp.asarray(rng.normal(size=5))
        mu = jax.nn.softmax(theta + jnp.asarray(rng.normal(size=5)))
        reward = jnp.asarray(rng.uniform(size=5))
        scores = jax.jacobian(jax.nn.log_softmax)(theta)  # [y, param]
        e_mu_s = mu @ scores
        cov = ((mu * (reward - mu @ reward))[:, None] * scores).sum(0)

        def expected_update(b, centered):
            def surrogate(t):
                logp_all = jax.nn.log_softmax(t)
                logp = centered_score_logp(logp_all, jnp.broadcast_to(logp_all, (5, 5)), jnp.broadcast_to(mu, (5, 5)))
                return (mu * (reward - b) * (logp if centered else logp_all)).sum()
            return jax.grad(surrogate)(theta)

        for b in (0.0, 0.7):
            np.testing.assert_allclose(expected_update(b, True), cov, atol=1e-12)
            np.testing.assert_allclose(expected_update(b, False), cov + (mu @ reward - b) * e_mu_s, atol=1e-12)
        assert np.abs(e_mu_s).max() > 1e-2  # the drift that centering removed was not zero


def test_score_centering_in_a_run_is_near_identity_at_zero_mismatch(tiny_overrides, tiny_base):
    """At zero mismatch E_mu[s] = E_pi[s] = 0 in exact arithmetic: centering changes the update only
    by rounding; under mismatch it changes it. Gaussian noise at scale 0 is zero mismatch, and its
    scale is traced: two compiled programs serve both levels."""
    gaussian = tiny_overrides + ["perturbation.logit_noise.family=gaussian"]
    at = lambda scale, *extra: train_metrics(  # noqa: E731
        load_config(None, gaussian + [f"perturbation.logit_noise.scale={scale}", *extra]), tiny_base)[1]
    plain, centered = at(0.0), at(0.0, "correction.score_centering=true")
    np.testing.assert_allclose(centered["loss"][:, 0], plain["loss"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(centered["grad_norm"][:, 0], plain["grad_norm"][:, 0], rtol=1e-3)
    a, b = at(1.0), at(1.0, "correction.score_centering=true")
    assert np.abs(a["grad_norm"][:, 0] - b["grad_norm"][:, 0]).max() > 1e-3 * np.abs(a["grad_norm"][:, 0]).max()
