"""Small helpers shared across layers (no ML framework imports): hashing, converter output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tomllib
import tempfile
import warnings
from pathlib import Path
from typing import NoReturn


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# The cause inside long converter / runtime messages, which name the failing node first (node
# names of fused ops run to hundreds of characters): said first, so no cut-off hides it.
_CAUSES = re.compile(r"No Op registered for \S+ with domain_version of \d+|Unsupported ops: Counter\([^)]*\)"
                     r"|Select TensorFlow op\(s\)[^.]*")


def first_error_line(e: BaseException, limit: int = 300) -> str:
    """The most telling line of a converter exception (they are often pages long), its cause first."""
    text = str(e) or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error:" in ln.lower() or "not supported" in ln.lower()),
                lines[0] if lines else type(e).__name__)
    cause = _CAUSES.search(text)
    if cause and cause.group(0) not in line[:limit]:
        return f"{cause.group(0)}: {line}"[:limit]
    return line[:limit]


# Signals that arrived during native work, raised when it ends (see `native_section`).
_native_depth = 0
_deferred: list[BaseException] = []


def in_native_section() -> bool:
    """True while TensorFlow / converter work runs (a signal handler should defer, not raise)."""
    return _native_depth > 0


def defer(exc: BaseException) -> None:
    """Raises `exc` when the outermost `native_section` ends (a signal handler's exception)."""
    if not _deferred:
        _deferred.append(exc)


@contextlib.contextmanager
def native_section():
    """Marks TensorFlow / converter work that an exception must not cut in half.

    A KeyboardInterrupt raised from a signal handler in the middle of tracing or conversion
    leaves TensorFlow's graph state half-built, and its cleanup crashed the process (SIGSEGV,
    seen here under SIGTERM): a signal arriving inside is deferred (`defer`) and raised here,
    once the work is whole again.
    """
    global _native_depth
    _native_depth += 1
    try:
        yield
    finally:
        _native_depth -= 1
    if _native_depth == 0 and _deferred:
        raise _deferred.pop()


@contextlib.contextmanager
def native_quiet():
    """Silences what converters print from C++ to file descriptor 2 (and their Python warnings).

    The chatter ("fully_quantize: 0, inference_type: 6 ...") is kept and re-emitted only when
    KDEPLOY_DEBUG is set; errors still surface as exceptions. The work is a `native_section`.
    """
    if os.environ.get("KDEPLOY_DEBUG"):
        with native_section():
            yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with native_section(), tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 2)
        _real_stderr.append(saved)
        try:
            yield
        finally:
            _real_stderr.remove(saved)
            os.dup2(saved, 2)
            os.close(saved)


_real_stderr: list[int] = []  # while `native_quiet` silences fd 2: a duplicate of the real one


class RealStderr:
    """A text stream onto the real stderr, also while `native_quiet` silences fd 2 in the main thread.

    Progress lines from other threads (the conversion lane's) would otherwise land in the sink
    with the converters' chatter. Outside `native_quiet`, and where `sys.stderr` is not the
    process' own (a test runner's capture), it writes to `sys.stderr` as usual.
    """

    def write(self, text: str) -> int:
        fds = list(_real_stderr)
        if fds and sys.stderr is sys.__stderr__:
            try:
                sys.stderr.flush()
                os.write(fds[0], text.encode(sys.stderr.encoding or "utf-8", "replace"))
                return len(text)
            except OSError:  # closed just now: fd 2 is the real one again
                pass
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()

    @property
    def encoding(self) -> str:
        return sys.stderr.encoding or "utf-8"


def natural_key(s: str) -> list:
    """Sort key that orders embedded numbers numerically (`output_2` before `output_10`)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def release_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc `malloc_trim`; elsewhere only gc).

    Converters free their intermediates, but glibc keeps the freed pages mapped, so a process
    that converts one recipe after another holds the largest intermediates of all of them.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def freeze_heap() -> bool:
    """Moves every object alive now out of the garbage collector's sight (`gc.freeze`) until `gc.unfreeze()`.

    With TensorFlow, Keras and the model loaded, each full collection walked ~0.3 s of objects that
    live as long as the run (8 in a MobileNetV2 run: 2.4 s of the parent's critical path, in
    `release_memory`, besides the automatic ones); frozen, a collection walks only what was made
    since. The caller collects first and calls `gc.unfreeze()` when its work is done (True
    returned). Returns False, freezing nothing, where something in this process froze objects
    already (it owns the frozen set).
    """
    import gc

    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def one_line(e: object, limit: int = 300) -> str:
    """An exception's (or any text's) message on one line, at most `limit` characters."""
    return " ".join(str(e).split())[:limit]


def read_toml(path: Path, what: str, error: type[Exception], not_found: str) -> dict:
    """Parses a TOML file; each way it can fail is one `error` line naming the file.

    Args:
        what: how messages name the file (e.g. "profile", "manifest").
        not_found: the message for a missing file (it says what is allowed).
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(not_found) from None
    except UnicodeDecodeError as e:
        raise error(f"cannot read {what} {path}: not UTF-8 text (byte {e.start}); allowed: a TOML file") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or type(e).__name__}; allowed: a readable TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{what} {path} is not valid TOML: {one_line(e)}") from None


def exit_now(code: int) -> NoReturn:
    """Ends the process with `code` once everything is written, without tearing the interpreter down.

    TensorFlow's teardown (module finalization, then its C++ static destructors) took 1.2-1.5 s
    after the last line here, in every process that imported it, and a child's teardown is on
    its parent's critical path. `atexit` handlers still run (libraries flush there); every file
    kdeploy writes is closed by its owner before this.
    """
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
