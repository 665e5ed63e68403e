"""TensorFlow Lite for Microcontrollers runner (`pip install tflite-micro`): the MCU interpreter.

It runs the same `.tflite` file a microcontroller would, with TFLM's kernels, one sample per
`invoke()` (TFLM does not resize tensors: `static_batch` 1, so `Runner.infer` feeds the samples
one by one), single-threaded. Its recording allocator reports the tensor arena the model needs:
the RAM figure of an `mcu` target. TFLM reports problems (an op it lacks, a hybrid kernel) by
printing from C, so construction and the first `invoke()` run with file descriptors 1 and 2
captured, and what was printed becomes the exception message.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from kdeploy.runtimes.base import Runner
from kdeploy.runtimes.quant import dequantize, quantize

# Host memory handed to TFLM; it records what it actually uses, which is the figure reported.
MIN_ARENA_BYTES = 4 << 20


class TFLMRunner(Runner):
    name = "tflm"
    framework = ("tflite_micro.python.tflite_micro.runtime", "ai_edge_litert.schema_py_generated")
    max_threads = 1

    def activate_impl(self) -> None:
        from tflite_micro.python.tflite_micro import runtime

        from kdeploy.artifacts.flatbuffer import read_tflite

        data = Path(self.artifact.path).read_bytes()
        graph = read_tflite(data)
        io = self.artifact.io
        if io.get("signature", "serving_default") is None:  # no SignatureDef: tensor names, in tensor order
            sig = {"inputs": {graph.tensors[t].name: i for i, t in enumerate(graph.inputs)},
                   "outputs": {graph.tensors[t].name: i for i, t in enumerate(graph.outputs)}}
        else:
            sig = graph.signature or {"inputs": {}, "outputs": {}}
        self.in_pos = {m: sig["inputs"].get(s, i) for i, (m, s) in enumerate(io["inputs"].items())}
        self.out_pos = [sig["outputs"].get(s, i) for i, s in enumerate(io["outputs"])]
        self.ops = sorted({op.name for op in graph.ops})
        with capture_fds() as printed:
            try:
                self.it = runtime.Interpreter.from_bytes(data, arena_size=max(10 * len(data), MIN_ARENA_BYTES))
            except Exception as e:
                raise RuntimeError(self._explain(e, printed)) from None
        self.in_details = {p: self.it.get_input_details(p) for p in self.in_pos.values()}
        self.out_details = [self.it.get_output_details(p) for p in self.out_pos]
        self.static_batch = 1  # one sample per invoke(): TFLM does not resize tensors
        self._checked = False

    def _explain(self, e: Exception, printed) -> str:
        text = " ".join(" ".join(printed()).split())
        missing = unsupported_ops(text)
        head = f"TFLite Micro cannot run this model ({e})"
        if missing:
            head += f"; op(s) it does not support here: {', '.join(missing)}"
        return f"{head}: {text[:300]}" if text else head

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One sample (`static_batch` 1: `Runner.infer` feeds a batch sample by sample)."""
        for model_name, pos in self.in_pos.items():
            d = self.in_details[pos]
            x = quantize(feeds[model_name], d["dtype"], *_scale_zero(d))
            self.it.set_input(x.reshape(tuple(d["shape"])), pos)
        if not self._checked:  # the first invoke is where TFLM reports kernel problems
            with capture_fds() as printed:
                try:
                    self.it.invoke()
                except Exception as e:
                    raise RuntimeError(self._explain(e, printed)) from None
            self._checked = True
        else:
            self.it.invoke()
        return [dequantize(self.it.get_output(pos), *_scale_zero(self.out_details[k]))
                for k, pos in enumerate(self.out_pos)]

    def arena_bytes(self) -> int | None:
        """Tensor arena TFLM allocated for this model (after an `invoke()`), from its recording allocator."""
        with capture_fds() as printed:
            self.it.print_allocations()
            text = " ".join(printed())
        m = re.search(r"Arena allocation total (\d+) bytes", text)
        return int(m.group(1)) if m else None

    def deactivate_impl(self) -> None:
        self.it = None


def unsupported_ops(text: str) -> list[str]:
    """Op names TFLM's messages say it could not find or prepare."""
    found = re.findall(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'", text)
    found += re.findall(r"Node ([A-Z0-9_]+) \(number \d+\) failed to (?:prepare|invoke)", text)
    found += re.findall(r"Failed to get registration from op code ([A-Z0-9_]+)", text)
    return list(dict.fromkeys(found))


@contextlib.contextmanager
def capture_fds():
    """Captures what C code writes to file descriptors 1 and 2; yields a function returning the lines so far."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    sink = tempfile.TemporaryFile()

    def lines() -> list[str]:
        _flush_c_stdio()
        sink.seek(0)
        return sink.read().decode(errors="replace").splitlines()

    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
        yield lines
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sink.close()


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass



def _scale_zero(d: dict) -> tuple[float, int]:
    """First (per-tensor) scale and zero point of a TFLM tensor detail, or (0, 0) when not quantized."""
    q = d.get("quantization_parameters") or {}
    scales, zeros = q.get("scales", []), q.get("zero_points", [])
    return (float(scales[0]), int(zeros[0])) if len(scales) else (0.0, 0)
