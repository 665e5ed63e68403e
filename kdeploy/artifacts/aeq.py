"""Static int8 with Google's LiteRT Quantizer (`ai-edge-quantizer`, the `quantizer` extra): range estimators.

The quantizer reads the fp32 `.tflite` and calibrates by running it on LiteRT with every tensor
kept; its ranges for activations are a moving average (smoothing 0.95) of each sample's min/max
(`qsv_utils.moving_average_update`), where the TFLite converter takes the min and max over all
samples, which one outlier sample stretches. Its other algorithms (OCTAV, MSE) choose the ranges
of *weights* only: for activations they fall back to min/max (`octav.py`, `mse.py`,
`get_tensor_quant_params` with no tensor content). Here one calibration pass keeps each sample's
min/max per tensor (`collect`), and each method derives its ranges from them (`quantize`):

- moving-average: the quantizer's own update, replayed over the samples in order;
- mean-min-max: the mean of the samples' min and max (NNCF's MeanMinMax);
- octav: moving-average ranges, the weights of CONV_2D, FULLY_CONNECTED, ... (`WEIGHT_OPS`) clipped by
  OCTAV (it refuses the asymmetric constants of MUL/ADD, e.g. an unfolded BatchNormalization).

The graph's inputs and outputs stay float (`NO_QUANTIZE` on INPUT/OUTPUT: a QUANTIZE op after
the input, a DEQUANTIZE before each output), as in the converter's int8. A DEQUANTIZE the
quantizer puts before a SHAPE op (it has no int8 SHAPE; Keras' Flatten with a dynamic batch
reads one) is removed, SHAPE reading the int8 tensor as in the converter's int8 (`tidy`); any
other float tensor inside the graph fails the method (`NotFullInteger`): the candidate must be
full int8.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from kdeploy.artifacts import Artifact
from kdeploy.errors import ConversionError
from kdeploy.util import first_error_line, native_quiet

METHODS = ("moving-average", "mean-min-max", "octav")
EXTRA = "pip install 'kdeploy[quantizer]' (ai-edge-quantizer 0.10)"
SIGNATURE = "serving_default"
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE")


class NotFullInteger(ConversionError):
    """The quantizer left float tensors inside the graph (ops it has no int8 kernel for)."""


def missing() -> str | None:
    """Why the quantizer methods cannot run (the extra is not installed), or None."""
    try:
        import ai_edge_quantizer  # noqa: F401
    except ImportError as e:
        return f"ai-edge-quantizer is not installed ({first_error_line(e)}); {EXTRA}"
    return None


def _quantizer(float_bytes: bytes, algorithm: str | None = None):
    """A Quantizer with static int8 (8-bit activations, 8-bit channelwise weights) on every op, I/O float."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    qt = quantizer.Quantizer(float_bytes)
    names, ops = algorithm_manager.AlgorithmName, qtyping.TFLOperationName
    qt.add_static_config(".*", ops.ALL_SUPPORTED, 8, 8)
    if algorithm is not None:  # the weights of these ops only: OCTAV refuses asymmetric (activation-like) constants
        for op in WEIGHT_OPS:
            qt.add_static_config(".*", getattr(ops, op), 8, 8, algorithm_key=algorithm)
    for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
        qt.update_quantization_recipe(regex=".*", operation_name=op, algorithm_key=names.NO_QUANTIZE)
    return qt


