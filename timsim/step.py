"""The pure, jitted GRPO run: one step, a chunk of steps (`lax.scan`), a batch of runs.

Static config (shapes, modes) is closed over when a program is built; traced config (`hp`, a
`timsim.hyper.Hyper` pytree: ``hp.grpo.lr``, ``hp.perturbation.logit_noise.scale``, ``hp.seed``)
is an argument with a leading run axis, so runs that differ only in traced values share one
compiled program.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from timsim import grpo, hyper
from timsim.config import Config
from timsim.corrections import (Verdict, centered_score_logp, correction_metrics, correction_verdict,
                                refreshed_correction)
from timsim.collect import Collected, make_finish, make_generate, make_learner_forward
from timsim.keys import step_key
from timsim.diagnostics import advantage_skew_metrics, mismatch_metrics, routing_metrics
from timsim.model import Routing, response_forward, token_logprobs
from timsim.rollout import learner_logprobs
from timsim.sampler import Sampler, SamplerKeys, SamplerSpec, learner_transform, noise_key_for, noise_knobs
from timsim.tasks import Task, eval_prompts


class RunState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: updates done so far
    lagged: nnx.State | None = None  # ring buffer [lag, ...] of past params when the sampler lags


def init_state(params: nnx.State, hp: hyper.Hyper, lag_steps: int = 0) -> RunState:
    lagged = None if not lag_steps else jax.tree.map(lambda x: jnp.broadcast_to(x, (lag_steps, *x.shape)), params)
    return RunState(params, grpo.make_optimizer(hp.grpo).init(params), jnp.zeros((), jnp.int32), lagged)


@functools.partial(jax.jit, static_argnums=2)
def init_states(params: nnx.State, hp: hyper.Hyper, lag_steps: int = 0) -> RunState:
    """`init_state` of every run on the leading run axis of `hp`, as one program: run op by op
    outside jit, each of its ops compiles a program of its own (~50, ~2 s at every start)."""
    return jax.vmap(lambda h: init_state(params, h, lag_steps))(hp)


class LearnerBatch(NamedTuple):
    """What the loss sees: the minibatch-sliceable arrays and the corrections' verdict."""

    prompts_N: jax.Array
    responses_NT: jax.Array
    mask_NT: jax.Array  # response tokens
    logp_old_NT: jax.Array  # the PPO ratio's denominator: pi_old (recompute) or mu (bypass)
    adv_N: jax.Array
    weight_NT: jax.Array  # correction weights, never differentiated (1 without corrections)
    keep_NT: jax.Array  # the loss's mask and denominator: the kept tokens, or every response token (rejected=zero)
    mu_NTV: jax.Array | None  # the sampler's full distribution, for score centering (else None)
    replay: tuple | None = None  # experts the loss's forward replays (R2: pi_old's, R3: the sampler's)
    verdict: Verdict | None = None  # the corrections' verdict at pi_old, for metrics and the skip


def learner_batch(c: Collected, hp: hyper.Hyper, old_logprobs: str, corr) -> LearnerBatch:
    """Apply the mode (recompute: pi_old = the learner's; bypass: mu) and the corrections.
    `correction.rejected=zero` keeps rejected tokens in the loss's denominator with weight 0."""
    logp_old = c.logp_learner_NT if old_logprobs == "recompute" else c.logp_sampler_NT
    if old_logprobs == "bypass" and corr.weighting and corr.bypass_weights == "replace":
        logp_old = c.logp_learner_NT  # the weight replaces r_corr instead of multiplying it (decoupled)
    verdict = correction_verdict(c.mask_NT, c.logp_learner_NT, c.logp_sampler_NT, c.adv_N, hp, corr)
    # verl's bypass recomputes the verdict in the loss at every minibatch (`make_objective`)
    weight, keep = ((jnp.ones_like(c.mask_NT), c.mask_NT) if refreshed_correction(old_logprobs, corr)
                    else (verdict.weight_NT, verdict.keep_NT))
    mu = jax.lax.stop_gradient(jnp.exp(c.logp_all_sampler_NTV)) if corr.score_centering else None
    # R2 and R3 both replay the routes of the old policy's forward: under R3 that forward
    # already replayed the sampler's experts (`teacher_forced_pair`)
    replay = c.routes_learner if corr.routing_replay != "none" else None
    return LearnerBatch(c.prompts_N, c.responses_NT, c.mask_NT, logp_old, c.adv_N, weight, keep, mu, replay, verdict)


