"""The k1 / k2 / k3 estimators of a KL divergence, written once (Schulman 2020).

Convention: tokens x are drawn from q, and ``log_r = log p(x) - log q(x)``; each estimator's
mean over x ~ q estimates KL(q || p). k1 = -log r is unbiased with high variance; k2 =
(log r)^2 / 2 is biased, low variance; k3 = (r - 1) - log r is unbiased and >= 0 (written with
expm1, exact for small log r). timsim uses them with
- log_r = delta = log pi_old - log mu on sampled tokens (x ~ mu): KL(mu || pi_old), the mismatch;
- log_r = log pi_ref - log pi_theta (x ~ pi_theta): KL(pi_theta || pi_ref), the reference penalty.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from timsim.registry import Registry

KL_ESTIMATORS: Registry[Callable[[jax.Array], jax.Array]] = Registry("KL estimator",
                                                               "correction.kl_estimator, grpo.kl_ref")


@KL_ESTIMATORS.register()
def k1(log_r):
    """-log r: unbiased, high variance, can be negative per token."""
    return -log_r


@KL_ESTIMATORS.register()
def k2(log_r):
    """(log r)^2 / 2: biased (second order), low variance, >= 0."""
    return 0.5 * log_r**2


@KL_ESTIMATORS.register()
def k3(log_r):
    """r - 1 - log r: unbiased and >= 0."""
    return jnp.expm1(log_r) - log_r
