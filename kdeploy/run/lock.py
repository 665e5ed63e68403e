"""Host-wide timing lock: concurrent batch jobs on one host time their candidates one at a time.

`kdeploy batch` sets `KDEPLOY_TIMING_LOCK=/path/of/a/lock/file` in every job's environment; the
pipeline holds the lock (`fcntl.flock`, so it is released when the process dies) while it times
candidates. Without the variable (a single `kdeploy optimize`) the lock is a no-op.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

TIMING_LOCK_ENV = "KDEPLOY_TIMING_LOCK"


@contextmanager
def timing_lock(environ: Mapping[str, str] | None = None) -> Iterator[float | None]:
    """Holds the host's timing lock named by `$KDEPLOY_TIMING_LOCK` for the body of the `with`.

    Args:
        environ: the environment to read the variable from (default `os.environ`).

    Returns:
        A context manager yielding the seconds spent waiting for the lock, or None when the
        variable is unset (nothing is locked).
    """
    path = (os.environ if environ is None else environ).get(TIMING_LOCK_ENV)
    if not path:
        yield None
        return
    import fcntl

    with open(path, "a") as f:
        started = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - started
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
