"""GRPO math against hand-computed values on small arrays."""

import jax.numpy as jnp
import numpy as np
import pytest

from timsim import grpo


def test_zscore_advantages_hand_computed():
    reward = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    adv = np.asarray(grpo.advantages(reward, 4, "zscore"))
    # group 1: mean 0.25, sample std sqrt(0.25) = 0.5; group 2: mean 0.75, std 0.5
    np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -1.5, 0.5], rtol=1e-5)


def test_mean_and_rloo_advantages_hand_computed():
    reward = jnp.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(grpo.advantages(reward, 4, "mean"), [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
    # rloo: r_i - mean of the other three
    np.testing.assert_allclose(grpo.advantages(reward, 4, "rloo"), [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)


def test_uniform_group_has_zero_advantage():
    adv = grpo.advantages(jnp.ones(4), 4, "zscore")
    assert np.all(np.asarray(adv) == 0.0)


def test_aggregations_hand_computed():
    per_token = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(grpo.aggregate(per_token, mask, "token_mean")) == pytest.approx((1 + 2 + 4) / 3)
    assert float(grpo.aggregate(per_token, mask, "seq_mean_token_mean")) == pytest.approx((1.5 + 4) / 2)
    assert float(grpo.aggregate(per_token, mask, "seq_mean_token_sum_norm")) == pytest.approx((1 + 2 + 4) / 6)


def test_padding_never_enters_the_aggregate():
    per_token = jnp.array([[1.0, 2.0, 3.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    poisoned = per_token.at[0, 2].set(1e9)
    for kind in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]:
        assert float(grpo.aggregate(poisoned, mask, kind)) == float(grpo.aggregate(per_token, mask, kind))


def test_ppo_clip_hand_computed():
    logp_old = jnp.zeros((2, 2))
    logp = jnp.log(jnp.array([[1.5, 0.9], [1.5, 0.5]]))
    adv = jnp.array([1.0, -1.0])
    loss, clipped, ratio = grpo.ppo_clip_per_token(logp, logp_old, adv, 0.2, 0.3)
    np.testing.assert_allclose(ratio, [[1.5, 0.9], [1.5, 0.5]], rtol=1e-6)
    # A>0: min(1.5, 1.3) = 1.3 (clipped); min(0.9, 0.9). A<0: min(-1.5, -1.3) = -1.5; min(-0.5, -0.8) = -0.8 (clipped)
    np.testing.assert_allclose(loss, [[-1.3, -0.9], [1.5, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[True, False], [False, True]])


def test_kl_estimators_hand_computed():
    logp = jnp.log(jnp.array([0.5]))
    logp_ref = jnp.log(jnp.array([0.25]))
    log_r = np.log(0.5)  # log(ref / pi)
    assert float(grpo.kl_to_reference(logp, logp_ref, "k1")[0]) == pytest.approx(-log_r)
    assert float(grpo.kl_to_reference(logp, logp_ref, "k2")[0]) == pytest.approx(0.5 * log_r**2)
    assert float(grpo.kl_to_reference(logp, logp_ref, "k3")[0]) == pytest.approx(0.5 - 1 - log_r)
