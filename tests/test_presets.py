"""Framework presets: each against the framework's meaning written out by hand (numpy, float64),
on one batch whose mismatch ranges from far inside every band to far outside it."""

import jax.numpy as jnp
import numpy as np
import pytest

from timsim import hyper
from timsim.collect import Collected
from timsim.config import ConfigError, config_from_dict, load_config
from timsim.corrections import CORRECTIONS
from timsim.presets import PRESETS
from timsim.step import learner_batch, make_objective, refreshed_correction

N, T = 24, 6
ROW_SCALES = [1e-4, 3e-4, 1e-3, 1e-2, 0.1, 0.3, 0.7, 1.5]  # the size of delta, per response


def _batch():
    rng = np.random.default_rng(7)
    learner = -rng.uniform(0.1, 2.0, (N, T)).astype(np.float32)
    delta = rng.normal(size=(N, T)) * np.resize(ROW_SCALES, N)[:, None]
    sampler = (learner - delta).astype(np.float32)
    mask = np.ones((N, T), np.float32)
    mask[::3, -2:] = 0.0  # shorter responses
    adv = rng.normal(size=N).astype(np.float32)
    # the delta the learner sees, in float64 from the float32 log-probs
    d = (learner.astype(np.float64) - sampler.astype(np.float64)) * mask
    return learner, sampler, mask, adv, d


def _k3(d):
    return np.expm1(d) - d


def _per_response(values_N):
    return np.broadcast_to(values_N[:, None], (N, T))


def _expected(name, d, mask):
    """(weight, kept, denominator) of preset `name` as the framework defines it."""
    ones = np.ones((N, T))
    r_tok, r_seq = np.exp(d), _per_response(np.exp(d.sum(-1)))
    geo = _per_response(np.exp(d.sum(-1) / mask.sum(-1)))
    k3_mean = _per_response((_k3(d) * mask).sum(-1) / mask.sum(-1))
    in_band = lambda x, lo, hi: ((x >= lo) & (x <= hi)).astype(float)  # noqa: E731
    cases = {
        "decoupled_token_is": (np.minimum(r_tok, 2.0), ones),
        "decoupled_seq_is": (np.minimum(r_seq, 2.0), ones),
        "decoupled_seq_is_rs": (np.minimum(r_seq, 2.0), in_band(r_seq, 0.5, 2.0)),
        "decoupled_geo_rs": (ones, in_band(geo, 0.999, 1.001)),
        "decoupled_geo_rs_seq_tis": (np.minimum(r_seq, 2.0), in_band(geo, 0.999, 1.001)),
        "decoupled_geo_rs_token_tis": (np.minimum(r_tok, 2.0), in_band(geo, 0.999, 1.001)),
        "decoupled_k3_rs": (ones, (k3_mean <= 0.01).astype(float)),
        "decoupled_k3_rs_seq_tis": (np.minimum(r_seq, 2.0), (k3_mean <= 0.01).astype(float)),
        "decoupled_k3_rs_token_tis": (np.minimum(r_tok, 2.0), (k3_mean <= 0.01).astype(float)),
        "token_is_rs": (np.minimum(r_tok, 2.0), in_band(r_tok, 0.5, 2.0)),
        "bypass_ppo_clip": (ones, ones),
        "bypass_ppo_clip_geo_rs": (ones, in_band(geo, 0.999, 1.001)),
        "bypass_ppo_clip_k3_rs": (ones, (k3_mean <= 0.01).astype(float)),
        "bypass_pg_is": (np.minimum(r_seq, 2.0), ones),
        "bypass_pg_geo_rs": (ones, in_band(geo, 0.999, 1.001)),
        "bypass_pg_geo_rs_seq_tis": (np.minimum(r_seq, 2.0), in_band(geo, 0.999, 1.001)),
        "bypass_pg_geo_rs_token_tis": (np.minimum(r_tok, 2.0), in_band(geo, 0.999, 1.001)),
        # IcePop and TRL's masks: the weight is zeroed, the token stays in the denominator
        "icepop": (r_tok * in_band(r_tok, 0.5, 5.0), None),
        "token_truncate": (np.minimum(r_tok, 3.0), ones),
        "token_mask": (np.where(r_tok > 3.0, 0.0, r_tok), None),
        "sequence_truncate": (np.minimum(r_seq, 3.0), ones),
        "sequence_mask": (np.where(r_seq > 3.0, 0.0, r_seq), None),
    }
    weight, kept = cases[name.split("/")[1]]
    if kept is None:  # zeroed, not dropped
        return weight * mask, mask, mask
    return weight * kept * mask, kept * mask, kept * mask


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_reproduces_its_frameworks_weights_masks_and_denominator(name):
    cfg = load_config(None, [f"correction.preset={name}"])
    learner, sampler, mask, adv, d = _batch()
    collected = Collected(None, None, jnp.asarray(mask), jnp.asarray(learner), jnp.asarray(sampler), None, None,
                          None, None, jnp.asarray(adv), None, None)
    batch = learner_batch(collected, hyper.of(cfg), cfg.grpo.old_logprobs, cfg.correction)
    weight, kept, denominator = _expected(name, d, mask)
    verdict = batch.verdict  # at pi_old (verl's bypass presets recompute it in the loss: below)
    if any(CORRECTIONS.entry(kind).rejects for kind in cfg.correction.kinds):  # the batch tests both sides
        assert 0 < np.asarray(verdict.kept_NT).sum() < mask.sum()
    if cfg.correction.rejected == "drop":
        np.testing.assert_array_equal(np.asarray(verdict.kept_NT), kept)
    np.testing.assert_array_equal(np.asarray(verdict.keep_NT), denominator)
    np.testing.assert_allclose(np.asarray(verdict.weight_NT) * np.asarray(verdict.keep_NT), weight, rtol=2e-6,
                               atol=1e-7)
    # decoupled: the PPO ratio divides by the learner's pi_old; bypass without a weight: by mu
    expected_old = learner if cfg.ratio_denominator == "pi_old" else sampler
    np.testing.assert_array_equal(np.asarray(batch.logp_old_NT), expected_old)
    assert cfg.ratio_denominator == ("mu" if name.startswith("verl/bypass_ppo") else "pi_old") or \
        cfg.grpo.loss == "reinforce"


