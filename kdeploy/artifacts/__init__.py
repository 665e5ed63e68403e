"""Artifacts: exporters (tflite, onnx, savedmodel), each writing one file and returning an `Artifact`,
and artifact inspection (`flatbuffer`: the one `.tflite` reader; `external`: artifacts built elsewhere)."""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_gzip_pool: ThreadPoolExecutor | None = None
_gzip_pool_lock = threading.Lock()
_gzip_here = True  # False in a process whose artifacts another process adopts and measures (`gzip_elsewhere`)


def gzip_elsewhere() -> None:
    """This process' artifacts go to another process, which measures their gzip size (`Artifact.measure_gzip`).

    The conversion lane's child: reporting an artifact waits for its gzip size, and gzip -6 of
    MobileNetV2-224's float16 ONNX twin takes 2.4 s (its half-float weights make zlib search hard;
    0.45 s for the fp32 one): the lane's end, which the per-layer errors of a failing int8 wait
    for, came that much later. The parent measures them on its gzip thread instead.
    """
    global _gzip_here
    _gzip_here = False


def _gzip_later(data: bytes) -> Future:
    """The gzip size of `data`, computed on a thread of its own at the lowest CPU priority: zlib releases the GIL,
    so the half second it takes on a 13 MB `.tflite` runs on what the conversions and runs that follow leave idle
    instead of before them (2.4 s on MobileNetV2-224's float16 ONNX twin, which beside the per-layer dump of a
    failing int8 at the same priority slowed it down)."""
    global _gzip_pool
    with _gzip_pool_lock:
        if _gzip_pool is None:
            _gzip_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdeploy-gzip",
                                            initializer=_lowest_priority)
    return _gzip_pool.submit(lambda: len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)))


def _lowest_priority() -> None:
    """The calling thread's nice value to 19 (Linux: each thread has its own; elsewhere nothing changes)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


GZIP_LEVEL = 6  # gzip's own default (`gzip -6`): the size a download or OTA update of the file costs


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
        gzip took half a second of MobileNetV2's) gzip size of the file; `gzip_bytes` is computed beside the
        caller's next step and waited for when first read."""
        data = self.path.read_bytes()
        self.size_bytes = len(data)
        self.gzip_bytes = _gzip_later(data) if compressed and _gzip_here else 0
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self

    def measure_gzip(self) -> "Artifact":
        """The gzip size of a file another process made (`gzip_elsewhere`), computed as `measure` does."""
        self.gzip_bytes = _gzip_later(self.path.read_bytes())
        return self


def _get_gzip_bytes(self: Artifact) -> int:
    value = self.__dict__["_gzip_bytes"]
    if isinstance(value, Future):
        value = self.__dict__["_gzip_bytes"] = value.result()
    return value


def _set_gzip_bytes(self: Artifact, value: "int | Future") -> None:
    self.__dict__["_gzip_bytes"] = value


# `gzip_bytes` stays a dataclass field (constructor argument, asdict, equality); reading it waits for a pending size
Artifact.gzip_bytes = property(_get_gzip_bytes, _set_gzip_bytes, doc=f"gzip -{GZIP_LEVEL} size of the file in bytes (0: not measured)")
