"""The explicit setup that makes timsim's promises hold: same config and seed, same bits on one
backend (DESIGN §8.2), and an fp32 learner that is fp32 (§8.7); and that compiled programs
persist between processes (`compilation_cache_dir`).

Importing timsim changes nothing global. Every entry point of the API (`timsim.train`,
`timsim.sweep`, ...) and of the CLI calls `setup()`; call it yourself first when you drive
timsim's lower layers (`timsim.step`, your own jitted code) in a process whose GPU
backend has not started yet.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

GPU_DETERMINISM = "--xla_gpu_deterministic_ops=true"
MATMUL_PRECISION = "highest"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future jax
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def setup() -> None:
    """XLA's GPU reductions and scatters use atomics unless `--xla_gpu_deterministic_ops` is set
    before the backend starts (it is read then; ignored on CPU), and XLA's default GPU matmul
    precision is TF32 (10-bit mantissa), which would itself be a training-inference mismatch.
    This sets both, and refuses to go on if a GPU backend already started without the flag."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        if _backends_started() and jax.default_backend() == "gpu":
            raise RuntimeError("JAX's GPU backend started before timsim.setup(), without "
                               f"{GPU_DETERMINISM} in XLA_FLAGS, so GPU reductions are not deterministic. "
                               "Call timsim.setup() before any JAX computation, or start Python with "
                               f"XLA_FLAGS={GPU_DETERMINISM}.")
        os.environ["XLA_FLAGS"] = f"{flags} {GPU_DETERMINISM}".strip()
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISION)
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))


def compilation_cache_dir() -> Path:
    """Where compiled programs persist between processes unless JAX_COMPILATION_CACHE_DIR says
    otherwise: a program a sweep, a notebook or the tests compiled before loads in ~1.5 s
    instead of compiling for ~8 (timsim's programs depend only on the static config). JAX keys
    each entry by the program, the XLA flags, the jaxlib version and the device, so a stale
    entry is never used; JAX_ENABLE_COMPILATION_CACHE=false turns the cache off."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "timsim" / "xla"


def in_force() -> bool:
    """Whether `setup()`'s settings hold in this process."""
    return ("xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", "")
            and jax.config.jax_default_matmul_precision == MATMUL_PRECISION)
