"""Runtimes that execute artifacts: one registry line per runtime (format it runs, its Runner).

Adding a runtime: a module with a Runner subclass + one line in RUNTIMES. The profile's allowed
runtimes, the format each runtime runs and which runner executes it all come from this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from kdeploy.runtimes.base import Runner


@dataclass(frozen=True)
class RuntimeSpec:
    format: str  # artifact format it runs: "tflite" | "onnx"
    runner: str  # "module:Class" of its Runner, imported when first used


RUNTIMES: dict[str, RuntimeSpec] = {
    "litert": RuntimeSpec("tflite", "kdeploy.runtimes.litert:LiteRTRunner"),
    "onnxruntime": RuntimeSpec("onnx", "kdeploy.runtimes.onnxrt:OnnxRuntimeRunner"),
    "tflm": RuntimeSpec("tflite", "kdeploy.runtimes.tflm:TFLMRunner"),
}
# runtime name -> artifact format it runs (derived from RUNTIMES).
RUNTIME_FORMATS: dict[str, str] = {name: spec.format for name, spec in RUNTIMES.items()}


def runner_class(runtime: str) -> type[Runner]:
    """The Runner class of `runtime` (its class attributes, e.g. `max_threads`, need no artifact)."""
    module, _, cls = RUNTIMES[runtime].runner.partition(":")
    return getattr(importlib.import_module(module), cls)


def runner_for(runtime: str, artifact, threads: int = 1) -> Runner:
    """Returns the runner of `runtime` for `artifact` (not yet entered)."""
    return runner_class(runtime)(artifact, threads=threads)
