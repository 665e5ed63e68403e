"""ONNX Runtime (CPU) runner."""

from __future__ import annotations

import numpy as np

from kdeploy.runtimes.base import Runner


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    framework = "onnxruntime"  # imported before the worker's memory baseline

    def activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.artifact.path), opts, providers=["CPUExecutionProvider"])
        self.in_types = {i.name: i.type for i in self.session.get_inputs()}
        batch = {i.shape[0] if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 else None
                 for i in self.session.get_inputs()}
        self.static_batch = batch.pop() if len(batch) == 1 else None

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = {}
        for model_name, onnx_name in self.artifact.io["inputs"].items():
            args[onnx_name] = feeds[model_name].astype(_NP_TYPES.get(self.in_types[onnx_name], np.float32), copy=False)
        return self.session.run(self.artifact.io["outputs"], args)

    def deactivate_impl(self) -> None:
        self.session = None


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
