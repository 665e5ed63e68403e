"""A fork server for the runtime children: imports once, forks a fresh process per job.

A runtime child (`kdeploy.runtimes.worker`, `kdeploy.debug.tensors`) spent ~0.35 s of CPU starting
Python and importing numpy, LiteRT and ONNX Runtime before its job, and a MobileNetV2 run whose full
int8 fails starts ~20 of them (fidelity runs, the repair's tries, probes, tensor dumps, timing).
This server (`python -m kdeploy.forkserver FD`, started once per kdeploy process, on first use)
imports them once; each job is `os.fork()` of it, so a child is still a process of its own (a crash
or a hang costs only its job, its memory goes with it, `nice` and `kill` work as before) that starts
in milliseconds. It never imports TensorFlow; children that need it (the conversion lane, TFMOT) are
started as before (`kdeploy.child`).

Protocol (an AF_UNIX SOCK_SEQPACKET pair; one JSON message each):
  parent -> server: {"id", "module", "job", "cwd", "env", "nice"} with two fds: the child's stdout
                    (a pipe the parent reads) and its stderr (the job's log file);
  server -> parent: {"id", "pid"} once forked (or {"id", "error"}), {"pid", "status"} when it exited
                    (`status` as `os.waitpid` gives it).
When the parent's end closes (it exited or was killed), the server kills its children and exits.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

FORKED = ("kdeploy.runtimes.worker", "kdeploy.debug.tensors")  # the modules a forked child may run
PRELOAD = ("numpy", "ai_edge_litert.interpreter", "onnxruntime", *FORKED)
MAX_MESSAGE = 1 << 20  # a request carries the environment: well below this


class Server:
    """The parent's side: starts the server process on first use; `spawn` forks a child of it.

    Thread-safe (the runs made ahead and the selective tries start children from threads). When the
    server cannot start or dies, `spawn` returns None and the caller starts the child itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc = None
        self._dead = False
        self._next = 0
        self._replies: dict[int, Any] = {}
        self._forked: dict[int, "ForkedChild"] = {}
        self._exited: dict[int, int] = {}  # exit statuses that came before their child's handle
        self._cond = threading.Condition(self._lock)

    def spawn(self, module: str, job_file: str, stdout_fd: int, stderr_fd: int, env: dict[str, str],
              nice: int = 0) -> "ForkedChild | None":
        """Forks a child running `python -m module job_file` as the server's fork, with `env`, this process'
        folder and `nice` added to its niceness; None where the server does not run `module` or is not running."""
        if module not in FORKED or os.name != "posix" or os.environ.get("KDEPLOY_NO_FORKSERVER"):
            return None
        with self._lock:
            if self._dead or (self._sock is None and not self._start()):
                return None
            rid = self._next
            self._next += 1
            msg = json.dumps({"id": rid, "module": module, "job": job_file, "cwd": os.getcwd(),
                              "env": env, "nice": nice}).encode()
            try:
                socket.send_fds(self._sock, [msg], [stdout_fd, stderr_fd])
            except OSError:
                self._dead = True
                return None
            while rid not in self._replies and not self._dead:
                self._cond.wait()
            reply = self._replies.pop(rid, None)
            if reply is None or "pid" not in reply:
                return None
            child = ForkedChild(reply["pid"])
            self._forked[child.pid] = child
            if child.pid in self._exited:
                child._done(self._exited.pop(child.pid))
            return child

    def warm(self) -> None:
        """Starts the server now (its imports take a core the caller leaves idle, as it loads a model), where
        `spawn` would use it."""
        if os.name != "posix" or os.environ.get("KDEPLOY_NO_FORKSERVER"):
            return
        with self._lock:
            if not self._dead and self._sock is None:
                self._start()

    def _start(self) -> bool:
        import subprocess

        parent, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "kdeploy.forkserver", str(theirs.fileno())],
                                          pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            self._dead = True
            parent.close()
            return False
        finally:
            theirs.close()
        self._sock = parent
        threading.Thread(target=self._read, name="kdeploy-forkserver", daemon=True).start()
        return True

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            with self._lock:
                if not data:  # the server died: every child it started is lost to us
                    self._dead = True
                    for child in list(self._forked.values()):
                        child._done(None)
                    self._forked.clear()
                    self._cond.notify_all()
                    return
                msg = json.loads(data)
                if "id" in msg:
                    self._replies[msg["id"]] = msg
                else:
                    child = self._forked.pop(msg["pid"], None)
                    if child is None:
                        self._exited[msg["pid"]] = msg["status"]
                    else:
                        child._done(msg["status"])
                self._cond.notify_all()


class ForkedChild:
    """What `kdeploy.child.run_child` uses of a Popen, for a child of the fork server."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = None  # the parent's end of the child's stdout (`kdeploy.child` sets it)
        self._exited = threading.Event()

    def _done(self, status: int | None) -> None:
        # None: the server died without telling; counted as killed (SIGKILL), so the caller reports a crash
        self.returncode = -signal.SIGKILL if status is None else os.waitstatus_to_exitcode(status)
        self._exited.set()

    def wait(self, timeout: float | None = None) -> int | None:
        self._exited.wait(timeout)
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if not self._exited.is_set():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:  # gone already
                pass


SERVER = Server()


# ---- the server process ---------------------------------------------------------------------------------------

def _serve(fd: int) -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a runtime that is not installed is imported (and fails) in the child
            pass
    import gc

    gc.collect()
    gc.freeze()  # a child's collections leave the imported objects (and their pages, shared with this process) alone
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the jobs; this ends with it
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()
    import select

    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        while children:  # reap every child that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            _send(sock, {"pid": pid, "status": status})
        if sock in ready:
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
            except OSError:
                data, fds = b"", []
            if not data:  # the parent is gone: so are its jobs
                for pid in children:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                os._exit(0)
            req = json.loads(data)
            try:
                pid = os.fork()
            except OSError as e:
                _send(sock, {"id": req["id"], "error": str(e)})
                for f in fds:
                    os.close(f)
                continue
            if pid == 0:
                sock.close()
                os.close(wake_r)
                os.close(wake_w)
                _child(req, fds)
            children.add(pid)
            for f in fds:
                os.close(f)
            _send(sock, {"id": req["id"], "pid": pid})


def _send(sock: socket.socket, msg: dict) -> None:
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:  # the parent is gone; the next receive ends the server
        pass


def _child(req: dict, fds: list[int]) -> None:
    """In the forked child: the job's environment, folder, priority and streams, then the module as `__main__`."""
    import runpy

    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as an exec'd child has it
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for f in fds:
            os.close(f)
        os.environ.clear()
        os.environ.update(req["env"])
        _numpy_pages()
        os.chdir(req["cwd"])
        if req["nice"]:
            os.nice(req["nice"])
        sys.argv = [req["module"], req["job"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the job's stderr, as an exec'd child would
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _numpy_pages() -> None:
    """numpy read NUMPY_MADVISE_HUGEPAGE when the server imported it: the job's value applies to the child."""
    try:
        from numpy._core import multiarray

        multiarray._set_madvise_hugepage(os.environ.get("NUMPY_MADVISE_HUGEPAGE", "1") != "0")
    except (ImportError, AttributeError):
        pass


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
