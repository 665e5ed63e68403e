"""Artifacts: exporters (tflite, onnx, savedmodel), each writing one file and returning an `Artifact`,
and artifact inspection (`flatbuffer`: the one `.tflite` reader; `external`: artifacts built elsewhere)."""

from __future__ import annotations

import gzip
import hashlib
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
    pairing: list[dict] | None = None  # artifacts built elsewhere: how each model output was paired (external.Pairing)

    def measure(self, compressed: bool = True) -> "Artifact":
        """Size, sha256 and (unless `compressed` is False: a file no report shows, such as a search's try, where
        gzip took half a second of MobileNetV2's) gzip size of the file."""
        data = self.path.read_bytes()
        self.size_bytes = len(data)
        self.gzip_bytes = len(gzip.compress(data, compresslevel=6, mtime=0)) if compressed else 0
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self
