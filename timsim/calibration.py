"""Calibration: map a mismatch target (per token or per response) to a noise scale.

Users think in mismatch size, not in sigma. For a given model and token distribution (the
sampler's own responses to training prompts) `measure` computes the DESIGN §5 mismatch
metrics at a noise scale; `calibrate_scale` finds the scale at which one of them (by default
the *exact* mean per-token KL(mu || pi); `perturbation.target` offers per-token k3, mean or
99th-percentile |delta|, per-response KL, or the variance of the sequence log-ratio) equals
the target, by geometric bisection on the measured curve (fixed prompts, sampling uniforms
and noise draws make it a deterministic, almost monotone function of the scale). For Gaussian logit noise the small-sigma closed form
E[KL] ~= 1/2 sigma^2 (1 - sum_v p_v^2) (temperature 1; sigma / tau otherwise) gives the
starting point, and its fourth-order form (`timsim.theory.gaussian_kl`) is reported beside
the measurement.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import pandas as pd
from flax import nnx

from timsim import grpo, hyper, theory
from timsim.config import Config, ConfigError, config_from_dict
from timsim.diagnostics import delta_quantiles_by_bin, mismatch_metrics
from timsim.noise import LOGIT_NOISE
from timsim.sampler import Sampler, SamplerKeys

CALIBRATION_SEED = 2024
MAX_SCALE = 1e3


def make_measure(cfg: Config, graphdef, seed: int = CALIBRATION_SEED, per_token: bool = False) -> Callable:
    """`measure(params, hp) -> metrics` on a fixed batch of the sampler's own responses to
    training prompts; `hp` holds a config's traced values (`hyperparams`). The sampler is the
    config's whole sampler side (numerics, weight noise, logit noise). With `per_token` the
    result also holds the [N, T] arrays `logp_old`, `logp_sampler` and `mask`, both sides' full
    log-distributions `logp_all_old` and `logp_all_sampler` [N, T, V], the `prompts`, `responses`,
    `reward` and group-relative `adv` [N] (for `timsim.predictions`)."""
    task = cfg.task.build()
    sampler = Sampler.from_config(cfg, graphdef)
    key = jax.random.key(seed)
    prompts = jnp.repeat(task.sample(jax.random.fold_in(key, 0), cfg.grpo.prompts_per_step), cfg.grpo.group_size, 0)
    keys = SamplerKeys(*(jax.random.fold_in(key, i) for i in (2, 1, 3, 4)))  # sample, noise, weight, router
    noise = cfg.perturbation.logit_noise
    gaussian_logits = noise.family == "gaussian" and not noise.report_only

    @jax.jit
    def measure(params, hp):
        model = nnx.merge(graphdef, params)
        rollout, sampler_model, routing = sampler.generate(params, model, prompts, keys, hp)
        r = sampler.report(model, sampler_model, prompts, rollout.responses, routing, keys.noise, hp)
        logp_all, logp_all_sampler = r.logp_all_learner_NTV, r.logp_all_sampler_NTV
        metrics = mismatch_metrics(logp_all, logp_all_sampler, rollout.responses, rollout.mask)
        collision = (jnp.exp(logp_all) ** 2).sum(-1)
        metrics["one_minus_sum_p2"] = ((1 - collision) * rollout.mask).sum() / rollout.mask.sum()
        metrics["response_tokens"] = rollout.mask.sum(-1).mean()
        logp_sampler = jnp.take_along_axis(logp_all_sampler, rollout.responses[..., None], -1)[..., 0]
        metrics["delta_floor_max"] = (jnp.abs(rollout.logp_decode - logp_sampler) * rollout.mask).max()
        if gaussian_logits:  # the closed form beside the measurement (`timsim.theory`)
            sigma = hyper.get(hp, cfg.perturbation.scale_key) / hp.sampler.temperature
            kl = theory.gaussian_kl(jnp.exp(logp_all), sigma)
            metrics["closed_form_kl"] = (kl * rollout.mask).sum() / rollout.mask.sum()
        seq_kl_N = ((jnp.exp(logp_all_sampler) * (logp_all_sampler - logp_all)).sum(-1) * rollout.mask).sum(-1)
        metrics["seq_kl_se"] = seq_kl_N.std() / jnp.sqrt(seq_kl_N.shape[0])  # standard error of seq_kl
        if per_token:
            take = lambda a: jnp.take_along_axis(a, rollout.responses[..., None], -1)[..., 0]  # noqa: E731
            reward = task.reward(prompts, rollout.responses, cfg.task.partial_credit)
            metrics.update(logp_old=take(logp_all), logp_sampler=take(logp_all_sampler), mask=rollout.mask,
                           logp_all_old=logp_all, logp_all_sampler=logp_all_sampler, prompts=prompts,
                           responses=rollout.responses, reward=reward,
                           adv=grpo.advantages(grpo.shaped_reward(reward, hp.grpo), cfg.grpo.group_size,
                                                  cfg.grpo.advantage))
        return metrics

    return measure


def hyperparams(cfg: Config, scale: float) -> hyper.Hyper:
    """`cfg`'s traced values (`timsim.hyper`) with the noise scale set to `scale`."""
    return hyper.replace(hyper.of(cfg), cfg.perturbation.scale_key, jnp.float32(scale))


