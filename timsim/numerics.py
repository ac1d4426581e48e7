"""Floating-point numerics of a forward pass: rounding to bf16 / fp16 at chosen sites.

Rounding is simulated with `jax.lax.reduce_precision` (bf16: 8 exponent / 7 mantissa bits,
fp16: 5 / 10) on fp32 values. A plain ``x.astype(bf16).astype(f32)`` round trip can be
simplified away by XLA inside fusions; `reduce_precision` survives jit (tested against the
compiled HLO, DESIGN §3, §8.7).

Sites: ``weights`` (every matmul weight), ``matmul_in`` (every matmul input), ``matmul_out``
(every matmul result, i.e. the accumulator written back in low precision), ``activations``
(outputs of LayerNorm, softmax and GELU), ``logits`` (the output head).
"""

from __future__ import annotations

import dataclasses

import jax

FORMATS = {"fp32": None, "bf16": (8, 7), "fp16": (5, 10)}
SITES = ("weights", "matmul_in", "matmul_out", "activations", "logits")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Static description of a forward's numerics; the default is exact fp32."""

    dtype: str = "fp32"
    sites: tuple[str, ...] = SITES

    @property
    def is_fp32(self) -> bool:
        return FORMATS[self.dtype] is None or not self.sites

    def round(self, x: jax.Array, site: str) -> jax.Array:
        if self.is_fp32 or site not in self.sites:
            return x
        exponent_bits, mantissa_bits = FORMATS[self.dtype]
        return jax.lax.reduce_precision(x, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits)


FP32 = Numerics()
