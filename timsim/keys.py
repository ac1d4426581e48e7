"""Random keys by purpose and step, so that common random numbers hold across cells.

Every random draw of a run comes from ``step_key(seed, purpose, step)``: two runs with the
same seed see the same prompts and the same sampling uniforms whatever else differs between
them (noise scale, correction, learning rate), and a new purpose never shifts the draws of
an existing one.
"""

import jax

PURPOSES = {"prompts": 0, "sample": 1, "eval": 2, "noise": 3, "weight_noise": 4, "router_noise": 5, "oracle": 6}


def step_key(seed: jax.Array, purpose: str, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), PURPOSES[purpose]), step)
