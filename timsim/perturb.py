"""Sampler-side perturbations: the sampler samples from mu and reports log mu.

The sampler may differ from the learner by its weights (noise re-drawn every step), by the
numerics of its forward (`timsim.numerics`), and by a perturbation of its logits.

The learner's clean logits are computed once per batch (teacher forcing); the sampler's
logits are a pure function of them, the position's noise key and traced knobs. The same
function perturbs the KV-cache decode path while sampling, with the same key per position,
so the tokens are drawn from the mu that is reported (up to the ~1e-6 decode floor).

Noise keys: ``fold_in(step_key(seed, "noise", step), t)`` for response position t, the same
draws for every noise scale of a seed (common random numbers). A scale of 0 adds an exact
zero, so the run is bit-identical to the zero-mismatch run. Persistent modes replace the
per-step draw by a deterministic function of the state, as a real engine's error is: mode
``context`` keys each position by a hash of its context (prompt + response so far), mode
``state`` by a hash of the sampler's own predictive distribution rounded to ``state_bin`` (a
fixed random function of the state, shared by every context that the model treats alike);
``version_steps`` re-keys either every k updates, as if the error followed the weights'
version.

A new family is one function ``(key, logits [..., V], knobs) -> logits`` plus one line in
`LOGIT_NOISE` (and in `SCALED` if calibration may tune its `scale`). The name is historical
for the truncation families `top_k` / `top_p`, which draw no noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from timsim.keys import step_key
from timsim.model import Routing, response_forward
from timsim.numerics import Numerics
from timsim.rollout import prefix_hashes


def gaussian(key, logits, knobs):
    """logits + scale * N(0, 1) per vocabulary entry."""
    return logits + knobs["scale"] * jax.random.normal(key, logits.shape)


def student_t(key, logits, knobs):
    """logits + scale * t_nu (heavy tails; nu > 2 so the variance is finite)."""
    return logits + knobs["scale"] * jax.random.t(key, knobs["nu"], logits.shape)


def spikes(key, logits, knobs):
    """logits + size * Bernoulli(rate): rare large one-signed bumps on random entries."""
    return logits + knobs["scale"] * jax.random.bernoulli(key, knobs["rate"], logits.shape)


def magnitude(key, logits, knobs):
    """logits + scale * |logit - mean logit| * N(0, 1): larger logits get larger errors."""
    centred = jnp.abs(logits - logits.mean(-1, keepdims=True))
    return logits + knobs["scale"] * centred * jax.random.normal(key, logits.shape)


def dirichlet(key, logits, knobs):
    """Mean-preserving noise: mu ~ Dirichlet(kappa * pi) per position with kappa = 1 / scale, so
    E[mu] = pi exactly (DESIGN §8.1): the control that separates mismatch from the average
    flattening that zero-mean logit noise causes. Returns log mu (probabilities below the
    float32 range become EXCLUDED_LOGIT); scale 0 returns the logits unchanged."""
    scale = knobs["scale"]
    probs = jax.nn.softmax(logits, axis=-1)
    alpha = probs / jnp.maximum(scale, 1e-30)
    mu = jax.random.dirichlet(key, jnp.maximum(alpha, 1e-30))
    log_mu = jnp.where(mu > 0, jnp.log(jnp.maximum(mu, 1e-38)), EXCLUDED_LOGIT)
    return jnp.where(scale > 0, log_mu, logits)


EXCLUDED_LOGIT = -1e9  # "outside the support": exp() is exactly 0, and 0 * logit stays finite (no NaN)


def top_k(key, logits, knobs):
    """Truncated support: keep the top_k largest logits (ties kept), renormalise over them.
    A systematic, one-signed mismatch: delta = log(kept mass) <= 0 at every sampled token."""
    k = jnp.clip(jnp.round(knobs["top_k"]).astype(jnp.int32), 1, logits.shape[-1])
    kth = jnp.take_along_axis(-jnp.sort(-logits, axis=-1), jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], -1)
    return jnp.where(logits >= kth, logits, EXCLUDED_LOGIT)


def top_p(key, logits, knobs):
    """Nucleus: keep the smallest set of most likely tokens whose probability (temperature 1)
    reaches top_p, the most likely always kept; renormalise over them."""
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    mass_before = jnp.cumsum(sorted_probs, -1) - sorted_probs
    keep_sorted = mass_before < knobs["top_p"]
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
    return jnp.where(keep, logits, EXCLUDED_LOGIT)


def temperature(key, logits, knobs):
    """One-sided temperature: the sampler samples from softmax(logits / tau), the learner (unless
    `learner_too`) computes plain log-probs: a common real-world bug."""
    return logits / knobs["temperature"]


def profile(key, logits, knobs, table_BL):
    """Engine-profile noise (`timsim.profile`): each vocabulary entry's logit is lowered by a
    draw from the fitted distribution of delta for its probability bin (inverse CDF, linear
    between the fitted quantile levels; tails beyond them are cut), times `scale` (1 = the
    profile). Then delta_v = log pi_v - log mu_v = scale eps_v + a normalisation shift
    common to the position, which is small when the draws are."""
    from timsim.profile import LEVELS, PROB_EDGES

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
    return logits - knobs["scale"] * eps


LOGIT_NOISE: dict[str, Callable] = {
    "profile": profile,
    "gaussian": gaussian,
    "student_t": student_t,
    "spikes": spikes,
    "magnitude": magnitude,
    "dirichlet": dirichlet,
    "top_k": top_k,
    "top_p": top_p,
    "temperature": temperature,
}
# The traced `perturbation.logit_noise.*` knobs each family reads: the config rejects the others.
KNOBS: dict[str, tuple[str, ...]] = {
    "profile": ("scale",), "gaussian": ("scale",), "student_t": ("scale", "nu"), "spikes": ("scale", "rate"),
    "magnitude": ("scale",), "dirichlet": ("scale",), "top_k": ("top_k",), "top_p": ("top_p",),
    "temperature": ("temperature",),
}
SCALED = ("gaussian", "student_t", "spikes", "magnitude", "dirichlet", "profile")  # families whose `scale` calibration can tune
DETERMINISTIC = ("temperature", "top_k", "top_p")  # transforms the learner can apply too (`learner_too`)


def noise_knobs(hp: dict) -> dict:
    """The traced knobs of the logit-noise family, from a run's hyperparameters."""
    prefix = "perturbation.logit_noise."
    return {k.removeprefix(prefix): v for k, v in hp.items() if k.startswith(prefix)}