def collect(float_bytes: bytes, calibration: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each tensor's min and max on each calibration sample (tensor name -> (mins, maxs), samples first).

    Args:
        calibration: the float model's serving-signature input name -> (N, ...) array, fed one sample at a time.

    Raises:
        ConversionError: the quantizer failed to calibrate.
    """
    from ai_edge_quantizer import calibrator, recipe_manager

    def keep(old: dict, new: dict) -> dict:  # the calibrator's update of a tensor's statistics, once per sample
        seen = old.get("samples") or [(old["min"], old["max"])]
        seen.append((new["min"], new["max"]))
        return {"min": np.minimum(old["min"], new["min"]), "max": np.maximum(old["max"], new["max"]), "samples": seen}

    n = len(next(iter(calibration.values())))
    feeds = [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(n)]
    try:
        rm = recipe_manager.RecipeManager()
        rm.load_quantization_recipe(_quantizer(float_bytes).get_quantization_recipe())
        with native_quiet(), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar writes to sys.stderr
            cal = calibrator.Calibrator(float_bytes, num_threads=1, qsv_update_func=keep)
            cal.calibrate({SIGNATURE: feeds}, rm)
        qsvs = cal.get_model_qsvs()
    except Exception as e:
        raise ConversionError(f"ai-edge-quantizer calibration failed: {first_error_line(e)}") from e
    out = {}
    for name, q in qsvs.items():
        seen = q.get("samples") or [(q["min"], q["max"])]
        out[name] = (np.stack([np.asarray(s[0]) for s in seen]), np.stack([np.asarray(s[1]) for s in seen]))
    return out


def ranges(stats: dict[str, tuple[np.ndarray, np.ndarray]], method: str) -> dict[str, dict[str, np.ndarray]]:
    """Each tensor's range (the quantizer's {"min", "max"}) by `method` from the per-sample statistics."""
    from ai_edge_quantizer.utils import qsv_utils

    out = {}
    for name, (mins, maxs) in stats.items():
        if method == "mean-min-max":
            out[name] = {"min": mins.mean(axis=0), "max": maxs.mean(axis=0)}
            continue
        q: dict = {}
        for lo, hi in zip(mins, maxs):  # the quantizer's own update, sample by sample
            q = qsv_utils.moving_average_update(q, {"min": lo, "max": hi})
        out[name] = q
    return out


def quantize(float_path: Path, stats: dict[str, tuple[np.ndarray, np.ndarray]], method: str, out_path: Path,
             input_names: list[str], signature_outputs: list[str]) -> Artifact:
    """The full int8 `.tflite` of `method` (one of METHODS), float I/O, written to `out_path`.

    Raises:
        NotFullInteger: float tensors remain inside the graph (named in the message).
        ConversionError: the quantizer failed.
    """
    from ai_edge_quantizer import algorithm_manager

    algorithm = algorithm_manager.AlgorithmName.OCTAV if method == "octav" else None
    try:
        qt = _quantizer(float_path.read_bytes(), algorithm)
        with native_quiet(), contextlib.redirect_stderr(io.StringIO()):
            data = bytes(qt.quantize(ranges(stats, method), enable_progress_report=False).quantized_model)
        data = tidy(data)
    except Exception as e:
        raise ConversionError(f"ai-edge-quantizer {method} failed: {first_error_line(e)}") from e
    floats = float_ops(data)
    if floats:
        raise NotFullInteger(f"ai-edge-quantizer left float tensors inside the graph (ops {', '.join(floats)}), "
                             "so it is not full int8")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return Artifact(format="tflite", path=out_path, precision="int8", source=f"ai-edge-quantizer({method})",
                    io={"inputs": {k: k for k in input_names}, "outputs": list(signature_outputs)}).measure()


def float_ops(data: bytes) -> list[str]:
    """The ops (sorted, once each) that read or write a float activation inside the graph, edges excepted."""
    from kdeploy.artifacts.flatbuffer import read_tflite

    g = read_tflite(data)
    edge = set(g.inputs) | set(g.outputs)

    def inner_float(i: int) -> bool:
        t = g.tensors[i]
        return i >= 0 and i not in edge and t.dtype == "float32" and not t.constant

    found = set()
    for op in g.ops:
        if op.name in ("QUANTIZE", "DEQUANTIZE") and (set(op.inputs) | set(op.outputs)) & edge:
            continue  # the float I/O's own conversions
        if any(inner_float(i) for i in [*op.inputs, *op.outputs]):
            found.add(op.name)
    return sorted(found)


def tidy(data: bytes) -> bytes:
    """The quantizer's graph made like the converter's int8 where it differs needlessly.

    - A DEQUANTIZE whose every reader is a SHAPE op is removed, SHAPE reading the int8 tensor:
      SHAPE depends on the shape alone, and LiteRT's SHAPE takes int8 (the converter's int8 does so).
    - Every operator code carries its op in both fields, as the converter writes them: the quantizer
      sets only `deprecated_builtin_code` on the ops it adds, and readers of `builtin_code` (tf2onnx)
      take its QUANTIZE and DEQUANTIZE for ADD (code 0): the ONNX twin then failed ("creating a circle
      in the graph", "Add has input size 1").
    - Constants the quantizer stored after the flatbuffer (`Buffer.offset`, on models of a few MB)
      are moved inside it, as the repacked flatbuffer's offsets change (a model past the
      flatbuffer's 2 GB limit fails to repack: a ConversionError).
    - The QUANTIZE and DEQUANTIZE outputs the quantizer adds lack the `shape_signature` (dynamic
      batch) of the tensor they convert: LiteRT does not mind, but the ONNX twin got a fixed batch
      of 1 ("Input shape:{64,8,8,1}, requested shape:{1,1,8,8}" on a batch of 64). It is copied.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT.InitFromPackedBuf(bytearray(data), 0)
    for buf in m.buffers or []:  # the quantizer writes large models' constants after the flatbuffer: inline them
        if buf.offset > 1:
            buf.data = np.frombuffer(data, np.uint8, count=buf.size, offset=buf.offset)
            buf.offset = buf.size = 0
    code = {i: max(c.builtinCode, c.deprecatedBuiltinCode) for i, c in enumerate(m.operatorCodes)}
    for i, c in enumerate(m.operatorCodes):  # both fields, as the converter writes them
        c.builtinCode = code[i]
        c.deprecatedBuiltinCode = min(code[i], fb.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    quantize, dequantize, shape = fb.BuiltinOperator.QUANTIZE, fb.BuiltinOperator.DEQUANTIZE, fb.BuiltinOperator.SHAPE
    for sg in m.subgraphs:
        outputs = {int(i) for i in (sg.outputs if sg.outputs is not None else [])}
        readers: dict[int, list] = {}
        for op in sg.operators:
            for i in op.inputs if op.inputs is not None else []:
                readers.setdefault(int(i), []).append(op)
        for op in sg.operators:  # the tensors the quantizer adds get the dynamic shape of the one they convert
            if code[op.opcodeIndex] in (quantize, dequantize) and op.outputs is not None and len(op.outputs) == 1:
                src, out = sg.tensors[int(op.inputs[0])], sg.tensors[int(op.outputs[0])]
                if out.shapeSignature is None and src.shapeSignature is not None:
                    out.shapeSignature = src.shapeSignature
        keep = []
        for op in sg.operators:
            if code[op.opcodeIndex] != dequantize or op.outputs is None or len(op.outputs) != 1:
                keep.append(op)
                continue
            src, out = int(op.inputs[0]), int(op.outputs[0])
            users = readers.get(out, [])
            if users and out not in outputs and all(code[u.opcodeIndex] == shape for u in users):
                for u in users:
                    u.inputs = [src if int(i) == out else int(i) for i in u.inputs]
                continue
            keep.append(op)
        sg.operators = keep
    b = flatbuffers.Builder(len(data) + 1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())
