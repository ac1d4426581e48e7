"""Decoder-only causal transformer policy (Flax NNX).

Two paths over the same parameters:
- `Transformer.__call__`: teacher-forced full forward, logits for every position (learner);
- `Transformer.decode`: one position at a time against a KV cache (sampler).
They compute the same function but with different shapes, so they agree only to ~1e-6 in
fp32; exact zero mismatch is obtained by reporting the learner path's log-probs (see
`rollout.py`), never by asserting a tolerance.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from timsim.config import ModelConfig
from timsim.numerics import FP32, Numerics


ATTENTION_BLOCK = 48  # positions per block of a long context's KV cache (`position_blocks`)
ATTENTION_CHUNK_BYTES = 2 << 20  # scores of one chunk of rows of a long context's attention (`Block._attend_blocks`)


def position_blocks(length: int, block: int = ATTENTION_BLOCK) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each block of a `length`-position KV cache. A decode step attends only
    to the blocks written so far, so causality skips work instead of masking it: at 128
    response tokens the sampler reads ~60% of the keys it would read whole, and attention over
    the cache is most of a long decode step. A context of at most `block` positions is one
    block: the plain cache. (The teacher-forced forward by query blocks was measured too: it
    saved nothing, the blocks' concatenated scores cost what the skipped keys saved.)"""
    return tuple((start, min(start + block, length)) for start in range(0, length, block))


def dense(layer: nnx.Linear, x: jax.Array, nm: Numerics) -> jax.Array:
    """`layer(x)` with the rounding of `nm` at the weights, the input and the result, and its
    contraction order (split-K)."""
    y = nm.matmul(nm.round(x, "matmul_in"), nm.round(layer.kernel[...], "weights"))
    y = nm.round(y, "matmul_out")
    return y if layer.bias is None else y + layer.bias[...]


class Routing(NamedTuple):
    """How the mixture-of-experts routers pick experts in one forward.

    `noise_key`/`noise_fn`: the sampler's routing perturbation, `noise_fn(key, logits_NE)` applied
    to the router logits of each position with a key per layer and absolute position, so the
    KV-cache decode and the teacher-forced forward of the same sequence see the same noise. `replay`: per layer, the
    expert indices [N, S, k] to use instead of the router's own top-k (R2, R3); the gates are
    still the router's softmax over the replayed experts, so gradients reach the router."""

    noise_key: jax.Array | None = None
    noise_fn: Callable | None = None
    replay: tuple[jax.Array, ...] | None = None


