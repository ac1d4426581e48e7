"""Theory against simulation for one config: `timsim theory CONFIG` and `timsim.theory(cfg)`.

The config's own sampler (`timsim.calibration.make_measure`: its real noise family, numerics,
temperature and corrections' inputs) samples a large batch of responses from a policy; each
registered prediction evaluates its closed form (`timsim.theory`) at the same positions and
compares it with what the simulator measured there. A row gives the prediction, the
measurement with its standard error (responses are the independent units: tokens of one
response are not), the size of the terms the closed form omits, and z = (measured -
predicted) / sqrt(se^2 + omitted^2). A prediction that does not apply to the config (another
noise family, report-only noise, truncated support) says so and why instead of a number.

A new prediction is one function ``(Measured) -> list[Row]`` registered in `PREDICTIONS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from timsim import hyper, theory
from timsim.calibration import hyperparams, make_measure
from timsim.config import Config, ConfigError
from timsim.diagnostics import PROB_BINS
from timsim.model import response_forward
from timsim.noise import make_logits_fn
from timsim.numerics import FORMATS, FP32, round_to
from timsim.registry import Registry

PREDICTIONS: Registry[Callable] = Registry("prediction", "timsim theory")
AGREE_Z = 3.0  # |z| below this: the measurement agrees with the prediction
FLATTENING_DRAWS = 256  # noise draws per position to estimate E[mu]
FLATTENING_POSITIONS = 512


@dataclasses.dataclass(frozen=True)
class Row:
    quantity: str
    formula: str
    predicted: float = math.nan
    measured: float = math.nan
    se: float = math.nan
    omitted: float = 0.0  # size of the terms the closed form leaves out
    applies: bool = True
    reason: str = ""  # why the prediction does not apply
    bound: bool = False  # the prediction is an upper bound: it agrees when measured <= predicted

    @property
    def agrees(self) -> bool:
        return self.measured <= self.predicted if self.bound else abs(self.z) < AGREE_Z

    @property
    def z(self) -> float:
        scale = math.sqrt(self.se**2 + self.omitted**2)
        diff = self.measured - self.predicted
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))


def not_applicable(quantity: str, formula: str, reason: str) -> list[Row]:
    return [Row(quantity, formula, applies=False, reason=reason)]


@dataclasses.dataclass(frozen=True)
class Measured:
    """One batch of the config's sampler at fixed parameters, on the host (float64)."""

    cfg: Config
    logp_all_old: np.ndarray  # [N, T, V] the learner's log pi
    logp_all_sampler: np.ndarray  # [N, T, V] what the sampler reports as log mu
    logits_old: np.ndarray  # [N, T, V] the learner's raw logits (before the temperature)
    responses: np.ndarray  # [N, T]
    mask: np.ndarray  # [N, T]
    adv: np.ndarray  # [N]
    sigma: float  # the logit noise's scale in units of the tempered logits: scale / temperature

    @functools.cached_property
    def p(self) -> np.ndarray:
        return np.exp(self.logp_all_old)

    @functools.cached_property
    def mu(self) -> np.ndarray:
        return np.exp(self.logp_all_sampler)

    def take(self, a_NTV: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a_NTV, self.responses[..., None], -1)[..., 0]

    @functools.cached_property
    def delta(self) -> np.ndarray:
        return (self.take(self.logp_all_old) - self.take(self.logp_all_sampler)) * self.mask

    @functools.cached_property
    def kl(self) -> np.ndarray:
        """Exact KL(mu || pi) at every position [N, T] (0 on padding)."""
        terms = np.where(self.mu > 0, self.mu * (self.logp_all_sampler - self.logp_all_old), 0.0)
        return terms.sum(-1) * self.mask

    @property
    def noise(self):
        return self.cfg.perturbation.logit_noise

    @property
    def cluster(self) -> int:
        """Responses that share noise draws: with context-keyed noise a prompt's group shares its
        prompt's (and common prefixes') draws, so the group is the independent unit."""
        return self.cfg.grpo.group_size if self.noise.mode == "context" else 1

    @property
    def other_sources(self) -> bool:
        """Mismatch from something other than logit noise: weights, router or numerics."""
        return bool(set(self.cfg.perturbation.active_sources) & {"weight_noise", "router_noise", "numerics"})

    @property
    def sampler_differs(self) -> bool:
        return self.noise.family != "none" or self.other_sources


