"""Jitted autoregressive sampling with a KV cache.

The sampler samples each response token from softmax(logits / temperature) computed by the
KV-cache decode path (`Transformer.decode`). What it *reports* as `logp_sampler` is a
separate choice, made in `sampler.Sampler.report`: the log-probs of the sampled
tokens recomputed by teacher forcing (the learner's own for the zero-mismatch sampler, which
makes delta == 0 bit for bit, DESIGN §8.2). The residual ~1e-6 disagreement between the
decode path and teacher forcing is kept as `logp_decode` and reported as `delta_floor_max`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from timsim.model import Routing, Transformer, position_blocks, response_forward, token_logprobs
from timsim.numerics import FP32, Numerics
from timsim.tasks import EOS, PAD


class Rollout(NamedTuple):
    responses: jax.Array  # [N, T] int32, PAD after <eos>
    mask: jax.Array  # [N, T] float32: 1 on generated tokens, the <eos> included
    logp_decode: jax.Array  # [N, T] log-prob of each sampled token on the decode path (0 on padding)


def sample(model: Transformer, prompts_NP: jax.Array, key: jax.Array, temperature,
           response_len: int, greedy: bool = False, logits_fn: Callable | None = None,
           nm: Numerics = FP32, routing: Routing | None = None, group: int = 1) -> Rollout:
    """Sample `response_len` tokens after each prompt; `greedy` takes the argmax instead.
    `logits_fn(logits_NV, t, context_hash_N)` is the sampler's perturbation of response
    position t's logits (the hash identifies prompt + response so far), `nm` the numerics of
    its forward, `routing` its router perturbation (mixture of experts). `group`: rows share
    their prompt in groups of this many; a dense model then prefills each prompt once.

    The decode runs as one scan per cache block: response position t feeds the token at
    position p - 1 + t, whose keys and values land in the block holding that position."""
    n, p = prompts_NP.shape
    shared = model.shares_prompts(group)
    bounds = position_blocks(p + response_len)
    cache = model.prefill(prompts_NP[::group if shared else 1, :-1], bounds, nm, routing)
    if shared:
        cache = jax.tree.map(lambda x: jnp.repeat(x, group, axis=0), cache)

    def segment(past, start):
        def generate(carry, t):
            last, token, done, context = carry
            logits, last = model.decode(token, p - 1 + t, past, last, start, nm, routing)
            if logits_fn is not None:
                logits = logits_fn(logits, t, context)
            logits = logits / temperature
            if greedy:
                new = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                new = jax.random.categorical(jax.random.fold_in(key, t), logits).astype(jnp.int32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), new[:, None], axis=-1)[:, 0]
            live = ~done
            new = jnp.where(live, new, PAD)
            done = done | (new == EOS)
            return (last, new, done, extend_hash(context, new)), (new, live.astype(jnp.float32),
                                                                  jnp.where(live, logp, 0.0))
        return generate

    state = (prompts_NP[:, p - 1], jnp.zeros((n,), bool), prompt_hash(prompts_NP))
    outputs = []
    for j, (start, stop) in enumerate(bounds):
        first, end = max(start - p + 1, 0), min(stop - p + 1, response_len)  # response positions in this block
        if first >= end:
            continue
        past = {name: tuple(layer[:j] for layer in cache[name]) for name in ("k", "v")}
        last = {name: tuple(layer[j] for layer in cache[name]) for name in ("k", "v")}
        (last, *state), out = jax.lax.scan(segment(past, start), (last, *state), jnp.arange(first, end))
        cache = {name: tuple((*layer[:j], written, *layer[j + 1:]) for layer, written in zip(cache[name], last[name]))
                 for name in ("k", "v")}
        outputs.append(out)
    tokens_TN, mask_TN, logp_TN = (jnp.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*outputs))
    return Rollout(tokens_TN.T, mask_TN.T, logp_TN.T)


def extend_hash(hash_N: jax.Array, token_N: jax.Array) -> jax.Array:
    """Rolling hash of a token sequence (uint32 arithmetic, wrapping)."""
    return hash_N * jnp.uint32(1_000_003) + token_N.astype(jnp.uint32) + jnp.uint32(1)


def prompt_hash(prompts_NP: jax.Array) -> jax.Array:
    """Hash [N] of each prompt: the context of the first response token."""
    h = jnp.full(prompts_NP.shape[:1], 2_166_136_261, jnp.uint32)
    return jax.lax.fori_loop(0, prompts_NP.shape[1], lambda i, h: extend_hash(h, prompts_NP[:, i]), h)


def prefix_hashes(prompts_NP: jax.Array, responses_NT: jax.Array) -> jax.Array:
    """Hash [N, T] of the context (prompt + responses[:, :t]) of every response position t."""
    def step(h, token):
        return extend_hash(h, token), h

    _, hashes_TN = jax.lax.scan(step, prompt_hash(prompts_NP), responses_NT.T)
    return hashes_TN.T


def learner_logprobs(model: Transformer, prompts_NP, responses_NT, mask_NT, temperature, nm: Numerics = FP32,
                     transform: Callable | None = None, routing: Routing | None = None, group: int = 1):
    """The learner's per-token log-probs of given responses (teacher forcing), 0 on padding,
    the full log-softmax [N, T, V] (for entropies and exact divergences) and the
    load-balancing loss (0 for a dense model). `transform`: a logit transform the learner
    applies (the consistent fix for a one-sided sampler one); `routing`: replayed experts;
    `group`: rows share their prompt in groups of this many (`model.response_forward`)."""
    logits, _, balance = response_forward(model, prompts_NP, responses_NT, nm, routing, group)
    if transform is not None:
        logits = transform(logits)
    logp, logp_all = token_logprobs(logits, responses_NT, temperature)
    return logp * mask_NT, logp_all, balance

