"""GRPO: group-relative advantages, the policy losses and their aggregation.

Pure functions over arrays, each registered in its catalogue (`ADVANTAGES`, `LOSSES`,
`AGGREGATIONS`): the config's accepted values are the registered names, and a new loss is one
function plus one registration. Shapes: N = prompts * group size responses, T response tokens.
`mask_NT` is 1 on generated tokens (the `<eos>` included) and 0 on padding; padding never
enters a numerator or a denominator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from timsim.kl import KL_ESTIMATORS
from timsim.registry import Registry

LOG_RATIO_CLAMP = 20.0

# population: the G -> infinity limit the exact-gradient oracle uses (`timsim.exact`). An advantage's is
# ``(reward_M, weight_M) -> adv_M`` over one prompt's enumerated responses with sampling probabilities
# weight_M (summing to 1); an aggregation's is ``(mask_NT, weight_N) -> (coeff_NT, normaliser_N)`` with
# the limit sum(coeff * per_token) / sum(normaliser) over every enumerated response (weights summing to 1).
ADVANTAGES: Registry = Registry("advantage", "grpo.advantage", population=None)
AGGREGATIONS: Registry = Registry("loss aggregation", "grpo.loss_agg", population=None)


def _population_baseline(reward_M, weight_M):
    return (weight_M * reward_M).sum()


def _population_zscore(reward_M, weight_M):
    centred = reward_M - _population_baseline(reward_M, weight_M)
    return centred / (jnp.sqrt((weight_M * centred**2).sum()) + 1e-6)


def _population_centred(reward_M, weight_M):
    return reward_M - _population_baseline(reward_M, weight_M)
# knobs: the traced `grpo.*` clip knobs a loss reads (the config rejects the others)
LOSSES: Registry = Registry("policy loss", "grpo.loss", knobs=())


@ADVANTAGES.register(population=_population_zscore)
def zscore(r_GS):
    """(r - mean) / (std + 1e-6) within each group, std with Bessel's correction as in common GRPO code."""
    return (r_GS - r_GS.mean(-1, keepdims=True)) / (r_GS.std(-1, ddof=1, keepdims=True) + 1e-6)


@ADVANTAGES.register(population=_population_centred)
def mean(r_GS):
    """r - group mean (Dr. GRPO)."""
    return r_GS - r_GS.mean(-1, keepdims=True)


@ADVANTAGES.register(population=_population_centred)
def rloo(r_GS):
    """r - mean of the *other* responses of the group (leave-one-out)."""
    group_size = r_GS.shape[-1]
    return (r_GS - r_GS.mean(-1, keepdims=True)) * group_size / (group_size - 1)


@ADVANTAGES.register(population=lambda reward_M, weight_M: reward_M)
def none(r_GS):
    """r itself: no baseline. The sampler's expected score then enters the update with weight
    E_mu[r] (DESIGN §8.1, the drift score centering removes), so the reward pair matters."""
    return r_GS


def advantages(reward_N: jax.Array, group_size: int, kind: str) -> jax.Array:
    """Group-relative advantages [N] of `grpo.advantage`: responses to one prompt are contiguous groups."""
    return ADVANTAGES[kind](reward_N.reshape(-1, group_size)).reshape(-1)


def shaped_reward(reward_N: jax.Array, hp_grpo) -> jax.Array:
    """The task's reward in [0, 1] mapped affinely onto [grpo.reward_wrong, grpo.reward_correct]:
    what the advantage sees (the `reward_mean` metric stays the task's)."""
    return hp_grpo.reward_wrong + (hp_grpo.reward_correct - hp_grpo.reward_wrong) * reward_N


@AGGREGATIONS.register(population=lambda mask, w: (w[:, None] * mask, w * mask.sum(-1)))
def token_mean(per_token_NT, mask_NT):
    """Sum over all tokens / number of tokens."""
    return (per_token_NT * mask_NT).sum() / jnp.maximum(mask_NT.sum(), 1.0)


@AGGREGATIONS.register(population=lambda mask, w: (w[:, None] * mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0),
                                                  w))
