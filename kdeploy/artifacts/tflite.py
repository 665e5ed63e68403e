"""TFLite (LiteRT) post-training quantization recipes, converted from the reference SavedModel."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from kdeploy.errors import ConversionError
from kdeploy.recipes import PRECISIONS
from kdeploy.artifacts import Artifact
from kdeploy.util import first_error_line, native_quiet


def _fp32(c, rep):
    pass


def _dynamic(c, rep):
    import tensorflow as tf

    c.optimizations = [tf.lite.Optimize.DEFAULT]


def _fp16(c, rep):
    import tensorflow as tf

    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.target_spec.supported_types = [tf.float16]


def _int8(c, rep):
    import tensorflow as tf

    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def _int16x8(c, rep):
    import tensorflow as tf

    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]


# precision -> converter settings. One line per precision of `kdeploy.recipes.PRECISIONS`
# (which says which of them need calibration data).
SETTINGS: dict[str, Callable] = {
    "fp32": _fp32,
    "dynamic": _dynamic,
    "fp16": _fp16,
    "int8": _int8,
    "int16x8": _int16x8,
}


def _one_sample_at_a_time(calibration: dict[str, np.ndarray] | None):
    """The converter's representative dataset: a fresh generator of one-sample feeds per call."""

    def representative():
        n = len(next(iter(calibration.values())))
        for i in range(n):
            yield {k: v[i : i + 1] for k, v in calibration.items()}

    return representative


def convert(
    saved_model_dir: Path,
    precision: str,
    out_path: Path,
    calibration: dict[str, np.ndarray] | None,
    input_names: list[str],
    signature_outputs: list[str],
    sparse: bool = False,
    calibrated_out: Path | None = None,
    float_model: Path | None = None,
) -> Artifact:
    """Converts the SavedModel with one recipe and writes `out_path`.

    Args:
        calibration: model input name -> (N, ...) arrays, fed one sample at a time to calibrate.
        input_names: the serving signature's input keys (the model input names).
        signature_outputs: the serving signature's output keys, in model output order.
        sparse: also apply `Optimize.EXPERIMENTAL_SPARSITY` (sparse-encoded weight tensors for
            pruned models; smaller fp32 files, while int8 files can grow).
        calibrated_out: int8 only (not sparse): also write the calibrated float model there, which
            `quantize_calibrated` quantizes again with other ops kept float (selective int8) without
            calibrating again. The int8 model is then the converter's calibration followed by its
            own quantizer call (`_quantize_calibrated`), the two halves of `convert()`: same ops,
            tensors and outputs (MobileNetV2-224 here: identical LiteRT outputs).
        float_model: int8 only (not sparse): the fp32 `.tflite` of this SavedModel; the int8 model is then
            calibrated from it (`calibrated`) instead of converting the SavedModel again.

    Raises:
        ConversionError: the converter refused the model with this recipe.
    """
    import tensorflow as tf

    configure = SETTINGS[precision]
    if PRECISIONS[precision].calibration and not calibration:
        raise ConversionError(f"{precision} needs calibration data")
    if precision == "int8" and not sparse and float_model is not None:
        cal = calibrated(float_model, calibration)
        try:
            with native_quiet():
                data = _quantize_calibrated(cal, [])
        except Exception as e:
            raise ConversionError(f"TFLite int8 conversion failed: {first_error_line(e)}") from e
        if calibrated_out is not None:
            calibrated_out.parent.mkdir(parents=True, exist_ok=True)
            calibrated_out.write_bytes(cal)
        return _written(data, out_path, precision, "tflite-converter", input_names, signature_outputs)
    split = calibrated_out is not None and precision == "int8" and not sparse

    representative = _one_sample_at_a_time(calibration)
    try:
        c = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=["serving_default"])
        configure(c, representative)
        if sparse:
            c.optimizations = [*c.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        c._experimental_calibrate_only = split  # noqa: SLF001 - the debugger's documented route to a calibrated model
        with native_quiet():
            data = c.convert()
            if split:
                calibrated_out.parent.mkdir(parents=True, exist_ok=True)
                calibrated_out.write_bytes(data)
                data = _quantize_calibrated(data, [])
    except Exception as e:
        raise ConversionError(f"TFLite {precision} conversion failed: {first_error_line(e)}") from e
    return _written(data, out_path, precision, "tflite-converter(sparsity)" if sparse else "tflite-converter",
                    input_names, signature_outputs)


def _written(data: bytes, out_path: Path, precision: str, source: str, input_names: list[str],
             signature_outputs: list[str]) -> Artifact:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return Artifact(format="tflite", path=out_path, precision=precision, source=source,
                    io={"inputs": {k: k for k in input_names}, "outputs": list(signature_outputs)}).measure()


def convert_function(frozen_fn, select_tf_ops: bool = False) -> bytes:
    """fp32 TFLite bytes of a frozen concrete function (variables as constants).

    `kdeploy inspect` converts this way: tracing and freezing the Keras call is several times
    faster than exporting and re-reading a SavedModel (MobileNetV2 at 96x96 here: 2.9 s vs 12 s),
    and the traced graph is the one `export_savedmodel` writes.

    Args:
        frozen_fn: from `convert_variables_to_constants_v2`.
        select_tf_ops: also allow Select TF (Flex) ops, so ops without a builtin lowering show up
            in the op list instead of failing the conversion.

    Raises:
        ConversionError: the converter refused the function.
    """
    import logging

    import tensorflow as tf

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "consider providing the trackable_obj": the function is frozen, nothing to track
    try:
        c = tf.lite.TFLiteConverter.from_concrete_functions([frozen_fn])
        if select_tf_ops:
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        with native_quiet():
            return c.convert()
    except Exception as e:
        raise ConversionError(f"TFLite fp32 conversion failed: {first_error_line(e)}") from e
    finally:
        absl.setLevel(level)


def calibrated(float_model: Path, calibration: dict[str, np.ndarray]) -> bytes:
    """The int8 recipe's calibrated model (float, with each tensor's range recorded), from the fp32 `.tflite` of the
    same SavedModel.

    The converter's int8 conversion converts the SavedModel to a float model, runs its calibrator on it, then its
    quantizer. That float model is the fp32 recipe's `.tflite` again: the same ops, tensors and buffers, only
    CONVERSION_METADATA differs (MobileNetV2, MobileNetV3Small, EfficientNetB0, an attention block and an MLP
    here; tests/test_tflite_int8.py keeps checking it). So the calibrator runs on the fp32 `.tflite` and the
    metadata is set as the converter sets it (PTQ full integer): int8 costs a calibration instead of a second
    SavedModel conversion (MobileNetV2-224 here: about 3 s on 64 samples instead of 11 s).

    Raises:
        ConversionError: the calibrator refused the model.
    """
    from tensorflow.lite.python import conversion_metadata_schema_py_generated as conversion_metadata
    from tensorflow.lite.python.optimize import calibrator
    from tensorflow.lite.python.util import get_conversion_metadata, populate_conversion_metadata
    from tensorflow.lite.tools import flatbuffer_utils

    try:
        with native_quiet():
            model = calibrator.add_intermediate_tensors(float_model.read_bytes())
            data = calibrator.Calibrator(model).calibrate(_one_sample_at_a_time(calibration))
        meta = get_conversion_metadata(data)
        if meta is None or meta.options is None:
            return data
        meta.options.modelOptimizationModes = [conversion_metadata.ModelOptimizationMode.PTQ_FULL_INTEGER]
        obj = populate_conversion_metadata(flatbuffer_utils.convert_bytearray_to_object(data), meta)
        return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))
    except Exception as e:
        raise ConversionError(f"TFLite int8 calibration failed: {first_error_line(e)}") from e


