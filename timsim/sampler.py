"""The sampler side: how the sampler that generates the rollouts differs from the learner.

The sampler may differ from the learner by its weights (a `timsim.sources.WEIGHT_NOISE`
family, re-drawn every step or hold), by the numerics of its forward (`timsim.numerics`), by
noise on its mixture-of-experts router (a `ROUTER_NOISE` family), and by a perturbation of its
logits (a `timsim.noise` family); `timsim.sources.SOURCES` lists them.

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from timsim.keys import step_key
from timsim.model import Routing, response_forward, token_logprobs
from timsim.noise import make_logits_fn, perturb_teacher_forced
from timsim.numerics import Numerics
from timsim.rollout import Rollout, prefix_hashes, sample
from timsim.sources import ROUTER_NOISE, WEIGHT_NOISE


def noise_knobs(hp):
    """The traced knobs of the logit-noise family, from a run's hyperparameters (`timsim.hyper`)."""
    return hp.perturbation.logit_noise


# ----------------------------------------------------------------------------- the sampler side


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static description of how the sampler differs from the learner."""

    noise_fn: Callable | None
    noise_mode: str  # "fresh" | "context" | "state"
    sampler_nm: Numerics
    learner_nm: Numerics
    weight_noise_fn: Callable | None  # a `timsim.sources.WEIGHT_NOISE` family, or None
    weight_hold_steps: int = 1
    report_only: bool = False  # the logit noise perturbs the reported log-probs, not the sampling
    version_steps: int = 0  # persistent modes: a new error every this many updates (0: never)
    learner_too: bool = False  # the learner applies the same deterministic transform (the consistent fix)
    router_noise_fn: Callable | None = None  # a `timsim.sources.ROUTER_NOISE` family, or None

    @property
    def persistent(self) -> bool:
        return self.noise_mode != "fresh"

    @property
    def separate_forward(self) -> bool:
        """The sampler's logits need their own forward (other weights or numerics)."""
        return (self.weight_noise_fn is not None or self.router_noise_fn is not None
                or self.sampler_nm != self.learner_nm)


def sampler_spec(cfg) -> SamplerSpec:
    p = cfg.perturbation
    family = lambda registry, name: None if name == "none" else registry[name]  # noqa: E731
    return SamplerSpec(make_logits_fn(p.logit_noise.family, p.logit_noise.profile), p.logit_noise.mode,
                       p.sampler_precision.numerics(), p.learner_precision.numerics(),
                       family(WEIGHT_NOISE, p.weight_noise.family), p.weight_noise.hold_steps,
                       p.logit_noise.report_only, p.logit_noise.version_steps, p.logit_noise.learner_too,
                       family(ROUTER_NOISE, p.router_noise.family))


