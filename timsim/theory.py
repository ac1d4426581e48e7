"""Closed-form predictions of training-inference mismatch, as pure functions of arrays.

Notation (DESIGN §1, §8.1): at one position the learner's distribution is pi = softmax(z) over
V tokens, p_v its probabilities and S = sum_v p_v^2; the sampler's is mu; a token y is drawn
from mu; delta = log pi(y) - log mu(y), r = exp(delta). A zero-mean logit perturbation eta is
added to z before the softmax (the `timsim.noise` families); with sampler temperature tau the
distributions are softmax(z / tau) and eta enters as eta / tau, so pass sigma / tau.

Most forms come from one expansion. Write A(z) = logsumexp(z); its derivatives are the
cumulants of the one-hot vector e_Y, Y ~ pi: grad A = p, Hessian Sigma = diag(p) - p p^T,
third and fourth derivatives kappa3, kappa4. Then mu = grad A(z + eta) and

    KL(mu || pi) = <mu, eta> - A(z + eta) + A(z) = 1/2 eta^T Sigma eta + 1/3 kappa3[eta^3] + 1/8 kappa4[eta^4] + O(eta^5),
    delta(y) = -(eta_y - <p, eta>) + 1/2 eta^T Sigma eta + O(eta^3).

For eta ~ N(0, sigma^2 I) the odd terms vanish in expectation. Every function states which
terms it keeps; the next omitted order is the size of its error, which the tests of theory
against simulation (tests/test_theory.py) use as their tolerance beside the sampling error.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def collision(p_V: jax.Array) -> jax.Array:
    """S = sum_v p_v^2 (the probability that two draws agree), over the last axis."""
    return (p_V**2).sum(-1)


# ----------------------------------------------------------------------------- Gaussian logit noise


def gaussian_kl_leading(p_V: jax.Array, sigma) -> jax.Array:
    """E[KL(mu || pi)] to second order: 1/2 sigma^2 tr(Sigma) = 1/2 sigma^2 (1 - S)."""
    return 0.5 * sigma**2 * (1.0 - collision(p_V))


def gaussian_kl(p_V: jax.Array, sigma) -> jax.Array:
    """E[KL(mu || pi)] to fourth order in sigma; the error is O(sigma^6).

    The fourth-order term is 1/8 E[kappa4[eta^4]]. For fixed eta, kappa4[eta^4] is the fourth
    cumulant of X = eta_Y (Y ~ pi): E[d_Y^4] - 3 E[d_Y^2]^2 with d = eta - <p, eta>. d is Gaussian
    with covariance sigma^2 C, C_ij = delta_ij - p_i - p_j + S, so with c_i = C_ii
    E[kappa4] = 3 sigma^4 (sum_i p_i c_i^2 - (sum_i p_i c_i)^2 - 2 sum_ij p_i p_j C_ij^2)."""
    s = collision(p_V)[..., None]
    c_VV = jnp.eye(p_V.shape[-1]) - p_V[..., :, None] - p_V[..., None, :] + s[..., None]
    c_V = jnp.diagonal(c_VV, axis1=-2, axis2=-1)
    pc = (p_V * c_V).sum(-1)
    cross = jnp.einsum("...i,...j,...ij->...", p_V, p_V, c_VV**2)
    kappa4 = 3.0 * sigma**4 * ((p_V * c_V**2).sum(-1) - pc**2 - 2.0 * cross)
    return gaussian_kl_leading(p_V, sigma) + kappa4 / 8.0


def gaussian_delta_var(p_V: jax.Array, token, sigma) -> jax.Array:
    """Var(delta) at a token y to first order: sigma^2 (1 - 2 p_y + S), the variance of
    -(eta_y - <p, eta>). For a confident token (S ~ p_y^2) it is sigma^2 (1 - p_y)^2."""
    p_y = jnp.take_along_axis(p_V, jnp.asarray(token)[..., None], -1)[..., 0]
    return sigma**2 * (1.0 - 2.0 * p_y + collision(p_V))


def gaussian_token_log_ratio(p_V: jax.Array, token, sigma) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of log r = delta at a token y *drawn from mu*, to second order:
    N(sigma^2 (2 p_y - 3/2 S - 1/2), v_y) with v_y = sigma^2 (1 - 2 p_y + S).

    y was drawn because its noise raised mu(y): conditioning on y tilts X = eta_y - <p, eta>
    by exp(X), shifting its mean by +v_y; delta = -X + 1/2 eta^T Sigma eta adds 1/2 sigma^2 (1 - S).
    Then E[r | y] = exp(sigma^2 (p_y - S)) = pi(y) / E[mu(y)] (flattening): r > 1 on likely
    tokens, < 1 on unlikely ones, and E_mu[r] = 1 overall."""
    p_y = jnp.take_along_axis(p_V, jnp.asarray(token)[..., None], -1)[..., 0]
    s = collision(p_V)
    return sigma**2 * (2.0 * p_y - 1.5 * s - 0.5), gaussian_delta_var(p_V, token, sigma)