def make_objective(cfg: Config, recompute_first: bool, aggregate: Callable | None = None,
                   refresh=None) -> Callable:
    """`objective(logp_NT, logp_all_NTV, batch, hp, first_update) -> (loss, clipped_NT, ratio_NT,
    entropy_NT, logp_NT)`: the policy loss with its corrections and entropy bonus as a function of the
    learner's log-probs, before any term that needs another forward (load balance, reference KL).
    `aggregate(per_token_NT, mask_NT)` reduces a per-token term (default `grpo.loss_agg`; the
    exact-gradient oracle passes its population limit, `timsim.exact`).

    `recompute_first`: at the first update theta == theta_old, so pi_old is the loss's own
    forward. The forward-only recomputation differs from the forward inside value_and_grad by
    float rounding (~1e-7: XLA fuses them differently), so that one is used: r_ppo == 1.
    `refresh`: a correction to recompute from the current policy (detached) against the
    sampler's log-probs at every minibatch, multiplied onto the batch's weights and mask
    (`refreshed_correction`)."""
    g = cfg.grpo
    aggregate = aggregate or (lambda per_token, mask: grpo.aggregate(per_token, mask, g.loss_agg))

    def objective(logp, logp_all, batch: LearnerBatch, hp, first_update):
        logp_old = batch.logp_old_NT
        if recompute_first:
            logp_old = jnp.where(first_update, jax.lax.stop_gradient(logp), logp_old)
        if refresh is not None:  # verl's bypass: the verdict of pi_theta / mu at this minibatch
            now = correction_verdict(batch.mask_NT, jax.lax.stop_gradient(logp), batch.logp_old_NT, batch.adv_N, hp,
                                     refresh)
            batch = batch._replace(weight_NT=batch.weight_NT * now.weight_NT, keep_NT=batch.keep_NT * now.keep_NT)
        if batch.mu_NTV is not None:
            logp = centered_score_logp(logp, logp_all, batch.mu_NTV) * batch.mask_NT
        mask = batch.keep_NT
        per_token, clipped, ratio = grpo.policy_loss(g.loss, logp, logp_old, batch.adv_N, mask, hp.grpo)
        per_token = per_token * batch.weight_NT
        entropy_NT = -(jnp.exp(logp_all) * logp_all).sum(-1)
        loss = aggregate(per_token, mask)
        loss = loss - hp.grpo.entropy_coef * aggregate(entropy_NT, mask)
        return loss, clipped, ratio, entropy_NT, logp  # logp: score-centred when centring is on

    return objective


def make_loss_of_forward(cfg: Config, graphdef, spec: SamplerSpec, recompute_first: bool, group: int = 1,
                         refresh=None) -> Callable:
    """`loss(logits_NTV, balance, ref_params, batch, hp, first_update) -> (loss, aux)` from the
    learner's forward already run: `make_objective`, the load-balancing loss and the reference KL.
    `group`: the batch's rows share their prompt in groups of this many (1: no assumption)."""
    g = cfg.grpo
    objective = make_objective(cfg, recompute_first, refresh=refresh)

    def loss_of_forward(logits_NTV, balance, ref_params, batch: LearnerBatch, hp, first_update):
        temperature = hp.sampler.temperature
        transform = learner_transform(spec, noise_knobs(hp))
        logp, logp_all = token_logprobs(transform(logits_NTV), batch.responses_NT, temperature)
        logp = logp * batch.mask_NT
        loss, clipped, ratio, entropy_NT, logp = objective(logp, logp_all, batch, hp, first_update)
        mask = batch.keep_NT
        if cfg.model.experts:
            loss = loss + cfg.model.balance_coef * balance
        kl_ref = jnp.zeros(())
        if g.kl_ref != "none":
            ref = nnx.merge(graphdef, ref_params)
            routing = None if batch.replay is None else Routing(replay=batch.replay)
            logp_ref = jax.lax.stop_gradient(learner_logprobs(ref, batch.prompts_N, batch.responses_NT, mask,
                                                              temperature, spec.learner_nm, transform, routing,
                                                              group)[0])
            kl_NT = grpo.kl_to_reference(logp, logp_ref, g.kl_ref)
            kl_ref = grpo.masked_mean(kl_NT, mask)
            loss = loss + hp.grpo.kl_coef * grpo.aggregate(kl_NT, mask, g.loss_agg)
        aux = {"clip_frac": grpo.masked_mean(clipped, mask), "entropy": grpo.masked_mean(entropy_NT, mask),
               "kl_ref": kl_ref, "ratio_dev_max": jnp.abs((ratio - 1.0) * mask).max()}
        return loss, aux

    return loss_of_forward