def weight_noise_key(spec: SamplerSpec, seed: jax.Array, step: jax.Array) -> jax.Array:
    """Weight noise is re-drawn every `hold_steps` updates (1: every step)."""
    return step_key(seed, "weight_noise", step // spec.weight_hold_steps)


def sampler_model(spec: SamplerSpec, graphdef, params, learner_model, key: jax.Array, hp):
    """The model the sampler runs: the learner's, or one with its weight noise."""
    if spec.weight_noise_fn is None:
        return learner_model
    return nnx.merge(graphdef, spec.weight_noise_fn(key, params, hp.perturbation.weight_noise))


def sampler_routing(spec: SamplerSpec, key: jax.Array, hp) -> Routing | None:
    """The sampler's router perturbation (a fresh draw per key), or None."""
    if spec.router_noise_fn is None:
        return None
    knobs = hp.perturbation.router_noise
    return Routing(noise_key=key, noise_fn=lambda k, logits_NE: spec.router_noise_fn(k, logits_NE, knobs))


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
    hashes_N = context_hash_N if spec.noise_mode == "context" else state_hash(logits_NV, knobs.state_bin)
    keys = jax.vmap(lambda h: jax.random.fold_in(key, h))(hashes_N)
    return jax.vmap(lambda k, x: spec.noise_fn(k, x, knobs))(keys, logits_NV)


def decode_logits_fn(spec: SamplerSpec, noise_key: jax.Array, knobs: dict) -> Callable | None:
    """`fn(logits_NV, t, context_hash_N)` applied on the KV-cache path while sampling, or None."""
    if spec.noise_fn is None or spec.report_only:
        return None
    if spec.persistent:
        return lambda logits, t, hashes: _per_sequence(spec, noise_key, logits, hashes, knobs)
    return lambda logits, t, hashes: spec.noise_fn(jax.random.fold_in(noise_key, t), logits, knobs)


def sampler_forward(spec: SamplerSpec, sampler, prompts_NP, responses_NT, routing: Routing | None, group: int = 1):
    """The sampler's own teacher-forced forward over its responses, when it differs from the
    learner's (other weights, numerics or routing): (logits before its logit noise, experts per
    layer [N, P + T - 1, k] or None for a dense model); (None, None) when it is the learner's.
    `group`: rows share their prompt in groups of this many (`model.response_forward`)."""
    if not spec.separate_forward:
        return None, None
    logits, routes, _ = response_forward(sampler, prompts_NP, responses_NT, spec.sampler_nm, routing, group)
    return logits, routes


def learner_routing(routes_sampler: tuple | None, replay: str) -> Routing | None:
    """`replay="r3"`: the learner's forward uses the experts the sampler chose (R3)."""
    return Routing(replay=routes_sampler) if replay == "r3" and routes_sampler is not None else None


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


def zero_mismatch_spec(spec: SamplerSpec) -> SamplerSpec:
    """The zero-mismatch twin of `spec`: the sampler is the learner (same numerics), no noise."""
    return dataclasses.replace(spec, noise_fn=None, sampler_nm=spec.learner_nm, weight_noise_fn=None,
                               report_only=False, learner_too=False, router_noise_fn=None)


class SamplerKeys(NamedTuple):
    """The draws of one batch: tokens, logit noise (one key per position folded in), weight
    noise and router noise. Two samplers given the same keys see the same random numbers."""

    sample: jax.Array
    noise: jax.Array
    weight: jax.Array
    router: jax.Array


class Report(NamedTuple):
    """Both sides' teacher-forced log-probs of the sampled responses: pi_old (the learner's,
    with `learner_too` its transform) and what the sampler reports as log mu."""

    logp_learner_NT: jax.Array
    logp_all_learner_NTV: jax.Array
    logp_sampler_NT: jax.Array
    logp_all_sampler_NTV: jax.Array
    routes_learner: tuple | None  # mixture of experts: per layer [N, P + T - 1, k] (None: dense)
    routes_sampler: tuple | None


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The sampler of one config, built once: it samples from mu, reports log mu of what it
    sampled, and knows its zero-mismatch twin. The training step's collect, the held-out
    evaluation, calibration, the gradient probes and the profile check all call it, so the
    sampler is assembled in one place."""

    spec: SamplerSpec
    graphdef: Any
    response_len: int
    routing_replay: str = "none"  # correction.routing_replay: r3 makes the learner replay the sampler's experts

    @classmethod
    def from_config(cls, cfg, graphdef) -> "Sampler":
        return cls(sampler_spec(cfg), graphdef, cfg.response_len, cfg.correction.routing_replay)

    def twin(self) -> "Sampler":
        """The zero-mismatch sampler: the learner itself (same numerics, no noise)."""
        return dataclasses.replace(self, spec=zero_mismatch_spec(self.spec))

    @property
    def is_learner(self) -> bool:
        """Whether the sampler is exactly the learner (so it reports the learner's log-probs)."""
        return self.spec.noise_fn is None and not self.spec.separate_forward

    def generate(self, params, learner_model, prompts_NP, keys: SamplerKeys, hp,
                 greedy: bool = False, group: int = 1) -> tuple[Rollout, Any, Routing | None]:
        """Sample responses with the sampler's weights, numerics, router and logit noise:
        (rollout, the sampler's model, its routing perturbation). `group`: rows share their
        prompt in groups of this many (`rollout.sample`)."""
        knobs = noise_knobs(hp)
        model = sampler_model(self.spec, self.graphdef, params, learner_model, keys.weight, hp)
        routing = sampler_routing(self.spec, keys.router, hp)
        rollout = sample(model, prompts_NP, keys.sample, hp.sampler.temperature, self.response_len, greedy=greedy,
                         logits_fn=decode_logits_fn(self.spec, keys.noise, knobs), nm=self.spec.sampler_nm,
                         routing=routing, group=group)
        return rollout, model, routing

    def report(self, learner_model, sampler_model_, prompts_NP, responses_NT, routing: Routing | None,
               noise_key: jax.Array, hp) -> Report:
        """Teacher-forced log-probs of both sides at the sampled responses. The zero-mismatch
        sampler reports the learner's own, bit for bit."""
        logits_sampler, routes_sampler = sampler_forward(self.spec, sampler_model_, prompts_NP, responses_NT, routing)
        logits, routes, _ = response_forward(learner_model, prompts_NP, responses_NT, self.spec.learner_nm,
                                             learner_routing(routes_sampler, self.routing_replay))
        return self.report_from_logits(logits, routes, logits_sampler, routes_sampler, prompts_NP, responses_NT,
                                       noise_key, hp)

    def report_from_logits(self, logits_NTV, routes, logits_sampler_NTV, routes_sampler, prompts_NP, responses_NT,
                           noise_key: jax.Array, hp) -> Report:
        """`report` from forwards already run: the learner's teacher-forced logits (and experts)
        and the sampler's own (None when it has no separate forward: then it starts from the
        learner's)."""
        knobs, temperature = noise_knobs(hp), hp.sampler.temperature
        if logits_sampler_NTV is None:
            logits_sampler_NTV, routes_sampler = logits_NTV, routes
        logits_learner = learner_transform(self.spec, knobs)(logits_NTV)
        if self.is_learner:
            logp_learner, logp_all_learner = token_logprobs(logits_learner, responses_NT, temperature)
            return Report(logp_learner, logp_all_learner, logp_learner, logp_all_learner, routes, routes_sampler)
        logits_sampler = report_logits(self.spec, logits_sampler_NTV, prompts_NP, responses_NT, noise_key, knobs)
        # both sides through one log-softmax: equal logits give equal log-probs bit for bit,
        # however XLA fuses the program (a no-op perturbation then reports delta == 0 exactly)
        logp_2NT, logp_all_2NTV = token_logprobs(jnp.stack([logits_learner, logits_sampler]),
                                                 jnp.stack([responses_NT, responses_NT]), temperature)
        return Report(logp_2NT[0], logp_all_2NTV[0], logp_2NT[1], logp_all_2NTV[1], routes, routes_sampler)
