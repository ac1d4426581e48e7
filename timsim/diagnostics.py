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
