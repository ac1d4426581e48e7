"""Every way the sampler can differ from the learner, as registries.

`SOURCES` is the catalogue of sampler sources, one entry per `perturbation.*` section: the
stage of the sampler it acts on (logits, weights, router, numerics, staleness), whether it
draws random numbers (so mu is random given the run's state), and the traced scale a
calibration may turn. Its value is a predicate: is the source on under this perturbation
config. The config, the sampler, the theory checks and the exact oracle ask it instead of
testing each section by hand.

Besides the logit-noise families (`timsim.noise.LOGIT_NOISE`) two sources have families of
their own: `WEIGHT_NOISE` (a function of the sampler's weights) and `ROUTER_NOISE` (a function
of one position's mixture-of-experts router logits). A new family is one function plus its
registration; the config accepts its name and rejects a knob it does not read.
"""

from __future__ import annotations

from typing import Callable

import jax

from timsim.registry import Registry

# ----------------------------------------------------------------------------- weight noise

# knobs: the `perturbation.weight_noise.*` traced fields the family reads
WEIGHT_NOISE: Registry[Callable] = Registry("weight-noise family", "perturbation.weight_noise.family", knobs=())


@WEIGHT_NOISE.register("gaussian", knobs=("scale",))
def gaussian_weights(key: jax.Array, params, knobs):
    """N(0, scale^2) added to every weight of the sampler, one draw per key."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + knobs.scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


# ----------------------------------------------------------------------------- router noise

ROUTER_NOISE: Registry[Callable] = Registry("router-noise family", "perturbation.router_noise.family", knobs=())


@ROUTER_NOISE.register("gaussian", knobs=("scale",))
def gaussian_router(key: jax.Array, logits_NE: jax.Array, knobs) -> jax.Array:
    """N(0, scale^2) on each router logit of one position (keyed by layer and absolute
    position, so the decode and the teacher-forced forward see the same draw)."""
    return logits_NE + knobs.scale * jax.random.normal(key, logits_NE.shape)


# ----------------------------------------------------------------------------- the catalogue of sources

# stage: where in the sampler the source acts; drawn: it draws random numbers every step (or
# hold), so mu is random given the run's state; scale: the traced field a calibration turns.
SOURCES: Registry[Callable] = Registry("sampler source", "perturbation", stage="", drawn=False, scale=None)
SOURCES.add("logit_noise", lambda p: p.logit_noise.family != "none", stage="logits",
            scale="perturbation.logit_noise.scale")
SOURCES.add("weight_noise", lambda p: p.weight_noise.family != "none", stage="weights", drawn=True,
            scale="perturbation.weight_noise.scale")
SOURCES.add("router_noise", lambda p: p.router_noise.family != "none", stage="router", drawn=True,
            scale="perturbation.router_noise.scale")
SOURCES.add("numerics", lambda p: p.sampler_precision.numerics() != p.learner_precision.numerics(),
            stage="numerics")
SOURCES.add("lag_steps", lambda p: p.lag_steps > 0, stage="staleness")
SOURCES.add("frozen_sampler", lambda p: p.frozen_sampler, stage="staleness")


def active_sources(perturbation) -> tuple[str, ...]:
    """The sources a `perturbation` config section turns on, in registration order."""
    return tuple(e.name for e in SOURCES.entries() if e.value(perturbation))
