"""ONNX exports: fp32 from the TF function, the same quantized artifact from its `.tflite`,
and onnxruntime dynamic quantization."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from kdeploy.errors import ConversionError
from kdeploy.export import Artifact, first_error_line, native_quiet
from kdeploy.loading import LoadedModel, call_keras

OPSET = 17  # tf2onnx 1.17 supports opsets up to 18; 17 is what ORT and tf2onnx were verified on here.


@contextlib.contextmanager
def _quiet():
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), native_quiet():
        yield


def from_model(model: LoadedModel, keras_model: Any, out_path: Path) -> Artifact:
    """fp32 ONNX through `tf2onnx.convert.from_function` with an explicit input signature.

    `from_function` is used rather than `from_keras`, which fails on some Keras 3 models
    (see STACK.md). `keras_model` is the model to convert (None: the loaded SavedModel's
    serving signature).
    """
    import tensorflow as tf
    import tf2onnx

    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in model.inputs]
    if keras_model is not None:
        def call(args):
            return call_keras(keras_model, args, model)
    else:
        sig = model.saved_model.signatures["serving_default"]

        def call(args):
            res = sig(**{t.name: a for t, a in zip(model.inputs, args)})
            return [res[k] for k in model.signature_outputs]

    @tf.function(input_signature=specs)
    def serve(*args):
        return call(list(args))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            proto, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=OPSET, output_path=str(out_path))
    except Exception as e:
        out_path.unlink(missing_ok=True)
        raise ConversionError(f"ONNX fp32 conversion (tf2onnx) failed: {first_error_line(e)}") from e
    return Artifact(
        format="onnx",
        path=out_path,
        precision="fp32",
        source="tf2onnx(function)",
        io={"inputs": {t.name: i.name for t, i in zip(model.inputs, proto.graph.input)},
            "outputs": [o.name for o in proto.graph.output]},
    ).measure()


def from_tflite(tflite: Artifact, out_path: Path) -> Artifact:
    """Converts a `.tflite` (e.g. full int8) to ONNX so the same quantized graph runs on ORT."""
    import tf2onnx
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tflite.path)).get_signature_runner("serving_default")
    in_names = {k: d["name"] for k, d in runner.get_input_details().items()}
    out_details = runner.get_output_details()
    out_names = [out_details[k]["name"] for k in tflite.io["outputs"]]
    try:
        with _quiet():
            tf2onnx.convert.from_tflite(str(tflite.path), opset=OPSET, output_path=str(out_path))
        _check_loads(out_path)
    except Exception as e:
        out_path.unlink(missing_ok=True)
        raise ConversionError(f"ONNX from {tflite.precision} TFLite failed: {first_error_line(e)}") from e
    return Artifact(
        format="onnx",
        path=out_path,
        precision=tflite.precision,
        source="tf2onnx(tflite)",
        io={"inputs": in_names, "outputs": out_names},
    ).measure()


def quantize_dynamic(fp32: Artifact, out_path: Path) -> Artifact:
    """onnxruntime dynamic quantization (int8 weights, activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

    try:
        ort_quantize_dynamic(str(fp32.path), str(out_path), weight_type=QuantType.QInt8)
        _check_loads(out_path)
    except Exception as e:
        out_path.unlink(missing_ok=True)
        raise ConversionError(f"onnxruntime dynamic quantization failed: {first_error_line(e)}") from e
    return Artifact(format="onnx", path=out_path, precision="dynamic", source="onnxruntime.quantize_dynamic", io=dict(fp32.io)).measure()


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
