#!/usr/bin/env bash
# The CI check as a new user's machine sees it: a fresh clone of this checkout's HEAD runs
# `make test` ROUNDS times in a row (first round installs .venv) while BUSY other processes
# each keep a core busy (default: one, "another process loads the cores"; the number of cores
# for a fully loaded machine; 0 when a real workload, e.g. a running sweep, is the load).
# Prints each round's wall time; exits non-zero if a round fails. The budget is 15 min a round
# (DESIGN §8.6).
#
#   bash scripts/test_under_load.sh [ROUNDS=2] [BUSY=1]
set -euo pipefail
rounds="${1:-2}"
busy="${2:-1}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
git clone --quiet "$repo" "$work/clone"
load=()
for _ in $(seq 1 "$busy"); do
    python3 -c 'while True: pass' &
    load+=($!)
done
trap 'kill "${load[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
status=0
for round in $(seq 1 "$rounds"); do
    start=$(date +%s)
    if (cd "$work/clone" && CI=true make test > "$work/round$round.log" 2>&1); then result=passed; else result=FAILED; status=1; fi
    echo "round $round: $result in $(( $(date +%s) - start )) s ($(grep -aE '[0-9]+ (passed|failed)' "$work/round$round.log" | tail -1))"
    [ "$result" = passed ] || tail -40 "$work/round$round.log"
done
exit $status
