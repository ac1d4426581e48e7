"""GRPO: group-relative advantages, the PPO-clip loss and its aggregation.

Pure functions over arrays. Shapes: N = prompts * group size responses, T response tokens.
`mask_NT` is 1 on generated tokens (the `<eos>` included) and 0 on padding; padding never
enters a numerator or a denominator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOG_RATIO_CLAMP = 20.0


def advantages(reward_N: jax.Array, group_size: int, kind: str) -> jax.Array:
    """Group-relative advantages [N]: responses to one prompt are contiguous groups.

    zscore: (r - mean) / (std + 1e-6), std with Bessel's correction as in common GRPO code;
    mean: r - mean (Dr. GRPO); rloo: r - mean of the *other* responses of the group.
    """
    r = reward_N.reshape(-1, group_size)
    mean = r.mean(-1, keepdims=True)
    if kind == "zscore":
        adv = (r - mean) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
    elif kind == "mean":
        adv = r - mean
    elif kind == "rloo":
        adv = (r - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"grpo.advantage must be zscore, mean or rloo, got {kind!r}")
    return adv.reshape(-1)


def aggregate(per_token_NT: jax.Array, mask_NT: jax.Array, kind: str) -> jax.Array:
    """Reduce a per-token loss to a scalar.

    token_mean: sum over all tokens / number of tokens;
    seq_mean_token_mean: mean over responses of each response's token mean;
    seq_mean_token_sum_norm: sum over all tokens / (N * T) — a constant normaliser (Dr. GRPO),
    so a response's weight does not depend on its length or on the batch's lengths.
    """
    masked = per_token_NT * mask_NT
    if kind == "token_mean":
        return masked.sum() / jnp.maximum(mask_NT.sum(), 1.0)
    if kind == "seq_mean_token_mean":
        return (masked.sum(-1) / jnp.maximum(mask_NT.sum(-1), 1.0)).mean()
    if kind == "seq_mean_token_sum_norm":
        return masked.sum() / mask_NT.size
    raise ValueError(f"grpo.loss_agg must be token_mean, seq_mean_token_mean or seq_mean_token_sum_norm, got {kind!r}")


def kl_to_reference(logp_NT: jax.Array, logp_ref_NT: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimator of KL(pi_theta || pi_ref) on tokens sampled from pi_theta."""
    log_r = jnp.clip(logp_ref_NT - logp_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return jnp.exp(log_r) - 1.0 - log_r
    raise ValueError(f"grpo.kl_ref must be none, k1, k2 or k3, got {estimator!r}")


def ppo_clip_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high):
    """Per-token PPO-clip loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A), and where the
    clip is active (the token's gradient is zero)."""
    ratio = jnp.exp(jnp.clip(logp_NT - logp_old_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = adv_N[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped), ratio


def dual_clip_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high, dual_clip):
    """PPO-clip with the dual clip (Ye et al. 2020): for A < 0 the objective is bounded below by
    c A (c > 1), so a huge ratio on a bad token cannot dominate the update. c = 0: off."""
    loss, clipped, ratio = ppo_clip_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high)
    adv = jnp.broadcast_to(adv_N[:, None], loss.shape)
    bound = -dual_clip * adv  # the loss is -objective, so the lower bound c A caps the loss at -c A
    capped = (dual_clip > 0) & (adv < 0) & (loss > bound)
    return jnp.where(capped, bound, loss), clipped | capped, ratio


def reinforce_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high):
    """REINFORCE: -A log pi (no ratio, no clip; one update per batch)."""
    ratio = jnp.exp(jnp.clip(logp_NT - logp_old_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return -adv_N[:, None] * logp_NT, jnp.zeros(logp_NT.shape, bool), ratio


def cispo_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high):
    """CISPO: -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi: the IS weight is clipped and detached,
    so every token keeps a gradient (none is dropped by the clip)."""
    ratio = jnp.exp(jnp.clip(logp_NT - logp_old_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    return -weight * adv_N[:, None] * logp_NT, (ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high), ratio


def gspo_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high, mask_NT):
    """GSPO: one length-normalised sequence ratio s = exp(mean_t log(pi / pi_old)), clipped as in
    PPO, broadcast to the response's tokens (so every aggregation sees the sequence loss)."""
    log_r = jnp.clip(logp_NT - logp_old_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask_NT
    seq_log_r = log_r.sum(-1) / jnp.maximum(mask_NT.sum(-1), 1.0)
    loss_N, clipped_N, ratio_N = ppo_clip_per_token(seq_log_r[:, None], jnp.zeros_like(seq_log_r)[:, None], adv_N,
                                                    eps_low, eps_high)
    shape = logp_NT.shape
    return (jnp.broadcast_to(loss_N, shape), jnp.broadcast_to(clipped_N, shape), jnp.broadcast_to(ratio_N, shape))


def policy_loss(kind: str, logp_NT, logp_old_NT, adv_N, mask_NT, eps_low, eps_high, dual_clip):
    """Per-token policy loss of `grpo.loss`, where the clip is active, and the token ratios."""
    if kind == "ppo":
        return dual_clip_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high, dual_clip)
    if kind == "reinforce":
        return reinforce_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high)
    if kind == "cispo":
        return cispo_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high)
    if kind == "gspo":
        return gspo_per_token(logp_NT, logp_old_NT, adv_N, eps_low, eps_high, mask_NT)
    raise ValueError(f"grpo.loss must be ppo, reinforce, cispo or gspo, got {kind!r}")


def make_optimizer(hp: dict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. Built inside the traced step from traced
    hyperparameters: the optimizer state's structure does not depend on their values."""
    return optax.chain(
        optax.clip_by_global_norm(hp["grpo.max_grad_norm"]),
        optax.adamw(hp["grpo.lr"], weight_decay=hp["grpo.weight_decay"]),
    )


def masked_mean(x_NT, mask_NT):
    return (x_NT * mask_NT).sum() / jnp.maximum(mask_NT.sum(), 1.0)