def gaussian_abs_delta(p_V: jax.Array, token, sigma) -> jax.Array:
    """E|delta| at a token y to first order: sqrt(2 / pi) sqrt(Var(delta)) ~ 0.8 sigma (1 - p_y)
    for a confident token: mismatch is largest where the learner is unsure."""
    return SQRT_2_OVER_PI * jnp.sqrt(gaussian_delta_var(p_V, token, sigma))


def report_only_ratio_mean(p_V: jax.Array, token, sigma) -> jax.Array:
    """E[r] at a token y drawn from pi (report-only noise: the sampler samples from pi but
    reports log mu), to second order: delta ~ N(1/2 sigma^2 (1 - S), sigma^2 (1 - 2 p_y + S)),
    so E[r | y] = exp(sigma^2 (1 - p_y)). Not 1: the identity E_mu[r] = 1 needs y ~ mu
    (DESIGN §8.1), and DESIGN's e^(sigma^2 / 2) is the case of noise on the reported log-prob
    itself, not on the logits before the softmax."""
    p_y = jnp.take_along_axis(p_V, jnp.asarray(token)[..., None], -1)[..., 0]
    return jnp.exp(sigma**2 * (1.0 - p_y))


def expected_mu_gaussian(p_V: jax.Array, sigma) -> jax.Array:
    """E[mu] to second order: p + sigma^2 p (S - p). Tokens above S lose mass, those below gain
    it: zero-mean logit noise flattens the sampler on average (DESIGN §8.1's temperature
    confound). From E[mu_i] = p_i + sigma^2 / 2 sum_j d^2 mu_i / dz_j^2 = p_i + sigma^2 p_i (S - p_i)."""
    return p_V + sigma**2 * p_V * (collision(p_V)[..., None] - p_V)


def flattening_temperature(p_V: jax.Array, sigma) -> jax.Array:
    """The temperature tau of softmax(z / tau) that best fits log E[mu] (p-weighted least
    squares), to second order: 1 + sigma^2 Cov_p(p, z) / Var_p(z), > 1 since likelier tokens
    have larger logits. z is recovered from p up to a constant (log p), which the fit ignores.
    The mean-preserving control, Dirichlet noise, has E[mu] = pi exactly: tau = 1."""
    z = jnp.log(jnp.maximum(p_V, 1e-30))
    mean_z = (p_V * z).sum(-1, keepdims=True)
    cov = (p_V * p_V * (z - mean_z)).sum(-1)
    var = (p_V * (z - mean_z) ** 2).sum(-1)
    return 1.0 + sigma**2 * cov / jnp.maximum(var, 1e-30)


# ----------------------------------------------------------------------------- any sampler noise


def expected_delta_under_mu(mu_V: jax.Array, pi_V: jax.Array) -> jax.Array:
    """E_{y ~ mu}[delta] = -KL(mu || pi), exactly (DESIGN §8.1)."""
    return -(mu_V * (jnp.log(jnp.maximum(mu_V, 1e-38)) - jnp.log(jnp.maximum(pi_V, 1e-38)))).sum(-1)


def seq_log_ratio_var(delta_var_NT: jax.Array, mask_NT: jax.Array) -> jax.Array:
    """Var(sum_{t < L} delta_t) over responses for every prefix length L = 1..T, [T]: the sum of
    the per-token variances (0 after a response's end). delta_t + KL_t is a martingale difference under mu (E_mu[delta_t | past] =
    -KL_t), so the variances add up whatever the noise mode; the KL_t themselves vary between
    sequences only at O(sigma^4) per token. Linear in length, fresh or persistent: persistence
    matters across steps (the same context gets the same error), not within a response."""
    return jnp.cumsum((delta_var_NT * mask_NT).mean(0))


# ----------------------------------------------------------------------------- truncated support


def truncation(p_V: jax.Array, kept_V: jax.Array) -> dict:
    """Top-k / top-p: mu = pi / Z on the kept set (Z its mass). Exactly: delta = log Z at every
    kept token, KL(mu || pi) = k1 = -log Z, and the per-token k3 = Z - 1 - log Z."""
    z = (p_V * kept_V).sum(-1)
    return {"delta": jnp.log(z), "kl": -jnp.log(z), "k3": z - 1.0 - jnp.log(z)}