class MoE(nnx.Module):
    """Top-k mixture of `experts` GELU MLPs (hidden `d_mlp` each). Every expert is evaluated
    on every token and the outputs are combined with the gates (cheap at this scale, and the
    same arithmetic whichever experts are chosen)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.d_mlp
        self.n_experts, self.top_k = cfg.experts, cfg.expert_top_k
        self.router = nnx.Linear(d, cfg.experts, use_bias=False, rngs=rngs)
        self.experts_in = nnx.List([nnx.Linear(d, h, rngs=rngs) for _ in range(cfg.experts)])
        self.experts_out = nnx.List([nnx.Linear(h, d, rngs=rngs) for _ in range(cfg.experts)])

    def __call__(self, x_NSD, positions_S, layer: int, routing: Routing | None, nm: Numerics):
        """(output [N, S, D], chosen experts [N, S, k], load-balancing loss)."""
        n_experts = self.n_experts
        logits_NSE = nm.round(dense(self.router, x_NSD, nm), "router")
        if routing is not None and routing.noise_key is not None:
            key = jax.random.fold_in(routing.noise_key, layer)
            logits_SNE = jax.vmap(lambda p, x_NE: routing.noise_fn(jax.random.fold_in(key, p), x_NE))(
                positions_S, logits_NSE.swapaxes(0, 1))
            logits_NSE = logits_SNE.swapaxes(0, 1)
        replay = None if routing is None or routing.replay is None else routing.replay[layer]
        experts_NSK = jax.lax.top_k(logits_NSE, self.top_k)[1] if replay is None else replay
        gates_NSK = jax.nn.softmax(jnp.take_along_axis(logits_NSE, experts_NSK, axis=-1), axis=-1)
        chosen_NSKE = jax.nn.one_hot(experts_NSK, n_experts, dtype=x_NSD.dtype)
        weights_NSE = (chosen_NSKE * gates_NSK[..., None]).sum(-2)
        out = jnp.zeros_like(x_NSD)
        for e in range(n_experts):
            h = dense(self.experts_in[e], x_NSD, nm)
            out = out + weights_NSE[..., e:e + 1] * dense(self.experts_out[e], nm.round(jax.nn.gelu(h), "activations"),
                                                          nm)
        # Switch-style balance: E * sum_e (fraction of assignments to e) * (mean router prob of e)
        share_E = chosen_NSKE.sum(-2).mean((0, 1)) / self.top_k
        balance = n_experts * (share_E * jax.nn.softmax(logits_NSE, axis=-1).mean((0, 1))).sum()
        return out, experts_NSK.astype(jnp.int32), balance


def attention_heads(q_HQK, k_blocks, v_blocks, allowed_last_QS, nm: Numerics) -> jax.Array:
    """Scaled dot-product attention of each head ([..., H, Q, K] -> [..., H, Q, K], before the
    output projection) over keys and values in blocks of positions, the last block masked by
    `allowed_last_QS`, with the rounding sites of `nm`."""
    scale = q_HQK.shape[-1] ** -0.5
    q = nm.round(q_HQK, "matmul_in")
    scores = [nm.round(q @ nm.round(k, "matmul_in").swapaxes(-1, -2), "matmul_out") * scale for k in k_blocks]
    scores[-1] = jnp.where(allowed_last_QS, scores[-1], -1e30)
    probs = nm.round(nm.softmax(scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)), "activations")
    ends = np.cumsum([v.shape[-2] for v in v_blocks])
    out = functools.reduce(jnp.add, [probs[..., end - v.shape[-2]:end] @ nm.round(v, "matmul_in")
                                     for end, v in zip(ends, v_blocks)])
    return nm.round(out, "matmul_out")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln_attn = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.attn_out = nnx.Linear(d, d, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(d, rngs=rngs)
        if cfg.experts:
            self.moe = MoE(cfg, rngs=rngs)
        else:
            self.mlp_in = nnx.Linear(d, cfg.d_mlp, rngs=rngs)
            self.mlp_out = nnx.Linear(cfg.d_mlp, d, rngs=rngs)

    def _heads(self, x_NSD, nm):
        """Queries, keys, values in [N, H, S, K] layout (batched matmuls over N, H: measured
        ~1.5x faster on CPU than einsums over [N, S, H, K])."""
        n, s, d = x_NSD.shape
        h = nm.round(self.ln_attn(x_NSD), "activations")
        qkv = dense(self.qkv, h, nm).reshape(n, s, 3, self.n_heads, d // self.n_heads)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, q_NHQK, k_NHSK, v_NHSK, allowed_QS, nm):
        return self._attend_blocks(q_NHQK, (k_NHSK,), (v_NHSK,), allowed_QS, nm)

    def _attend_blocks(self, q_NHQK, k_blocks, v_blocks, allowed_last_QS, nm):
        """Attention over keys and values held in blocks of positions ([N, H, S_b, K] each, in
        order), then the output projection; `allowed_last_QS` masks the last block only (the
        earlier ones are all visible). One block is the plain masked attention; the decode path
        passes the filled blocks of its cache, so it reads only those.

        When the scores outgrow a core's L2 cache (2 MB here) the attention runs by chunks of
        rows whose scores fit in it: each score-sized tensor (dot, mask, max, exp, normaliser,
        dot) then stays in cache instead of making a round trip to memory, and the backward
        recomputes a chunk's scores (`jax.checkpoint`) rather than storing them. Rows are
        independent, so this is the same arithmetic. At 128 response tokens it halves the
        attention alone (fwd+bwd 159 -> 77 ms a layer) and cuts the learner's forward and
        backward by ~13% (750 -> 655 ms); the standard shapes (scores < 2 MB) run unchanged."""
        n, heads, q_len, _ = q_NHQK.shape
        score_bytes = heads * q_len * sum(k.shape[2] for k in k_blocks) * 4
        rows = max(1, ATTENTION_CHUNK_BYTES // score_bytes)

        def attend(q, k_blocks, v_blocks):
            return attention_heads(q, k_blocks, v_blocks, allowed_last_QS, nm)

        if rows >= n:
            out = attend(q_NHQK, k_blocks, v_blocks)
        else:
            out = jax.lax.map(jax.checkpoint(lambda a: attend(*a)), (q_NHQK, k_blocks, v_blocks), batch_size=rows)
        return dense(self.attn_out, out.transpose(0, 2, 1, 3).reshape(n, q_len, -1), nm)

    def _mlp(self, x, nm, positions_S, layer, routing):
        """(output, chosen experts or None, balance loss) of the MLP or mixture of experts."""
        h = nm.round(self.ln_mlp(x), "activations")
        if hasattr(self, "moe"):
            return self.moe(h, positions_S, layer, routing, nm)
        h = dense(self.mlp_in, h, nm)
        return dense(self.mlp_out, nm.round(jax.nn.gelu(h), "activations"), nm), None, jnp.zeros(())

    def forward_with_kv(self, x_NSD, nm: Numerics = FP32, layer: int = 0, routing: Routing | None = None):
        """Causal forward over all positions: (output, keys, values, chosen experts, balance)."""
        q, k, v = self._heads(x_NSD, nm)
        s = x_NSD.shape[1]
        causal = jnp.tril(jnp.ones((s, s), bool))
        x_NSD = x_NSD + self._attend(q, k, v, causal, nm)
        out, experts, balance = self._mlp(x_NSD, nm, jnp.arange(s), layer, routing)
        return x_NSD + out, k, v, experts, balance

    def forward_shared_prefix(self, x_BPD, x_NTD, group: int, nm: Numerics = FP32):
        """Causal forward of N = B * group sequences whose first P positions are their group's
        (dense MLP): the prefix runs once per group, each suffix attends to its group's prefix
        keys and values and to its own. Returns the updated (prefix, suffix)."""
        p, t = x_BPD.shape[1], x_NTD.shape[1]
        q_prefix, k_prefix, v_prefix = self._heads(x_BPD, nm)
        q_suffix, k_suffix, v_suffix = self._heads(x_NTD, nm)
        x_BPD = x_BPD + self._attend(q_prefix, k_prefix, v_prefix, jnp.tril(jnp.ones((p, p), bool)), nm)
        k_NHSK = jnp.concatenate([jnp.repeat(k_prefix, group, axis=0), k_suffix], axis=2)
        v_NHSK = jnp.concatenate([jnp.repeat(v_prefix, group, axis=0), v_suffix], axis=2)
        allowed_TS = jnp.concatenate([jnp.ones((t, p), bool), jnp.tril(jnp.ones((t, t), bool))], axis=1)
        x_NTD = x_NTD + self._attend(q_suffix, k_NHSK, v_NHSK, allowed_TS, nm)
        x_BPD = x_BPD + self._mlp(x_BPD, nm, jnp.arange(p), 0, None)[0]
        x_NTD = x_NTD + self._mlp(x_NTD, nm, p + jnp.arange(t), 0, None)[0]
        return x_BPD, x_NTD

    def decode(self, x_N1D, pos, k_blocks, v_blocks, start: int, nm: Numerics = FP32, layer: int = 0,
               routing: Routing | None = None):
        """Position `pos` against this layer's KV cache blocks up to the one it writes (the last,
        whose first position is `start`): (output, that block's keys and values updated)."""
        q, k, v = self._heads(x_N1D, nm)
        k_last = jax.lax.dynamic_update_slice_in_dim(k_blocks[-1], k, pos - start, axis=2)
        v_last = jax.lax.dynamic_update_slice_in_dim(v_blocks[-1], v, pos - start, axis=2)
        allowed = (start + jnp.arange(k_last.shape[2]) <= pos)[None, :]
        x_N1D = x_N1D + self._attend_blocks(q, (*k_blocks[:-1], k_last), (*v_blocks[:-1], v_last), allowed, nm)
        out = self._mlp(x_N1D, nm, pos[None], layer, routing)[0]
        return x_N1D + out, k_last, v_last


class Transformer(nnx.Module):
    """Pre-LayerNorm GPT-style policy with learned positions and an untied output head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok_embed = nnx.Embed(vocab_size, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_final = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens_NS: jax.Array, nm: Numerics = FP32, routing: Routing | None = None) -> jax.Array:
        """Logits [N, S, V]: position s predicts token s+1."""
        return self.forward(tokens_NS, nm, routing)[0]

    def forward(self, tokens_NS: jax.Array, nm: Numerics = FP32, routing: Routing | None = None):
        """(logits [N, S, V], per layer the chosen experts [N, S, k] (None: dense MLP), the
        load-balancing loss summed over layers)."""
        x = self._embed(tokens_NS, jnp.arange(tokens_NS.shape[1]), nm)
        routes, balance = [], jnp.zeros(())
        for layer, block in enumerate(self.blocks):
            x, _, _, experts, layer_balance = block.forward_with_kv(x, nm, layer, routing)
            routes.append(experts)
            balance = balance + layer_balance
        return self._logits(x, nm), (tuple(routes) if self.cfg.experts else None), balance

    def shares_prompts(self, group: int) -> bool:
        """Whether rows in groups of `group` with one prompt run it once: a dense model only (a
        mixture of experts' router noise differs per row)."""
        return group > 1 and not self.cfg.experts

    def response_logits_shared_prefix(self, prompts_BP, responses_NT, group: int, nm: Numerics = FP32):
        """Teacher-forced logits [N, T, V] of each response after its prompt, for N = B * group
        responses whose group shares one prompt (rows g * group ... g * group + group - 1): every
        prompt position runs once per group instead of once per response (dense MLP only)."""
        p, t = prompts_BP.shape[1], responses_NT.shape[1]
        x_prefix = self._embed(prompts_BP, jnp.arange(p), nm)
        x_suffix = self._embed(responses_NT[:, :-1], p + jnp.arange(t - 1), nm)
        for block in self.blocks:
            x_prefix, x_suffix = block.forward_shared_prefix(x_prefix, x_suffix, group, nm)
        first = jnp.repeat(self._logits(x_prefix[:, -1:], nm), group, axis=0)  # predicts response token 0
        return jnp.concatenate([first, self._logits(x_suffix, nm)], axis=1)

    def _logits(self, x, nm):
        return nm.round(dense(self.head, nm.round(self.ln_final(x), "activations"), nm), "logits")

    def prefill(self, tokens_NS: jax.Array, bounds: tuple[tuple[int, int], ...], nm: Numerics = FP32,
                routing: Routing | None = None) -> dict:
        """A KV cache holding the keys and values of `tokens_NS`, computed in one causal forward
        (cheaper than one decode step per prompt token), in blocks of positions [start, stop)
        (`position_blocks`). Per layer a tuple of [N, H, stop - start, K] blocks, not one stacked
        buffer: decode updates a block in place (stacking the layers would copy the whole cache
        at every generated token, measured 50x slower at 256 positions), and attends only to
        the blocks written so far."""
        x = self._embed(tokens_NS, jnp.arange(tokens_NS.shape[1]), nm)
        ks, vs = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v, _, _ = block.forward_with_kv(x, nm, layer, routing)
            ks.append(k)
            vs.append(v)

        def blocks(kv_NHSK):
            whole = jnp.pad(kv_NHSK, [(0, 0), (0, 0), (0, bounds[-1][1] - kv_NHSK.shape[2]), (0, 0)])
            return tuple(whole[:, :, start:stop] for start, stop in bounds)

        return {"k": tuple(blocks(k) for k in ks), "v": tuple(blocks(v) for v in vs)}

    def _embed(self, tokens, positions, nm):
        tok = nm.round(self.tok_embed.embedding[...], "weights")[tokens]
        pos = nm.round(self.pos_embed.embedding[...], "weights")[positions]
        return tok + pos[None]

    def decode(self, token_N: jax.Array, pos: jax.Array, past: dict, last: dict, start: int, nm: Numerics = FP32,
               routing: Routing | None = None) -> tuple[jax.Array, dict]:
        """Logits [N, V] for the token after `token_N` at position `pos`, which lies in the cache
        block `last` (per layer "k"/"v" [N, H, S_b, K], first position `start`) after the full
        blocks `past` (per layer a tuple of blocks); returns `last` updated."""
        x = self._embed(token_N[:, None], pos[None], nm)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.decode(x, pos, (*past["k"][i], last["k"][i]), (*past["v"][i], last["v"][i]), start, nm,
                                   i, routing)
            ks.append(k)
            vs.append(v)
        logits = self._logits(x, nm)[:, 0]
        return logits, {"k": tuple(ks), "v": tuple(vs)}


def init_model(cfg: ModelConfig, vocab_size: int, seed: int) -> Transformer:
    return Transformer(cfg, vocab_size, rngs=nnx.Rngs(seed))


def response_logits(model: Transformer, prompts_NP: jax.Array, responses_NT: jax.Array,
                    nm: Numerics = FP32, routing: Routing | None = None) -> jax.Array:
    """Teacher-forced logits [N, T, V] that predict each response token."""
    return response_forward(model, prompts_NP, responses_NT, nm, routing)[0]


def response_forward(model: Transformer, prompts_NP: jax.Array, responses_NT: jax.Array, nm: Numerics = FP32,
                     routing: Routing | None = None, group: int = 1):
    """`response_logits`, the experts chosen at every position of prompt + response (per layer
    [N, P + T - 1, k], None for a dense model) and the load-balancing loss. `group`: rows come
    in groups of this many with one prompt (GRPO's samples of a prompt); a dense model then
    runs each prompt once (`Transformer.response_logits_shared_prefix`)."""
    if model.shares_prompts(group):
        chex.assert_equal(prompts_NP.shape[0] % group, 0)
        logits = model.response_logits_shared_prefix(prompts_NP[::group], responses_NT, group, nm)
        return logits, None, jnp.zeros(())
    tokens = jnp.concatenate([prompts_NP, responses_NT], axis=1)[:, :-1]
    logits, routes, balance = model.forward(tokens, nm, routing)
    return logits[:, prompts_NP.shape[1] - 1 :], routes, balance


def token_logprobs(logits_NTV: jax.Array, tokens_NT: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `tokens_NT` under softmax(logits / temperature), and the full log-softmax."""
    logp_all = jax.nn.log_softmax(logits_NTV / temperature, axis=-1)
    return jnp.take_along_axis(logp_all, tokens_NT[..., None], axis=-1)[..., 0], logp_all