def make_logits_fn(family: str, profile_path: str | None = None) -> Callable | None:
    """`fn(key, logits, knobs) -> sampler logits`, or None for the zero-mismatch sampler."""
    if family == "none":
        return None
    if family == "profile":
        from timsim.profile import load_profile, prob_table

        return functools.partial(profile, table_BL=prob_table(load_profile(profile_path)))
    return LOGIT_NOISE[family]


def position_keys(key: jax.Array, length: int) -> jax.Array:
    """One key per response position: the decode path and teacher forcing use the same ones."""
    return jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(length))


def perturb_teacher_forced(fn: Callable, key: jax.Array, logits_NTV: jax.Array, knobs: dict) -> jax.Array:
    """Apply a per-position perturbation to teacher-forced logits [N, T, V]."""
    keys = position_keys(key, logits_NTV.shape[1])
    out_TNV = jax.vmap(lambda k, x: fn(k, x, knobs), in_axes=(0, 1))(keys, logits_NTV)
    return out_TNV.swapaxes(0, 1)


# ----------------------------------------------------------------------------- the sampler side


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static description of how the sampler differs from the learner."""

    noise_fn: Callable | None
    noise_mode: str  # "fresh" | "context" | "state"
    sampler_nm: Numerics
    learner_nm: Numerics
    weight_noise: bool
    weight_hold_steps: int = 1
    report_only: bool = False  # the logit noise perturbs the reported log-probs, not the sampling
    version_steps: int = 0  # persistent modes: a new error every this many updates (0: never)
    learner_too: bool = False  # the learner applies the same deterministic transform (the consistent fix)
    router_noise: bool = False  # noise on the mixture-of-experts router logits

    @property
    def persistent(self) -> bool:
        return self.noise_mode != "fresh"

    @property
    def separate_forward(self) -> bool:
        """The sampler's logits need their own forward (other weights or numerics)."""
        return self.weight_noise or self.router_noise or self.sampler_nm != self.learner_nm


def sampler_spec(cfg) -> SamplerSpec:
    p = cfg.perturbation
    return SamplerSpec(make_logits_fn(p.logit_noise.family, p.logit_noise.profile), p.logit_noise.mode, p.sampler_precision.numerics(),
                       p.learner_precision.numerics(), p.weight_noise.family != "none",
                       p.weight_noise.hold_steps, p.logit_noise.report_only, p.logit_noise.version_steps,
                       p.logit_noise.learner_too, p.router_noise.family != "none")


def with_weight_noise(params, key: jax.Array, scale) -> nnx.State:
    """`params` plus scale * N(0, 1) on every weight (a fresh draw per key)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def weight_noise_key(spec: SamplerSpec, seed: jax.Array, step: jax.Array) -> jax.Array:
    """Weight noise is re-drawn every `hold_steps` updates (1: every step)."""
    return step_key(seed, "weight_noise", step // spec.weight_hold_steps)


def sampler_model(spec: SamplerSpec, graphdef, params, learner_model, key: jax.Array, hp: dict):
    """The model the sampler runs: the learner's, or one with noisy weights."""
    if not spec.weight_noise:
        return learner_model
    return nnx.merge(graphdef, with_weight_noise(params, key, hp["perturbation.weight_noise.scale"]))