def make_loss(cfg: Config, graphdef, spec: SamplerSpec, recompute_first: bool, group: int = 1,
              refresh=None) -> Callable:
    """`loss(params, ref_params, batch: LearnerBatch, hp, first_update) -> (loss, aux)`: the
    learner's forward (replaying `batch.replay`'s experts) and `make_loss_of_forward`. `group`:
    the batch's rows share their prompt in groups of this many (1: no assumption)."""
    loss_of_forward = make_loss_of_forward(cfg, graphdef, spec, recompute_first, group, refresh)

    def loss_fn(params, ref_params, batch: LearnerBatch, hp, first_update):
        model = nnx.merge(graphdef, params)
        routing = None if batch.replay is None else Routing(replay=batch.replay)
        logits, _, balance = response_forward(model, batch.prompts_N, batch.responses_NT, spec.learner_nm, routing,
                                              group)
        return loss_of_forward(logits, balance, ref_params, batch, hp, first_update)

    return loss_fn


def make_step(cfg: Config, task: Task, graphdef, share_forward: bool = True) -> Callable:
    """Build `step(state, hp, ref_params) -> (state, metrics)` for one run.

    `cfg` must be a static view: traced fields are read from `hp` only. `share_forward=False`
    runs the learner's forward for pi_old apart from the loss's even where they could be one
    (the reference the tests hold the shared one to)."""
    g = cfg.grpo
    n_mb = g.minibatches
    n = g.prompts_per_step * g.group_size
    sampler = Sampler.from_config(cfg, graphdef)
    spec = sampler.spec
    corr = cfg.correction
    lag, frozen = cfg.perturbation.lag_steps, cfg.perturbation.frozen_sampler
    recompute_first = g.old_logprobs == "recompute" and not cfg.perturbation.stale
    # a minibatch of whole groups runs each prompt once (minibatches are contiguous rows)
    group = g.group_size if (n // n_mb) % g.group_size == 0 else 1
    refresh = refreshed_correction(g.old_logprobs, corr)
    grad_fn = jax.value_and_grad(make_loss(cfg, graphdef, spec, recompute_first, group, refresh), has_aux=True)
    # One forward for pi_old and the first update: with one minibatch and no lag the first
    # update runs at theta == theta_old on the whole batch, so the learner's forward that
    # reports pi_old is the loss's own; it runs once, and its vjp carries the gradient.
    # A sampler with a forward of its own (weights, numerics, router) keeps a separate learner
    # forward for pi_old, fused as its own is: at zero strength the two then agree bit for bit.
    shared_forward = share_forward and n_mb == 1 and not cfg.perturbation.stale and not spec.separate_forward
    generate, learner_forward, finish = (make_generate(cfg, task, sampler), make_learner_forward(sampler, g.group_size),
                                         make_finish(cfg, task, sampler))
    loss_of_forward_grad = jax.value_and_grad(make_loss_of_forward(cfg, graphdef, spec, recompute_first, group, refresh),
                                              argnums=(0, 1), has_aux=True)

    def step(state: RunState, hp: hyper.Hyper, ref_params) -> tuple[RunState, dict]:
        # With async lag the sampler runs (and recompute uses) the weights of `lag` updates ago, a
        # frozen sampler the base model's (`ref_params`): delta then measures numerics only and
        # the PPO ratio measures staleness (DESIGN §8.2).
        old_params = (ref_params if frozen else state.params if not lag
                      else jax.tree.map(lambda b: b[state.step % lag], state.lagged))
        tx = grpo.make_optimizer(hp.grpo)

        def apply(params, opt_state, loss, grads, aux):
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            # a non-finite loss or gradient leaves this run's weights untouched (and is counted);
            # the other runs on the run axis are independent and go on
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (optax.apply_updates(params, updates), new_opt_state), (params, opt_state))
            return (params, opt_state), {"loss": loss, "grad_norm": grad_norm, "nonfinite_update": 1.0 - finite, **aux}

        # COLLECT and REPORT: the sampler generates a batch and reports log mu of it; the learner's
        # teacher-forced forward gives pi_old (`Sampler.generate`, `Sampler.report_from_logits`).
        gen = generate(old_params, hp, state.step)
        forward = functools.partial(learner_forward, gen=gen)
        if shared_forward:
            (logits, balance), forward_vjp, routes = jax.vjp(forward, state.params, has_aux=True)
        else:
            (logits, _), routes = forward(old_params)
        c = finish(gen, logits, routes, hp)

        # CORRECT: the ratio's denominator (recompute: pi_old, bypass: mu) and the corrections'
        # weights and masks, computed once from stopped quantities.
        batch = learner_batch(c, hp, g.old_logprobs, corr)
        any_kept = batch.verdict.keep_NT.sum() > 0  # a batch with every token rejected skips its update (counted)
        batch_mb = jax.tree.map(lambda x: x.reshape(n_mb, n // n_mb, *x.shape[1:]), batch)

        # UPDATE: epochs x minibatches optimizer steps on the policy loss.
        def update(carry, i):
            params, opt_state = carry
            mb = jax.tree.map(lambda x: x[i % n_mb], batch_mb)
            (loss, aux), grads = grad_fn(params, ref_params, mb, hp, i == 0)
            return apply(params, opt_state, loss, grads, aux)

        carry, first = (state.params, state.opt_state), 0
        per_update = []
        if shared_forward:
            (loss, aux), (grad_logits, grad_balance) = loss_of_forward_grad(logits, balance, ref_params, batch, hp, True)
            carry, metrics = apply(*carry, loss, forward_vjp((grad_logits, grad_balance))[0], aux)
            per_update, first = [jax.tree.map(lambda x: x[None], metrics)], 1
        if first < g.epochs * n_mb:
            carry, later = jax.lax.scan(update, carry, jnp.arange(first, g.epochs * n_mb))
            per_update.append(later)
        (params, opt_state) = carry
        per_update = jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_update)
        if corr.kinds:
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(any_kept, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
        first_update_ratio_dev = per_update.pop("ratio_dev_max")[0]
        per_update = jax.tree.map(jnp.mean, per_update)

        # DIAGNOSE: every metric of the step, on the batch before the update (`timsim.metrics`).
        mask = c.mask_NT
        metrics = {
            "reward_mean": c.reward_N.mean(),
            "accuracy": task.verify(c.prompts_N, c.responses_NT).mean(),
            "response_len": mask.sum(-1).mean(),
            "update_norm": optax.tree.norm(jax.tree.map(jnp.subtract, params, state.params)),
            **mismatch_metrics(c.logp_all_learner_NTV, c.logp_all_sampler_NTV, c.responses_NT, mask),
            **advantage_skew_metrics((c.logp_learner_NT - c.logp_sampler_NT) * mask, c.adv_N, mask,
                                     hp.grpo.clip_eps_low, hp.grpo.clip_eps_high),
            "noise_scale": (hyper.get(hp, cfg.perturbation.scale_key) if spec.noise_fn is not None or spec.router_noise_fn is not None
                            else jnp.zeros(())),
            "nonfinite_frac": grpo.masked_mean(~jnp.isfinite(c.logp_sampler_NT) | ~jnp.isfinite(c.logp_learner_NT),
                                               mask),
            "delta_floor_max": jnp.abs(c.logp_decode_NT - c.logp_sampler_NT).max(),
            "ratio_first_dev_max": first_update_ratio_dev,
            **correction_metrics(batch.verdict.weight_NT, batch.verdict.kept_NT, mask, any_kept),
            **routing_metrics(c.routes_sampler, c.routes_learner, mask),
            **per_update,
        }
        lagged = None if not lag else jax.tree.map(lambda b, p: b.at[state.step % lag].set(p), state.lagged,
                                                   state.params)
        return RunState(params, opt_state, state.step + 1, lagged), metrics

    return step


def batch_over_runs(fn: Callable, batching: str) -> Callable:
    """Map `fn(state, hp, shared)` over the leading run axis of `state` and `hp`.

    vmap turns the runs into batched matmuls (fast on accelerators); lax.map runs them one
    after another inside one program (cheaper on a 2-core CPU, DESIGN §7). With several
    devices the run axis is split across them with `shard_map` (lax.map over a sharded axis
    would not run in parallel, DESIGN §8.4); each device maps over its own runs, so a run's
    numbers do not depend on the device count. The run count must be a multiple of it
    (`padded_width`)."""
    if batching == "vmap":
        local = jax.vmap(fn, in_axes=(0, 0, None))
    elif batching == "map":
        local = lambda state, hp, shared: jax.lax.map(lambda args: fn(*args, shared), (state, hp))  # noqa: E731
    else:
        raise ValueError(f"run.batching must be vmap or map, got {batching!r}")
    if jax.device_count() == 1:
        return local
    runs, shared = jax.sharding.PartitionSpec("runs"), jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=run_mesh(), in_specs=(runs, runs, shared), out_specs=runs, check_vma=False)


@functools.cache
def run_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("runs",))