def _quantize_calibrated(calibrated: bytes, float_nodes: list[str]) -> bytes:
    """The converter's own quantizer call on a calibrated model (float model input and output), with the ops
    whose output tensors are named in `float_nodes` left float; what `QuantizationDebugger.
    get_nondebug_quantized_model` calls."""
    from tensorflow.lite.python.convert import mlir_quantize

    return mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False,
                         denylisted_nodes=list(float_nodes) or None)


def quantize_calibrated(
    calibrated: Path,
    out_path: Path,
    input_names: list[str],
    signature_outputs: list[str],
    float_nodes: list[str],
) -> Artifact:
    """Full int8 except the ops named in `float_nodes`, which stay float (as do their inputs), from the
    calibrated model of the int8 recipe (`convert(..., calibrated_out=)` or `calibrated`).

    TensorFlow's quantizer with `denylisted_nodes`, as `QuantizationDebugger` uses it: it quantizes
    around the denylisted ops, so a kept-float op at the graph input reads the float model input
    and a QUANTIZE op follows it (a `no_quantize` rule of ai-edge-quantizer on the same ops still
    quantized the graph input). No calibration again: a try takes the quantizer's time only
    (MobileNetV2-224 here: 0.27 s, against 11 s converting and calibrating from the SavedModel).

    Args:
        float_nodes: TFLite node names (each op's output tensor name in the float model).

    Raises:
        ConversionError: the quantizer refused the model.
    """
    try:
        with native_quiet():
            data = _quantize_calibrated(calibrated.read_bytes(), float_nodes)
    except Exception as e:
        raise ConversionError(f"TFLite selective int8 conversion failed: {first_error_line(e)}") from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return Artifact(format="tflite", path=out_path, precision="int8", source="tflite-converter(quantization-debugger)",
                    io={"inputs": {k: k for k in input_names}, "outputs": list(signature_outputs)},
                    ).measure(compressed=False)  # a search's try; the chosen one is measured again as a candidate
