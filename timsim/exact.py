"""The exact-gradient oracle: what each estimator's update is in expectation, computed exactly.

On a task whose response space can be enumerated (vocabulary 16, responses of up to 4 tokens,
few prompts), every expectation is a finite sum. At parameters theta (= theta_old) the oracle
computes
- the true gradient g* = grad_theta E_x E_{y~pi_theta}[R(x, y)], and
- for every estimator (recompute or bypass, each registered correction, the double count of
  bypass with a weighting correction, score centering) its expected update
  E_x E_{y~mu}[-grad loss(y)] under the configured sampler mu, through the project's own loss
  (`timsim.step.make_objective`, `learner_batch`, the corrections and losses registries).

Group-relative advantages couple the responses of a group, which makes exact expectations
over whole groups intractable. The oracle uses the population limit G -> infinity instead:
the group mean and std become E_mu[R | x] and its std, and a batch aggregation becomes its
limit (the `population` facts of `ADVANTAGES` and `AGGREGATIONS`). For rloo advantages with
0/1 rewards and a constant normaliser (`seq_mean_token_sum_norm`) the finite-G expectation
equals this limit exactly (the leave-one-out baseline is independent of the response); for
other settings the finite-G gap is measured by Monte-Carlo (tests/test_exact.py).

Every estimator's gradient at theta = theta_old is sum_t c_t grad log pi(y_t) (plus a term in the
full distribution for score centering), so the oracle differentiates the loss with respect to
the learner's log-probs once (`c`, exact) and maps all estimators through one forward and one
vector-Jacobian product per estimator, prompt by prompt.

Sampler noise drawn afresh for every sample is averaged over `draws` noise keys, each keying
the noise by context (so each draw is one consistent distribution mu over responses): the
expectation over fresh noise is the average over draws, reported with its standard error.
Persistent and deterministic samplers need one draw. A sampler whose mu is not a distribution
over the enumerated responses (router noise drawn per row) is refused.

Reported per estimator: the cosine to g*, the relative bias against the zero-mismatch
update of the same loss (`rel_bias`: what mismatch does, 0 at zero mismatch) and against g*
after the best scale (`rel_err_true`: what the estimator's normalisation and the mismatch do
together), and the per-sample variance tr Cov of a single response's update.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from timsim import grpo, hyper
from timsim.config import Config, ConfigError
from timsim.corrections import CORRECTIONS
from timsim.keys import step_key
from timsim.rollout import learner_logprobs
from timsim.sampler import (Sampler, learner_transform, noise_key_for, noise_knobs, sampler_model, sampler_routing,
                            weight_noise_key)
from timsim.sources import SOURCES
from timsim.collect import Collected
from timsim.step import LearnerBatch, learner_batch, make_objective
from timsim.tasks import EOS, PAD, VOCAB_SIZE, Task, project_to_split

MAX_RESPONSES = 60_000  # enumerated responses per prompt (15^4 + ... = 54,241 at 4 tokens)
MAX_FREE_DIGITS = 4  # prompt spaces up to 10^4 free-digit vectors are enumerated exactly
MASS_TOLERANCE = 1e-3  # |sum_y mu(y | x) - 1| above this: mu is not a distribution over the responses
VARIANCE_MAX_ROWS = 40_000  # the per-sample variance needs one vector-Jacobian product per response


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One way of turning sampled responses into an update."""

    name: str
    mode: str  # "recompute" | "bypass"
    kinds: tuple[str, ...] = ()
    bypass_weights: str = "replace"  # bypass with a weight: replace r_corr, or multiply onto it (double count)
    score_centering: bool = False


