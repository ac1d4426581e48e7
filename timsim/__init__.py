"""timsim: a controlled-perturbation simulator of training-inference mismatch in LLM RL."""

from timsim.config import Config, ConfigError, load_config
from timsim.store import load

__all__ = ["Config", "ConfigError", "load", "load_config"]
__version__ = "0.1.0"
