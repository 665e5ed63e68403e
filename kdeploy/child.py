"""The one child-process runner: a job file in, a result file out, crashes and hangs contained.

Runtimes (`kdeploy.runtimes.worker`) and TFMOT (`kdeploy.compress.tfmot_worker`) both run
this way: the parent writes `job.json`, runs `python -m MODULE job.json` with a timeout, relays
the child's `PROGRESS ...` lines and reads `result.json`. A crash (signal), a timeout, a non-zero
exit or an `{"error": ...}` result raise ChildFailure with a one-line reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn

from kdeploy.util import exit_now

PROGRESS_PREFIX = "PROGRESS "
# numpy asks the kernel to back every array of 4 MB or more with transparent huge pages (madvise). Where the
# kernel compacts memory to serve such a request (THP defrag "madvise", a common default), each fresh large
# array stalls on it: the tensor dump of MobileNetV2-224 (float + int8, 9 samples, ~450 MB of layer outputs)
# took 6.4-7.9 s with it and 2.2-2.8 s without (same result). kdeploy's processes make many short-lived large
# arrays and keep none long enough to gain from huge pages. A value the user set wins.
PROCESS_ENV = {"NUMPY_MADVISE_HUGEPAGE": "0"}


class ChildFailure(Exception):
    """The child crashed, hung or raised; the message says which and how."""


def run_child(module: str, job: dict, job_dir: Path, *, timeout_s: float, what: str,
              on_progress: Callable[[str], None] | None = None, timeout_hint: str = "",
              subject: str | None = None, on_start: Callable[[subprocess.Popen], None] | None = None,
              nice: int = 0) -> dict:
    """Runs `python -m module job.json` in `job_dir` and returns its result dict.

    Args:
        module: the child's module (it writes `result.json` beside the job file).
        job: JSON-serializable job.
        job_dir: folder for job.json, result.json and the child's stderr log.
        timeout_s: the child is killed after this many seconds.
        what: how failures name the child (e.g. "litert", "the TFMOT child process").
        on_progress: called with the text of each `PROGRESS ...` line the child prints.
        timeout_hint: appended to the timeout message (e.g. which setting to raise).
        subject: what the child worked on, named when it crashes (e.g. the artifact's file name).
        on_start: called with the child's Popen once it runs (so another thread can stop it).
        nice: added to the child's niceness at its start (a lower CPU priority: its threads, created
            later, inherit it), for work that should take only what the rest leaves idle.

    Raises:
        ChildFailure: crash, timeout, non-zero exit or a reported exception.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file = job_dir / "job.json"
    job_file.write_text(json.dumps(job))
    result_file = job_dir / "result.json"
    result_file.unlink(missing_ok=True)
    log = job_dir / "stderr.log"
    env = {**PROCESS_ENV, **os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    killed = threading.Event()
    with open(log, "wb") as err:
        proc = _forked(module, job_file, err, env, nice)
        if proc is None:
            proc = subprocess.Popen([sys.executable, "-m", module, str(job_file)], stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=env)
            if nice:
                try:
                    os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)
                except OSError:  # not permitted here: the child runs at this process' priority
                    pass
        if on_start is not None:
            on_start(proc)

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            tail = []
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    if on_progress:
                        on_progress(line[len(PROGRESS_PREFIX):].rstrip())
                elif line.strip():
                    tail = [line.strip()]
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
            proc.stdout.close()
    if killed.is_set():
        raise ChildFailure(f"{what} did not finish within {timeout_s:.0f} s (killed{timeout_hint})")
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = str(-proc.returncode)
        raise ChildFailure(f"{what} crashed with signal {-proc.returncode} ({sig})" + (f" on {subject}" if subject else ""))
    if proc.returncode != 0 or not result_file.is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] or tail
        raise ChildFailure(f"{what} failed (exit {proc.returncode}): {lines[-1][:300] if lines else 'no output'}")
    result = json.loads(result_file.read_text())
    if "error" in result:
        raise ChildFailure(f"{what} raised {result['error']}")
    return result


def _forked(module: str, job_file: Path, err, env: dict, nice: int):
    """The child as a fork of the fork server (`kdeploy.forkserver`: its modules imported already), or None where
    the server does not run `module` or cannot start (then the caller starts `python -m module`)."""
    from kdeploy.forkserver import SERVER

    r, w = os.pipe()
    try:
        proc = SERVER.spawn(module, str(job_file), w, err.fileno(), env, nice)
    finally:
        os.close(w)
    if proc is None:
        os.close(r)
        return None
    proc.stdout = os.fdopen(r, "r", errors="replace")
    return proc


def child_main(argv: list[str], run: Callable[[dict], dict]) -> NoReturn:
    """The child's side: reads the job, runs it, writes `result.json` (an exception becomes `{"error": ...}`), exits 0.

    The exit skips the interpreter's teardown (`util.exit_now`): the parent waits for this
    process, and a TensorFlow child's teardown took over a second.
    """
    job_file = Path(argv[0])
    job = json.loads(job_file.read_text())
    try:
        result = run(job)
    except Exception as e:  # reported to the parent as data, not a traceback on its console
        result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}
        if os.environ.get("KDEPLOY_DEBUG"):
            import traceback

            traceback.print_exc()
    (job_file.parent / "result.json").write_text(json.dumps(result, default=float))
    exit_now(0)


def progress(text: str) -> None:
    """Child side: one progress line for the parent.

    It starts on a line of its own: converters print to fd 1 from C++ without a final newline,
    and a progress line glued to that text was not recognised (the lane's float16 lines went
    missing that way).
    """
    print("\n" + PROGRESS_PREFIX + text, flush=True)
