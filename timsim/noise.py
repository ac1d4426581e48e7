"""Logit-noise families: how the sampler's logits differ from the learner's at one position.

A family is a pure function ``(key, logits [..., V], knobs) -> sampler logits`` (`knobs`:
the traced `hp.perturbation.logit_noise` section, `timsim.hyper`) registered in
`LOGIT_NOISE` with the traced `perturbation.logit_noise.*` knobs it reads (the config rejects
the others), whether calibration may tune its `scale` (`scaled`), and whether it is a
deterministic transform the learner can apply too (`deterministic`, for `learner_too`). A new
family is one function plus its registration; `timsim.sampler` applies it on the decode path
and in teacher forcing with the same key per position. The catalogue's name is historical for
the truncation families `top_k` / `top_p`, which draw no noise.

Also here: the engine-profile table format the `profile` family draws from (`timsim.profile`
fits it from paired log-probs).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from timsim.config_types import ConfigError
from timsim.registry import Registry

LOGIT_NOISE: Registry[Callable] = Registry("logit-noise family", "perturbation.logit_noise.family", knobs=(),
                                           scaled=False, deterministic=False, needs_profile=False)

# The engine-profile format: quantiles of delta at LEVELS per bin of the learner's probability.
PROB_EDGES = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
LEVELS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
EXCLUDED_LOGIT = -1e9  # "outside the support": exp() is exactly 0, and 0 * logit stays finite (no NaN)


@LOGIT_NOISE.register(knobs=("scale",), scaled=True)
def gaussian(key, logits, knobs):
    """logits + scale * N(0, 1) per vocabulary entry."""
    return logits + knobs.scale * jax.random.normal(key, logits.shape)


@LOGIT_NOISE.register(knobs=("scale", "nu"), scaled=True)
def student_t(key, logits, knobs):
    """logits + scale * t_nu (heavy tails; nu > 2 so the variance is finite)."""
    return logits + knobs.scale * jax.random.t(key, knobs.nu, logits.shape)


@LOGIT_NOISE.register(knobs=("scale", "rate"), scaled=True)
def spikes(key, logits, knobs):
    """logits + size * Bernoulli(rate): rare large one-signed bumps on random entries."""
    return logits + knobs.scale * jax.random.bernoulli(key, knobs.rate, logits.shape)


@LOGIT_NOISE.register(knobs=("scale",), scaled=True)
def magnitude(key, logits, knobs):
    """logits + scale * |logit - mean logit| * N(0, 1): larger logits get larger errors."""
    centred = jnp.abs(logits - logits.mean(-1, keepdims=True))
    return logits + knobs.scale * centred * jax.random.normal(key, logits.shape)


@LOGIT_NOISE.register(knobs=("scale",), scaled=True)
def dirichlet(key, logits, knobs):
    """Mean-preserving noise: mu ~ Dirichlet(kappa * pi) per position with kappa = 1 / scale, so
    E[mu] = pi exactly (DESIGN §8.1): the control that separates mismatch from the average
    flattening that zero-mean logit noise causes. Returns log mu (probabilities below the
    float32 range become EXCLUDED_LOGIT); scale 0 returns the logits unchanged."""
    scale = knobs.scale
    probs = jax.nn.softmax(logits, axis=-1)
    alpha = probs / jnp.maximum(scale, 1e-30)
    mu = jax.random.dirichlet(key, jnp.maximum(alpha, 1e-30))
    log_mu = jnp.where(mu > 0, jnp.log(jnp.maximum(mu, 1e-38)), EXCLUDED_LOGIT)
    return jnp.where(scale > 0, log_mu, logits)


@LOGIT_NOISE.register(knobs=("top_k",), deterministic=True)
def top_k(key, logits, knobs):
    """Truncated support: keep the top_k largest logits (ties kept), renormalise over them.
    A systematic, one-signed mismatch: delta = log(kept mass) <= 0 at every sampled token."""
    k = jnp.clip(jnp.round(knobs.top_k).astype(jnp.int32), 1, logits.shape[-1])
    kth = jnp.take_along_axis(-jnp.sort(-logits, axis=-1), jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], -1)
    return jnp.where(logits >= kth, logits, EXCLUDED_LOGIT)


@LOGIT_NOISE.register(knobs=("top_p",), deterministic=True)
def top_p(key, logits, knobs):
    """Nucleus: keep the smallest set of most likely tokens whose probability (temperature 1)
    reaches top_p, the most likely always kept; renormalise over them."""
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    mass_before = jnp.cumsum(sorted_probs, -1) - sorted_probs
    keep_sorted = mass_before < knobs.top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
    return jnp.where(keep, logits, EXCLUDED_LOGIT)


@LOGIT_NOISE.register(knobs=("temperature",), deterministic=True)
def temperature(key, logits, knobs):
    """One-sided temperature: the sampler samples from softmax(logits / tau), the learner (unless
    `learner_too`) computes plain log-probs: a common real-world bug."""
    return logits / knobs.temperature


@LOGIT_NOISE.register(knobs=("scale",), scaled=True, needs_profile=True)
def profile(key, logits, knobs, table_BL):
    """Engine-profile noise (`timsim.profile`): each vocabulary entry's logit is lowered by a
    draw from the fitted distribution of delta for its probability bin (inverse CDF, linear
    between the fitted quantile levels; tails beyond them are cut), times `scale` (1 = the
    profile). Then delta_v = log pi_v - log mu_v = scale eps_v + a normalisation shift
    common to the position, which is small when the draws are."""
    levels = jnp.asarray(LEVELS, logits.dtype)
    table = jnp.asarray(table_BL, logits.dtype)
    prob = jax.nn.softmax(logits, axis=-1)
    bins = jnp.clip(jnp.searchsorted(jnp.asarray(PROB_EDGES, logits.dtype), prob, side="right") - 1, 0,
                    table.shape[0] - 1)
    u = jax.random.uniform(key, logits.shape, logits.dtype, levels[0], levels[-1])
    hi = jnp.clip(jnp.searchsorted(levels, u), 1, levels.size - 1)
    lo_level, hi_level = levels[hi - 1], levels[hi]
    lo_value, hi_value = table[bins, hi - 1], table[bins, hi]
    eps = lo_value + (u - lo_level) / (hi_level - lo_level) * (hi_value - lo_value)
    return logits - knobs.scale * eps


def make_logits_fn(family: str, profile_path: str | None = None) -> Callable | None:
    """`fn(key, logits, knobs) -> sampler logits`, or None for the zero-mismatch sampler."""
    if family == "none":
        return None
    if LOGIT_NOISE.entry(family).needs_profile:
        return functools.partial(LOGIT_NOISE[family], table_BL=prob_table(load_profile(profile_path)))
    return LOGIT_NOISE[family]


def prob_table(profile: dict) -> np.ndarray:
    """[bins, levels] quantiles of delta per probability bin, empty bins filled from the nearest
    fitted one (what the `profile` noise family draws from)."""
    rows = profile["by_prob"]
    fitted = [i for i, r in enumerate(rows) if r["quantiles"] is not None]
    return np.asarray([rows[min(fitted, key=lambda j: abs(j - i))]["quantiles"] for i in range(len(rows))],
                      np.float32)


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"perturbation.logit_noise.profile: {str(path)!r} does not exist; write one with "
                          f"`timsim profile PAIRS_FILE --out {path}`.")
    return json.loads(path.read_text())


def position_keys(key: jax.Array, length: int) -> jax.Array:
    """One key per response position: the decode path and teacher forcing use the same ones."""
    return jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(length))


def perturb_teacher_forced(fn: Callable, key: jax.Array, logits_NTV: jax.Array, knobs: dict) -> jax.Array:
    """Apply a per-position perturbation to teacher-forced logits [N, T, V]."""
    keys = position_keys(key, logits_NTV.shape[1])
    out_TNV = jax.vmap(lambda k, x: fn(k, x, knobs), in_axes=(0, 1))(keys, logits_NTV)
    return out_TNV.swapaxes(0, 1)
