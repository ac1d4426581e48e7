#!/usr/bin/env bash
# On a lent GPU machine: run several timsim commands at once on its one GPU (small programs
# leave most of an H100 idle, so concurrent jobs cost little extra wall time), stop them at a
# deadline, and pack their logs, tables and metrics (not checkpoints) into $OUT/results.tgz.
#   usage (via the device tool): bash scripts/device_jobs.sh SECONDS 'timsim ARGS' ['timsim ARGS' ...]
# Each job writes under gpu_runs/jobN (pass --out-dir gpu_runs/jobN yourself) and logs to
# gpu_runs/jobN.log. Carry .whl (see scripts/device_check.sh) and runs/bases (reuses bases).
set -uo pipefail
deadline=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
       JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache_gpu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p gpu_runs
i=0
for job in "$@"; do
  echo "job$i: timsim $job"
  ( start=$SECONDS; timeout -s TERM "$deadline" python3 -m timsim.cli $job > "gpu_runs/job$i.log" 2>&1
    echo "job$i exit $? after $((SECONDS - start)) s" | tee -a "gpu_runs/job$i.log" ) &
  i=$((i + 1))
done
wait
tar czf "$OUT/results.tgz" --exclude=ckpt gpu_runs runs/bases
for f in gpu_runs/job*.log; do echo "== $f"; tail -n 25 "$f"; done
