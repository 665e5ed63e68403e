"""LiteRT (`ai_edge_litert`) runner, through the model's serving signature."""

from __future__ import annotations

import numpy as np

from kdeploy.runtimes.base import Runner


class LiteRTRunner(Runner):
    name = "litert"
    framework = "ai_edge_litert.interpreter"  # imported before the worker's memory baseline

    def activate_impl(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(self.artifact.path), num_threads=self.threads)
        self.runner = self.interpreter.get_signature_runner("serving_default")
        self.in_details = self.runner.get_input_details()
        self.out_details = self.runner.get_output_details()

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = {}
        for model_name, sig_name in self.artifact.io["inputs"].items():
            args[sig_name] = _quantize(feeds[model_name], self.in_details[sig_name])
        res = self.runner(**args)
        return [_dequantize(res[k], self.out_details[k]) for k in self.artifact.io["outputs"]]

    def deactivate_impl(self) -> None:
        self.runner = self.interpreter = None


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.issubdtype(y.dtype, np.integer) and scale:
        return (y.astype(np.float32) - zero) * scale
    return np.array(y)
