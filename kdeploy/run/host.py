"""The host a run measured on: CPU, cores, OS, Python and library versions (read once per run)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("tensorflow", "keras", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnx",
             "onnxruntime", "ai-edge-litert", "numpy")


def describe_host() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(), "python": platform.python_version(), "libraries": versions}
