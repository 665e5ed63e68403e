"""Runtimes that execute artifacts. Adding one: a module with a Runner + one registry line."""

from __future__ import annotations

from kdeploy.runtimes.base import Runner


def runner_for(runtime: str, artifact, threads: int = 1) -> Runner:
    """Returns the runner of `runtime` for `artifact` (not yet entered)."""
    from kdeploy.runtimes.litert import LiteRTRunner
    from kdeploy.runtimes.onnxrt import OnnxRuntimeRunner
    from kdeploy.runtimes.tflm import TFLMRunner

    registry = {
        "litert": LiteRTRunner,
        "onnxruntime": OnnxRuntimeRunner,
        "tflm": TFLMRunner,
    }
    return registry[runtime](artifact, threads=threads)


# runtime name -> artifact format it runs. One line per runtime.
RUNTIME_FORMATS: dict[str, str] = {
    "litert": "tflite",
    "onnxruntime": "onnx",
    "tflm": "tflite",
}
