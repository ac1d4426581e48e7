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


def test_no_baseline_and_the_reward_pair_hand_computed():
    """`none` passes the shaped reward through; ±1 rewards double the mean baseline's advantage."""
    from timsim import hyper
    from timsim.config import load_config

    reward = jnp.array([1.0, 0.0, 0.0, 0.5])  # 0.5: partial credit maps linearly
    hp = hyper.of(load_config(None, ["grpo.advantage=none", "grpo.reward_wrong=-1"])).grpo
    shaped = grpo.shaped_reward(reward, hp)
    np.testing.assert_allclose(grpo.advantages(shaped, 4, "none"), [1.0, -1.0, -1.0, 0.0])
    np.testing.assert_allclose(grpo.advantages(shaped, 4, "mean"), 2 * grpo.advantages(reward, 4, "mean"), rtol=1e-6)


def _cells_metrics(tiny_overrides, tiny_base, common, cells: dict) -> dict:
    """Step metrics {cell: {metric: [steps]}} of `cells` (one static config: one program, one seed)."""
    from timsim.config import load_config
    from timsim.loop import FramesHook, run
    from timsim.plan import Cell

    hook = FramesHook()
    run([Cell(name, load_config(None, tiny_overrides + common + extra)) for name, extra in cells.items()],
        tiny_base[0], tiny_base[1], [hook], evaluate=False)
    frame = hook.metrics()
    frame = frame[frame.step > 0]
    return {name: {col: frame[frame.cell_id == name][col].to_numpy() for col in frame.columns} for name in cells}


def test_the_reward_pair_inside_a_run(tiny_overrides, tiny_base):
    """Without a baseline the first update's loss is -token mean of A (r_ppo = 1), so ±1 rewards
    give exactly 2 x (the 0/1 loss) + 1 on the same batch; `reward_mean` stays the task's."""
    runs = _cells_metrics(tiny_overrides, tiny_base, ["grpo.advantage=none", "run.steps=1", "run.chunk_steps=1"],
                          {"01": [], "pm1": ["grpo.reward_wrong=-1"]})
    zero_one, plus_minus = runs["01"], runs["pm1"]
    assert zero_one["reward_mean"][0] == plus_minus["reward_mean"][0] > 0
    np.testing.assert_allclose(plus_minus["loss"][0], 2 * zero_one["loss"][0] + 1, rtol=1e-5)


def test_a_frozen_sampler_samples_the_base_model(tiny_overrides, tiny_base):
    """A frozen sampler draws every batch from the base weights: a learning run sees bit for bit
    the batches of a run that does not learn (lr 0), though its weights move; an online
    sampler's batches part from the lr-0 run's once the weights have moved."""
    cells = {"still": ["grpo.lr=0"], "learning": ["grpo.lr=0.003"]}
    for frozen in ("true", "false"):
        runs = _cells_metrics(tiny_overrides, tiny_base, [f"perturbation.frozen_sampler={frozen}",
                                                          "run.steps=6", "run.chunk_steps=6"], cells)
        still, learning = runs["still"], runs["learning"]
        assert np.all(still["update_norm"] == 0) and np.all(learning["update_norm"] > 0)
        same_batches = [np.array_equal(still[m], learning[m]) for m in ("reward_mean", "response_len", "entropy_sampler")]
        assert all(same_batches) if frozen == "true" else not all(same_batches), frozen


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


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    """A = -1 with r = 5: PPO's loss is r|A| = 5 (the min picks the unclipped -5); dual clip c = 3
    caps it at 3. A = +1 and small ratios are untouched."""
    logp = jnp.log(jnp.array([[5.0, 1.1], [5.0, 0.5]]))
    adv = jnp.array([-1.0, 1.0])
    loss, clipped, _ = grpo.dual_clip_per_token(logp, jnp.zeros((2, 2)), adv, 0.2, 0.2, 3.0)
    np.testing.assert_allclose(loss, [[3.0, 1.1], [-1.2, -0.5]], rtol=1e-6)
    assert bool(clipped[0, 0])
    off, _, _ = grpo.dual_clip_per_token(logp, jnp.zeros((2, 2)), adv, 0.2, 0.2, 0.0)
    np.testing.assert_allclose(off[0, 0], 5.0, rtol=1e-6)


def test_reinforce_cispo_and_gspo_hand_computed():
    import jax

    logp_old = jnp.log(jnp.array([[0.5, 0.5]]))
    logp = jnp.log(jnp.array([[0.8, 0.5]]))  # r = (1.6, 1.0)
    adv, mask = jnp.array([2.0]), jnp.ones((1, 2))
    loss, _, _ = grpo.reinforce_per_token(logp, logp_old, adv)
    np.testing.assert_allclose(loss, -2.0 * np.log([[0.8, 0.5]]), rtol=1e-6)
    # CISPO: the weight clip(1.6, 0.8, 1.2) = 1.2 is detached: d loss / d logp = -1.2 A, the token keeps a gradient
    grad = jax.grad(lambda lp: grpo.cispo_per_token(lp, logp_old, adv, 0.2, 0.2)[0].sum())(logp)
    np.testing.assert_allclose(grad, [[-1.2 * 2.0, -1.0 * 2.0]], rtol=1e-6)
    # GSPO: s = exp(mean log r) = sqrt(1.6) = 1.265 > 1.2: clipped, the same loss -1.2 A on both tokens
    loss, clipped, ratio = grpo.gspo_per_token(logp, logp_old, adv, 0.2, 0.2, mask)
    np.testing.assert_allclose(ratio, np.sqrt(1.6), rtol=1e-6)
    np.testing.assert_allclose(loss, [[-2.4, -2.4]], rtol=1e-6)
    assert bool(clipped.all())


