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


def make_optimizer(hp: dict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. Built inside the traced step from traced
    hyperparameters: the optimizer state's structure does not depend on their values."""
    return optax.chain(
        optax.clip_by_global_norm(hp["grpo.max_grad_norm"]),
        optax.adamw(hp["grpo.lr"], weight_decay=hp["grpo.weight_decay"]),
    )


def masked_mean(x_NT, mask_NT):
    return (x_NT * mask_NT).sum() / jnp.maximum(mask_NT.sum(), 1.0)