def token_mean(values_NT: np.ndarray, mask_NT: np.ndarray, cluster: int = 1) -> tuple[float, float]:
    """Mean over tokens with mask 1 and its standard error (the ratio estimator's linearised
    variance) with runs of `cluster` consecutive responses as the independent units."""
    total = mask_NT.sum()
    mean = (values_NT * mask_NT).sum() / total
    resid_N = ((values_NT - mean) * mask_NT).reshape(len(mask_NT) // cluster, -1).sum(-1)
    n = len(resid_N)
    return float(mean), float(np.sqrt(n / max(n - 1, 1) * (resid_N**2).sum()) / total)


def compare_tokens(quantity: str, formula: str, measured_NT, predicted_NT, mask_NT, cluster: int = 1,
                   omitted_NT=None) -> Row:
    """A row comparing per-token measurements with per-token predictions at the same tokens:
    the standard error is that of their paired difference (`token_mean`'s units)."""
    measured, _ = token_mean(measured_NT, mask_NT)
    predicted, _ = token_mean(predicted_NT, mask_NT)
    _, se = token_mean(measured_NT - predicted_NT, mask_NT, cluster)
    omitted = 0.0 if omitted_NT is None else token_mean(np.abs(omitted_NT), mask_NT)[0]
    return Row(quantity, formula, predicted, measured, se, omitted)


# ----------------------------------------------------------------------------- any sampler noise

_NO_MISMATCH = "the sampler is the learner: nothing to predict"
_REPORT_ONLY = "report-only noise: tokens are drawn from pi, not from the reported mu"


@PREDICTIONS.register("zero_mismatch")
def zero_mismatch(m: Measured) -> list[Row]:
    """DESIGN §8.2: with no perturbation the sampler reports the learner's own log-probs."""
    quantity, formula = "zero mismatch", "delta = 0 and KL(mu || pi) = 0 at every token, bit for bit"
    if m.sampler_differs:
        return not_applicable(quantity, formula, "the config's sampler differs from the learner")
    return [Row("max |delta| (zero mismatch)", "0, bit for bit", 0.0, float(np.abs(m.delta).max()), 0.0, bound=True),
            Row("max KL(mu || pi) (zero mismatch)", "0, bit for bit", 0.0, float(m.kl.max()), 0.0, bound=True)]


def _drawn_from_mu(m: Measured, quantity: str, formula: str, see: str = "") -> list[Row] | None:
    """None when tokens are drawn from a reported mu that differs from pi, else the reason row."""
    if not m.sampler_differs:
        return not_applicable(quantity, formula, _NO_MISMATCH)
    if m.noise.report_only:
        return not_applicable(quantity, formula, _REPORT_ONLY + see)
    return None


@PREDICTIONS.register("ratio_mean")
def ratio_mean(m: Measured) -> list[Row]:
    quantity, formula = "E_mu[r] over tokens", "E_{y~mu}[pi(y)/mu(y)] = 1 (any mu covering pi's support)"
    if (skip := _drawn_from_mu(m, quantity, formula, " (see report_only_ratio)")) is not None:
        return skip
    if m.noise.family in ("top_k", "top_p"):
        return not_applicable(quantity, formula, "truncated support: mu = 0 where pi > 0, so E_mu[r] = Z < 1")
    ratio = np.exp(np.clip(m.delta, -20, 20))
    return [compare_tokens(quantity, formula, ratio, np.ones_like(ratio), m.mask, m.cluster)]


@PREDICTIONS.register("delta_mean")
def delta_mean(m: Measured) -> list[Row]:
    quantity, formula = "E_mu[delta] over tokens", "E_{y~mu}[delta] = -KL(mu || pi), exact"
    if (skip := _drawn_from_mu(m, quantity, formula)) is not None:
        return skip
    return [compare_tokens(quantity, formula, m.delta, -m.kl, m.mask, m.cluster)]


# ----------------------------------------------------------------------------- Gaussian logit noise

def _gaussian(m: Measured, quantity: str, formula: str, report_only: bool = False) -> list[Row] | None:
    """None when the Gaussian-noise prediction applies, else its 'not applicable' row."""
    if m.noise.family != "gaussian" or m.sigma == 0:
        return not_applicable(quantity, formula, f"needs Gaussian logit noise with scale > 0 "
                                                 f"(logit-noise family {m.noise.family!r}, scale {m.noise.scale:g})")
    if m.noise.mode == "state":
        return not_applicable(quantity, formula, "state-keyed noise: positions whose distributions round alike share "
                                                 "one draw, so a batch holds few independent draws (the forms hold "
                                                 "on average over noise keys)")
    if m.noise.report_only != report_only:
        return not_applicable(quantity, formula, _REPORT_ONLY if m.noise.report_only
                              else "applies to report-only noise only")
    if m.other_sources:
        return not_applicable(quantity, formula, "other sampler perturbations add to the logit noise")
    return None


@PREDICTIONS.register("gaussian_kl")
def gaussian_kl(m: Measured) -> list[Row]:
    quantity, formula = "KL(mu || pi) per token", "1/2 s^2 (1 - S) + 1/8 E[kappa4], s = sigma / tau"
    if (skip := _gaussian(m, quantity, formula)) is not None:
        return skip
    predicted = np.asarray(theory.gaussian_kl(m.p, m.sigma), np.float64)
    fourth = predicted - np.asarray(theory.gaussian_kl_leading(m.p, m.sigma))
    return [compare_tokens(quantity, formula, m.kl, predicted, m.mask, m.cluster, omitted_NT=fourth * m.sigma**2)]


@PREDICTIONS.register("abs_delta_by_confidence")
def abs_delta_by_confidence(m: Measured) -> list[Row]:
    quantity, formula = "E|delta| by pi(y) bin", "sqrt(2/pi) s sqrt(1 - 2 p_y + S) (~0.8 s (1 - p_y))"
    if (skip := _gaussian(m, quantity, formula)) is not None:
        return skip
    predicted = np.asarray(theory.gaussian_abs_delta(m.p, m.responses, m.sigma), np.float64)
    p_y = m.take(m.p)
    rows = []  # omitted: the O(s^2) mean of delta and its non-Gaussian part change E|delta| by O(s^2) relative
    for lo, hi in zip(PROB_BINS, PROB_BINS[1:]):
        in_bin = m.mask * (p_y >= lo) * ((p_y < hi) | (hi == 1.0))
        if in_bin.sum() < 20:
            continue
        rows.append(compare_tokens(f"{quantity} [{lo:g}, {hi:g})", formula, np.abs(m.delta), predicted, in_bin,
                                   m.cluster, omitted_NT=predicted * m.sigma**2))
    return rows


@PREDICTIONS.register("report_only_ratio")
def report_only_ratio(m: Measured) -> list[Row]:
    quantity, formula = "E[r], report-only noise", "E[exp(s^2 (1 - p_y))], y ~ pi (second order)"
    if (skip := _gaussian(m, quantity, formula, report_only=True)) is not None:
        return skip
    predicted = np.asarray(theory.report_only_ratio_mean(m.p, m.responses, m.sigma), np.float64)
    ratio = np.exp(np.clip(m.delta, -20, 20))
    return [compare_tokens(quantity, formula, ratio, predicted, m.mask, m.cluster,
                           omitted_NT=np.full_like(predicted, m.sigma**3))]


@PREDICTIONS.register("seq_log_ratio_var")
def seq_log_ratio_var(m: Measured) -> list[Row]:
    quantity, formula = "Var(sum_{t<L} delta_t)", "sum_{t<L} E[s^2 (1 - 2 p_t + S_t)]: linear in L, any mode"
    if (skip := _gaussian(m, quantity, formula)) is not None:
        return skip
    per_token_var = np.asarray(theory.gaussian_delta_var(m.p, m.responses, m.sigma), np.float64)
    predicted_L = np.asarray(theory.seq_log_ratio_var(per_token_var, m.mask), np.float64)
    sums_NL = np.cumsum(m.delta, -1)
    rows = []
    for length in range(1, m.mask.shape[1] + 1):
        x = sums_NL[:, length - 1]
        var = x.var(ddof=1)
        units = ((x - x.mean()) ** 2).reshape(-1, m.cluster).mean(-1)  # the variance's terms, per independent unit
        se = float(units.std(ddof=1) / math.sqrt(len(units)))
        rows.append(Row(f"{quantity}, L = {length}", formula, float(predicted_L[length - 1]), float(var), se,
                        omitted=float(predicted_L[length - 1]) * m.sigma**2))
    return rows


@PREDICTIONS.register("flattening")
def flattening(m: Measured) -> list[Row]:
    """E[mu] estimated from FLATTENING_DRAWS draws of the config's own noise family at each of
    the first FLATTENING_POSITIONS sampled positions. Its temperature is read off linearly,
    tau - 1 = -sum_v (E[mu]_v - p_v)(z_v - z_bar) / Var_p(z) (softmax(z / tau) moves p by
    -(tau - 1) p (z - z_bar)), so the Monte-Carlo mean enters unbiased (a fit to log E[mu] is
    biased by the log of a noisy mean)."""
    quantity, formula = "temperature of E[mu]", "1 + s^2 Cov_p(p, z) / Var_p(z); Dirichlet: 1 exactly"
    family = m.noise.family
    if family not in ("gaussian", "dirichlet") or m.noise.scale == 0:
        return not_applicable(quantity, formula, f"needs gaussian or dirichlet logit noise with scale > 0 "
                                                 f"(family {family!r})")
    tau = m.cfg.sampler.temperature
    where = np.argwhere(m.mask > 0)[:FLATTENING_POSITIONS]
    p_KV = m.p[where[:, 0], where[:, 1]]
    knobs = hyper.of(m.cfg).perturbation.logit_noise
    fn = make_logits_fn(family, m.noise.profile)
    keys = jax.random.split(jax.random.key(7), FLATTENING_DRAWS)
    logits = jnp.asarray(tau * np.log(np.maximum(p_KV, 1e-30)), jnp.float32)
    mean_mu = jax.jit(lambda ks: jax.lax.map(lambda k: jax.nn.softmax(fn(k, logits, knobs) / tau, -1), ks).mean(0))(keys)
    z = np.log(np.maximum(p_KV, 1e-30))
    z_c = z - (p_KV * z).sum(-1, keepdims=True)
    var_z = np.maximum((p_KV * z_c**2).sum(-1), 1e-30)
    measured = 1.0 - ((np.asarray(mean_mu, np.float64) - p_KV) * z_c).sum(-1) / var_z
    predicted = (np.asarray(theory.flattening_temperature(p_KV, m.sigma), np.float64) if family == "gaussian"
                 else np.ones(len(p_KV)))
    diff = measured - predicted
    omitted = float(((predicted - 1.0) ** 2).mean())  # the next order: the square of the first-order effect
    return [Row(quantity, formula, float(predicted.mean()), float(measured.mean()),
                float(diff.std(ddof=1) / math.sqrt(len(diff))), omitted)]


# ----------------------------------------------------------------------------- truncated support

@PREDICTIONS.register("truncation")
def truncation(m: Measured) -> list[Row]:
    quantity, formula = "top-k / top-p", "delta = log Z, k1 = KL = -log Z, k3 = Z - 1 - log Z (exact)"
    if m.noise.family not in ("top_k", "top_p") or m.noise.learner_too:
        return not_applicable(quantity, formula, f"needs one-sided top_k or top_p (family {m.noise.family!r})")
    p = m.p
    if m.noise.family == "top_k":
        kth = -np.sort(-p, -1)[..., int(round(m.noise.top_k)) - 1 : int(round(m.noise.top_k))]
        kept = p >= kth
    else:  # the smallest most-likely set whose mass reaches top_p
        order = np.argsort(-p, -1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < m.noise.top_p
        kept = np.take_along_axis(keep_sorted, np.argsort(order, -1), -1)
    t = {k: np.asarray(v, np.float64) for k, v in theory.truncation(p, kept).items()}
    k3 = np.expm1(m.delta) - m.delta
    floor = np.full_like(m.delta, 1e-6)  # float32 log-probs: the exact identities hold to ~1e-6
    return [compare_tokens("delta at sampled tokens", "log Z", m.delta, t["delta"], m.mask, omitted_NT=floor),
            compare_tokens("k1 = -delta", "KL(mu || pi) = -log Z", -m.delta, m.kl, m.mask, omitted_NT=floor),
            compare_tokens("k3", "Z - 1 - log Z", k3, t["k3"], m.mask, omitted_NT=floor)]


# ----------------------------------------------------------------------------- rounding

@PREDICTIONS.register("rounding")
def rounding(m: Measured) -> list[Row]:
    quantity, formula = "logits rounded", "|err| <= 2^-(m+1) |z|; KL = 1/2 c_m sum_v p_v (1 - p_v) z_v^2"
    precision = m.cfg.perturbation.sampler_precision
    if (FORMATS.get(precision.dtype) is None or tuple(precision.sites) != ("logits",) or m.noise.family != "none"
            or m.cfg.perturbation.learner_precision.numerics() != FP32):
        return not_applicable(quantity, formula, "needs sampler_precision bf16 or fp16 at sites: [logits] alone, "
                                                 "an fp32 learner and no other perturbation")
    exponent_bits, bits = FORMATS[precision.dtype]
    z = m.logits_old[m.mask > 0].ravel()
    z = z[np.abs(z) >= 2.0 ** (2 - 2 ** (exponent_bits - 1))]  # the bound holds in the normal range
    rel = np.abs(np.asarray(round_to(jnp.asarray(z, jnp.float32), precision.dtype), np.float64) - z) / np.abs(z)
    bound = theory.rounding_relative_bound(bits)
    predicted = np.asarray(theory.rounding_kl(m.p, m.logits_old / m.cfg.sampler.temperature, bits), np.float64)
    return [Row(f"max relative error ({precision.dtype})", "<= 2^-(m+1) (normal range)", bound, float(rel.max()), 0.0,
                bound=True),
            compare_tokens(f"KL(mu || pi) per token ({precision.dtype})", "1/2 c_m sum_v p_v (1 - p_v) z_v^2", m.kl,
                           predicted, m.mask, omitted_NT=0.1 * predicted)]  # the rounding model: 10%


# ----------------------------------------------------------------------------- the losses' response

def _token_log_ratio(m: Measured, quantity: str, formula: str):
    """((mean, var) of log r at each sampled token under Gaussian logit noise, None), or (None, the
    'not applicable' row)."""
    skip = _gaussian(m, quantity, formula)
    if skip is not None:
        return None, skip
    return tuple(np.asarray(a, np.float64) for a in theory.gaussian_token_log_ratio(m.p, m.responses, m.sigma)), None


@PREDICTIONS.register("clip_skew")
def clip_skew(m: Measured) -> list[Row]:
    quantity, formula = "PPO clip drops", "P(r > 1 + eps_high) if A > 0, P(r < 1 - eps_low) if A < 0; log r ~ N(m_y, v_y)"
    moments, skip = _token_log_ratio(m, quantity, formula)
    if skip is not None:
        return skip
    g = m.cfg.grpo
    high, low = (np.asarray(a, np.float64) for a in theory.clip_drop_probability(*moments, g.clip_eps_low,
                                                                                 g.clip_eps_high))
    ratio = np.exp(np.clip(m.delta, -20, 20))
    adv = np.broadcast_to(m.adv[:, None], m.mask.shape)
    return [compare_tokens("clip-dropped fraction, A > 0", formula, ratio > 1 + g.clip_eps_high, high,
                           m.mask * (adv > 0), m.cluster, omitted_NT=high * m.sigma),
            compare_tokens("clip-dropped fraction, A < 0", formula, ratio < 1 - g.clip_eps_low, low,
                           m.mask * (adv < 0), m.cluster, omitted_NT=low * m.sigma)]


@PREDICTIONS.register("token_tis_weight")
def token_tis_weight(m: Measured) -> list[Row]:
    quantity, formula = "token TIS weight E[min(r, C)]", "E[r] - E[(r - C)_+], log r ~ N(m_y, v_y)"
    moments, skip = _token_log_ratio(m, quantity, formula)
    if skip is not None:
        return skip
    cap, (mean, var) = m.cfg.correction.tis_cap, moments
    predicted = np.asarray(theory.capped_weight_mean(mean, var, cap), np.float64)
    ratio = np.exp(np.clip(m.delta, -20, 20))
    capped_off = np.exp(mean + 0.5 * var) - predicted  # E[(r - C)_+]: the lognormal tail, O(s) relative error
    return [compare_tokens(f"{quantity}, C = {cap:g}", formula, np.minimum(ratio, cap), predicted, m.mask, m.cluster,
                           omitted_NT=capped_off * m.sigma)]


# ----------------------------------------------------------------------------- the table

def check_names(names) -> None:
    """ConfigError naming unknown predictions and the accepted ones."""
    unknown = sorted(set(names or ()) - set(PREDICTIONS))
    if unknown:
        raise ConfigError(f"theory: unknown prediction(s) {unknown}; accepted: {', '.join(PREDICTIONS)}.")


def measure_batch(cfg: Config, graphdef, params, n_prompts: int = 512) -> Measured:
    """Sample `n_prompts` x group-size responses with `cfg`'s sampler at `params` (one program)."""
    cfg = cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"prompts_per_step": n_prompts})})
    scale = hyper.get(hyper.of(cfg), cfg.perturbation.scale_key)
    got = jax.device_get(make_measure(cfg, graphdef, per_token=True)(params, hyperparams(cfg, float(scale))))
    logits = jax.jit(lambda p, x, y: response_forward(nnx.merge(graphdef, p), x, y)[0])(params, got["prompts"],
                                                                                          got["responses"])
    host = {k: np.asarray(v, np.float64) for k, v in got.items()}
    return Measured(cfg, host["logp_all_old"], host["logp_all_sampler"], np.asarray(logits, np.float64),
                    np.asarray(got["responses"]), host["mask"], host["adv"],
                    float(scale) / cfg.sampler.temperature)


def table(measured: Measured, names: list[str] | None = None) -> pd.DataFrame:
    """One row per prediction (`PREDICTIONS`, or the given names): prediction, measurement,
    standard error, omitted terms, z and whether they agree (|z| < AGREE_Z); predictions that
    do not apply have `applies` False and the reason."""
    rows = []
    for name in names or list(PREDICTIONS):
        for row in PREDICTIONS[name](measured):
            z = row.z if row.applies and not row.bound else math.nan
            rows.append({"prediction": name, "quantity": row.quantity, "formula": row.formula,
                         "predicted": row.predicted, "measured": row.measured, "se": row.se, "omitted": row.omitted,
                         "z": z, "agrees": row.agrees if row.applies else None,
                         "applies": row.applies, "reason": row.reason})
    return pd.DataFrame(rows)