# ----------------------------------------------------------------------------- rounding


def rounding_relative_bound(mantissa_bits: int) -> float:
    """Round-to-nearest with m explicit mantissa bits: |round(x) - x| <= 2^-(m+1) |x|."""
    return 2.0 ** -(mantissa_bits + 1)


def rounding_mean_square_relative(mantissa_bits: int) -> float:
    """E[((round(x) - x) / x)^2] for x with a log-uniform mantissa: the error is uniform over
    one ulp = 2^-m f^-1 |x| (f in [1, 2) the mantissa), so 2^-2m E[f^-2] / 12 with
    E[f^-2] = 3 / (8 ln 2)."""
    return 4.0**-mantissa_bits * 3.0 / (8.0 * math.log(2.0)) / 12.0


def rounding_kl(p_V: jax.Array, logits_V: jax.Array, mantissa_bits: int) -> jax.Array:
    """E[KL(mu || pi)] when only the logits are rounded: eta_v = z_v u_v with independent
    relative errors u of mean square c_m (`rounding_mean_square_relative`), so to second order
    1/2 c_m sum_v p_v (1 - p_v) z_v^2. Unlike noise, rounding depends on the raw logits' size."""
    c = rounding_mean_square_relative(mantissa_bits)
    return 0.5 * c * (p_V * (1.0 - p_V) * logits_V**2).sum(-1)


def rounding_kl_ratio(mantissa_bits_a: int, mantissa_bits_b: int, floor: float = 0.0) -> float:
    """KL_a / KL_b of two formats rounding the same logits: 4^(m_b - m_a) (bf16 / fp16: 4^3 = 64).
    A common floor (mismatch both share: fp32 accumulations, reordered reductions, other
    kernels) pulls the ratio towards 1: (4^-m_a + floor) / (4^-m_b + floor), in units of c_m.
    Rounding at every layer of a deep model leaves the logits' error shaped by the layers
    after it (normalisation, residual sums in fp32), which is such a floor: hence the 10-25x
    reported for full models against the 64x of rounding the logits alone."""
    return (4.0**-mantissa_bits_a + floor) / (4.0**-mantissa_bits_b + floor)


# ----------------------------------------------------------------------------- the losses' response


def clip_drop_probability(mean_log_r, var_log_r, eps_low, eps_high) -> tuple[jax.Array, jax.Array]:
    """With log r ~ N(m, v) at a token (`gaussian_token_log_ratio`), the probability that the PPO
    clip drops its gradient: P(r > 1 + eps_high) for A > 0 tokens and P(r < 1 - eps_low) for
    A < 0 tokens. The two sides differ (log(1 + eps) != -log(1 - eps), and m depends on the token),
    so which tokens survive depends on the sign of A: the clip's sign-dependent skew."""
    sd = jnp.sqrt(jnp.maximum(var_log_r, 1e-30))
    high = 1.0 - ndtr((jnp.log1p(eps_high) - mean_log_r) / sd)
    low = ndtr((jnp.log1p(-eps_low) - mean_log_r) / sd)
    return high, low


def capped_weight_mean(mean_log_r, var_log_r, cap) -> jax.Array:
    """E[min(r, C)] for lognormal r (log r ~ N(m, v)): E[r] - E[(r - C)_+], with
    E[(r - C)_+] = e^(m + v/2) Phi(d1) - C Phi(d1 - sqrt v), d1 = (m + v - log C) / sqrt v.
    Under mu, E[r] = 1, so the token TIS weight's bias is -E[(r - C)_+]: its size."""
    sd = jnp.sqrt(jnp.maximum(var_log_r, 1e-30))
    mean_r = jnp.exp(mean_log_r + 0.5 * var_log_r)
    d1 = (mean_log_r + var_log_r - jnp.log(cap)) / sd
    return mean_r - (mean_r * ndtr(d1) - cap * ndtr(d1 - sd))


def update_split(mu_M: jax.Array, reward_M: jax.Array, score_MD: jax.Array, baseline) -> dict:
    """E_mu[(R - b) s] over an enumerated response set M (probabilities mu_M, scores s = grad log
    pi, [M, D]) split as Cov_mu(R, s) + (E_mu[R] - b) E_mu[s] (DESIGN §8.1). The true gradient
    is Cov_pi(R, s); score centering removes the drift term, not the covariance's bias."""
    mean_r = (mu_M * reward_M).sum()
    mean_s = mu_M @ score_MD
    cov = (mu_M * (reward_M - mean_r)) @ score_MD
    return {"cov": cov, "drift": (mean_r - baseline) * mean_s, "total": (mu_M * (reward_M - baseline)) @ score_MD}