@pytest.mark.parametrize("name", ["verl/icepop", "trl/sequence_mask", "verl/decoupled_seq_is_rs"])
def test_the_loss_divides_by_the_presets_denominator(name):
    """At the first update (r_ppo = 1) the token-mean PPO loss is -sum(A w) / (the denominator's
    token count): rejected tokens count in it under IcePop and TRL's masks, not under verl's RS."""
    cfg = load_config(None, [f"correction.preset={name}"])
    learner, sampler, mask, adv, d = _batch()
    collected = Collected(None, None, jnp.asarray(mask), jnp.asarray(learner), jnp.asarray(sampler), None, None,
                          None, None, jnp.asarray(adv), None, None)
    hp = hyper.of(cfg)
    batch = learner_batch(collected, hp, cfg.grpo.old_logprobs, cfg.correction)
    objective = make_objective(cfg, recompute_first=True)
    logp_all = jnp.zeros((N, T, 3))  # the entropy term is off (entropy_coef 0)
    loss = float(objective(jnp.asarray(learner), logp_all, batch, hp, True)[0])
    weight, _, denominator = _expected(name, d, mask)
    np.testing.assert_allclose(loss, -(adv[:, None] * weight).sum() / denominator.sum(), rtol=1e-5)


def test_presets_fix_their_structure_and_let_thresholds_be_tuned():
    cfg = load_config(None, ["correction.preset=verl/bypass_pg_is", "correction.tis_cap=5"])
    assert (cfg.grpo.old_logprobs, cfg.grpo.loss, cfg.correction.kinds) == ("bypass", "reinforce", ["seq_tis"])
    assert cfg.correction.tis_cap == 5.0 and cfg.correction.preset == "verl/bypass_pg_is"
    for overrides, field in ((["correction.preset=verl/bypass_pg_is", "grpo.loss=ppo"], "grpo.loss"),
                             (["correction.preset=trl/token_mask", "correction.rejected=drop"], "correction.rejected"),
                             (["correction.preset=trl/token_mask", "correction.kinds=[token_tis]"], "correction.kinds"),
                             (["correction.preset=verl/tis"], "correction.preset")):
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert f"`{field}`" in str(err.value) and "preset" in str(err.value)
    # restating a value the preset sets is not a conflict, and a dumped config validates to itself
    cfg = load_config(None, ["correction.preset=trl/token_mask", "grpo.old_logprobs=recompute"])
    assert config_from_dict(cfg.model_dump()) == cfg


