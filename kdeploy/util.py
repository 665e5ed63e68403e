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
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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
