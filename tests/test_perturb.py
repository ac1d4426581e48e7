"""Perturbations, calibration and mismatch diagnostics."""

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timsim.calibration import calibrate_scale, hyperparams, make_measure
from timsim.config import ConfigError, load_config
from timsim.diagnostics import mismatch_metrics
from timsim.noise import LOGIT_NOISE, perturb_teacher_forced
from timsim.tasks import VOCAB_SIZE
from test_core import SIDE_METRICS, assert_same_training, train_metrics

EXAMPLE_PROFILE = Path(__file__).parent.parent / "examples" / "engine_pairs.profile.json"
FAMILY_KNOBS = {"gaussian": [], "student_t": ["perturbation.logit_noise.nu=3"],
                "spikes": ["perturbation.logit_noise.rate=0.05"], "magnitude": [], "dirichlet": [],
                "profile": [f"perturbation.logit_noise.profile={EXAMPLE_PROFILE}"]}
TRUNCATION_KNOBS = {"top_k": "perturbation.logit_noise.top_k=3", "top_p": "perturbation.logit_noise.top_p=0.8"}


ONE_SIDED_KNOBS = {**TRUNCATION_KNOBS, "temperature": "perturbation.logit_noise.temperature=0.7"}


def test_every_family_is_covered():
    assert set(FAMILY_KNOBS) | set(ONE_SIDED_KNOBS) == set(LOGIT_NOISE)
    assert set(FAMILY_KNOBS) == set(LOGIT_NOISE.names(scaled=True))


@pytest.mark.bits
def test_top_k_of_the_whole_vocabulary_is_bit_identical_to_zero_mismatch(tiny_overrides, tiny_base, zero_run):
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=top_k",
                                              f"perturbation.logit_noise.top_k={VOCAB_SIZE}"])
    _, metrics = train_metrics(cfg, tiny_base)
    # the entropies of both distributions come from another fusion of the same arithmetic
    # than the zero run's (a different program): equal to float32 rounding; the tokens, the
    # rewards, every delta and the update bit for bit
    assert_same_training(zero_run, metrics, rounding=SIDE_METRICS)


@pytest.mark.parametrize("family", ["top_k"])  # top_p: the same identities, exactly, in tests/test_theory.py
def test_truncation_is_one_signed_and_k1_is_the_exact_kl(tiny_overrides, tiny_base, family):
    """With support truncated and renormalised, delta = log(kept mass) <= 0 at every sampled
    token and KL(mu || pi) = -log(kept mass) per position, so k1 equals the exact KL: in a run's
    own metrics (this program is shared with the whole-vocabulary test above)."""
    cfg = load_config(None, tiny_overrides + [f"perturbation.logit_noise.family={family}", TRUNCATION_KNOBS[family]])
    _, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["kl_sampler_learner"] > 0)
    np.testing.assert_allclose(metrics["mismatch_k1"], metrics["kl_sampler_learner"], rtol=1e-4, atol=1e-7)
    assert np.all(metrics["delta_floor_max"] < 1e-4)


@pytest.fixture(scope="module")
def zero_run(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides)
    return train_metrics(cfg, tiny_base)[1]


def _sampled(cfg, base, scales):
    """The sampler's own responses to a fixed batch of training prompts and both sides' reports
    at each noise scale (one small compiled program per config: `make_measure`)."""
    measure = make_measure(cfg, base[0], per_token=True)
    return [jax.device_get(measure(base[1], hyperparams(cfg, scale))) for scale in scales]


@pytest.mark.bits
def test_scale_zero_gaussian_noise_trains_bit_identically_to_zero_mismatch(tiny_overrides, tiny_base, zero_run):
    """The whole run, for one family: a scale of 0 adds an exact zero, so every metric of every
    step matches the zero-mismatch run's (the other families: at the sampler, below)."""
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian",
                                              "perturbation.logit_noise.scale=0"])
    _, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["delta_abs_max"] == 0.0)
    assert_same_training(zero_run, metrics)


@pytest.fixture(scope="module")
def zero_sampled(tiny_overrides, tiny_base):
    return _sampled(load_config(None, tiny_overrides), tiny_base, [0.0])[0]


SCALED_SAMPLERS = {**{family: [f"perturbation.logit_noise.family={family}"] + knobs
                      for family, knobs in FAMILY_KNOBS.items()},
                   **{f"gaussian_{mode}": ["perturbation.logit_noise.family=gaussian",
                                           f"perturbation.logit_noise.mode={mode}"] for mode in ("context", "state")}}


