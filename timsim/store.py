"""The results layout (DESIGN §8.3), written atomically and readable while a run goes on.

```
<dir>/manifest.json                     schema version, provenance, run-axis width, cells + status
<dir>/config.resolved.yaml              the fully resolved config(s)
<dir>/metrics/part-<cell>-<chunk>.parquet   one row per run x step; parts are never rewritten
<dir>/summary.parquet                   one row per run
<dir>/ckpt/<group>/<step>/              orbax checkpoints of the run states at chunk ends
<dir>/.lock                             held (flock) by the one process writing the directory
```

Metrics table columns: ``cell_id, run_idx, seed, step``, every swept value as
``cfg.<dotted.key>``, then the metrics of `timsim.metrics.METRICS` (NaN where a metric is
not computed at that step). Every file is written to a temporary name and renamed, so a
reader never sees a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from timsim import faults
from timsim.config_types import ConfigError

SCHEMA_VERSION = 1


TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


class ResultsBusy(RuntimeError):
    """Another process is writing this results directory."""


@contextlib.contextmanager
def _temporary_beside(path: Path, point: str):
    """A temporary file next to `path` that replaces it when the block succeeds and is
    removed when it fails (a full disk leaves no half-written file behind). A process
    killed inside the block leaves only a hidden `.name.*.tmp`, which readers never glob
    and the next writer of the directory removes (`Store.lock`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield tmp
        faults.reached(point, path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _temporary_beside(path, "write_bytes") as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    with _temporary_beside(path, "write_parquet") as tmp:
        df.to_parquet(tmp, index=False)


def read_parquet(path: Path) -> pd.DataFrame:
    """Read through one open file handle: a concurrent atomic replace then cannot mix two
    versions (pyarrow opening a path twice, footer then pages, can)."""
    with open(path, "rb") as fh:
        return pd.read_parquet(fh)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict:
    """Everything that bit-for-bit reproducibility depends on (DESIGN §8.2)."""
    import jax

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "timsim": _version("timsim"), "git_commit": commit,
        "jax": _version("jax"), "jaxlib": _version("jaxlib"), "flax": _version("flax"),
        "optax": _version("optax"), "python": sys.version.split()[0], "platform": platform.platform(),
        "backend": jax.default_backend(), "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


_HELD: dict[Path, int] = {}  # directories whose lock this process holds -> nesting depth


class Store:
    """One run or sweep directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @contextlib.contextmanager
    def lock(self):
        """Hold this directory for this process: a second process (a second sweep started on
        the same directory) gets `ResultsBusy` at once instead of interleaving its files.
        Re-entrant within a process (the finder holds it across its rounds of `run_cells`).
        The lock is an flock on `<dir>/.lock`, released by the kernel when the process
        dies, so a killed run never leaves a stale lock."""
        key = self.root.resolve()
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield self
            finally:
                _HELD[key] -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ResultsBusy(f"Results directory {str(self.root)!r} is in use by {holder}. Two runs writing one "
                              "directory would interleave their files: wait for that one to finish (rerunning then "
                              "resumes), or give this one another run.name or --out-dir.") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"timsim pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            for stale in self.root.rglob(f".*{TMP_SUFFIX}"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
            _HELD[key] = 1
            yield self
        finally:
            _HELD.pop(key, None)
            handle.close()

    def clear(self) -> None:
        """Delete every result in this directory (--restart), keeping the lock file."""
        if not self.root.exists():
            return
        for child in self.root.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        """The manifest with every group's progress file laid over it. A group's runner (in
        this process or a Ray worker) writes only its own `groups/<gid>.json`, so concurrent
        groups never overwrite each other's progress; the driver writes the plan."""
        if not self.manifest_path.exists():
            return {}
        manifest = json.loads(self.manifest_path.read_text())
        for path in sorted((self.root / "groups").glob("*.json")):
            progress = json.loads(path.read_text())
            manifest["groups"].setdefault(path.stem, {}).update(progress["group"])
            for cell_id, fields in progress["cells"].items():
                manifest["cells"].setdefault(cell_id, {}).update(fields)
        return manifest

    def write_group(self, gid: str, progress: dict) -> None:
        """A group's progress: `{"group": {...}, "cells": {cell_id: {...}}}` (see read_manifest)."""
        atomic_write_bytes(self.root / "groups" / f"{gid}.json", json.dumps(progress, indent=2).encode())

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False).encode())

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.root / name, text.encode())

    def write_metrics_part(self, cell_id: str, chunk: int, df: pd.DataFrame) -> Path:
        path = self.root / "metrics" / f"part-{cell_id}-{chunk:05d}.parquet"
        atomic_write_parquet(path, df)
        return path

    def write_summary(self, df: pd.DataFrame) -> None:
        atomic_write_parquet(self.root / "summary.parquet", df)

    def checkpoint_dir(self, group: str, step: int) -> Path:
        return self.root / "ckpt" / group / f"{step:07d}"


def load(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`(metrics, summary)` DataFrames of a run or sweep directory (readable while it runs)."""
    root = Path(path)
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"{str(root)!r} is not a timsim results directory (no manifest.json).")
    parts = sorted((root / "metrics").glob("part-*.parquet"))
    metrics = pd.concat([read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
    order = {cid: i for i, cid in enumerate(json.loads((root / "manifest.json").read_text())["cells"])}
    rank = lambda col: col.map(order) if col.name == "cell_id" else col  # noqa: E731  (cells in plan order)
    if len(metrics):
        metrics = metrics.sort_values(["cell_id", "run_idx", "step"], key=rank, kind="stable", ignore_index=True)
    summary_path = root / "summary.parquet"
    summary = read_parquet(summary_path) if summary_path.exists() else pd.DataFrame()
    if len(summary):
        summary = summary.sort_values(["cell_id", "run_idx"], key=rank, kind="stable", ignore_index=True)
    return metrics, summary


EXPORT_PART = "part-all.parquet"


def export(root: str | Path, dest: str | Path, command: str, every: int = 1) -> Path:
    """A compact, reloadable copy of a results directory, to publish beside a finding: the
    manifest (with its provenance, plus `export`: the source, the command that regenerates the
    results and how they were thinned), the resolved config, the summary as is, and the
    metrics as one float32 zstd Parquet part, keeping every `every`-th step and every step
    with an evaluation or a probe. `timsim.load(dest)` reads it like the original."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"--every takes a positive number of steps (every= in timsim.export), got {every!r}.")
    root, dest = Path(root), Path(dest)
    metrics, summary = load(root)
    if every > 1:
        marked = metrics.filter(regex=r"^(eval_|probe_|oracle_)").notna().any(axis=1)
        metrics = metrics[(metrics.step % every == 0) | marked]
    metrics = metrics.astype({c: "float32" for c in metrics.columns if metrics[c].dtype == "float64"})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["export"] = {"source": str(root), "command": command, "every": every, "metrics_dtype": "float32",
                          "exported_at": time.strftime("%Y-%m-%d")}
    (dest / "metrics").mkdir(parents=True, exist_ok=True)
    for stale in (dest / "metrics").glob("part-*.parquet"):
        stale.unlink()
    atomic_write_bytes(dest / "manifest.json", json.dumps(manifest, indent=2).encode())
    if (root / "config.resolved.yaml").exists():
        atomic_write_bytes(dest / "config.resolved.yaml", (root / "config.resolved.yaml").read_bytes())
    atomic_write_parquet(dest / "summary.parquet", summary)
    with _temporary_beside(dest / "metrics" / EXPORT_PART, "export") as tmp:
        metrics.to_parquet(tmp, index=False, compression="zstd")
    return dest
