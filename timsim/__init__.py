"""timsim: a controlled-perturbation simulator of training-inference mismatch in LLM RL."""

import os

# Same config and seed => same bits on one backend (DESIGN §8.2): XLA's GPU reductions and
# scatters use atomics unless told otherwise. Read when the backend starts; ignored on CPU.
if "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()

import jax  # noqa: E402

# The fp32 learner must be fp32: on GPUs XLA's default matmul precision is TF32 (10-bit
# mantissa), which would itself be a training-inference mismatch (DESIGN §8.7). No-op on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

from timsim.config import Config, ConfigError, load_config  # noqa: E402
from timsim.store import load  # noqa: E402

__all__ = ["Config", "ConfigError", "load", "load_config"]
__version__ = "0.1.0"
