"""Where the test suite's time goes: `TIMSIM_COMPILE_LOG=/tmp/compile make test`, then
`python scripts/compile_report.py /tmp/compile` prints JAX tracing, lowering and XLA compile
seconds in total and for the tests that spend the most."""

import sys
from pathlib import Path

import pandas as pd

frames = [pd.read_csv(p, sep="\t", names=["test", "event", "seconds"]).assign(worker=p.suffix[1:])
          for p in Path(sys.argv[1]).parent.glob(Path(sys.argv[1]).name + ".*")]
log = pd.concat(frames, ignore_index=True)
print(log.groupby("event").seconds.agg(["count", "sum"]).round(1).to_string())
compile_ = log[log.event == "backend_compile_duration"]
print(f"\nXLA compiles over 1 s: {(compile_.seconds > 1).sum()}, their total {compile_.seconds[compile_.seconds > 1].sum():.0f} s")
per_test = log.pivot_table(index="test", columns="event", values="seconds", aggfunc="sum", fill_value=0.0)
per_test["total"] = per_test.sum(axis=1)
print(per_test.sort_values("total", ascending=False).head(25).round(1).to_string())
