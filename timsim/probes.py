"""Objective-effect probes (DESIGN §5): how the configured mismatch and correction bend the update.

At a probe step, from a run's current parameters, the batch is sampled twice with the same
prompts and the same random numbers (common random numbers): once by the configured sampler,
once by its zero-mismatch twin. For each mode (recompute, bypass) the full-batch policy
gradient at theta = theta_old is computed from the mismatched batch *with the configured
corrections*, and from the twin's batch without them, and compared: cosine, relative norm of
the difference, and projection on the zero-mismatch gradient g0. The projection of the
difference is also split by the sign of the advantage (which responses bend the update: the
PPO clip drops A > 0 and A < 0 tokens on opposite sides of r = 1, DESIGN §8.1).

"Update direction" here is the gradient the optimizer receives (before global-norm clipping
and Adam's normalisation), over the whole batch in one piece (not per minibatch). At zero
mismatch the two gradients are computed by the same arithmetic, so their difference is exactly
zero (a test checks it bit for bit, not through a floating-point cosine).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from timsim.config import Config
from timsim.sampler import Sampler
from timsim.tasks import Task
from timsim.collect import make_collect
from timsim.step import batch_over_runs, learner_batch, make_loss, refreshed_correction, resolve_batching, trace_once

MODES = ("recompute", "bypass")
PROBE_METRICS = tuple(f"probe_{mode}_{name}" for mode in MODES
                      for name in ("cos", "rel_diff", "proj", "diff_proj_pos", "diff_proj_neg"))


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def direction_metrics(g, g0, g_pos, g0_pos, g_neg, g0_neg) -> dict:
    """Compare an update direction `g` with the zero-mismatch one `g0` (pytrees of the same
    structure); `*_pos` / `*_neg` are the parts contributed by responses with A > 0 / A < 0."""
    diff = jax.tree.map(jnp.subtract, g, g0)
    g0_sq = jnp.maximum(_vdot(g0, g0), 1e-30)
    g_sq = jnp.maximum(_vdot(g, g), 1e-30)
    return {
        "cos": _vdot(g, g0) / jnp.sqrt(g_sq * g0_sq),
        "rel_diff": jnp.sqrt(_vdot(diff, diff) / g0_sq),
        "proj": _vdot(g, g0) / g0_sq,
        "diff_proj_pos": _vdot(jax.tree.map(jnp.subtract, g_pos, g0_pos), g0) / g0_sq,
        "diff_proj_neg": _vdot(jax.tree.map(jnp.subtract, g_neg, g0_neg), g0) / g0_sq,
    }


def make_probe(cfg: Config, task: Task, graphdef) -> Callable:
    """`probe(params_R, step_R, hp_R, ref_params) -> {probe_*}` per run; one jitted program."""
    sampler = Sampler.from_config(cfg, graphdef)
    twin = sampler.twin()
    collect, collect_twin = make_collect(cfg, task, sampler), make_collect(cfg, task, twin)
    no_correction = cfg.correction.without_corrections()
    group = cfg.grpo.group_size  # full batches: whole groups
    losses = {mode: (make_loss(cfg, graphdef, sampler.spec, mode == "recompute", group,
                               refreshed_correction(mode, cfg.correction)),
                     make_loss(cfg, graphdef, twin.spec, mode == "recompute", group)) for mode in MODES}

    def gradients(loss_fn, batch, params, ref_params, hp) -> list:
        """Gradients of the full loss and of its A > 0 and A < 0 parts (with the full loss's
        denominator, so the parts add up to the policy term of the full gradient)."""
        signs = jnp.stack([jnp.ones_like(batch.adv_N), batch.adv_N > 0, batch.adv_N < 0]).astype(batch.adv_N.dtype)

        def grad_for(sign_N):
            part = batch._replace(weight_NT=batch.weight_NT * sign_N[:, None])
            return jax.grad(lambda p: loss_fn(p, ref_params, part, hp, True)[0])(params)

        stacked = jax.vmap(grad_for)(signs)
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(3)]

    def probe(params_and_step, hp, ref_params):
        params, step = params_and_step
        mismatched, zero = collect(params, hp, step), collect_twin(params, hp, step)
        out = {}
        for mode in MODES:
            loss_fn, loss_twin = losses[mode]
            g, g_pos, g_neg = gradients(loss_fn, learner_batch(mismatched, hp, mode, cfg.correction), params,
                                        ref_params, hp)
            g0, g0_pos, g0_neg = gradients(loss_twin, learner_batch(zero, hp, mode, no_correction), params,
                                           ref_params, hp)
            for name, value in direction_metrics(g, g0, g_pos, g0_pos, g_neg, g0_neg).items():
                out[f"probe_{mode}_{name}"] = value
        return out

    batched = batch_over_runs(probe, resolve_batching(cfg.run.batching))
    return jax.jit(trace_once(lambda params, step, hp, ref_params: batched((params, step), hp, ref_params), "probe"))
