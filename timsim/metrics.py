"""The one registry of metric names, formulas and units.

Tables, plots and docs read it; a run that emits a name not registered here stops with an
error (`timsim.loop`) rather than dropping the metric. Names follow DESIGN.md §1/§5.
Per-token quantities are averaged over response tokens (mask = 1); "per step" metrics are computed on the step's training batch before the
update; "eval_*" metrics are computed on held-out prompts at chunk boundaries and are NaN on
other steps.
"""

from __future__ import annotations

import dataclasses

from timsim.config_types import ConfigError
from timsim.registry import Registry


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    formula: str
    unit: str = ""


_CATALOGUE = [
    Metric("reward_mean", "mean reward of the step's sampled responses"),
    Metric("accuracy", "fraction of the step's sampled responses that are exactly correct"),
    Metric("response_len", "mean number of generated tokens per response (<eos> included)", "tokens"),
    Metric("loss", "policy loss averaged over the step's updates"),
    Metric("grad_norm", "global gradient norm before clipping, averaged over the step's updates"),
    Metric("update_norm", "global norm of the parameter change over the whole step"),
    Metric("clip_frac", "fraction of response tokens whose PPO clip is active, averaged over updates"),
    Metric("entropy", "learner entropy -sum_v pi_v log pi_v per response token", "nats"),
    Metric("kl_ref", "per-token estimator (grpo.kl_ref) of KL(pi_theta || pi_ref) to the base model", "nats"),
    Metric("delta_abs_mean", "mean_t |delta_t|, delta = logp_old - logp_sampler at the sampled token", "nats"),
    Metric("delta_abs_max", "max_t |delta_t|", "nats"),
    Metric("mismatch_k1", "mean_t -delta_t (k1 estimator of KL(mu || pi_old))", "nats"),
    Metric("delta_abs_q50", "median of |delta_t| over the step's response tokens", "nats"),
    Metric("delta_abs_q90", "90th percentile of |delta_t|", "nats"),
    Metric("delta_abs_q99", "99th percentile of |delta_t|", "nats"),
    Metric("mismatch_k2", "mean_t delta_t^2 / 2 (k2 estimator of KL(mu || pi_old))", "nats"),
    Metric("mismatch_k3", "mean_t exp(delta_t) - 1 - delta_t (k3 estimator of KL(mu || pi_old))", "nats"),
    Metric("chi2_token", "mean_t r_corr,t^2 - 1, r_corr = exp(delta)"),
    Metric("ratio_out_band_frac", "fraction of tokens with r_corr outside [0.5, 2]"),
    Metric("dp_abs_mean", "mean_t |pi_old(y_t) - mu(y_t)| in probability space"),
    Metric("dp_abs_max", "max_t |pi_old(y_t) - mu(y_t)|"),
    Metric("extreme_token_frac", "fraction of tokens with |pi_old(y_t) - mu(y_t)| > 0.5"),
    Metric("p_pearson", "Pearson correlation of pi_old(y_t) and mu(y_t) over response tokens (1 = identical)"),
    Metric("kl_sampler_learner", "exact KL(mu || pi_old) over the vocabulary, mean over sampled positions", "nats"),
    Metric("kl_learner_sampler", "exact KL(pi_old || mu) over the vocabulary, mean over sampled positions", "nats"),
    Metric("tv_distance", "exact total variation 1/2 sum_v |mu_v - pi_v|, mean over sampled positions"),
    Metric("argmax_flip_frac", "fraction of positions where the learner's and the sampler's top token differ"),
    Metric("entropy_sampler", "sampler entropy -sum_v mu_v log mu_v per response token", "nats"),
    Metric("entropy_learner", "learner (pi_old) entropy per response token, before the update", "nats"),
    Metric("log_ppl_diff", "mean over responses of log PPL_mu - log PPL_pi = mean_t delta_t of the response", "nats"),
    Metric("ppl_ratio", "mean over responses of PPL_mu / PPL_pi = exp(mean_t delta_t)"),
    Metric("ppl_ratio_learner", "mean over responses of PPL_pi / PPL_mu = exp(-mean_t delta_t) (not 1 / ppl_ratio: "
           "the mean is over responses)"),
    Metric("log_ppl_abs_diff", "mean over responses of |log PPL_mu - log PPL_pi|", "nats"),
    Metric("log_ppl_learner", "mean over responses of log PPL_pi = -mean_t log pi_old(y_t)", "nats"),
    Metric("log_ppl_sampler", "mean over responses of log PPL_mu = -mean_t log mu(y_t)", "nats"),
    Metric("ppl_learner", "mean over responses of PPL_pi = exp(-mean_t log pi_old(y_t))"),
    Metric("ppl_sampler", "mean over responses of PPL_mu = exp(-mean_t log mu(y_t))"),
    Metric("seq_kl", "mean over responses of sum_t KL_t(mu || pi_old), exact per position (per-response mismatch)",
           "nats"),
    Metric("seq_delta_var", "variance over responses of the sequence log-ratio sum_t delta_t", "nats^2"),
    Metric("seq_k3_sum", "mean over responses of sum_t k3_t (per-response mismatch)", "nats"),
    Metric("chi2_seq", "mean over responses of exp(2 sum_t delta_t) - 1 (log-ratio clamped to +-20)"),
    Metric("contrib_pos", "C(r) = -(r_corr - 1) A, mean over tokens of responses with A > 0"),
    Metric("contrib_neg", "C(r) = -(r_corr - 1) A, mean over tokens of responses with A < 0"),
    Metric("clip_drop_pos_frac", "fraction of A > 0 tokens with r_corr > 1 + clip_eps_high (gradient dropped by "
           "the clip at the first update in bypass mode)"),
    Metric("clip_drop_neg_frac", "fraction of A < 0 tokens with r_corr < 1 - clip_eps_low"),
    Metric("is_weight_mean", "mean_t r_corr,t (importance weight pi_old / mu), before any correction"),
    Metric("is_weight_std", "std_t r_corr,t"),
    Metric("is_weight_min", "min_t r_corr,t"),
    Metric("is_weight_max", "max_t r_corr,t"),
    Metric("is_ess", "normalised effective sample size (sum_t r_corr)^2 / (n sum_t r_corr^2), 1 = no mismatch"),
    Metric("nonfinite_frac", "fraction of response tokens whose sampler or learner log-prob is NaN or inf "
           "(a perturbation that breaks the numbers is reported, the run goes on)"),
    Metric("nonfinite_update", "fraction of the step's updates skipped because the loss or gradient was not finite"),
    Metric("noise_scale", "the scale of the sampler's logit noise (or router noise, when that is the only scaled "
           "source) that the run used (calibrated when perturbation.target is set)"),
    Metric("delta_floor_max", "max_t |logp of the KV-cache decode path - learner logp|: the numerical floor "
           "between the sampling path and the learner, reported not injected", "nats"),
    Metric("ratio_first_dev_max", "max_t |r_ppo - 1| at the step's first update (exactly 0 in recompute mode; "
           "the mismatch in bypass mode)"),
    Metric("rejected_token_frac", "fraction of response tokens the corrections removed from the loss"),
    Metric("corr_weight_mean", "mean correction weight over kept tokens (1 without weighting corrections)"),
    Metric("corr_weight_max", "max correction weight over kept tokens"),
    Metric("corr_ess", "normalised effective sample size of the applied weights (sum w)^2 / (n sum w^2)"),
    Metric("update_skipped", "1 when every token of the step was rejected and the update was skipped"),
    Metric("eval_greedy_accuracy", "exact-match accuracy of greedy decoding on held-out prompts (learner weights)"),
    Metric("eval_sampled_accuracy", "exact-match accuracy of temperature sampling on held-out prompts"),
    Metric("eval_sampler_sampled_accuracy", "exact-match accuracy of temperature sampling under the sampler's "
           "perturbation on held-out prompts; equals eval_sampled_accuracy at zero mismatch"),
    Metric("eval_sampler_greedy_accuracy", "exact-match accuracy of greedy decoding under the sampler's "
           "perturbation (its own noise draws) on held-out prompts; equals eval_greedy_accuracy at zero mismatch"),
    Metric("route_flip_frac", "mixture of experts: fraction of (response token, layer) router decisions whose set of "
           "k experts differs between the sampler and the learner's forward, averaged over layers"),
    Metric("route_any_layer_frac", "fraction of response tokens that see a different expert in at least one layer"),
    *[Metric(f"route_flip_l{i}", f"route_flip_frac in layer {i}") for i in range(8)],
    *[Metric(f"probe_{mode}_{name}", formula.format(mode=mode)) for mode in ("recompute", "bypass")
      for name, formula in [
          ("cos", "cosine between the {mode}-mode policy gradient under the configured mismatch and correction and "
                  "the zero-mismatch twin's g0 (same parameters, prompts and random numbers; probe steps only)"),
          ("rel_diff", "|g - g0| / |g0| in {mode} mode"),
          ("proj", "<g, g0> / |g0|^2 in {mode} mode: 1 = the true direction's component is kept"),
          ("diff_proj_pos", "<g_pos - g0_pos, g0> / |g0|^2 in {mode} mode: the projection error contributed by "
                            "responses with A > 0"),
          ("diff_proj_neg", "<g_neg - g0_neg, g0> / |g0|^2 in {mode} mode: the part from responses with A < 0"),
      ]],
]
_CATALOGUE += [
    Metric("oracle_cos_true", "exact-gradient oracle (timsim.exact; run.oracle_every steps only): cosine between the "
           "configured estimator's expected update under mu and the true gradient grad E_pi[R]"),
    Metric("oracle_rel_bias", "oracle: |E[g] - g0| / |g0|, g0 the same loss's expected update at zero mismatch"),
    Metric("oracle_recompute_rel_bias", "oracle: oracle_rel_bias of plain recompute (no correction)"),
    Metric("oracle_bypass_rel_bias", "oracle: oracle_rel_bias of plain bypass (no correction)"),
    Metric("oracle_zero_cos_true", "oracle: cosine of the zero-mismatch expected update to the true gradient "
           "(what the advantage normalisation and the aggregation alone do)"),
]
METRICS: Registry[Metric] = Registry("metric", "metrics")
for _metric in _CATALOGUE:
    METRICS.add(_metric.name, _metric)


