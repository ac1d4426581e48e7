"""Shared fixtures: one tiny base policy per test session (DESIGN §8.6)."""

import os
from pathlib import Path

import pytest



def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has `flag`: XLA aborts the process on an unknown XLA_FLAGS entry,
    and flags come and go between releases (the GPU image runs another jaxlib, DESIGN §8.7)."""
    import mmap

    import jaxlib

    for library in Path(jaxlib.__file__).parent.glob("*.so"):
        with library.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
            if image.find(flag.encode()) >= 0:
                return True
    return False


# Most of the suite's time is XLA compiling small programs (scripts/compile_report.py). LLVM at -O0
# compiles them about twice as fast; the numbers differ from the production build's in the last
# bits (FMA contraction), which no test depends on: tests compare runs made with the same flags
# (subprocesses inherit them), never golden numbers (DESIGN §8.2). TIMSIM_TEST_FULL_OPT=1 runs
# the suite with the production build.
#
# TIMSIM_TEST_FAST_EMITTER=1 (`make test`'s first session) also selects XLA's older CPU fusion
# emitter, which halves what is left: a tiny chunk program compiles in 2.5-2.8 s against
# 5.6-7.1 s. Its code for an op depends on the fusion the op lands in, so two computations of
# one value in different fusions can differ in the last bit; the tests that assert bits across
# two computations (marker `bits`) are skipped under it and run in `make test`'s second session.
FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
FAST_EMITTER = os.environ.get("TIMSIM_TEST_FAST_EMITTER") == "1"
if FAST_EMITTER:
    FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
if not os.environ.get("TIMSIM_TEST_FULL_OPT"):
    flags = os.environ.get("XLA_FLAGS", "").split()
    given = {f.split("=")[0] for f in flags}  # a flag the caller set keeps the caller's value
    flags += [f for f in FAST_COMPILE if f.split("=")[0] not in given and _xla_knows(f.split("=")[0].lstrip("-"))]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def pytest_collection_modifyitems(config, items):
    if FAST_EMITTER:
        skip = pytest.mark.skip(reason="asserts bits across two computations: needs XLA's production fusion "
                                       "emitter (run without TIMSIM_TEST_FAST_EMITTER; make test does)")
        for item in items:
            if "bits" in item.keywords:
                item.add_marker(skip)


import timsim  # noqa: E402  (after the flags: XLA reads them when its backend starts)
from timsim.config import SMOKE, load_config

# The explicit determinism setup the API and CLI make (tests also drive the lower layers directly).
timsim.setup()

if os.environ.get("TIMSIM_COMPILE_LOG"):  # where the suite's time goes: scripts/compile_report.py reads it
    import jax.monitoring

    _LOG = Path(f"{os.environ['TIMSIM_COMPILE_LOG']}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")

    def _record(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
            with _LOG.open("a") as out:
                out.write(f"{test}\t{event.rsplit('/', 1)[-1]}\t{seconds:.4f}\n")

    jax.monitoring.register_event_duration_secs_listener(_record)

TINY = SMOKE  # one tiny base policy per test session


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(scope="session")
def tiny_overrides(base_dir):
    return TINY + [f"pretrain.cache_dir={base_dir}"]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    return load_config(None, tiny_overrides)


@pytest.fixture(scope="session")
def tiny_base(tiny_cfg):
    from timsim.base import get_base

    return get_base(tiny_cfg, announce=lambda msg: None)
