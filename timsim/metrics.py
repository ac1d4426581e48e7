"""The one registry of metric names, formulas and units.

Tables, plots and docs read it; a step function may only emit names registered here (a
test checks). Names follow DESIGN.md §1/§5. Per-token quantities are averaged over response
tokens (mask = 1); "per step" metrics are computed on the step's training batch before the
update; "eval_*" metrics are computed on held-out prompts at chunk boundaries and are NaN on
other steps.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    formula: str
    unit: str = ""


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("reward_mean", "mean reward of the step's sampled responses"),
    Metric("accuracy", "fraction of the step's sampled responses that are exactly correct"),
    Metric("response_len", "mean number of generated tokens per response (<eos> included)", "tokens"),
    Metric("loss", "policy loss averaged over the step's updates"),
    Metric("grad_norm", "global gradient norm before clipping, averaged over the step's updates"),
    Metric("update_norm", "global norm of the parameter change over the whole step"),
    Metric("clip_frac", "fraction of response tokens whose PPO clip is active, averaged over updates"),
    Metric("entropy", "learner entropy -sum_v pi_v log pi_v per response token", "nats"),
    Metric("kl_ref", "per-token estimator (grpo.kl_ref) of KL(pi_theta || pi_ref) to the base model", "nats"),
    Metric("delta_abs_mean", "mean_t |delta_t|, delta = logp_old - logp_sampler", "nats"),
    Metric("delta_abs_max", "max_t |delta_t|", "nats"),
    Metric("mismatch_k3", "mean_t exp(delta_t) - 1 - delta_t (k3 estimator of KL(mu || pi_old))", "nats"),
    Metric("delta_floor_max", "max_t |logp of the KV-cache decode path - learner logp|: the numerical floor "
           "between the sampling path and the learner, reported not injected", "nats"),
    Metric("ratio_first_dev_max", "max_t |r_ppo - 1| at the step's first update (exactly 0 in recompute mode; "
           "the mismatch in bypass mode)"),
    Metric("eval_greedy_accuracy", "exact-match accuracy of greedy decoding on held-out prompts (learner weights)"),
    Metric("eval_sampled_accuracy", "exact-match accuracy of temperature sampling on held-out prompts"),
]}


def describe() -> str:
    """A Markdown table of every metric (for `timsim metrics` and the README)."""
    rows = ["| metric | formula | unit |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {m.formula} | {m.unit} |" for m in METRICS.values()]
    return "\n".join(rows)