def test_knobs_that_select_nothing_are_errors_and_sequence_normalisation_counts_responses():
    for override, field in (("correction.rejected=zero", "correction.rejected"),
                            ("correction.batch_normalize_over=responses", "correction.batch_normalize_over")):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["correction.kinds=[token_tis]", override])
        assert f"`{field}`" in str(err.value)
    # one response of 4 tokens at weight 2 and one of 1 token at weight 0.5 (the rest padding):
    # per token the mean is 9/5, per response (2 + 0.5) / 2
    cfg = load_config(None, ["correction.kinds=[token_tis]", "correction.tis_cap=10", "correction.batch_normalize=true",
                             "correction.batch_normalize_over=responses"])
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    learner = np.full((2, 4), -1.0, np.float32)
    sampler = learner - np.log(np.array([[2.0] * 4, [0.5] * 4], np.float32))
    collected = Collected(None, None, jnp.asarray(mask), jnp.asarray(learner), jnp.asarray(sampler), None, None,
                          None, None, jnp.asarray([1.0, -1.0]), None, None)
    batch = learner_batch(collected, hyper.of(cfg), "recompute", cfg.correction)
    np.testing.assert_allclose(np.asarray(batch.weight_NT)[mask > 0], np.array([2.0] * 4 + [0.5]) / 1.25, rtol=1e-6)


def test_verl_bypass_recomputes_weights_and_masks_from_the_current_policy():
    """With `bypass_weights=current` (verl's bypass presets) a later minibatch's weights and masks
    come from pi_theta / mu at that minibatch, not from pi_old / mu at the step's start."""
    learner, sampler, mask, adv, _ = _batch()
    moved = learner + np.random.default_rng(1).normal(scale=0.05, size=learner.shape).astype(np.float32)  # theta != theta_old
    d_now = (moved.astype(np.float64) - sampler) * mask
    collected = Collected(None, None, jnp.asarray(mask), jnp.asarray(learner), jnp.asarray(sampler), None, None,
                          None, None, jnp.asarray(adv), None, None)
    logp_all = jnp.zeros((N, T, 3))
    cfg = load_config(None, ["correction.preset=verl/bypass_pg_is"])
    hp = hyper.of(cfg)
    batch = learner_batch(collected, hp, "bypass", cfg.correction)
    refresh = refreshed_correction("bypass", cfg.correction)
    loss = float(make_objective(cfg, False, refresh=refresh)(jnp.asarray(moved), logp_all, batch, hp, False)[0])
    weight = _per_response(np.minimum(np.exp(d_now.sum(-1)), 2.0))
    np.testing.assert_allclose(loss, -(adv[:, None] * moved * weight * mask).sum() / mask.sum(), rtol=1e-5)

    cfg = load_config(None, ["correction.preset=verl/bypass_ppo_clip_geo_rs", "correction.geo_low=0.99",
                             "correction.geo_high=1.01"])
    batch = learner_batch(collected, hyper.of(cfg), "bypass", cfg.correction)
    objective = make_objective(cfg, False, refresh=refreshed_correction("bypass", cfg.correction))
    kept_now = _per_response(np.abs(d_now.sum(-1) / mask.sum(-1)) <= np.log(1.01)) * mask
    assert (kept_now != np.asarray(batch.verdict.kept_NT)).any(), "moving theta must change the mask"
    ratio = np.exp(d_now)
    per_token = -np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    loss = float(objective(jnp.asarray(moved), logp_all, batch, hyper.of(cfg), False)[0])
    np.testing.assert_allclose(loss, (per_token * kept_now).sum() / kept_now.sum(), rtol=1e-5)


@pytest.mark.parametrize("overrides", [["correction.bypass_weights=current"],
                                       ["correction.bypass_weights=current", "grpo.old_logprobs=bypass"],
                                       ["correction.bypass_weights=current", "correction.kinds=[geometric]"]])
def test_current_bypass_weights_without_bypass_and_a_correction_are_refused(overrides):
    with pytest.raises(ConfigError, match="`correction.bypass_weights`: 'current' has no effect"):
        load_config(None, overrides)
