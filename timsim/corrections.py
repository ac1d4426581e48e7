"""Corrections (remedies) for training-inference mismatch, DESIGN §4.

Each correction is a pure function ``(inputs, knobs) -> (weight_NT, keep_NT)``: a token
weight that multiplies the per-token loss and a 0/1 mask of the tokens it keeps. Rejected
tokens leave the loss *and* its denominator. Corrections compose: weights multiply, masks
intersect. A new correction is one function plus its registration in `CORRECTIONS` (the `correction.*`
knobs it reads, and whether it produces weights or only masks).

Everything is computed once per step, before the updates, from stopped quantities: weights
are never differentiated. Inputs are the learner's `logp_old` (pi_old) and the sampler's
reported `logp_sampler` (mu) at the sampled tokens, so r_corr = pi_old / mu = exp(delta);
log-ratios are clamped to +-20 before exp.

Modes. In recompute mode the PPO ratio is pi_theta / pi_old and the weight multiplies it.
In bypass mode the ratio pi_theta / mu already carries r_corr, so a *weighting* correction
is a choice, `correction.bypass_weights`: `replace` (default; verl's decoupled mode) puts the
learner's pi_old in the ratio, so the weight replaces r_corr and the arm is recompute plus
the weight (`Config.ratio_denominator` says so, and the manifest records it per cell);
`multiply` keeps pi_theta / mu and multiplies the weight onto it, counting the mismatch
twice (DESIGN §4: a prototype that did so fell to 0.34-0.37). Rejections work the same in
both modes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from timsim.grpo import LOG_RATIO_CLAMP
from timsim.kl import KL_ESTIMATORS
from timsim.registry import Registry

# knobs: the `correction.*` fields a kind reads (the config rejects a threshold no listed kind uses);
# static: those among them that select code (passed as keyword arguments, not traced);
# weighting: it produces weights, not only masks (in bypass mode the weight replaces r_corr).
# rejects: it can reject tokens (produces a mask, not only ones).
CORRECTIONS: Registry[Callable] = Registry("correction", "correction.kinds", knobs=(), static=(), weighting=False,
                                           rejects=False)


@dataclasses.dataclass(frozen=True)
class CorrectionInputs:
    delta_NT: jax.Array  # logp_old - logp_sampler at the sampled tokens, clamped, 0 on padding
    mask_NT: jax.Array  # 1 on response tokens
    adv_N: jax.Array
    logp_old_NT: jax.Array  # learner's log-prob of the sampled token (for CIS)

    @property
    def ratio_NT(self) -> jax.Array:
        return jnp.exp(self.delta_NT)

    @property
    def seq_delta_N(self) -> jax.Array:
        return (self.delta_NT * self.mask_NT).sum(-1)

    @property
    def lengths_N(self) -> jax.Array:
        return jnp.maximum(self.mask_NT.sum(-1), 1.0)


def make_inputs(logp_old_NT, logp_sampler_NT, mask_NT, adv_N) -> CorrectionInputs:
    delta = jnp.clip(logp_old_NT - logp_sampler_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask_NT
    return CorrectionInputs(jax.lax.stop_gradient(delta), mask_NT, adv_N, jax.lax.stop_gradient(logp_old_NT))


def _ones(x: CorrectionInputs):
    return jnp.ones_like(x.delta_NT)


def _per_response(x: CorrectionInputs, values_N):
    return jnp.broadcast_to(values_N[:, None], x.delta_NT.shape)


def _seq_ratio(x: CorrectionInputs):
    return jnp.exp(jnp.clip(x.seq_delta_N, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


@CORRECTIONS.register(knobs=("tis_cap",), weighting=True)
def token_tis(x, k):
    """Truncated IS per token: w_t = min(r_corr,t, C)."""
    return jnp.minimum(x.ratio_NT, k.tis_cap), _ones(x)


@CORRECTIONS.register(knobs=("tis_cap",), weighting=True)
def seq_tis(x, k):
    """Truncated IS per response: w = min(prod_t r_corr,t, C) on every token of the response."""
    return _per_response(x, jnp.minimum(_seq_ratio(x), k.tis_cap)), _ones(x)


@CORRECTIONS.register(knobs=("mis_low", "mis_high"), weighting=True, rejects=True)
def token_mis(x, k):
    """Masked IS per token (IcePop): w_t = r_corr,t, kept only if lo <= r_corr,t <= hi."""
    keep = (x.ratio_NT >= k.mis_low) & (x.ratio_NT <= k.mis_high)
    return x.ratio_NT, keep.astype(jnp.float32)


@CORRECTIONS.register(knobs=("mis_low", "mis_high"), rejects=True)
def token_mask(x, k):
    """Token rejection (verl's token_k1): keep a token only if lo <= r_corr,t <= hi (no weight)."""
    return _ones(x), ((x.ratio_NT >= k.mis_low) & (x.ratio_NT <= k.mis_high)).astype(jnp.float32)


@CORRECTIONS.register(knobs=("seq_low", "seq_high"), rejects=True)
def seq_mask(x, k):
    """Sequence rejection: keep a response only if lo <= prod_t r_corr,t <= hi (no weight)."""
    ratio = _seq_ratio(x)
    return _ones(x), _per_response(x, ((ratio >= k.seq_low) & (ratio <= k.seq_high)).astype(jnp.float32))


@CORRECTIONS.register(knobs=("seq_low", "seq_high"), weighting=True, rejects=True)
def seq_mis(x, k):
    """Sequence MIS: the sequence mask times the weight prod_t r_corr,t."""
    weight, keep = seq_mask(x, k)
    return weight * _per_response(x, _seq_ratio(x)), keep


@CORRECTIONS.register(knobs=("geo_low", "geo_high"), rejects=True)
def geometric(x, k):
    """Geometric rejection (length-invariant): keep if lo <= exp(mean_t delta_t) <= hi."""
    geo = jnp.exp(x.seq_delta_N / x.lengths_N)
    return _ones(x), _per_response(x, ((geo >= k.geo_low) & (geo <= k.geo_high)).astype(jnp.float32))


@CORRECTIONS.register(knobs=("kl_estimator", "kl_aggregate", "kl_threshold"), static=("kl_estimator", "kl_aggregate"), rejects=True)
def kl_rejection(x, k, kl_estimator: str = "k3", kl_aggregate: str = "mean"):
    """Trust-region mask: reject a response whose per-token KL estimate, aggregated by sum,
    mean or max over its tokens, exceeds the threshold."""
    kl_NT = KL_ESTIMATORS[kl_estimator](x.delta_NT) * x.mask_NT
    if kl_aggregate == "sum":
        per_seq = kl_NT.sum(-1)
    elif kl_aggregate == "mean":
        per_seq = kl_NT.sum(-1) / x.lengths_N
    else:
        per_seq = jnp.where(x.mask_NT > 0, kl_NT, -jnp.inf).max(-1)
    return _ones(x), _per_response(x, (per_seq <= k.kl_threshold).astype(jnp.float32))


@CORRECTIONS.register(knobs=("veto_threshold",), rejects=True)
def veto(x, k):
    """Reject a response if any of its tokens has r_corr below the veto threshold."""
    low = jnp.where(x.mask_NT > 0, x.ratio_NT, jnp.inf).min(-1)
    return _ones(x), _per_response(x, (low >= k.veto_threshold).astype(jnp.float32))


@CORRECTIONS.register(knobs=("offpolicy_threshold",), rejects=True)
def offpolicy_mask(x, k):
    """DeepSeek-V3.2 off-policy sequence mask: drop a response with A < 0 whose mean
    log(mu / pi) exceeds the threshold. pi is pi_old here (the step's start; at the first
    update pi_theta = pi_old), so mean log(mu / pi) = -mean_t delta_t."""
    drift = -x.seq_delta_N / x.lengths_N
    drop = (x.adv_N < 0) & (drift > k.offpolicy_threshold)
    return _ones(x), _per_response(x, (~drop).astype(jnp.float32))


@CORRECTIONS.register(knobs=("cis_lambda", "cis_kappa"), weighting=True)
def cis(x, k):
    """Calibrated IS: w_t = min(r_corr,t, 1 + lambda * max(1 - p_t, kappa)), a cap that grows as
    the learner's probability p_t = pi_old(y_t) of the token falls (rare tokens keep more weight)."""
    cap = 1.0 + k.cis_lambda * jnp.maximum(1.0 - jnp.exp(x.logp_old_NT), k.cis_kappa)
    return jnp.minimum(x.ratio_NT, cap), _ones(x)


@CORRECTIONS.register(knobs=("prefix_cap",), weighting=True)
def prefix_is(x, k):
    """Prefix IS: w_t = min(prod_{i<=t} r_corr,i, C). The exact per-token correction (the state
    at t was reached under mu), unbiased when untruncated; its variance grows with t."""
    log_prefix = jnp.clip(jnp.cumsum(x.delta_NT, axis=-1), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.minimum(jnp.exp(log_prefix), k.prefix_cap), _ones(x)


@CORRECTIONS.register(knobs=("prefix_cap",), weighting=True)
def minpro(x, k):
    """MinPRO (Lei et al. 2026): the cumulative prefix product is replaced by the token's own
    ratio times the smallest ratio seen before it, w_t = min(r_corr,t * min(1, min_{i<t} r_corr,i), C).

    Our reading of "a non-cumulative surrogate built from the minimum token ratio in the
    preceding prefix": one bad token early in a response down-weights the rest of it, but
    ratios above 1 never compound, so the weight stays bounded by the token's own ratio."""
    ratio = jnp.where(x.mask_NT > 0, x.ratio_NT, 1.0)
    running_min = jax.lax.cummin(ratio, axis=ratio.ndim - 1)
    before = jnp.concatenate([jnp.ones_like(ratio[..., :1]), running_min[..., :-1]], axis=-1)
    return jnp.minimum(ratio * jnp.minimum(before, 1.0), k.prefix_cap), _ones(x)


def centered_score_logp(logp_NT, logp_all_NTV, mu_NTV):
    """Score centering: log pi(y_t) in value, with the gradient of log pi(y_t) - sum_v mu_v log pi_v,
    so every token's score s = grad log pi(y_t) becomes s - E_mu[s] (exact: the vocabulary is small).

    Why (DESIGN §8.1): under mu the expected update is Cov_mu(R, s) + (E_mu[R] - b) E_mu[s]; the
    learner's score has mean zero under pi, not under mu, so the second term is a drift that
    any baseline error amplifies. Centering removes it (the update becomes Cov_mu(R, s) whatever
    b is); the covariance bias Cov_mu - Cov_pi remains. `mu_NTV` is treated as a constant."""
    expected = (jax.lax.stop_gradient(mu_NTV) * logp_all_NTV).sum(-1)
    return logp_NT + (jax.lax.stop_gradient(expected) - expected)  # the added term is exactly 0 in value


def apply_corrections(kinds: tuple[str, ...], x: CorrectionInputs, knobs: dict, kl_estimator: str = "k3",
                      kl_aggregate: str = "mean", batch_normalize: bool = False,
                      normalize_over: str = "tokens") -> tuple[jax.Array, jax.Array]:
    """Compose `kinds`: (weight_NT, keep_NT); padding is never kept. With `batch_normalize`
    the kept weights are divided by their mean (w <- w / mean(w)): over kept tokens
    (`normalize_over="tokens"`), or over responses, each response counting once with the mean
    weight of its kept tokens (`"responses"`, verl's normalisation of sequence-level weights)."""
    weight, keep = _ones(x), x.mask_NT
    static = {"kl_estimator": kl_estimator, "kl_aggregate": kl_aggregate}
    for kind in kinds:
        entry = CORRECTIONS.entry(kind)
        w, m = entry.value(x, knobs, **{name: static[name] for name in entry.static})
        weight, keep = weight * w, keep * m
    if batch_normalize:
        if normalize_over == "tokens":
            mean = (weight * keep).sum() / jnp.maximum(keep.sum(), 1.0)
        else:
            kept_N = keep.sum(-1)
            response_mean_N = (weight * keep).sum(-1) / jnp.maximum(kept_N, 1.0)
            mean = (response_mean_N * (kept_N > 0)).sum() / jnp.maximum((kept_N > 0).sum(), 1.0)
        weight = weight / jnp.maximum(mean, 1e-30)
    return jax.lax.stop_gradient(weight), jax.lax.stop_gradient(keep)


def correction_metrics(weight_NT, keep_NT, mask_NT, any_kept) -> dict:
    """What the corrections did this step: rejected fraction, the applied weights on kept
    tokens (mean, max, normalised ESS) and whether the update was skipped."""
    n = jnp.maximum(keep_NT.sum(), 1.0)
    w_sum, w2_sum = (weight_NT * keep_NT).sum(), (weight_NT**2 * keep_NT).sum()
    return {
        "rejected_token_frac": 1.0 - keep_NT.sum() / jnp.maximum(mask_NT.sum(), 1.0),
        "corr_weight_mean": w_sum / n,
        "corr_weight_max": jnp.where(keep_NT > 0, weight_NT, 0.0).max(),
        "corr_ess": w_sum**2 / jnp.maximum(n * w2_sum, 1e-30),
        "update_skipped": 1.0 - any_kept.astype(jnp.float32),
    }


class Verdict(NamedTuple):
    """What the corrections decided on a batch: the weights and loss mask the loss uses, and the
    tokens they keep (the loss mask too, unless `correction.rejected=zero` keeps rejected tokens
    in the denominator at weight 0)."""

    weight_NT: jax.Array
    keep_NT: jax.Array
    kept_NT: jax.Array


def refreshed_correction(old_logprobs: str, corr):
    """The correction to recompute from the current policy at every minibatch (verl's bypass,
    `correction.bypass_weights=current`), or None when weights are computed once per step."""
    return corr if old_logprobs == "bypass" and corr.bypass_weights == "current" and corr.kinds else None


def correction_verdict(mask_NT, logp_learner_NT, logp_sampler_NT, adv_N, hp, corr) -> Verdict:
    """The corrections' weights and masks from the learner's and the sampler's log-probs, and
    the loss's mask (with `correction.rejected=zero` every response token, rejected ones at weight 0)."""
    weight, kept = jnp.ones_like(mask_NT), mask_NT
    if corr.kinds:
        weight, kept = apply_corrections(tuple(corr.kinds), make_inputs(logp_learner_NT, logp_sampler_NT, mask_NT, adv_N),
                                         hp.correction, corr.kl_estimator, corr.kl_aggregate,
                                         corr.batch_normalize, corr.batch_normalize_over)
    if corr.rejected == "zero":
        return Verdict(weight * kept, mask_NT, kept)
    return Verdict(weight, kept, kept)