@dataclasses.dataclass(frozen=True)
class Alias:
    """A framework's dashboard metric as a timsim metric: `scale` * METRICS[`source`], and
    where the two differ in meaning (clamping, truncation), `note` says so."""
    source: str
    scale: float = 1.0
    note: str = ""


# Dashboard names of real frameworks, so a simulated run reads like a real one. verl: the
# `rollout_corr/*` off-policy metrics of `rollout_corr_helper.compute_offpolicy_metrics` and its
# IS statistics; TRL: the `sampling/*` metrics GRPOTrainer logs with vLLM importance sampling.
# Both compare the trainer's log-probs (pi_old) with the rollout engine's (mu) at the sampled
# tokens, as delta = log pi_old - log mu does here.
FRAMEWORKS: dict[str, dict[str, Alias]] = {
    "verl": {
        "rollout_corr/kl": Alias("mismatch_k1"),
        "rollout_corr/k3_kl": Alias("mismatch_k3", note="timsim clamps delta to +-20 first; verl does not"),
        "rollout_corr/log_ppl_diff": Alias("log_ppl_diff", -1.0, "verl's sign: log PPL_pi - log PPL_mu"),
        "rollout_corr/log_ppl_abs_diff": Alias("log_ppl_abs_diff"),
        "rollout_corr/ppl_ratio": Alias("ppl_ratio_learner", note="verl's ratio is PPL_pi / PPL_mu, timsim's "
                                        "ppl_ratio its per-response reciprocal"),
        "rollout_corr/training_ppl": Alias("ppl_learner"),
        "rollout_corr/training_log_ppl": Alias("log_ppl_learner"),
        "rollout_corr/rollout_ppl": Alias("ppl_sampler"),
        "rollout_corr/rollout_log_ppl": Alias("log_ppl_sampler"),
        "rollout_corr/chi2_token": Alias("chi2_token"),
        "rollout_corr/chi2_seq": Alias("chi2_seq", note="timsim clamps 2 sum_t delta to +-20, verl clamps sum_t delta "
                                       "to +-20 and then doubles: equal while |sum_t delta| < 10"),
    },
    "trl": {
        "sampling/sampling_logp_difference/mean": Alias("delta_abs_mean"),
        "sampling/sampling_logp_difference/max": Alias("delta_abs_max"),
        "sampling/importance_sampling_ratio/min": Alias("is_weight_min", note="TRL logs the ratio after its "
                                                        "truncation at vllm_importance_sampling_cap; timsim's is "
                                                        "before any correction"),
        "sampling/importance_sampling_ratio/mean": Alias("is_weight_mean", note="before truncation (see min)"),
        "sampling/importance_sampling_ratio/max": Alias("is_weight_max", note="before truncation (see min)"),
    },
}


