"""Mismatch diagnostics between the learner (pi_old) and the sampler (mu), DESIGN §5.

All per-token quantities are averaged over response tokens (mask = 1); delta = logp_old -
logp_sampler and r_corr = exp(delta) are taken at the sampled tokens, the exact divergences
over the whole (tiny) vocabulary at every sampled position.
"""

from __future__ import annotations

import jax.numpy as jnp

from timsim.grpo import LOG_RATIO_CLAMP, masked_mean


def mismatch_metrics(logp_all_learner_NTV, logp_all_sampler_NTV, tokens_NT, mask_NT) -> dict:
    """Sampled-token estimators and exact divergences of mu against pi_old."""
    take = lambda a: jnp.take_along_axis(a, tokens_NT[..., None], axis=-1)[..., 0]  # noqa: E731
    logp_old, logp_sampler = take(logp_all_learner_NTV), take(logp_all_sampler_NTV)
    delta = jnp.clip(logp_old - logp_sampler, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask_NT
    ratio = jnp.exp(delta)
    p_learner, p_sampler = jnp.exp(logp_all_learner_NTV), jnp.exp(logp_all_sampler_NTV)
    dp = jnp.abs(take(p_learner) - take(p_sampler)) * mask_NT
    log_diff = logp_all_sampler_NTV - logp_all_learner_NTV
    seq_delta = delta.sum(-1)
    entropy = lambda p, logp: -(p * logp).sum(-1)  # noqa: E731
    return {
        "delta_abs_mean": masked_mean(jnp.abs(delta), mask_NT),
        "delta_abs_max": jnp.abs(delta).max(),
        "mismatch_k1": masked_mean(-delta, mask_NT),
        "mismatch_k3": masked_mean(ratio - 1.0 - delta, mask_NT),
        "chi2_token": masked_mean(ratio**2, mask_NT) - 1.0,
        "ratio_out_band_frac": masked_mean((ratio < 0.5) | (ratio > 2.0), mask_NT),
        "dp_abs_mean": masked_mean(dp, mask_NT),
        "dp_abs_max": dp.max(),
        "extreme_token_frac": masked_mean(dp > 0.5, mask_NT),
        "kl_sampler_learner": masked_mean((p_sampler * log_diff).sum(-1), mask_NT),
        "kl_learner_sampler": masked_mean((-p_learner * log_diff).sum(-1), mask_NT),
        "tv_distance": masked_mean(0.5 * jnp.abs(p_sampler - p_learner).sum(-1), mask_NT),
        "argmax_flip_frac": masked_mean(logp_all_learner_NTV.argmax(-1) != logp_all_sampler_NTV.argmax(-1), mask_NT),
        "entropy_sampler": masked_mean(entropy(p_sampler, logp_all_sampler_NTV), mask_NT),
        "seq_delta_var": seq_delta.var(),
        "seq_k3_sum": (ratio - 1.0 - delta).sum(-1).mean(),
        "chi2_seq": jnp.exp(jnp.clip(2.0 * seq_delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).mean() - 1.0,
    }


def advantage_skew_metrics(delta_NT, adv_N, mask_NT, eps_low, eps_high) -> dict:
    """C(r) = -(r - 1) A with r = r_corr (the PPO ratio at the first update in bypass mode),
    split by the sign of A, and the fraction of tokens whose gradient PPO clipping drops at
    that update (A > 0 with r > 1 + eps_high, A < 0 with r < 1 - eps_low): which tokens
    survive the clip depends on the sign of A (DESIGN §8.1). Also the importance-weight
    statistics of r_corr: mean, std, min, max and the normalised effective sample size
    (sum w)^2 / (n sum w^2)."""
    ratio = jnp.exp(jnp.clip(delta_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = jnp.broadcast_to(adv_N[:, None], delta_NT.shape)
    pos, neg = mask_NT * (adv > 0), mask_NT * (adv < 0)
    contrib = -(ratio - 1.0) * adv
    n = jnp.maximum(mask_NT.sum(), 1.0)
    w_sum, w2_sum = (ratio * mask_NT).sum(), (ratio**2 * mask_NT).sum()
    mean = w_sum / n
    return {
        "contrib_pos": masked_mean(contrib, pos),
        "contrib_neg": masked_mean(contrib, neg),
        "clip_drop_pos_frac": masked_mean(ratio > 1.0 + eps_high, pos),
        "clip_drop_neg_frac": masked_mean(ratio < 1.0 - eps_low, neg),
        "is_weight_mean": mean,
        "is_weight_std": jnp.sqrt(jnp.maximum(w2_sum / n - mean**2, 0.0)),
        "is_weight_min": jnp.where(mask_NT > 0, ratio, jnp.inf).min(),
        "is_weight_max": jnp.where(mask_NT > 0, ratio, -jnp.inf).max(),
        "is_ess": w_sum**2 / jnp.maximum(n * w2_sum, 1e-30),
    }
