"""Exporters: each writes one artifact file and returns an `Artifact` describing it."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Artifact:
    """One exported file, how to feed it, and what it is.

    `io` maps the model's inputs to the artifact's tensor names and lists the artifact's output
    names in model output order, so every runner feeds and reads it the same way.
    """

    format: str  # "tflite" | "onnx"
    path: Path
    precision: str
    source: str  # how it was produced, e.g. "tflite-converter", "tf2onnx(tflite)"
    io: dict = field(default_factory=dict)
    size_bytes: int = 0
    gzip_bytes: int = 0
    sha256: str = ""

    def measure(self) -> "Artifact":
        data = self.path.read_bytes()
        self.size_bytes = len(data)
        self.gzip_bytes = len(gzip.compress(data, compresslevel=6, mtime=0))
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self


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


@contextlib.contextmanager
def native_quiet():
    """Silences what converters print from C++ to file descriptor 2 (and their Python warnings).

    The chatter ("fully_quantize: 0, inference_type: 6 ...") is kept and re-emitted only when
    KDEPLOY_DEBUG is set; errors still surface as exceptions.
    """
    if os.environ.get("KDEPLOY_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