def estimators(cfg: Config) -> list[Estimator]:
    """The configured estimator first, then recompute and bypass plain, each registered
    correction in both modes, the bypass double count of each weighting correction, and score
    centering. Thresholds and caps are the config's own `correction.*` values."""
    c = cfg.correction
    configured = Estimator("configured", cfg.grpo.old_logprobs, tuple(c.kinds), c.bypass_weights, c.score_centering)
    out = [configured, Estimator("recompute", "recompute"), Estimator("bypass", "bypass")]
    for kind in CORRECTIONS:
        out += [Estimator(f"recompute+{kind}", "recompute", (kind,)), Estimator(f"bypass+{kind}", "bypass", (kind,))]
    out += [Estimator(f"bypass*{kind} (double count)", "bypass", (kind,), bypass_weights="multiply")
            for kind in CORRECTIONS.names(weighting=True)]
    out.append(Estimator("recompute+score_centering", "recompute", score_centering=True))
    return out


def enumerate_responses(response_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every response the sampler can produce, once: [M, T] tokens and mask. A response is any
    sequence of non-<eos> tokens, ended by <eos> at position k (then <pad>, masked) or running to
    the full length; the sampler pads after <eos> exactly so."""
    count = sum((VOCAB_SIZE - 1) ** k for k in range(response_len + 1))
    if count > MAX_RESPONSES:
        raise ConfigError(f"The exact-gradient oracle enumerates every response: {count} of length up to "
                          f"{response_len} exceed its limit of {MAX_RESPONSES}. Use a task with an answer of at most "
                          "3 tokens (task.n_digits: 1 or 2 for reverse, sort, cumsum; sampler.max_response_len <= 4).")
    others = [v for v in range(VOCAB_SIZE) if v != EOS]
    rows, masks = [], []
    for k in range(response_len + 1):
        for prefix in itertools.product(others, repeat=k):
            if k < response_len:
                rows.append((*prefix, EOS) + (PAD,) * (response_len - k - 1))
                masks.append((1,) * (k + 1) + (0,) * (response_len - k - 1))
            else:
                rows.append(prefix)
                masks.append((1,) * k)
    return np.asarray(rows, np.int32), np.asarray(masks, np.float32)


def prompt_distribution(task: Task, max_prompts: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The exact distribution of `task.sample(split="train")`: its distinct prompts [B, P] and
    their probabilities [B]. Beyond `max_prompts` the most likely ones are kept and renormalised;
    the third value is the probability mass they cover (1 when exact)."""
    if task.n_free > MAX_FREE_DIGITS:
        raise ConfigError(f"The exact-gradient oracle enumerates the task's prompt space: task {task.name!r} with "
                          f"task.n_digits={task.n_digits} has 10^{task.n_free} prompts; use at most "
                          f"{MAX_FREE_DIGITS} free digits.")
    digits = np.stack(np.meshgrid(*[np.arange(10)] * task.n_free, indexing="ij"), -1).reshape(-1, task.n_free)
    prompts = np.asarray(task.encode(project_to_split(jnp.asarray(digits, jnp.int32), "train")))
    unique, counts = np.unique(prompts, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:max_prompts]
    kept, prob = unique[order], counts[order] / counts.sum()
    return kept, prob / prob.sum(), float(prob.sum())


def _keys(spec, fresh_noise: bool, seed, step, draw):
    """(noise, weight, router) keys of one oracle draw: the run's own persistent noise key, else
    an oracle-only draw keyed by (seed, step, draw)."""
    fresh = jax.random.fold_in(step_key(seed, "oracle", step), draw)
    noise = jax.random.fold_in(fresh, 0) if fresh_noise else noise_key_for(spec, seed, step)
    weight = weight_noise_key(spec, seed, step) if spec.weight_hold_steps > 1 else jax.random.fold_in(fresh, 1)
    return noise, weight, jax.random.fold_in(fresh, 2)


def needs_draws(cfg: Config) -> bool:
    """Whether mu is random given the run's state (fresh logit noise, weight or router noise)."""
    p = cfg.perturbation
    fresh_logits = p.logit_noise.family != "none" and p.logit_noise.mode == "fresh" and \
        p.logit_noise.family not in ("top_k", "top_p", "temperature")
    return fresh_logits or any(SOURCES.entry(name).drawn for name in p.active_sources)


@dataclasses.dataclass(frozen=True)
class Oracle:
    """A built oracle: call it like the jitted function it wraps; `names` labels its rows."""

    run: Callable
    names: list[str]  # the estimators, then "zero mismatch" and "true gradient"
    prompt_mass: float  # probability of the enumerated prompts (1: every training prompt)
    sizes: tuple[int, int]  # (prompts, responses per prompt)

    def __call__(self, *args):
        return self.run(*args)


def population_weight_mean(weight_NT, kept_NT, prob_N, over: str = "tokens"):
    """The population limit of `correction.batch_normalize`'s mean: over kept tokens, or over
    responses with at least one kept token (each the mean weight of its kept tokens), every
    response counted with its probability `prob_N`."""
    if over == "tokens":
        kept = prob_N[:, None] * kept_NT
        return (kept * weight_NT).sum() / jnp.maximum(kept.sum(), 1e-30)
    n_kept_N = kept_NT.sum(-1)
    response_mean_N = (weight_NT * kept_NT).sum(-1) / jnp.maximum(n_kept_N, 1.0)
    counted_N = prob_N * (n_kept_N > 0)
    return (counted_N * response_mean_N).sum() / jnp.maximum(counted_N.sum(), 1e-30)


def make_oracle(cfg: Config, graphdef, max_prompts: int = 128, only: tuple[str, ...] | None = None,
                variance: bool = True) -> Oracle:
    """`oracle(params, sampler_params, hp, step, draw, second_moments=True) -> dict` for one noise
    draw (jitted): the expected update of every `estimators(cfg)` entry (or those named in
    `only`), then the zero-mismatch update, then the true gradient, flattened [E + 2, D]; each
    one's per-sample second moment E||g(y)||^2 [E + 2] (NaN when `second_moments` is false, which
    skips the per-response pass, without `variance`, or beyond VARIANCE_MAX_ROWS responses); and
    the largest |sum_y pi(y|x) - 1| and |sum_y mu(y|x) - 1| over the prompts."""
    task = cfg.task.build()
    responses_MT, mask_MT = enumerate_responses(cfg.response_len)
    prompts_BP, prompt_prob_B, prompt_mass = prompt_distribution(task, max_prompts)
    n_prompts, n_responses = len(prompts_BP), len(responses_MT)
    with_variance = variance and n_prompts * n_responses <= VARIANCE_MAX_ROWS
    sampler = Sampler.from_config(cfg, graphdef)
    fresh_noise = sampler.spec.noise_fn is not None and not sampler.spec.persistent
    if fresh_noise:  # one draw of fresh noise is one consistent mu when keyed by context
        sampler = dataclasses.replace(sampler, spec=dataclasses.replace(sampler.spec, noise_mode="context"))
    spec = sampler.spec
    ests = [e for e in estimators(cfg) if only is None or e.name in only]
    advantage = grpo.ADVANTAGES.entry(cfg.grpo.advantage).population
    aggregation = grpo.AGGREGATIONS.entry(cfg.grpo.loss_agg).population
    responses, mask, prompts = jnp.asarray(responses_MT), jnp.asarray(mask_MT), jnp.asarray(prompts_BP)
    prompt_prob = jnp.asarray(prompt_prob_B, jnp.float32)

    def both_sides(params, sampler_params, hp, keys, prompt_P):
        """Both sides' teacher-forced log-probs of every response to one prompt, and the rewards."""
        prompts_MP = jnp.broadcast_to(prompt_P, (n_responses, prompt_P.shape[0]))
        model = nnx.merge(graphdef, params)
        sampler_side = sampler_model(spec, graphdef, sampler_params, model, keys[1], hp)
        r = sampler.report(model, sampler_side, prompts_MP, responses, sampler_routing(spec, keys[2], hp), keys[0], hp)
        reward = grpo.shaped_reward(task.reward(prompts_MP, responses, cfg.task.partial_credit), hp.grpo)
        return r.logp_learner_NT * mask, r.logp_sampler_NT * mask, r.logp_all_learner_NTV, r.logp_all_sampler_NTV, reward

    def learner_forward(params, hp, prompts_NP, responses_NT, mask_NT):
        """The learner's differentiable log-probs (with its transform, if any)."""
        logp, logp_all, _ = learner_logprobs(nnx.merge(graphdef, params), prompts_NP, responses_NT, mask_NT,
                                             hp.sampler.temperature, spec.learner_nm,
                                             learner_transform(spec, noise_knobs(hp)))
        return logp, logp_all

    def cotangent(est: Estimator, sides, weight_BM, adv_BM, hp):
        """d(-population loss)/d(logp [B, M, T], logp_all [B, M, T, V]) of one estimator: the
        update is sum over responses of these times the learner's log-prob gradients."""
        logp_l, logp_s, all_l, all_s, reward = sides
        rows = n_prompts * n_responses
        flat = lambda a: a.reshape(rows, *a.shape[2:])  # noqa: E731
        tile = lambda a: jnp.broadcast_to(a, (n_prompts, *a.shape)).reshape(rows, *a.shape[1:])  # noqa: E731
        collected = Collected(jnp.repeat(prompts, n_responses, 0), tile(responses), tile(mask), flat(logp_l),
                              flat(logp_s), flat(all_l), flat(all_s), flat(logp_s), flat(reward), flat(adv_BM),
                              None, None)
        corr = cfg.correction.model_copy(update={"kinds": list(est.kinds), "score_centering": est.score_centering,
                                                 "batch_normalize": False, "routing_replay": "none",
                                                 # at theta = theta_old verl's per-minibatch weights
                                                 # (current) are pi_old's on the ratio pi_theta / mu
                                                 "bypass_weights": ("multiply" if est.bypass_weights == "current"
                                                                    else est.bypass_weights)})
        batch = learner_batch(collected, hp, est.mode, corr)
        weight_N = flat(weight_BM)
        if cfg.correction.batch_normalize and est.kinds:  # the population mean of the kept weights
            batch = batch._replace(weight_NT=batch.weight_NT / jnp.maximum(
                population_weight_mean(batch.weight_NT, batch.verdict.kept_NT, weight_N,
                                       cfg.correction.batch_normalize_over), 1e-30))
        coeff, normaliser = aggregation(batch.keep_NT, weight_N)
        objective = make_objective(cfg, est.mode == "recompute",
                                   lambda per_token, _mask: (coeff * per_token).sum() / normaliser.sum())
        grads = jax.grad(lambda lp, la: objective(lp, la, batch, hp, True)[0], argnums=(0, 1))(flat(logp_l),
                                                                                              flat(all_l))
        return tuple(-c.reshape(n_prompts, n_responses, *c.shape[1:]) for c in grads)

    def oracle(params, sampler_params, hp, step, draw, second_moments=True):
        hp = hyper.replace(hyper.replace(hp, "grpo.entropy_coef", jnp.zeros(())), "grpo.kl_coef", jnp.zeros(()))
        keys = _keys(spec, fresh_noise, hp.seed.astype(jnp.int32), step, draw)
        sides = jax.lax.map(lambda x: both_sides(params, sampler_params, hp, keys, x), prompts)
        logp_l, logp_s, all_l, all_s, reward = sides
        pi_BM, mu_BM = jnp.exp(logp_l.sum(-1)), jnp.exp(logp_s.sum(-1))
        drawn_BM = pi_BM if spec.report_only else mu_BM  # what the tokens are drawn from
        weight, weight0 = prompt_prob[:, None] * drawn_BM, prompt_prob[:, None] * pi_BM
        adv, adv0 = jax.vmap(advantage)(reward, drawn_BM), jax.vmap(advantage)(reward, pi_BM)
        twin_sides = (logp_l, logp_l, all_l, all_l, reward)
        cots = [cotangent(e, sides, weight, adv, hp) for e in ests]
        cots.append(cotangent(Estimator("zero mismatch", "recompute"), twin_sides, weight0, adv0, hp))
        cots.append(((weight0 * reward)[..., None] * mask, jnp.zeros_like(all_l)))  # d/dlogp of E_pi[R]
        c_logp = jnp.stack([c[0] for c in cots], 1)  # [B, E + 2, M, T]
        c_all = jnp.stack([c[1] for c in cots], 1)
        w = jnp.stack([weight] * len(ests) + [weight0, weight0], 1)  # [B, E + 2, M] the sampling weights
        flat_params, unflatten = jax.flatten_util.ravel_pytree(params)

        def per_prompt(args):
            prompt_P, c_lp, c_la, w_EM = args
            prompts_MP = jnp.broadcast_to(prompt_P, (n_responses, prompt_P.shape[0]))
            _, vjp = jax.vjp(lambda f: learner_forward(unflatten(f), hp, prompts_MP, responses, mask), flat_params)
            total = jax.vmap(lambda a, b: vjp((a, b))[0])(c_lp, c_la)  # [E + 2, D]
            if not with_variance:
                return total, jnp.full(len(c_lp), jnp.nan)

            def per_response(row):  # one response's update, squared, over its probability
                response_T, mask_T, c_lp_ET, c_la_ETV, w_E = row
                _, row_vjp = jax.vjp(lambda f: learner_forward(unflatten(f), hp, prompt_P[None], response_T[None],
                                                               mask_T[None]), flat_params)
                g = jax.vmap(lambda a, b: row_vjp((a[None], b[None]))[0])(c_lp_ET, c_la_ETV)
                return (g**2).sum(-1) / jnp.maximum(w_E, 1e-30)

            rows = (responses, mask, c_lp.swapaxes(0, 1), c_la.swapaxes(0, 1), w_EM.swapaxes(0, 1))
            second = jax.lax.cond(second_moments, lambda: jax.lax.map(per_response, rows, batch_size=32).sum(0),
                                  lambda: jnp.full(len(c_lp), jnp.nan))
            return total, second

        totals, seconds = jax.lax.map(per_prompt, (prompts, c_logp, c_all, w))
        return {"updates": totals.sum(0), "second_moment": seconds.sum(0),
                "pi_mass_err": jnp.abs(pi_BM.sum(-1) - 1.0).max(), "mu_mass_err": jnp.abs(drawn_BM.sum(-1) - 1.0).max()}

    return Oracle(jax.jit(oracle), [e.name for e in ests] + ["zero mismatch", "true gradient"], prompt_mass,
                  (n_prompts, n_responses))


def summarize(names: list[str], updates_KED: np.ndarray, second_KE: np.ndarray) -> pd.DataFrame:
    """Per estimator, over K noise draws: the expected update's cosine to the true gradient, its
    relative bias against the zero-mismatch update (and the standard error over draws), the
    bias's projection on the zero-mismatch update, and the per-sample variance (from the first
    draw's second moments)."""
    g = updates_KED.mean(0)
    g_true, g_zero = g[-1], g[-2]
    norm = lambda a: np.sqrt((a**2).sum(-1))  # noqa: E731
    per_draw = norm(updates_KED - updates_KED[:, -2:-1]) / np.maximum(norm(updates_KED[:, -2:-1]), 1e-30)
    k = len(updates_KED)
    table = pd.DataFrame({
        "estimator": names,
        "cos_true": g @ g_true / np.maximum(norm(g) * norm(g_true), 1e-30),
        "rel_bias": norm(g - g_zero) / max(norm(g_zero), 1e-30),
        "rel_bias_se": per_draw.std(0, ddof=1) / math.sqrt(k) if k > 1 else np.zeros(len(names)),
        "bias_proj": (g - g_zero) @ g_zero / max(g_zero @ g_zero, 1e-30),
        "norm_ratio": norm(g) / max(norm(g_zero), 1e-30),
        "variance": second_KE[0] - (g**2).sum(-1),
    })
    table.loc[table.estimator == "true gradient", ["rel_bias", "rel_bias_se", "bias_proj", "norm_ratio"]] = np.nan
    return table


def evaluate(oracle: Callable, cfg: Config, params, sampler_params, hp, step: int, draws: int) -> tuple[pd.DataFrame, dict]:
    """Run a built oracle for one run (`hp` unstacked) over `draws` noise draws when mu is random
    (one otherwise): the `summarize` table and facts (draws, prompts, responses, prompt mass,
    mass errors). A sampler whose mu is not a distribution over the responses is refused."""
    k = draws if needs_draws(cfg) else 1
    # the per-sample second moment E_noise E_y ||g||^2 from the first draw alone: unbiased, and the
    # per-response pass costs several times the rest
    outs = [jax.device_get(oracle(params, sampler_params, hp, step, d, d == 0)) for d in range(k)]
    mass_err = max(float(o["mu_mass_err"]) for o in outs)
    if mass_err > MASS_TOLERANCE:
        raise ConfigError(f"The exact-gradient oracle needs a sampler whose distribution over responses is a "
                          f"function of the context; this one's probabilities sum to 1 +- {mass_err:.2g} over the "
                          "enumerated responses (router noise is drawn per row, not per context).")
    table = summarize(oracle.names, np.stack([o["updates"] for o in outs]).astype(np.float64),
                      np.stack([o["second_moment"] for o in outs]).astype(np.float64))
    facts = {"draws": k, "prompts": oracle.sizes[0], "responses": oracle.sizes[1], "prompt_mass": oracle.prompt_mass,
             "pi_mass_err": max(float(o["pi_mass_err"]) for o in outs), "mu_mass_err": mass_err}
    return table, facts


PROBE = {"oracle_cos_true": ("configured", "cos_true"), "oracle_rel_bias": ("configured", "rel_bias"),
         "oracle_recompute_rel_bias": ("recompute", "rel_bias"),
         "oracle_bypass_rel_bias": ("bypass", "rel_bias"), "oracle_zero_cos_true": ("zero mismatch", "cos_true")}


def make_oracle_probe(cfg: Config, graphdef) -> Callable:
    """`probe(params_R, lagged_R, step_R, hp_R, n_runs, base_params) -> {oracle_*: [R]}` at a chunk boundary: the
    oracle of the configured estimator, recompute and bypass for each run (NaN on padding runs),
    averaged over `run.oracle_draws` noise draws when the sampler is random. Without the
    per-sample variance, whose per-response pass costs several times the rest (`timsim.oracle`
    has it)."""
    oracle = make_oracle(cfg, graphdef, cfg.run.oracle_prompts, ("configured", "recompute", "bypass"), variance=False)
    lag = cfg.perturbation.lag_steps

    def probe(params_R, lagged_R, step_R, hp_R, n_runs: int, base_params) -> dict:
        width = len(np.asarray(step_R))
        out = {name: np.full(width, np.nan) for name in PROBE}
        for i in range(n_runs):
            pick = lambda tree: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
            step = int(np.asarray(step_R)[i])
            params = pick(params_R)
            sampler_params = (base_params if cfg.perturbation.frozen_sampler
                              else jax.tree.map(lambda b: b[step % lag], pick(lagged_R)) if lag else params)
            table = evaluate(oracle, cfg, params, sampler_params, pick(hp_R), step, cfg.run.oracle_draws)[0]
            rows = table.set_index("estimator")
            for name, (estimator, column) in PROBE.items():
                out[name][i] = rows.loc[estimator, column]
        return out

    return probe