def place(tree, over_runs: bool):
    """Put `tree` on the devices: split along the run axis, or replicated (`over_runs=False`).

    Always a committed placement, also on one device: a jitted program's outputs are committed,
    and jit keys its compiled programs on committedness, so a chunk fed uncommitted initial
    state would compile a second time when fed its own output (measured: ~6 s per program)."""
    if jax.device_count() == 1:
        return jax.device_put(tree, jax.devices()[0])
    spec = jax.sharding.PartitionSpec("runs") if over_runs else jax.sharding.PartitionSpec()
    return jax.device_put(tree, jax.sharding.NamedSharding(run_mesh(), spec))


def padded_width(n_runs: int) -> int:
    """Run-axis width: `n_runs` rounded up to a multiple of the device count."""
    return -(-n_runs // jax.device_count()) * jax.device_count()


def resolve_batching(batching: str) -> str:
    """`auto`: lax.map on CPU, vmap on accelerators (measured: `timsim bench`)."""
    if batching != "auto":
        return batching
    return "map" if jax.default_backend() == "cpu" else "vmap"


class RecompileError(RuntimeError):
    """A compiled program was traced again: its inputs changed shape or dtype."""


def trace_once(fn: Callable, name: str) -> Callable:
    """Fail loudly if the jitted `fn` is traced more than once (no silent recompiles).

    Counted per built program, unlike `chex.assert_max_traces`, which counts per code location
    and so would flag two legitimately different programs built by the same factory."""
    traces = 0

    def traced(*args):
        nonlocal traces
        traces += 1
        if traces > 1:
            raise RecompileError(f"{name} was traced a second time: its inputs changed shape or dtype")
        return fn(*args)

    return traced


def make_chunk(cfg: Config, task: Task, graphdef) -> Callable:
    """`chunk(state_R, hp_R, ref_params) -> (state_R, metrics_RS)`: `run.chunk_steps` steps of
    every run, one jitted program, compiled once (`trace_once`)."""
    step = make_step(cfg, task, graphdef)

    def run_chunk(state, hp, ref_params):
        return jax.lax.scan(lambda s, _: step(s, hp, ref_params), state, None, length=cfg.run.chunk_steps)

    return jax.jit(trace_once(batch_over_runs(run_chunk, resolve_batching(cfg.run.batching)), "chunk"))


def make_eval(cfg: Config, task: Task, graphdef) -> Callable:
    """`evaluate(params_R, step_R, hp_R) -> {eval_*}` per run on the fixed held-out prompts: greedy and
    sampled accuracy of the learner's clean policy, and both under the sampler's perturbation
    (a gap shows "the learner improves but the sampler does not")."""
    prompts = eval_prompts(task, cfg.task.eval_prompts)
    sampler = Sampler.from_config(cfg, graphdef)
    learner = sampler.twin()

    def evaluate(params_and_step, hp, _):
        params, step = params_and_step
        model = nnx.merge(graphdef, params)
        seed = hp.seed.astype(jnp.int32)
        key = step_key(seed, "eval", 0)
        # fresh noise: an eval-only draw; persistent noise: the run's own deterministic sampler
        noise_key = noise_key_for(sampler.spec, seed, step) if sampler.spec.persistent else step_key(seed, "eval", 1)
        keys = SamplerKeys(sample=key, noise=noise_key, weight=step_key(seed, "eval", 2), router=step_key(seed, "eval", 3))
        out = {}
        for name, greedy in (("greedy", True), ("sampled", False)):
            rollout = learner.generate(params, model, prompts, keys, hp, greedy=greedy)[0]
            out[f"eval_{name}_accuracy"] = task.verify(prompts, rollout.responses).mean()
        for name, greedy in (("greedy", True), ("sampled", False)):
            if sampler.is_learner:
                out[f"eval_sampler_{name}_accuracy"] = out[f"eval_{name}_accuracy"]
            else:
                rollout = sampler.generate(params, model, prompts, keys, hp, greedy=greedy)[0]
                out[f"eval_sampler_{name}_accuracy"] = task.verify(prompts, rollout.responses).mean()
        return out

    batched = batch_over_runs(evaluate, resolve_batching(cfg.run.batching))
    return jax.jit(trace_once(lambda params, step, hp: batched((params, step), hp, None), "evaluate"))
