#!/usr/bin/env bash
# On a lent GPU machine (Python 3.12, jax preinstalled, no package index): install the
# missing pure-Python dependencies from carried wheels (.whl/, see README "GPU"), run the
# GPU-relevant tests, and time the standard step with the run axis vmapped.
#   usage (via the device tool): bash scripts/device_check.sh [tests|bench|all]
# The wheels, fetched once on a machine with an index (ignored by git, carried with the call):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core annotated-types typing-inspection
# (pin the versions of the local .venv: pydantic and pydantic_core must match each other)
set -uo pipefail
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache_gpu
python3 -c "import jax, timsim; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
if [[ $what == tests || $what == all ]]; then
  # rounding survives jit on GPU (HLO), zero mismatch is exact, scale 0 is bit-identical
  python3 -m pytest -q -p no:cacheprovider tests/test_numerics.py tests/test_core.py \
    -k "rounding or zero_mismatch or bit_identical or reordered or split_k or softmax" --tb=short -rf 2>&1 \
    | grep -v "^$" | tail -60
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m timsim.cli bench --runs 16 2>&1 | grep -v "^$"
  python3 - <<'PY'
from timsim.bench import time_chunk, STANDARD
print("runs | ms per run-step | ms per step of all runs | compile s  (vmap, standard shape)")
for runs in (1, 16, 64, 256, 512):
    r = time_chunk(STANDARD, runs, "vmap")
    print(f"{runs} | {r['step_s'] * 1e3:.2f} | {r['step_s'] * runs * 1e3:.1f} | {r['compile_s']:.1f}", flush=True)
PY
fi
