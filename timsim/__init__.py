"""timsim: a controlled-perturbation simulator of training-inference mismatch in LLM RL.

The API (`timsim.api`): `train`, `sweep`, `calibrate`, `critical`, `theory_table`, `oracle`, `load`, `compare`
return DataFrames; `write_report` and `export` publish a results directory; `setup` is the explicit determinism setup every entry point calls. Importing timsim
changes no global JAX or XLA setting.
"""

from timsim.api import (Result, calibrate, compare, critical, export, load, oracle, sweep, theory_table, train,
                        write_report)
from timsim.config import Config, ConfigError, load_config
from timsim.determinism import setup
from timsim.loop import Boundary, GroupRun, Hook, ProgressHook, ScalarHook

__all__ = ["Boundary", "Config", "ConfigError", "GroupRun", "Hook", "ProgressHook", "Result", "ScalarHook", "calibrate",
           "compare", "critical", "export", "load", "load_config", "oracle", "setup", "sweep", "theory_table", "train", "write_report"]
__version__ = "0.1.0"