def calibrate_scale(measure: Callable, params, cfg: Config, target: float, metric: str = "kl_sampler_learner",
                    iters: int = 40, start: float | None = None) -> tuple[float, dict]:
    """The scale at which the measured `metric` (a `mismatch_metrics` name; mean per-token
    KL(mu || pi) by default) equals `target` (relative error below 1e-3, or the bisection's
    resolution), and the metrics measured there. Every target metric grows with the scale.
    `start`: a scale near the answer, to begin the search from."""
    family = cfg.perturbation.logit_noise.family
    if cfg.perturbation.scaled_source is None:
        raise ConfigError(f"Calibration needs perturbation.logit_noise.family with a scale "
                          f"({', '.join(LOGIT_NOISE.names(scaled=True))}) or "
                          f"perturbation.router_noise.family: gaussian (got logit-noise family {family!r}).")
    source = cfg.perturbation.scaled_source
    at = lambda s: {k: float(v) for k, v in jax.device_get(measure(params, hyperparams(cfg, s))).items()}  # noqa: E731
    hi = 1.0
    if start is not None and start > 0:  # e.g. the previous chunk's scale when tracking a target
        hi = 2.0 * start
    elif source == "gaussian logit noise" and metric == "kl_sampler_learner":
        hi = max(1e-6, 2.0 * math.sqrt(2.0 * target / max(at(0.0)["one_minus_sum_p2"], 1e-12)))
    top = at(hi)
    while top[metric] < target:
        if hi >= MAX_SCALE:
            raise ConfigError(f"A calibration target of {metric} = {target:g} is out of reach for {source} "
                              f"on this model and response length: the largest scale tried ({MAX_SCALE:g}) gives "
                              f"{top[metric]:.3g}; reachable range is (0, {top[metric]:.3g}] (set a smaller "
                              f"perturbation.target, or use longer responses for a per-response target).")
        hi = min(hi * 4.0, MAX_SCALE)
        top = at(hi)
    lo, best, best_scale = hi * 1e-6, top, hi
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        got = at(mid)
        if abs(got[metric] - target) < abs(best[metric] - target):
            best, best_scale = got, mid
        if abs(got[metric] / target - 1.0) < 1e-3:
            break
        lo, hi = (mid, hi) if got[metric] < target else (lo, mid)
    return best_scale, best


def calibration_table(measure: Callable, params, cfg: Config, scales: list[float]) -> list[dict]:
    """Measured metrics (with Gaussian logit noise also the closed form `closed_form_kl`) at each
    scale, for `timsim calibrate`."""
    rows = []
    for scale in scales:
        got = {k: float(v) for k, v in jax.device_get(measure(params, hyperparams(cfg, scale))).items()}
        rows.append({"scale": scale, **got})
    return rows


def delta_bins(cfg: Config, graphdef, params, scales: list[float]) -> list[pd.DataFrame]:
    """|delta| quantiles by the learner's token probability and by position, at each scale
    (one compiled measurement for all of them)."""
    measure = make_measure(cfg, graphdef, per_token=True)
    frames = []
    for scale in scales:
        got = jax.device_get(measure(params, hyperparams(cfg, scale)))
        frames.append(delta_quantiles_by_bin(got["logp_old"], got["logp_sampler"], got["mask"]))
    return frames


PRECISION_MODES = {  # label -> perturbation.sampler_precision
    "bf16 all sites": {"dtype": "bf16"},
    **{f"bf16 {site}": {"dtype": "bf16", "sites": [site]}
       for site in ("weights", "matmul_in", "matmul_out", "activations", "logits")},
    "fp16 all sites": {"dtype": "fp16"},
    "split-K 4, fp32 partials": {"split_k": 4},
    "split-K 4, bf16 partials": {"split_k": 4, "partials": "bf16"},
    "softmax 4 blocks, bf16 sums": {"softmax_chunks": 4, "partials": "bf16"},
    "batch-variant split-K 8, bf16": {"split_k": 8, "partials": "bf16", "batch_variant": True},
}


def precision_modes(cfg: Config, graphdef, weights: dict) -> pd.DataFrame:
    """The mismatch each sampler precision or reduction-order mode (`PRECISION_MODES`) produces
    against the fp32 learner, on each named set of weights: one row per (mode, weights)."""
    rows = []
    for label, precision in PRECISION_MODES.items():
        raw = cfg.model_dump()
        raw["perturbation"]["sampler_precision"] = precision
        mode_cfg = config_from_dict(raw)
        measure = make_measure(mode_cfg, graphdef)
        for name, params in weights.items():
            got = {k: float(v) for k, v in jax.device_get(measure(params, hyperparams(mode_cfg, 0.0))).items()}
            rows.append({"mode": label, "weights": name, **got})
    return pd.DataFrame(rows)
