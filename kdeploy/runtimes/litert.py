"""LiteRT (`ai_edge_litert`) runner: through the artifact's signature, or its tensors where it has none.

`io["signature"]` names the SignatureDef to call (absent: `serving_default`, as kdeploy's own
`.tflite` files have); None means the file has none (many `.tflite` files from elsewhere), and the
primary subgraph's input and output tensors are fed and read by name (`set_tensor` / `invoke` /
`get_tensor`), resized when the batch dimension is dynamic.
"""

from __future__ import annotations

import numpy as np

from kdeploy.runtimes.base import Runner
from kdeploy.runtimes.quant import dequantize, quantize


class LiteRTRunner(Runner):
    name = "litert"
    framework = "ai_edge_litert.interpreter"  # imported before the worker's memory baseline

    def __init__(self, artifact, threads: int = 1, **interpreter_options):
        super().__init__(artifact, threads)
        self.interpreter_options = interpreter_options  # more Interpreter(...) keywords (the tensor dump's)

    def activate_impl(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(self.artifact.path), num_threads=self.threads,
                                       **self.interpreter_options)
        signature = self.artifact.io.get("signature", "serving_default")
        if signature is not None:
            self.runner = self.interpreter.get_signature_runner(signature)
            self.in_details = self.runner.get_input_details()
            self.out_details = self.runner.get_output_details()
        else:
            self.runner = None
            self.interpreter.allocate_tensors()
            self.in_details = {d["name"]: d for d in self.interpreter.get_input_details()}
            self.out_details = {d["name"]: d for d in self.interpreter.get_output_details()}
        batch = {int(d["shape_signature"][0]) if len(d["shape_signature"]) else -1 for d in self.in_details.values()}
        self.static_batch = batch.pop() if len(batch) == 1 and min(batch) > 0 else None

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = {}
        for model_name, tensor in self.artifact.io["inputs"].items():
            d = self.in_details[tensor]
            args[tensor] = quantize(feeds[model_name], d["dtype"], *d["quantization"])
        if self.runner is not None:
            res = self.runner(**args)
            return [dequantize(res[k], *self.out_details[k]["quantization"]) for k in self.artifact.io["outputs"]]
        it = self.interpreter
        resized = False
        for tensor, x in args.items():
            d = self.in_details[tensor]
            if tuple(d["shape"]) != x.shape:
                it.resize_tensor_input(d["index"], list(x.shape))
                resized = True
        if resized:
            it.allocate_tensors()
            self.in_details = {d["name"]: d for d in it.get_input_details()}
        for tensor, x in args.items():
            it.set_tensor(self.in_details[tensor]["index"], x)
        it.invoke()
        return [dequantize(it.get_tensor(self.out_details[k]["index"]), *self.out_details[k]["quantization"])
                for k in self.artifact.io["outputs"]]

    def deactivate_impl(self) -> None:
        self.runner = self.interpreter = None