def sampler_routing(spec: SamplerSpec, key: jax.Array, hp: dict) -> Routing | None:
    """The sampler's router perturbation (a fresh draw per key), or None."""
    if not spec.router_noise:
        return None
    return Routing(noise_key=key, noise_scale=hp["perturbation.router_noise.scale"])


def learner_transform(spec: SamplerSpec, knobs: dict) -> Callable:
    """The learner's own logit transform: the sampler's deterministic one with `learner_too`,
    else the identity."""
    if spec.learner_too:
        return lambda logits: spec.noise_fn(None, logits, knobs)
    return lambda logits: logits


def noise_key_for(spec: SamplerSpec, seed: jax.Array, step: jax.Array) -> jax.Array:
    """Fresh noise: a key per step. Persistent noise: one key per run (or per weights' version,
    every `version_steps` updates), so the same context or state gets the same error at every
    step, as a deterministic engine would give it."""
    if not spec.persistent:
        return step_key(seed, "noise", step)
    return step_key(seed, "noise", step // spec.version_steps if spec.version_steps else 0)


def state_hash(logits_NV: jax.Array, state_bin) -> jax.Array:
    """Hash [N] of the predictive distribution softmax(logits), each probability rounded to a
    multiple of `state_bin`: positions whose distributions round alike get one noise draw."""
    levels = jnp.round(jax.nn.softmax(logits_NV, axis=-1) / state_bin).astype(jnp.uint32)
    weights = jnp.uint32(2_654_435_761) ** jnp.arange(1, logits_NV.shape[-1] + 1, dtype=jnp.uint32)
    return (levels * weights).sum(-1, dtype=jnp.uint32)


def _per_sequence(spec: SamplerSpec, key: jax.Array, logits_NV, context_hash_N, knobs):
    """Persistent noise: each row's draw keyed by its context hash or by its state's hash."""
    hashes_N = context_hash_N if spec.noise_mode == "context" else state_hash(logits_NV, knobs["state_bin"])
    keys = jax.vmap(lambda h: jax.random.fold_in(key, h))(hashes_N)
    return jax.vmap(lambda k, x: spec.noise_fn(k, x, knobs))(keys, logits_NV)


def decode_logits_fn(spec: SamplerSpec, noise_key: jax.Array, knobs: dict) -> Callable | None:
    """`fn(logits_NV, t, context_hash_N)` applied on the KV-cache path while sampling, or None."""
    if spec.noise_fn is None or spec.report_only:
        return None
    if spec.persistent:
        return lambda logits, t, hashes: _per_sequence(spec, noise_key, logits, hashes, knobs)
    return lambda logits, t, hashes: spec.noise_fn(jax.random.fold_in(noise_key, t), logits, knobs)


def teacher_forced_pair(spec: SamplerSpec, model, sampler, prompts_NP, responses_NT, routing: Routing | None,
                        replay: str = "none"):
    """Teacher-forced forwards of both sides over the sampled responses: (learner logits,
    learner's experts, sampler logits before its logit noise, sampler's experts); experts are
    per layer [N, P + T - 1, k], None for a dense model. The sampler runs its own forward only
    when it differs (other weights, numerics or routing); else both are the learner's.
    `replay="r3"`: the learner's forward uses the experts the sampler chose (R3)."""
    logits_sampler = routes_sampler = None
    if spec.separate_forward:
        logits_sampler, routes_sampler, _ = response_forward(sampler, prompts_NP, responses_NT, spec.sampler_nm,
                                                             routing)
    learner_routing = Routing(replay=routes_sampler) if replay == "r3" and routes_sampler is not None else None
    logits, routes, _ = response_forward(model, prompts_NP, responses_NT, spec.learner_nm, learner_routing)
    if logits_sampler is None:
        logits_sampler, routes_sampler = logits, routes
    return logits, routes, logits_sampler, routes_sampler


def report_logits(spec: SamplerSpec, sampler_logits_NTV, prompts_NP, responses_NT, noise_key: jax.Array,
                  knobs: dict) -> jax.Array:
    """The sampler's teacher-forced logits of its own responses (what it reports log mu of):
    its own forward's logits (the learner's when it has none) with its logit noise."""
    logits = sampler_logits_NTV
    if spec.noise_fn is None:
        return logits
    if spec.persistent:
        hashes_TN = prefix_hashes(prompts_NP, responses_NT).T
        out_TNV = jax.vmap(lambda x, h: _per_sequence(spec, noise_key, x, h, knobs), in_axes=(1, 0))(
            logits, hashes_TN)
        return out_TNV.swapaxes(0, 1)
    return perturb_teacher_forced(spec.noise_fn, noise_key, logits, knobs)
