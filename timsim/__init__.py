"""timsim: a controlled-perturbation simulator of training-inference mismatch in LLM RL."""

import jax

# The fp32 learner must be fp32: on GPUs XLA's default matmul precision is TF32 (10-bit
# mantissa), which would itself be a training-inference mismatch (DESIGN §8.7). No-op on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

from timsim.config import Config, ConfigError, load_config  # noqa: E402
from timsim.store import load  # noqa: E402

__all__ = ["Config", "ConfigError", "load", "load_config"]
__version__ = "0.1.0"
