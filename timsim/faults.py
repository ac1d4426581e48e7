"""Deterministic fault injection, for the tests that kill or starve a run at an exact point.

``TIMSIM_FAULT=<point>:<n>[:<action>]`` acts the n-th time this process reaches `point`
(DESIGN §8.6: faults by environment variable, never by timers). Actions: ``kill`` (the
default) sends SIGKILL to this process; ``enospc`` and ``erofs`` raise the `OSError` that a
full or a read-only disk raises at that write.

Points:
- ``chunk_end``: a chunk's metrics, checkpoint and progress are all on disk;
- ``write_parquet`` / ``write_bytes``: an atomic write has filled its temporary file and has
  not yet renamed it over the target (a kill here is a kill in the middle of a write);
- ``checkpoint``: an orbax save of the run states has started and not finished.
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "TIMSIM_FAULT"
POINTS = ("chunk_end", "write_parquet", "write_bytes", "checkpoint")
ACTIONS = ("kill", "enospc", "erofs")
_reached: dict[tuple[str, str], int] = {}  # (spec, point) -> times reached under that spec


def _parse(spec: str) -> tuple[str, int, str]:
    point, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    action = action or "kill"
    if point not in POINTS or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: write <point>:<n>[:<action>] with point one of "
                         f"{', '.join(POINTS)}, n >= 1 and action one of {', '.join(ACTIONS)}")
    return point, int(count), action


def reached(point: str, path: object = None) -> None:
    """Mark that this process reached `point` (writing `path`); act if the fault says so."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_point, count, action = _parse(spec)
    if point != fault_point:
        return
    _reached[spec, point] = _reached.get((spec, point), 0) + 1
    if _reached[spec, point] != count:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EROFS
    raise OSError(code, os.strerror(code), str(path) if path is not None else None)


def reset() -> None:
    """Forget how often each point was reached (tests that inject twice in one process)."""
    _reached.clear()