def _aliases(framework: str) -> dict[str, Alias]:
    if framework not in FRAMEWORKS:
        raise ConfigError(f"Unknown framework {framework!r} (`--as` / framework_view); accepted: "
                          f"{', '.join(sorted(FRAMEWORKS))}.")
    return FRAMEWORKS[framework]


def framework_view(metrics, framework: str):
    """A run's metrics (`timsim.load(...).metrics` or `Result.metrics`) under a framework's
    dashboard names: the identifying columns and one column per alias of `FRAMEWORKS[framework]`."""
    ids = [c for c in ("cell_id", "run_idx", "seed", "step") if c in metrics.columns]
    view = metrics[ids].copy()
    for name, alias in _aliases(framework).items():
        view[name] = alias.scale * metrics[alias.source]
    return view


def describe_framework(framework: str) -> str:
    """A Markdown table of a framework's aliases (for `timsim metrics --as FRAMEWORK`)."""
    rows = [f"| {framework} | timsim | note |", "|---|---|---|"]
    rows += [f"| `{name}` | {'-' if a.scale == -1 else ''}`{a.source}` | {a.note} |"
             for name, a in _aliases(framework).items()]
    return "\n".join(rows)


def describe() -> str:
    """A Markdown table of every metric (for `timsim metrics` and the README)."""
    rows = ["| metric | formula | unit |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {m.formula} | {m.unit} |" for m in (e.value for e in METRICS.entries())]
    return "\n".join(rows)