def seq_mean_token_mean(per_token_NT, mask_NT):
    """Mean over responses of each response's token mean."""
    return ((per_token_NT * mask_NT).sum(-1) / jnp.maximum(mask_NT.sum(-1), 1.0)).mean()


@AGGREGATIONS.register(population=lambda mask, w: (w[:, None] * mask, w * mask.shape[-1]))
def seq_mean_token_sum_norm(per_token_NT, mask_NT):
    """Sum over all tokens / (N * T): a constant normaliser (Dr. GRPO), so a response's weight
    does not depend on its length or on the batch's lengths."""
    return (per_token_NT * mask_NT).sum() / mask_NT.size


def aggregate(per_token_NT: jax.Array, mask_NT: jax.Array, kind: str) -> jax.Array:
    """Reduce a per-token loss to a scalar by `grpo.loss_agg`; padding never counts."""
    return AGGREGATIONS[kind](per_token_NT, mask_NT)


def kl_to_reference(logp_NT: jax.Array, logp_ref_NT: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimator (`timsim.kl`) of KL(pi_theta || pi_ref) on tokens sampled from pi_theta."""
    return KL_ESTIMATORS[estimator](jnp.clip(logp_ref_NT - logp_NT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


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


def reinforce_per_token(logp_NT, logp_old_NT, adv_N):
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


@LOSSES.register("ppo", knobs=("clip_eps_low", "clip_eps_high", "dual_clip"))
def ppo(logp_NT, logp_old_NT, adv_N, mask_NT, knobs):
    """PPO-clip; `dual_clip` > 1 adds the dual clip (0: off)."""
    return dual_clip_per_token(logp_NT, logp_old_NT, adv_N, knobs.clip_eps_low, knobs.clip_eps_high,
                               knobs.dual_clip)


@LOSSES.register("reinforce")
def reinforce(logp_NT, logp_old_NT, adv_N, mask_NT, knobs):
    """-A log pi, one update per batch (no ratio to clip)."""
    return reinforce_per_token(logp_NT, logp_old_NT, adv_N)


@LOSSES.register("gspo", knobs=("clip_eps_low", "clip_eps_high"))
def gspo(logp_NT, logp_old_NT, adv_N, mask_NT, knobs):
    """Clipped length-normalised sequence ratio."""
    return gspo_per_token(logp_NT, logp_old_NT, adv_N, knobs.clip_eps_low, knobs.clip_eps_high, mask_NT)


@LOSSES.register("cispo", knobs=("clip_eps_low", "clip_eps_high"))
def cispo(logp_NT, logp_old_NT, adv_N, mask_NT, knobs):
    """Clipped, detached IS weight on -A log pi."""
    return cispo_per_token(logp_NT, logp_old_NT, adv_N, knobs.clip_eps_low, knobs.clip_eps_high)


def policy_loss(kind: str, logp_NT, logp_old_NT, adv_N, mask_NT, knobs):
    """Per-token policy loss of `grpo.loss`, where the clip is active, and the token ratios;
    `knobs`: the run's traced `grpo` values (`hp.grpo`, `timsim.hyper`)."""
    return LOSSES[kind](logp_NT, logp_old_NT, adv_N, mask_NT, knobs)


def make_optimizer(knobs) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. Built inside the traced step from traced
    hyperparameters: the optimizer state's structure does not depend on their values.

    It runs on the parameters raveled into one vector (`optax.flatten`): the same elementwise
    AdamW, but one set of ops instead of one per weight array (26 for the standard model), which
    cuts the compiled step by ~90 XLA fusions and its compile time by ~9%. Only the global norm's
    summation order differs from the per-array chain (last bits)."""
    return optax.flatten(optax.chain(
        optax.clip_by_global_norm(knobs.max_grad_norm),
        optax.adamw(knobs.lr, weight_decay=knobs.weight_decay),
    ))


def masked_mean(x_NT, mask_NT):
    return (x_NT * mask_NT).sum() / jnp.maximum(mask_NT.sum(), 1.0)