@pytest.mark.bits
@pytest.mark.parametrize("name", sorted(SCALED_SAMPLERS))
def test_every_scaled_sampler_is_the_learner_at_scale_zero_and_samples_its_reported_mu(tiny_overrides, tiny_base,
                                                                                       zero_sampled, name):
    """At scale 0 the sampler draws the zero-mismatch sampler's tokens and reports the learner's
    log-probs, bit for bit; at scale 1 it creates mismatch, and the decode path sampled from the
    same mu that teacher forcing reports (same noise keys; persistent modes: the same draw per
    context or state)."""
    cfg = load_config(None, tiny_overrides + SCALED_SAMPLERS[name])
    zero, noisy = _sampled(cfg, tiny_base, [0.0, 1.0])
    assert np.array_equal(zero["responses"], zero_sampled["responses"])
    assert np.array_equal(zero["logp_sampler"], zero["logp_old"])
    assert np.array_equal(zero["logp_old"], zero_sampled["logp_old"])
    assert float(zero["kl_sampler_learner"]) == 0.0
    assert float(noisy["kl_sampler_learner"]) > 0
    assert float(noisy["delta_floor_max"]) < 1e-4


@pytest.mark.bits
def test_common_random_numbers_across_scales(tiny_overrides, tiny_base):
    """Same seed, different noise scales: same prompts and sampling uniforms, so a negligible
    scale samples exactly the tokens of the zero-scale run at the first step."""
    out = {}
    for scale in (0.0, 1e-6, 1.0):
        cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian",
                                                  f"perturbation.logit_noise.scale={scale}"])
        out[scale] = train_metrics(cfg, tiny_base)[1]
    for name in ("reward_mean", "accuracy", "response_len"):
        assert np.array_equal(out[0.0][name][:, 0], out[1e-6][name][:, 0]), name
    assert not np.array_equal(out[0.0]["kl_sampler_learner"], out[1.0]["kl_sampler_learner"])


@pytest.mark.bits
def test_teacher_forced_noise_matches_per_position_draws():
    key = jax.random.key(0)
    logits = jax.random.normal(jax.random.key(1), (3, 5, 16))
    knobs = SimpleNamespace(scale=jnp.float32(0.7))
    batched = perturb_teacher_forced(LOGIT_NOISE["gaussian"], key, logits, knobs)
    for t in range(5):
        one = LOGIT_NOISE["gaussian"](jax.random.fold_in(key, t), logits[:, t], knobs)
        assert np.array_equal(np.asarray(batched[:, t]), np.asarray(one))


@pytest.fixture(scope="module")
def gaussian_measure(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian"])
    return cfg, make_measure(cfg, tiny_base[0])


@pytest.mark.parametrize("target", [1e-3, 3e-2])
def test_calibration_hits_its_target(gaussian_measure, tiny_base, target):
    cfg, measure = gaussian_measure
    scale, got = calibrate_scale(measure, tiny_base[1], cfg, target)
    assert scale > 0
    assert got["kl_sampler_learner"] == pytest.approx(target, rel=1e-2)


def test_sequence_level_calibration_holds_on_fresh_samples(gaussian_measure, tiny_overrides, tiny_base):
    """Calibrated on one batch, the per-response KL on an independent batch (other prompts,
    samples and noise) is within 4 standard errors of the target."""
    cfg, measure = gaussian_measure
    target = 0.05
    scale, got = calibrate_scale(measure, tiny_base[1], cfg, target, "seq_kl")
    assert got["seq_kl"] == pytest.approx(target, rel=1e-2)
    fresh = jax.device_get(make_measure(cfg, tiny_base[0], seed=7)(tiny_base[1], hyperparams(cfg, scale)))
    assert abs(float(fresh["seq_kl"]) - target) < 4 * float(fresh["seq_kl_se"])
    assert float(fresh["seq_kl"]) == pytest.approx(float(fresh["kl_sampler_learner"]) * float(
        fresh["response_tokens"]), rel=0.5)  # per response ~ per token x tokens per response


def test_unreachable_target_names_the_reachable_range(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=spikes",
                                              "perturbation.logit_noise.rate=0.0"])
    with pytest.raises(ConfigError, match="reachable range"):
        calibrate_scale(make_measure(cfg, tiny_base[0]), tiny_base[1], cfg, 1e-2, iters=2)


