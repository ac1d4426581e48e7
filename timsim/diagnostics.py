"""Mismatch diagnostics between the learner (pi_old) and the sampler (mu), DESIGN §5.

All per-token quantities are averaged over response tokens (mask = 1); delta = logp_old -
logp_sampler and r_corr = exp(delta) are taken at the sampled tokens, the exact divergences
over the whole (tiny) vocabulary at every sampled position.
"""

from __future__ import annotations

import jax
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
    lengths = jnp.maximum(mask_NT.sum(-1), 1.0)
    log_ppl_diff_N = seq_delta / lengths  # log PPL_mu - log PPL_pi of each response
    log_ppl_learner_N = -(logp_old * mask_NT).sum(-1) / lengths
    log_ppl_sampler_N = -(logp_sampler * mask_NT).sum(-1) / lengths
    kl_NT = (p_sampler * log_diff).sum(-1) * mask_NT
    entropy = lambda p, logp: -(p * logp).sum(-1)  # noqa: E731
    abs_delta = jnp.where(mask_NT > 0, jnp.abs(delta), jnp.nan)
    return {
        "delta_abs_mean": masked_mean(jnp.abs(delta), mask_NT),
        "delta_abs_max": jnp.abs(delta).max(),
        "mismatch_k1": masked_mean(-delta, mask_NT),
        "delta_abs_q50": jnp.nanquantile(abs_delta, 0.5),
        "delta_abs_q90": jnp.nanquantile(abs_delta, 0.9),
        "delta_abs_q99": jnp.nanquantile(abs_delta, 0.99),
        "mismatch_k2": masked_mean(0.5 * delta**2, mask_NT),
        "mismatch_k3": masked_mean(ratio - 1.0 - delta, mask_NT),
        "chi2_token": masked_mean(ratio**2, mask_NT) - 1.0,
        "ratio_out_band_frac": masked_mean((ratio < 0.5) | (ratio > 2.0), mask_NT),
        "dp_abs_mean": masked_mean(dp, mask_NT),
        "dp_abs_max": dp.max(),
        "extreme_token_frac": masked_mean(dp > 0.5, mask_NT),
        "p_pearson": masked_pearson(take(p_learner), take(p_sampler), mask_NT),
        "kl_sampler_learner": masked_mean(kl_NT, mask_NT),
        "kl_learner_sampler": masked_mean((-p_learner * log_diff).sum(-1), mask_NT),
        "tv_distance": masked_mean(0.5 * jnp.abs(p_sampler - p_learner).sum(-1), mask_NT),
        "argmax_flip_frac": masked_mean(logp_all_learner_NTV.argmax(-1) != logp_all_sampler_NTV.argmax(-1), mask_NT),
        "entropy_sampler": masked_mean(entropy(p_sampler, logp_all_sampler_NTV), mask_NT),
        "entropy_learner": masked_mean(entropy(p_learner, logp_all_learner_NTV), mask_NT),
        "log_ppl_diff": log_ppl_diff_N.mean(),
        "ppl_ratio": jnp.exp(log_ppl_diff_N).mean(),
        "ppl_ratio_learner": jnp.exp(-log_ppl_diff_N).mean(),
        "log_ppl_abs_diff": jnp.abs(log_ppl_diff_N).mean(),
        "log_ppl_learner": log_ppl_learner_N.mean(),
        "log_ppl_sampler": log_ppl_sampler_N.mean(),
        "ppl_learner": jnp.exp(log_ppl_learner_N).mean(),
        "ppl_sampler": jnp.exp(log_ppl_sampler_N).mean(),
        "seq_kl": kl_NT.sum(-1).mean(),
        "seq_delta_var": seq_delta.var(),
        "seq_k3_sum": (ratio - 1.0 - delta).sum(-1).mean(),
        "chi2_seq": jnp.exp(jnp.clip(2.0 * seq_delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).mean() - 1.0,
    }


def masked_pearson(x_NT, y_NT, mask_NT) -> jax.Array:
    """Pearson correlation of x and y over the tokens with mask 1 (1 when both are constant
    and equal, e.g. at zero mismatch with a saturated policy)."""
    mx, my = masked_mean(x_NT, mask_NT), masked_mean(y_NT, mask_NT)
    cov = masked_mean((x_NT - mx) * (y_NT - my), mask_NT)
    var_x, var_y = masked_mean((x_NT - mx) ** 2, mask_NT), masked_mean((y_NT - my) ** 2, mask_NT)
    same = jnp.all(jnp.where(mask_NT > 0, x_NT == y_NT, True))
    return jnp.where(same, 1.0, cov / jnp.sqrt(jnp.maximum(var_x * var_y, 1e-30)))


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


PROB_BINS = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def delta_quantiles_by_bin(logp_old_NT, logp_sampler_NT, mask_NT, position_bins: int = 4):
    """Quantiles of |delta| (50/90/99/99.9/max) by bins of the learner's probability of the
    sampled token and of the position in the response (host-side, for reports), as a pandas
    DataFrame: mismatch is rarely uniform, and real-engine profiles are given per bin."""
    import numpy as np
    import pandas as pd

    mask = np.asarray(mask_NT) > 0
    abs_delta = np.abs(np.asarray(logp_old_NT) - np.asarray(logp_sampler_NT))[mask]
    prob = np.exp(np.asarray(logp_old_NT))[mask]
    position = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)[mask]
    edges = np.unique(np.round(np.linspace(0, mask.shape[1], position_bins + 1)).astype(int))
    rows = []
    bins = [("p", lo, hi, (prob >= lo) & ((prob < hi) | (hi == 1.0))) for lo, hi in zip(PROB_BINS, PROB_BINS[1:])]
    bins += [("position", lo, hi, (position >= lo) & (position < hi)) for lo, hi in zip(edges, edges[1:])]
    for by, lo, hi, sel in bins:
        values = abs_delta[sel]
        row = {"by": by, "bin": f"[{lo:g}, {hi:g})", "tokens": int(sel.sum())}
        row.update({f"q{100 * q:g}": float(np.quantile(values, q)) if values.size else float("nan") for q in QUANTILES})
        row["max"] = float(values.max()) if values.size else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


MAX_ROUTING_LAYERS = 8  # per-layer routing metrics are logged for the first this many layers


def routing_metrics(routes_sampler, routes_learner, mask_NT) -> dict:
    """Mixture of experts: how often the sampler's expert choice differs from the learner's.

    Routes are per layer [N, P + T - 1, k] over the teacher-forced positions; the last T of
    them process the tokens that predict the response, and a token "sees a different expert"
    in a layer when the two sides' sets of k experts differ there. Empty for a dense model."""
    if routes_learner is None:
        return {}
    t = mask_NT.shape[1]
    differs = [(jnp.sort(a[:, -t:], -1) != jnp.sort(b[:, -t:], -1)).any(-1)
               for a, b in zip(routes_sampler, routes_learner)]
    per_layer = [masked_mean(d, mask_NT) for d in differs]
    out = {f"route_flip_l{i}": v for i, v in enumerate(per_layer[:MAX_ROUTING_LAYERS])}
    out["route_flip_frac"] = jnp.mean(jnp.stack(per_layer))
    out["route_any_layer_frac"] = masked_mean(jnp.stack(differs).any(0), mask_NT)
    return out
