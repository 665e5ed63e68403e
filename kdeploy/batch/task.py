"""One batch job on a Ray worker: `python -m kdeploy optimize ...` in a child process.

The child is the CLI itself, so a job has exactly `kdeploy optimize`'s code path, exit code and
report, and TensorFlow lives and dies with it. It runs in its own session (process group) and
gets SIGTERM when its worker dies; a timeout or a cancelled task (Ctrl-C on the driver) stops the
whole group. The child writes to a folder local to the worker's host; the finished folder goes
back to the driver as a tar archive, so the batch folder only has to exist on the driver's host.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from kdeploy.run.lock import TIMING_LOCK_ENV

# Seconds a stopped job's process group gets to clean up after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0
LOG_TAIL_BYTES = 200_000
_STAGE = re.compile(r"^\s*\d+\.\ds\s+(\S+)\s?(.*)$")  # the CLI's progress lines: "  12.3s   latency timing ..."
_ERROR = re.compile(r"^(error|internal error|interrupted|terminated \(SIGTERM\)):\s*(.*)$")
_PR_SET_PDEATHSIG = 1


def run_job(spec: dict[str, Any], notify: Callable[[str, str, str], None] | None = None) -> dict[str, Any]:
    """Runs one `kdeploy optimize` child process to its end, a timeout, or a cancellation.

    Args:
        spec: `name`, `args` (optimize arguments without `--out`), `timeout_s`, `env` (variables
            to set in the child; a None value unsets one).
        notify: called with (job name, stage, detail) for every progress line of the child.

    Returns:
        A dict: `exit_code` (0-3), `message` (the child's error line, or why it was stopped),
        `duration_s`, `node`, `log` (the child's console output) and `files` (the output folder
        as an uncompressed tar archive, or None when the child wrote none).
    """
    work = Path(tempfile.mkdtemp(prefix=f"kdeploy-batch-{spec['name']}-"))
    out = work / "out"
    cmd = [sys.executable, "-m", "kdeploy", "optimize", *spec["args"], "--out", str(out)]
    started = time.monotonic()
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", env=_child_env(spec["env"]), cwd=work,
                                start_new_session=True, preexec_fn=_die_with_parent)
        reader = threading.Thread(target=_read, args=(proc, lines, spec["name"], notify), daemon=True)
        reader.start()
        try:
            returncode = proc.wait(timeout=spec["timeout_s"])
            stopped = None
        except subprocess.TimeoutExpired:
            _stop(proc)
            returncode, stopped = None, f"timed out after {spec['timeout_s']:g} s; the job was stopped"
        finally:
            if proc.poll() is None:  # cancelled (KeyboardInterrupt from ray.cancel) or another error here
                _stop(proc)
        reader.join(timeout=5)
        code, message = _outcome(returncode, stopped, lines)
        files = _tar(out) if code in (0, 1) and (out / "report.json").is_file() else None
        log = "".join(lines)
        return {"exit_code": code, "message": message, "duration_s": time.monotonic() - started,
                "node": socket.gethostname(), "log": log[-LOG_TAIL_BYTES:], "files": files}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child_env(changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    # The child runs this very kdeploy, whether it is installed or on the worker's path.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.setdefault(TIMING_LOCK_ENV, str(Path(tempfile.gettempdir()) / f"kdeploy-timing-{os.getuid()}.lock"))
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the Ray worker that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _read(proc: subprocess.Popen, lines: list[str], name: str, notify) -> None:
    for line in proc.stdout:
        lines.append(line)
        m = _STAGE.match(line)
        if m and notify is not None:
            notify(name, m.group(1), m.group(2).strip())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (the child then removes its staging folder), SIGKILL after a grace."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:  # the leader is gone; its own children may not be
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _outcome(returncode: int | None, stopped: str | None, lines: list[str]) -> tuple[int, str]:
    """(exit code 0-3, message) from the child's return code and output."""
    if stopped is not None:
        return 3, stopped
    error = next((m for m in map(_ERROR.match, (ln.strip() for ln in reversed(lines))) if m), None)
    if returncode in (0, 1):
        return returncode, ""
    if returncode in (2, 3):
        return returncode, error.group(2) if error else f"exit {returncode} (no error line; see the log)"
    if returncode is not None and returncode < 0:
        return 3, f"crashed: killed by signal {signal.Signals(-returncode).name}"
    detail = f": {error.group(0)}" if error else ""
    return 3, f"the job's process exited with {returncode}{detail}"


def _tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()
