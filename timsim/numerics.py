"""Floating-point numerics of a forward pass: rounding and reduction order at chosen sites.

Rounding is simulated with `jax.lax.reduce_precision` (bf16: 8 exponent / 7 mantissa bits,
fp16: 5 / 10) on fp32 values. A plain ``x.astype(bf16).astype(f32)`` round trip can be
simplified away by XLA inside fusions; `reduce_precision` survives jit (tested against the
compiled HLO, DESIGN §3, §8.7).

Sites: ``weights`` (every matmul weight), ``matmul_in`` (every matmul input), ``matmul_out``
(every matmul result, i.e. the accumulator written back in low precision), ``activations``
(outputs of LayerNorm, softmax and GELU), ``logits`` (the output head), ``router`` (the
mixture-of-experts router logits: ``sites: [router]`` alone flips expert choices and nothing else).

Reordered reductions model kernels that add the same numbers in another order:
- split-K: a dense layer's contraction is cut into ``split_k`` chunks, each chunk's partial sum is
  rounded to ``partials`` (GPU split-K kernels write partials in the output dtype) and the
  partials are added last chunk first;
- chunked softmax: the attention normaliser is accumulated over ``softmax_chunks`` key blocks
  (as flash attention does), each block sum rounded to ``partials``;
- batch-variant: the split count depends on how many rows the matmul has (engines choose
  split-K for small batches), so the same sequence gets different numbers in batches of
  different sizes (``batch_variant``).
In exact arithmetic none of them changes anything (tested against float64).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FORMATS = {"fp32": None, "bf16": (8, 7), "fp16": (5, 10)}
SITES = ("weights", "matmul_in", "matmul_out", "activations", "logits", "router")
BATCH_VARIANT_ROWS = 1024  # batch-variant: the full split_k below this many rows, fewer splits above


def round_to(x: jax.Array, dtype: str) -> jax.Array:
    """`x` rounded to `dtype` ("fp32": unchanged), staying in x's own dtype."""
    if FORMATS[dtype] is None:
        return x
    exponent_bits, mantissa_bits = FORMATS[dtype]
    return jax.lax.reduce_precision(x, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Static description of a forward's numerics; the default is plain fp32."""

    dtype: str = "fp32"
    sites: tuple[str, ...] = SITES
    split_k: int = 1
    partials: str = "fp32"
    softmax_chunks: int = 1
    batch_variant: bool = False

    @property
    def rounds(self) -> bool:
        return FORMATS[self.dtype] is not None and bool(self.sites)

    def round(self, x: jax.Array, site: str) -> jax.Array:
        return round_to(x, self.dtype) if self.rounds and site in self.sites else x

    def splits_for(self, rows: int, depth: int) -> int:
        """Chunks of a contraction of `depth` over `rows` rows: a divisor of depth."""
        target = self.split_k
        if self.batch_variant:
            target = max(1, self.split_k * BATCH_VARIANT_ROWS // max(rows, BATCH_VARIANT_ROWS))
        chunks = min(target, depth)
        while depth % chunks:
            chunks -= 1
        return chunks

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """x [..., K] @ w [K, M] with this contraction order; rounding sites are the caller's."""
        depth = x.shape[-1]
        rows = x.size // depth
        chunks = self.splits_for(rows, depth)
        if chunks == 1:  # as one 2-D matmul: its weight gradient then needs no transposed copy of x
            return (x.reshape(rows, depth) @ w).reshape(*x.shape[:-1], w.shape[-1])
        x_C = x.reshape(*x.shape[:-1], chunks, depth // chunks)
        partial = jnp.einsum("...ck,ckm->c...m", x_C, w.reshape(chunks, depth // chunks, w.shape[-1]))
        return reverse_sum(round_to(partial, self.partials))

    def softmax(self, scores: jax.Array) -> jax.Array:
        """softmax over the last axis, its normaliser summed in `softmax_chunks` blocks."""
        if self.softmax_chunks == 1:
            return jax.nn.softmax(scores, axis=-1)
        exp = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        n = exp.shape[-1]
        chunks = min(self.softmax_chunks, n)
        width = -(-n // chunks)
        padded = jnp.pad(exp, [(0, 0)] * (exp.ndim - 1) + [(0, chunks * width - n)])
        block_sums = padded.reshape(*exp.shape[:-1], chunks, width).sum(-1)
        total = reverse_sum(round_to(jnp.moveaxis(block_sums, -1, 0), self.partials))
        return exp / total[..., None]


def reverse_sum(parts_C: jax.Array) -> jax.Array:
    """parts[C-1] + ... + parts[0], added one at a time in that order (a fixed, non-default order)."""
    total = parts_C[-1]
    for i in range(parts_C.shape[0] - 2, -1, -1):
        total = total + parts_C[i]
    return total


FP32 = Numerics()
