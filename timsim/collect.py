"""One step's batch, collected: the sampler's rollouts and both sides' teacher-forced reports.

`make_generate` samples with the sampler (and runs its own forward when it has one),
`make_learner_forward` is the learner's clean forward over the samples, and `make_finish` turns
the two into a `Collected` batch with rewards and advantages. The training step
(`timsim.step`) runs the learner's forward once for pi_old and its first update; probes, the
oracle and tests use `make_collect`, which runs all three at given weights.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from timsim import grpo
from timsim.config import Config
from timsim.keys import step_key
from timsim.model import response_forward
from timsim.sampler import Sampler, SamplerKeys, learner_routing, noise_key_for, sampler_forward, weight_noise_key
from timsim.tasks import Task


class Collected(NamedTuple):
    """One step's rollouts and both sides' log-probs at the sampled tokens (0 on padding)."""

    prompts_N: jax.Array  # [N, P] each prompt repeated group-size times
    responses_NT: jax.Array
    mask_NT: jax.Array
    logp_learner_NT: jax.Array  # pi_old: the learner's clean teacher-forced log-probs
    logp_sampler_NT: jax.Array  # mu: what the sampler reports
    logp_all_learner_NTV: jax.Array
    logp_all_sampler_NTV: jax.Array
    logp_decode_NT: jax.Array  # the decode path's own log-probs (the floor metric)
    reward_N: jax.Array
    adv_N: jax.Array
    routes_learner: tuple | None  # mixture of experts: per layer [N, P + T - 1, k] (None: dense)
    routes_sampler: tuple | None


class Generated(NamedTuple):
    """One step's rollouts before the learner's forward: the sampler's side only."""

    prompts_N: jax.Array  # [N, P] each prompt repeated group-size times
    responses_NT: jax.Array
    mask_NT: jax.Array
    logp_decode_NT: jax.Array
    logits_sampler_NTV: jax.Array | None  # the sampler's own teacher-forced forward (None: the learner's)
    routes_sampler: tuple | None
    noise_key: jax.Array


def make_generate(cfg: Config, task: Task, sampler: Sampler) -> Callable:
    """`generate(old_params, hp, step) -> Generated`: sample a batch with `sampler` from the policy
    `old_params` and run the sampler's own teacher-forced forward if it has one. Every draw is
    keyed by (seed, purpose, step), so two samplers (a config's and its zero-mismatch twin) see
    the same prompts and the same random numbers."""
    g = cfg.grpo

    def generate(old_params, hp, step) -> Generated:
        seed = hp.seed.astype(jnp.int32)
        model = nnx.merge(sampler.graphdef, old_params)
        prompts = task.sample(step_key(seed, "prompts", step), g.prompts_per_step, "train")
        prompts_N = jnp.repeat(prompts, g.group_size, axis=0)
        keys = SamplerKeys(sample=step_key(seed, "sample", step), noise=noise_key_for(sampler.spec, seed, step),
                           weight=weight_noise_key(sampler.spec, seed, step),
                           router=step_key(seed, "router_noise", step))
        rollout, sampler_model, routing = sampler.generate(old_params, model, prompts_N, keys, hp, group=g.group_size)
        chex.assert_shape([rollout.responses, rollout.mask], (g.prompts_per_step * g.group_size, cfg.response_len))
        logits_sampler, routes_sampler = sampler_forward(sampler.spec, sampler_model, prompts_N, rollout.responses,
                                                         routing, g.group_size)
        return Generated(prompts_N, rollout.responses, rollout.mask, rollout.logp_decode, logits_sampler,
                         routes_sampler, keys.noise)

    return generate


def make_learner_forward(sampler: Sampler, group: int) -> Callable:
    """`forward(params, generated) -> ((logits [N, T, V], balance), experts)`: the learner's clean
    teacher-forced forward over the sampled responses (under R3 replaying the sampler's experts),
    each prompt run once per `group` of its samples."""

    def forward(params, gen: Generated):
        model = nnx.merge(sampler.graphdef, params)
        logits, routes, balance = response_forward(model, gen.prompts_N, gen.responses_NT, sampler.spec.learner_nm,
                                                   learner_routing(gen.routes_sampler, sampler.routing_replay), group)
        return (logits, balance), routes

    return forward


def make_finish(cfg: Config, task: Task, sampler: Sampler) -> Callable:
    """`finish(generated, learner_logits, learner_routes, hp) -> Collected`: both sides' reports,
    rewards and advantages, from forwards already run."""
    g = cfg.grpo

    def finish(gen: Generated, logits_NTV, routes, hp) -> Collected:
        r = sampler.report_from_logits(logits_NTV, routes, gen.logits_sampler_NTV, gen.routes_sampler, gen.prompts_N,
                                       gen.responses_NT, gen.noise_key, hp)
        mask = gen.mask_NT
        reward = task.reward(gen.prompts_N, gen.responses_NT, cfg.task.partial_credit)
        return Collected(gen.prompts_N, gen.responses_NT, mask, r.logp_learner_NT * mask, r.logp_sampler_NT * mask,
                         r.logp_all_learner_NTV, r.logp_all_sampler_NTV, gen.logp_decode_NT, reward,
                         grpo.advantages(grpo.shaped_reward(reward, hp.grpo), g.group_size, g.advantage), r.routes_learner, r.routes_sampler)

    return finish


def make_collect(cfg: Config, task: Task, sampler: Sampler) -> Callable:
    """`collect(old_params, hp, step) -> Collected`: sample a batch (`make_generate`) and report
    both sides' log-probs of it, with the learner's own forward at `old_params`."""
    generate, forward, finish = (make_generate(cfg, task, sampler), make_learner_forward(sampler, cfg.grpo.group_size),
                                 make_finish(cfg, task, sampler))

    def collect(old_params, hp, step) -> Collected:
        gen = generate(old_params, hp, step)
        (logits, _), routes = forward(old_params, gen)
        return finish(gen, logits, routes, hp)

    return collect