def test_reinforce_needs_one_update_per_batch_and_dual_clip_above_one():
    from timsim.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="one update per batch"):
        load_config(None, ["grpo.loss=reinforce", "grpo.epochs=2"])
    with pytest.raises(ConfigError, match="grpo.dual_clip"):
        load_config(None, ["grpo.dual_clip=0.5"])


def test_kl_estimators_hand_computed():
    logp = jnp.log(jnp.array([0.5]))
    logp_ref = jnp.log(jnp.array([0.25]))
    log_r = np.log(0.5)  # log(ref / pi)
    assert float(grpo.kl_to_reference(logp, logp_ref, "k1")[0]) == pytest.approx(-log_r)
    assert float(grpo.kl_to_reference(logp, logp_ref, "k2")[0]) == pytest.approx(0.5 * log_r**2)
    assert float(grpo.kl_to_reference(logp, logp_ref, "k3")[0]) == pytest.approx(0.5 - 1 - log_r)


def _first_step(tiny_overrides, tiny_base, extra):
    """Step metrics of a short run; step 1 starts from the base weights on the same batch for
    every config (common random numbers), so configs differ there only by how they learn."""
    from test_core import train_metrics
    from timsim.config import load_config

    return train_metrics(load_config(None, tiny_overrides + extra), tiny_base)[1]


def test_each_loss_learns_differently_from_the_same_batch(tiny_overrides, tiny_base):
    """At r = 1 every loss has the gradient -A grad log pi, so they differ only once the ratio
    moves: with two epochs the second update differs for ppo, gspo and cispo. If grpo.loss
    were ignored, the updates would coincide."""
    runs = {loss: _first_step(tiny_overrides, tiny_base, [f"grpo.loss={loss}", "grpo.epochs=2"])
            for loss in ("ppo", "gspo", "cispo")}
    rewards = {loss: float(m["reward_mean"][0, 0]) for loss, m in runs.items()}
    assert len(set(rewards.values())) == 1, rewards  # one batch
    norms = {loss: float(m["update_norm"][0, 0]) for loss, m in runs.items()}
    assert len(set(norms.values())) == len(norms), norms


def test_reinforce_has_ppos_first_gradient_but_not_its_loss(tiny_overrides, tiny_base):
    """One update at r = 1: -A log pi and -A r have the same gradient (so the same update, to
    float rounding), but not the same value."""
    ppo = _first_step(tiny_overrides, tiny_base, [])
    reinforce = _first_step(tiny_overrides, tiny_base, ["grpo.loss=reinforce"])
    np.testing.assert_allclose(reinforce["update_norm"][:, 0], ppo["update_norm"][:, 0], rtol=1e-4)
    assert np.all(np.abs(reinforce["loss"][:, 0] - ppo["loss"][:, 0]) > 1e-3)


def test_entropy_bonus_enters_the_loss_with_its_coefficient(tiny_overrides, tiny_base):
    """loss(c) = loss(0) - c * entropy at the first update (token_mean aggregation)."""
    plain = _first_step(tiny_overrides, tiny_base, [])
    bonus = _first_step(tiny_overrides, tiny_base, ["grpo.entropy_coef=0.05"])
    np.testing.assert_allclose(bonus["loss"][:, 0], plain["loss"][:, 0] - 0.05 * plain["entropy"][:, 0], rtol=1e-4)
    assert np.all(bonus["update_norm"][:, 0] != plain["update_norm"][:, 0])


def test_loss_aggregations_inside_a_run(tiny_overrides, tiny_base, tiny_cfg):
    """At the first update r = 1, so the PPO loss per token is -A. Per-response means of a
    z-scored group sum to 0; the constant normaliser N * T rescales the token mean by the
    mean response length over T."""
    token = _first_step(tiny_overrides, tiny_base, [])
    seq = _first_step(tiny_overrides, tiny_base, ["grpo.loss_agg=seq_mean_token_mean"])
    norm = _first_step(tiny_overrides, tiny_base, ["grpo.loss_agg=seq_mean_token_sum_norm"])
    assert np.all(np.abs(seq["loss"][:, 0]) < 1e-6) and np.all(np.abs(token["loss"][:, 0]) > 1e-4)
    np.testing.assert_allclose(norm["loss"][:, 0],
                               token["loss"][:, 0] * token["response_len"][:, 0] / tiny_cfg.response_len, rtol=1e-4)


def test_advantages_inside_a_run(tiny_overrides, tiny_base, tiny_cfg):
    """rloo = (r - group mean) * G / (G - 1): the first update's loss is the mean baseline's
    times G / (G - 1); z-scoring rescales each group by its own spread instead."""
    mean = _first_step(tiny_overrides, tiny_base, ["grpo.advantage=mean"])
    rloo = _first_step(tiny_overrides, tiny_base, ["grpo.advantage=rloo"])
    zscore = _first_step(tiny_overrides, tiny_base, [])
    g = tiny_cfg.grpo.group_size
    np.testing.assert_allclose(rloo["loss"][:, 0], mean["loss"][:, 0] * g / (g - 1), rtol=1e-4)
    assert np.all(zscore["loss"][:, 0] != mean["loss"][:, 0])