@pytest.mark.parametrize("override, field", [
    ("perturbation.logit_noise.family=gauss", "perturbation.logit_noise.family"),
    ("perturbation.logit_noise.nu=2", "perturbation.logit_noise.nu"),
    ("perturbation.logit_noise.scale=-1", "perturbation.logit_noise.scale"),
    ("perturbation.logit_noise.rate=1.5", "perturbation.logit_noise.rate"),
    ("perturbation.target.token_kl=1e-3", "perturbation"),
    ("perturbation.logit_noise.top_k=17", "perturbation.logit_noise.top_k"),
    ("perturbation.logit_noise.top_k=0", "perturbation.logit_noise.top_k"),
    ("perturbation.logit_noise.top_p=0", "perturbation.logit_noise.top_p"),
    ("perturbation.logit_noise.top_p=1.5", "perturbation.logit_noise.top_p"),
])
def test_bad_perturbation_config_names_the_field(override, field):
    """Bad knobs fail at load time with the field named."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"`{field}`" in str(err.value)


def test_mismatch_metrics_hand_computed():
    """Two positions, vocabulary of 2, both sampled token 0: pi = (0.5, 0.5), mu = (0.8, 0.2)."""
    pi = jnp.log(jnp.array([[[0.5, 0.5], [0.5, 0.5]]]))
    mu = jnp.log(jnp.array([[[0.8, 0.2], [0.8, 0.2]]]))
    tokens = jnp.zeros((1, 2), jnp.int32)
    mask = jnp.array([[1.0, 0.0]])  # the second position is padding and must not count
    m = {k: float(v) for k, v in mismatch_metrics(pi, mu, tokens, mask).items()}
    delta = np.log(0.5 / 0.8)
    assert m["delta_abs_mean"] == pytest.approx(abs(delta), rel=1e-5)
    assert m["mismatch_k1"] == pytest.approx(-delta, rel=1e-5)
    assert m["mismatch_k3"] == pytest.approx(np.exp(delta) - 1 - delta, rel=1e-5)
    assert m["chi2_token"] == pytest.approx(np.exp(2 * delta) - 1, rel=1e-5)
    assert m["ratio_out_band_frac"] == 0.0  # r = 0.625 is inside [0.5, 2]
    assert m["kl_sampler_learner"] == pytest.approx(0.8 * np.log(0.8 / 0.5) + 0.2 * np.log(0.2 / 0.5), rel=1e-5)
    assert m["kl_learner_sampler"] == pytest.approx(0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2), rel=1e-5)
    assert m["tv_distance"] == pytest.approx(0.3, rel=1e-5)
    assert m["dp_abs_max"] == pytest.approx(0.3, rel=1e-5)
    assert m["argmax_flip_frac"] == 0.0
    assert m["seq_k3_sum"] == pytest.approx(np.exp(delta) - 1 - delta, rel=1e-5)
    assert m["mismatch_k2"] == pytest.approx(delta**2 / 2, rel=1e-5)
    assert m["log_ppl_diff"] == pytest.approx(delta, rel=1e-5)  # one token: mean_t delta
    assert m["ppl_ratio"] == pytest.approx(0.5 / 0.8, rel=1e-5)
    assert m["seq_kl"] == pytest.approx(m["kl_sampler_learner"], rel=1e-6)  # one response token
    assert m["delta_abs_q50"] == m["delta_abs_q99"] == pytest.approx(abs(delta), rel=1e-5)
    assert m["entropy_learner"] == pytest.approx(np.log(2), rel=1e-6)


def test_pearson_and_quantiles_over_masked_tokens():
    from timsim.diagnostics import masked_pearson

    x = jnp.array([[0.1, 0.5, 0.9, 7.0]])
    y = jnp.array([[0.2, 0.4, 1.0, -3.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the outlier is padding
    assert float(masked_pearson(x, y, mask)) == pytest.approx(np.corrcoef([0.1, 0.5, 0.9], [0.2, 0.4, 1.0])[0, 1],
                                                              rel=1e-5)
    assert float(masked_pearson(x, x, mask)) == 1.0
    # quantiles of |delta| ignore padding: |delta| = (log 2, log 4, 0) on the real tokens
    pi = jnp.log(jnp.array([[[0.5, 0.5], [0.8, 0.2], [0.5, 0.5], [0.5, 0.5]]]))
    mu = jnp.log(jnp.array([[[0.25, 0.75], [0.2, 0.8], [0.5, 0.5], [0.01, 0.99]]]))
    tokens = jnp.zeros((1, 4), jnp.int32)
    m = mismatch_metrics(pi, mu, tokens, mask)
    assert float(m["delta_abs_q50"]) == pytest.approx(np.log(2), rel=1e-5)
    assert float(m["delta_abs_max"]) == pytest.approx(np.log(4), rel=1e-5)


def test_a_target_needs_a_scaled_family():
    with pytest.raises(ConfigError, match="with a scale"):
        load_config(None, ["perturbation.logit_noise.family=top_k", "perturbation.target.token_kl=1e-3"])


def test_advantage_skew_and_is_weights_hand_computed():
    """Two responses of two tokens: A = +1 with r_corr (2, 1), A = -1 with r_corr (0.5, 1)."""
    from timsim.diagnostics import advantage_skew_metrics

    delta = jnp.log(jnp.array([[2.0, 1.0], [0.5, 1.0]]))
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 2))
    m = {k: float(v) for k, v in advantage_skew_metrics(delta, adv, mask, 0.2, 0.2).items()}
    assert m["contrib_pos"] == pytest.approx((-(2 - 1) * 1 + 0) / 2)
    assert m["contrib_neg"] == pytest.approx((-(0.5 - 1) * -1 + 0) / 2)
    assert m["clip_drop_pos_frac"] == pytest.approx(0.5) and m["clip_drop_neg_frac"] == pytest.approx(0.5)
    assert m["is_weight_mean"] == pytest.approx(1.125)
    assert m["is_weight_min"] == pytest.approx(0.5) and m["is_weight_max"] == pytest.approx(2.0)
    assert m["is_weight_std"] == pytest.approx(np.std([2.0, 1.0, 0.5, 1.0]), rel=1e-5)
    assert m["is_ess"] == pytest.approx(4.5**2 / (4 * 6.25), rel=1e-6)


@pytest.mark.bits
def test_zero_mismatch_skew_metrics_are_neutral(zero_run):
    assert np.all(zero_run["contrib_pos"] == 0.0) and np.all(zero_run["contrib_neg"] == 0.0)
    assert np.all(zero_run["is_ess"] == 1.0) and np.all(zero_run["is_weight_mean"] == 1.0)


def _spec(overrides):
    from timsim.sampler import sampler_spec

    return sampler_spec(load_config(None, overrides))


def test_context_noise_is_a_deterministic_function_of_the_context():
    """Identical contexts get identical noise, whatever the row or the step; contexts that
    differ at response token j get the same noise up to position j and different noise after."""
    from timsim.sampler import noise_key_for, report_logits

    spec = _spec(["perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.mode=context"])
    assert jax.random.key_data(noise_key_for(spec, 3, 1)).tolist() == jax.random.key_data(noise_key_for(spec, 3, 9)).tolist()
    prompts = jnp.array([[1, 2, 12], [1, 2, 12], [1, 2, 12]])
    responses = jnp.array([[4, 5, 6, 11], [4, 5, 6, 11], [4, 7, 6, 11]])
    logits = jnp.zeros((3, 4, 16))
    out = np.asarray(report_logits(spec, logits, prompts, responses, noise_key_for(spec, 0, 0),
                                   SimpleNamespace(scale=jnp.float32(1.0))))
    assert np.array_equal(out[0], out[1])
    assert np.array_equal(out[0, :2], out[2, :2]), "positions 0 and 1 share the context"
    assert not np.any(out[0, 2:] == out[2, 2:]), "after the differing token the noise differs"
    fresh = _spec(["perturbation.logit_noise.family=gaussian"])
    assert not np.array_equal(jax.random.key_data(noise_key_for(fresh, 3, 1)), jax.random.key_data(noise_key_for(fresh, 3, 9)))


def test_state_noise_is_a_deterministic_function_of_the_predictive_distribution():
    """Mode state: rows whose distributions round alike get identical noise, whatever their
    context; a different distribution gets a different draw."""
    from timsim.sampler import noise_key_for, report_logits

    spec = _spec(["perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.mode=state"])
    prompts = jnp.array([[1, 2, 12], [3, 4, 12], [1, 2, 12]])
    responses = jnp.array([[4, 5, 11], [7, 8, 11], [4, 5, 11]])
    confident = jnp.zeros(16).at[3].set(8.0)
    logits = jnp.stack([jnp.stack([confident, confident + 1e-3, jnp.zeros(16)])] * 2
                       + [jnp.stack([jnp.zeros(16).at[5].set(8.0)] * 3)])
    knobs = SimpleNamespace(scale=jnp.float32(1.0), state_bin=jnp.float32(0.1))
    out = np.asarray(report_logits(spec, logits, prompts, responses, noise_key_for(spec, 0, 0), knobs))
    noise = out - np.asarray(logits)
    np.testing.assert_allclose(noise[0], noise[1], rtol=0, atol=1e-6)  # other context, same states
    np.testing.assert_allclose(noise[0, 0], noise[0, 1], rtol=0, atol=1e-6)  # near-identical states share it
    assert not np.allclose(noise[0, 0], noise[0, 2]) and not np.allclose(noise[0, 0], noise[2, 0])


def test_persistent_noise_follows_the_weights_version():
    from timsim.sampler import noise_key_for

    spec = _spec(["perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.mode=context",
                  "perturbation.logit_noise.version_steps=4"])
    key = lambda step: jax.random.key_data(noise_key_for(spec, 3, step)).tolist()  # noqa: E731
    assert key(0) == key(3) != key(4) == key(7) != key(8)


def test_weight_noise_is_held_for_hold_steps():
    from timsim.sampler import weight_noise_key

    spec = _spec(["perturbation.weight_noise.family=gaussian", "perturbation.weight_noise.hold_steps=5"])
    keys = [jax.random.key_data(weight_noise_key(spec, 0, s)).tolist() for s in range(11)]
    assert keys[0] == keys[4] and keys[5] == keys[9] and keys[0] != keys[5] and keys[9] != keys[10]


def test_a_perturbation_that_breaks_the_numbers_is_reported_not_raised(tiny_overrides, tiny_base):
    """Infinite logit spikes: reported in metrics; in bypass mode the loss is not finite, so the
    update is skipped and counted, and the run's weights stay finite. (A config refuses an
    infinite scale; numbers that overflow inside a run are what this stands for, so the scale
    is set past validation.)"""
    import jax

    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=spikes", "perturbation.logit_noise.rate=0.5",
                                              "perturbation.logit_noise.scale=1.0", "grpo.old_logprobs=bypass"])
    noise = cfg.perturbation.logit_noise.model_copy(update={"scale": float("inf")})
    cfg = cfg.model_copy(update={"perturbation": cfg.perturbation.model_copy(update={"logit_noise": noise})})
    state, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["nonfinite_frac"][:, 0] > 0)
    assert np.any(metrics["nonfinite_update"] > 0)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.bits
def test_finite_runs_report_no_nonfinite_tokens(zero_run):
    assert np.all(zero_run["nonfinite_frac"] == 0.0)


def test_delta_quantiles_by_bin_hand_computed():
    from timsim.diagnostics import delta_quantiles_by_bin

    logp_old = np.log(np.array([[0.05, 0.95, 0.5, 0.5]]))
    logp_sampler = logp_old - np.array([[0.1, 0.2, 0.3, 9.0]])
    mask = np.array([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    table = delta_quantiles_by_bin(logp_old, logp_sampler, mask, position_bins=2).set_index(["by", "bin"])
    assert table.loc[("p", "[0, 0.1)"), "max"] == pytest.approx(0.1)
    assert table.loc[("p", "[0.9, 0.99)"), "q50"] == pytest.approx(0.2)
    assert table.loc[("p", "[0.5, 0.9)"), "tokens"] == 1  # padding is not counted
    assert table.loc[("position", "[0, 2)"), "max"] == pytest.approx(0.2)
    assert table.loc[("position", "[2, 4)"), "max"] == pytest.approx(0.3)


@pytest.mark.bits
def test_report_only_noise_keeps_the_clean_samples(tiny_overrides, tiny_base, zero_run):
    """Report-only noise: the tokens are the zero-mismatch run's (same reward and accuracy at
    the first step, same common random numbers), only the reported log mu differs."""
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian",
                                              "perturbation.logit_noise.scale=0.5",
                                              "perturbation.logit_noise.report_only=true"])
    _, metrics = train_metrics(cfg, tiny_base)
    for name in ("reward_mean", "accuracy", "response_len"):
        assert np.array_equal(metrics[name][:, 0], zero_run[name][:, 0]), name
    assert np.all(metrics["kl_sampler_learner"] > 0)
    assert np.all(metrics["delta_floor_max"] > 1e-2)  # sampled from pi, reported log mu: the two differ


@pytest.mark.parametrize("track", ["once", "every_chunk"])
def test_tracked_target_recalibrates_each_run_at_chunk_boundaries(tiny_overrides, tiny_base, tmp_path, track):
    """track=once: one scale for the whole run (calibrated at the base). every_chunk: each run
    gets a new scale at each chunk boundary, calibrated on its own weights, saved in the manifest."""

    from timsim.executors import run_cells
    from timsim.plan import Cell
    from timsim.store import Store, load

    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=gaussian",
                                              "perturbation.target.token_kl=0.05", f"perturbation.target.track={track}",
                                              "run.seeds=[0,1]", "run.steps=4", "run.chunk_steps=2"])
    run_cells([Cell("c", cfg)], Store(tmp_path / track))
    metrics, _ = load(tmp_path / track)
    scales = metrics[metrics.step > 0].pivot_table(index="step", columns="seed", values="noise_scale")
    chunk_of = (scales.index - 1) // 2
    assert (scales.groupby(chunk_of).nunique() == 1).all().all()  # constant within a chunk
    manifest = Store(tmp_path / track).read_manifest()
    (group,) = manifest["groups"].values()
    if track == "once":
        assert scales.nunique().max() == 1 and "tracked_scales" not in group
    else:
        per_chunk = scales.groupby(chunk_of).first()
        assert per_chunk.nunique().min() == 2  # a new scale at the boundary
        assert per_chunk.iloc[1].nunique() == 2  # each run its own, from its own weights
        np.testing.assert_allclose(group["tracked_scales"], per_chunk.iloc[-1].to_numpy(), rtol=1e-6)


def test_dirichlet_noise_preserves_the_mean():
    """E[mu] = pi exactly: the mean of many draws is within Monte Carlo error of pi, while each
    draw differs from it."""
    import jax

    from timsim.noise import dirichlet

    logits = jnp.array([2.0, 1.0, 0.0, -1.0])
    pi = np.asarray(jax.nn.softmax(logits))
    keys = jax.random.split(jax.random.key(0), 20000)
    mu = np.exp(np.asarray(jax.vmap(lambda k: dirichlet(k, logits, SimpleNamespace(scale=jnp.float32(0.5))))(keys)))
    np.testing.assert_allclose(mu.sum(-1), 1.0, rtol=1e-5)
    se = mu.std(0) / np.sqrt(len(mu))
    assert np.all(np.abs(mu.mean(0) - pi) < 5 * se)
    assert np.abs(mu[0] - pi).max() > 0.01
    same = dirichlet(keys[0], logits, SimpleNamespace(scale=jnp.float32(0.0)))
    assert np.array_equal(np.asarray(same), np.asarray(logits))


@pytest.mark.parametrize("family", sorted(ONE_SIDED_KNOBS))
def test_one_sided_transform_creates_mismatch_and_the_consistent_fix_removes_it(tiny_overrides, tiny_base, family):
    """The sampler alone applies temperature / top-k / top-p: mismatch. With learner_too the learner
    applies the same transform and delta is exactly 0 again."""
    one_sided = tiny_overrides + [f"perturbation.logit_noise.family={family}", ONE_SIDED_KNOBS[family]]
    measure = lambda cfg: {k: float(v) for k, v in make_measure(cfg, tiny_base[0])(  # noqa: E731
        tiny_base[1], hyperparams(cfg, 0.0)).items()}
    cfg = load_config(None, one_sided)
    assert measure(cfg)["kl_sampler_learner"] > 1e-4
    fixed = measure(load_config(None, one_sided + ["perturbation.logit_noise.learner_too=true"]))
    assert fixed["delta_abs_max"] == 0.0 and fixed["kl_sampler_learner"] == 0.0


def test_learner_too_needs_a_deterministic_transform():
    with pytest.raises(ConfigError, match="learner_too"):
        load_config(None, ["perturbation.logit_noise.family=gaussian", "perturbation.logit_noise.learner_too=true"])
    with pytest.raises(ConfigError, match="perturbation.logit_noise.temperature"):
        load_config(None, ["perturbation.logit_noise.family=temperature", "perturbation.logit_noise.temperature=0"])


@pytest.mark.bits
def test_consistent_temperature_trains_without_mismatch(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["perturbation.logit_noise.family=temperature",
                                              "perturbation.logit_noise.temperature=0.7",
                                              "perturbation.logit_noise.learner_too=true"])
    _, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["delta_abs_max"] == 0.0) and np.all(metrics["ratio_first_dev_max"] == 0.0)
    assert np.all(np.isfinite(metrics["loss"]))
