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
) -> Artifact:
    """Converts the SavedModel with one recipe and writes `out_path`.

    Args:
        calibration: model input name -> (N, ...) arrays, fed one sample at a time to calibrate.
        input_names: the serving signature's input keys (the model input names).
        signature_outputs: the serving signature's output keys, in model output order.
        sparse: also apply `Optimize.EXPERIMENTAL_SPARSITY` (sparse-encoded weight tensors for
            pruned models; smaller fp32 files, while int8 files can grow).

    Raises:
        ConversionError: the converter refused the model with this recipe.
    """
    import tensorflow as tf

    configure = SETTINGS[precision]
    if PRECISIONS[precision].calibration and not calibration:
        raise ConversionError(f"{precision} needs calibration data")

    representative = _one_sample_at_a_time(calibration)
    try:
        c = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=["serving_default"])
        configure(c, representative)
        if sparse:
            c.optimizations = [*c.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        with native_quiet():
            data = c.convert()
    except Exception as e:
        raise ConversionError(f"TFLite {precision} conversion failed: {first_error_line(e)}") from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return Artifact(
        format="tflite",
        path=out_path,
        precision=precision,
        source="tflite-converter(sparsity)" if sparse else "tflite-converter",
        io={"inputs": {k: k for k in input_names}, "outputs": list(signature_outputs)},
    ).measure()


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


def convert_selective(
    saved_model_dir: Path,
    out_path: Path,
    calibration: dict[str, np.ndarray],
    input_order: list[str],
    signature_outputs: list[str],
    float_nodes: list[str],
) -> Artifact:
    """Full int8 except the ops named in `float_nodes`, which stay float (as do their inputs).

    TensorFlow's `QuantizationDebugger` with `denylisted_nodes` and `get_nondebug_quantized_model`:
    the converter quantizes around the denylisted ops, so a kept-float op at the graph input
    reads the float model input and a QUANTIZE op follows it (a `no_quantize` rule of
    ai-edge-quantizer on the same ops still quantized the graph input). Same bytes for the same
    inputs (seen here).

    Args:
        calibration: model input name -> (N, ...) arrays, one sample at a time.
        input_order: model input names in the order of the float model's input tensors (the
            debugger feeds positional lists).
        float_nodes: TFLite node names (each op's output tensor name in the float model).

    Raises:
        ConversionError: the converter refused the model.
    """
    import tensorflow as tf

    n = len(next(iter(calibration.values())))

    representative = _one_sample_at_a_time(calibration)
    def positional():
        for i in range(n):
            yield [calibration[k][i : i + 1] for k in input_order]

    try:
        c = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=["serving_default"])
        _int8(c, representative)
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(float_nodes))
        with native_quiet():
            debugger = tf.lite.experimental.QuantizationDebugger(converter=c, debug_dataset=positional,
                                                                 debug_options=opts)
            data = debugger.get_nondebug_quantized_model()
    except Exception as e:
        raise ConversionError(f"TFLite selective int8 conversion failed: {first_error_line(e)}") from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return Artifact(format="tflite", path=out_path, precision="int8", source="tflite-converter(quantization-debugger)",
                    io={"inputs": {k: k for k in input_order}, "outputs": list(signature_outputs)}).measure()
