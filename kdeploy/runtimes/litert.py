"""LiteRT (`ai_edge_litert`) runner, through the model's serving signature."""

from __future__ import annotations

import numpy as np

from kdeploy.runtimes.base import Runner
from kdeploy.runtimes.quant import dequantize, quantize


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
            d = self.in_details[sig_name]
            args[sig_name] = quantize(feeds[model_name], d["dtype"], *d["quantization"])
        res = self.runner(**args)
        return [dequantize(res[k], *self.out_details[k]["quantization"]) for k in self.artifact.io["outputs"]]

    def deactivate_impl(self) -> None:
        self.runner = self.interpreter = None

