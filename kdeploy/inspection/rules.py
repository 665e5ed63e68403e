"""Readiness rules over a loaded model and its one conversion: summary figures and hazards.

Pure functions: they read the Keras model, the ops found (`inspection.ops.OpsFound`), the
target profile and optional data, and return values; nothing here converts or prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdeploy.loading import TensorInfo
from kdeploy.profiles import TargetProfile
from kdeploy.report.model import Hazard, LayerCompat

# Layers that only act in training; at inference they must lower to nothing.
TRAINING_ONLY = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                 "GaussianNoise", "AlphaDropout", "ActivityRegularization", "RandomFlip", "RandomRotation",
                 "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness", "RandomCrop")
# Keras class -> why full-integer quantization handles it badly in practice. One line per class.
INT8_HOSTILE = {
    "LayerNormalization": "mean/variance over activations with a wide range; int8 kernels lose the small deviations",
    "MultiHeadAttention": "softmax over dot products whose range grows with the head size; one int8 scale per tensor",
    "Attention": "softmax over dot products whose range grows with the key size; one int8 scale per tensor",
    "LSTM": "the recurrent state accumulates quantization error over the time steps",
    "GRU": "the recurrent state accumulates quantization error over the time steps",
    "SimpleRNN": "the recurrent state accumulates quantization error over the time steps",
}
# Activations whose outputs have a long tail (exp-like) or need more resolution near zero than int8 gives.
INT8_HOSTILE_ACTIVATIONS = {"exponential", "softplus", "selu", "elu", "gelu"}
INT8_PRECISIONS = ("int8", "int16x8")
DYNAMIC_PLACEHOLDER = "N"


def static_batch_inputs(inputs: list[TensorInfo], prof: TargetProfile) -> list[TensorInfo]:
    """Inputs with the batch dimension fixed to the profile's `static_batch` (unchanged without one).

    Dynamic batch lowers to SHAPE/FILL/REDUCE_PROD ops that TFLite Micro lacks: fixed for conversion.
    """
    if prof.static_batch is None:
        return inputs
    return [TensorInfo(t.name, (prof.static_batch,) + tuple(t.shape[1:]), t.dtype) for t in inputs]


def input_spread(inputs: list[TensorInfo], arrays: dict[str, np.ndarray], limit: float = 1e3) -> list[tuple]:
    """Inputs whose features have ranges orders of magnitude apart: (name, ratio, smallest, largest range).

    Full-integer quantization gives each input tensor one scale, so a feature with a range of
    0.01 next to one with a range of 4000 is quantized to a handful of levels.
    """
    found = []
    for t in inputs:
        x = arrays.get(t.name)
        if x is None or x.dtype.kind != "f" or x.ndim < 2:
            continue
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[1] <= 16:  # an image's channels: column by column, 17x faster than numpy's axis-0 reduction
            ranges = np.array([flat[:, i].max() - flat[:, i].min() for i in range(flat.shape[1])])
        else:
            ranges = flat.max(axis=0) - flat.min(axis=0)
        ranges = ranges[ranges > 0]
        if ranges.size > 1 and ranges.max() / ranges.min() > limit:
            found.append((t.name, float(ranges.max() / ranges.min()), float(ranges.min()), float(ranges.max())))
    return found


def predicted_sizes(graph, fp32_bytes: int) -> dict[str, int]:
    """Predicted `.tflite` bytes per precision from the fp32 graph's constant tensors.

    fp16 halves every float32 constant; dynamic range stores float32 weight tensors of at least
    1024 elements (the converter's threshold) as int8; int8 and int16x8 store float32 weights
    (2-D and up) as int8 while biases become int32 (same size).
    """
    consts = [t for t in graph.tensors if t.constant and t.dtype == "float32"]
    f32 = sum(t.nbytes for t in consts)
    big = sum(t.nbytes for t in consts if t.elements >= 1024)
    weights = sum(t.nbytes for t in consts if len(t.shape) >= 2)
    return {"fp32": fp32_bytes, "fp16": int(fp32_bytes - f32 / 2), "dynamic": int(fp32_bytes - 0.75 * big),
            "int8": int(fp32_bytes - 0.75 * weights), "int16x8": int(fp32_bytes - 0.75 * weights)}


def largest_activation(graph, names: list[str]) -> dict[str, Any]:
    """The op whose non-constant inputs and outputs take the most bytes at int8 (1 byte per element).

    TFLite Micro must hold them in its arena at once, so this is a lower bound of the arena.
    """
    best, where = 0, None
    for op in graph.ops:
        live = sum(graph.tensors[i].elements for i in op.inputs + op.outputs if i >= 0 and not graph.tensors[i].constant)
        if live > best:
            best, where = live, (op.name, names[op.outputs[0]] if op.outputs else "")
    return {"bytes_int8": int(best), "op": where[0] if where else None, "tensor": where[1] if where else None}


def layer_rows(index: dict[str, Any], found, tflm: frozenset[str] | None, onnx: frozenset[str] | None,
               repaired: dict[str, str]) -> list[LayerCompat]:
    """One compatibility row per Keras layer (nested models' layers included)."""
    rows = []
    for path, layer in index.items():
        ops = found.tflite_ops.get(path, [])
        tf_ops = found.tf_ops.get(path, [])
        missing: dict[str, list[str]] = {}
        if found.error is not None:
            rows.append(LayerCompat(name=path, class_name=type(layer).__name__, tflite="not-converted",
                                    tflm="not-converted", onnx="not-converted", repair=repaired.get(path)))
            continue
        flex = sorted({o for o in ops if o.startswith("Flex")})
        if flex:
            missing["tflite"] = flex
        no_tflm = sorted({o for o in ops if tflm is not None and o not in tflm})
        if no_tflm:
            missing["tflm"] = no_tflm
        no_onnx = sorted({o for o in tf_ops if onnx is not None and o not in onnx})
        if no_onnx:
            missing["onnx"] = no_onnx
        rows.append(LayerCompat(
            name=path, class_name=type(layer).__name__,
            tflite="no-ops" if not ops else "select-tf-ops" if flex else "builtin",
            tflm="no-ops" if not ops else "unsupported" if no_tflm else "supported",
            onnx="no-ops" if not tf_ops else "no-route" if no_onnx else "supported",
            ops=sorted(set(ops)), missing=missing, repair=repaired.get(path)))
    return rows


def hazards(loaded, index: dict[str, Any], rows: list[LayerCompat], found, prof: TargetProfile,
            inputs: list[TensorInfo], data: dict[str, np.ndarray] | None, summary: dict[str, Any],
            repaired: dict[str, str]) -> list[Hazard]:
    """Every hazard a user can fix before export; `blocks` says which keep the target from being ready."""
    out: list[Hazard] = []
    deployed = set(prof.runtimes)
    int8 = bool(set(INT8_PRECISIONS) & set(prof.precisions))
    for t in inputs:
        axes = [i for i, d in enumerate(t.shape) if d is None and i > 0]
        if axes:
            dims = ",".join(DYNAMIC_PLACEHOLDER if d is None else str(d) for d in t.shape[1:])
            out.append(Hazard(code="dynamic-dim", layer=t.name, severity="error", blocks=True,
                              message=f"input '{t.name}' has dynamic non-batch dimension(s) at axis "
                                      f"{', '.join(map(str, axes))} (shape {_shape(t.shape)}); conversion needs them fixed",
                              fix=f"pass --input-shape {t.name}={dims} with {DYNAMIC_PLACEHOLDER} the size you deploy "
                                  "with (repeat --input-shape per input)"))
        if t.dtype == "float64":
            out.append(Hazard(code="float64", layer=t.name, message=f"input '{t.name}' is float64; TFLite and most "
                              "edge kernels are float32, so the converter inserts casts or fails",
                              fix="build the model with float32 inputs (keras.Input(..., dtype='float32'))"))
    batch = inputs[0].shape[0] if inputs else None
    if batch is not None and batch > 1:
        clash = prof.static_batch is not None and prof.static_batch != batch
        out.append(Hazard(code="fixed-batch", layer=inputs[0].name, severity="error" if clash else "warning",
                          blocks=clash, message=f"the batch dimension is fixed to {batch}"
                          + (f"; target {prof.name} runs batch {prof.static_batch}" if clash else
                             f"; batch sizes of the profile other than {batch} are dropped"),
                          fix="build the model with keras.Input(shape) (dynamic batch) instead of batch_shape"))
    for path, layer in index.items():
        cls = type(layer).__name__
        dtype = getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None)
        if dtype == "float64":
            out.append(Hazard(code="float64", layer=path, message=f"layer {path} ({cls}) computes in float64",
                              fix="use the default float32 dtype policy (or mixed_float16) for this layer"))
        module = type(layer).__module__ or ""
        if not module.startswith("keras.") and not module.startswith("keras_hub."):
            out.append(Hazard(code="custom-class", layer=path, message=f"layer {path} is the custom class {cls} "
                              f"(module {module}); it loads only with --custom-objects and its ops are unknown before "
                              "conversion", fix="prefer Keras built-in layers, or check its ops below"))
        elif module.startswith("keras_hub."):
            out.append(Hazard(code="trusted-package-class", layer=path, severity="info",
                              message=f"layer {path} is {cls} from keras_hub; it loads once keras_hub is imported",
                              fix="install the same keras_hub version where the model is loaded"))
        if cls in TRAINING_ONLY and found.tflite_ops.get(path):
            out.append(Hazard(code="training-only-active", layer=path, severity="error", blocks=True,
                              message=f"layer {path} ({cls}) acts only in training but lowers to ops at inference "
                                      f"({', '.join(sorted(set(found.tflite_ops[path])))}): outputs change per call",
                              fix="do not call it with training=True inside the model; remove it for export"))
        if int8:
            why = INT8_HOSTILE.get(cls)
            act = getattr(getattr(layer, "activation", None), "__name__", None)
            if why is None and act in INT8_HOSTILE_ACTIVATIONS:
                why = f"activation '{act}' has a long-tailed output range; one int8 scale per tensor wastes levels"
            if why is not None:
                out.append(Hazard(code="int8-hostile", layer=path, message=f"layer {path} ({cls}) is int8-hostile: {why}",
                                  fix="expect int8 to fail fidelity here; keep it in float (fp16/dynamic) or use "
                                      "int16x8 activations"))
    if data is not None and int8:
        norms = [p for p, layer in index.items() if type(layer).__name__ == "Normalization"]
        inside = (f"; the model's Normalization layer ({', '.join(norms)}) does not help, it runs after the int8 "
                  "input quantization") if norms else ""
        for name, ratio, lo, hi in input_spread(inputs, data):
            out.append(Hazard(code="input-scale-spread", layer=name,
                              message=f"input '{name}' has features whose ranges differ {ratio:.1e}x ({lo:.3g} to "
                                      f"{hi:.3g}); int8/int16x8 quantize the input tensor with one scale, so "
                                      f"small-range features lose resolution{inside}",
                              fix="normalize the features before they reach the model (each to a similar range)"))
    for path, why in repaired.items():
        out.append(Hazard(code="rnn-unrolled", layer=path, severity="info", message=why,
                          fix="none needed: optimize converts the unrolled copy (or set unroll=True yourself)"))
    out += _op_hazards(rows, found, prof, deployed, index, inputs)
    out += _budget_hazards(summary, prof)
    return out


def _op_hazards(rows, found, prof, deployed, index, inputs) -> list[Hazard]:
    out: list[Hazard] = []
    if found.error is not None:
        out.append(Hazard(code="conversion-failed", layer=None, severity="error", blocks=True,
                          message=f"the fp32 TFLite conversion failed: {found.error}",
                          fix="fix the error above; optimize would fail the same way"))
        return out
    dynamic = any(d is None for t in inputs for d in t.shape[1:])
    uses_tflite = bool(deployed & {"litert", "tflm"})
    for r in rows:
        if "tflite" in r.missing:
            rnn = r.class_name in ("LSTM", "GRU", "SimpleRNN", "Bidirectional")
            fix = ("fix the time steps with --input-shape so kdeploy can unroll it (static time steps give builtin ops)"
                   if rnn and dynamic else "set unroll=True on the layer (needs static time steps)" if rnn else
                   "replace it with layers that lower to TFLite builtin ops; the LiteRT wheel has no Flex delegate")
            out.append(Hazard(code="select-tf-ops", layer=r.name, severity="error" if uses_tflite else "warning",
                              blocks=uses_tflite, fix=fix,
                              message=f"layer {r.name} ({r.class_name}) needs Select TF (Flex) op(s) "
                                      f"{', '.join(r.missing['tflite'])}, which LiteRT and TFLite Micro cannot run"))
        if "tflm" in r.missing and "tflm" in set(prof.runtimes) | set(prof.crosscheck_runtimes):
            blocks = "tflm" in deployed
            out.append(Hazard(code="tflm-unsupported-op", layer=r.name, severity="error" if blocks else "warning",
                              blocks=blocks, message=f"layer {r.name} ({r.class_name}) lowers to op(s) "
                              f"{', '.join(r.missing['tflm'])} that TFLite Micro has no kernel for",
                              fix="replace the layer with one whose ops TFLite Micro registers (see the tflm column)"))
        if "onnx" in r.missing and "onnxruntime" in set(prof.runtimes) | set(prof.crosscheck_runtimes):
            blocks = "onnxruntime" in deployed
            out.append(Hazard(code="no-onnx-route", layer=r.name, severity="error" if blocks else "warning",
                              blocks=blocks, message=f"layer {r.name} ({r.class_name}) uses TensorFlow op(s) "
                              f"{', '.join(r.missing['onnx'])} that tf2onnx cannot convert",
                              fix="replace the layer, or deploy the TFLite artifact instead"
                              + ("" if blocks else " (only the ONNX cross-check is lost)")))
    return out


def _budget_hazards(summary: dict[str, Any], prof: TargetProfile) -> list[Hazard]:
    out: list[Hazard] = []
    bud = prof.budgets
    sizes = summary.get("predicted_size_bytes") or {}
    allowed = {p: s for p, s in sizes.items() if p in prof.precisions}
    if bud.max_size_bytes is not None and allowed and min(allowed.values()) > bud.max_size_bytes:
        best = min(allowed, key=allowed.get)
        out.append(Hazard(code="size-over-budget", layer=None, severity="error", blocks=True,
                          message=f"the smallest predicted artifact ({best}, {allowed[best]:,} bytes) exceeds "
                                  f"max_size_bytes {bud.max_size_bytes:,} of target {prof.name}",
                          fix="shrink the model (fewer filters/units) or pick a target with a larger budget"))
    arena = (summary.get("largest_activation") or {}).get("bytes_int8")
    if bud.max_arena_bytes is not None and arena is not None and arena > bud.max_arena_bytes:
        act = summary["largest_activation"]
        out.append(Hazard(code="arena-over-budget", layer=act.get("layer"), severity="error", blocks=True,
                          message=f"the largest activation ({act['op']}, {arena:,} bytes at int8) alone exceeds "
                                  f"max_arena_bytes {bud.max_arena_bytes:,}; the TFLite Micro arena is at least that",
                          fix="reduce the input size or the early feature maps (strides, fewer channels)"))
    return out


def _shape(shape: tuple) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
