"""Op compatibility per Keras layer, from one fp32 conversion.

The Keras call is traced once (inference mode) and frozen; the frozen graph is converted to
TFLite with Select TF ops allowed, so an op without a builtin lowering appears in the op list as
a Flex op instead of failing the conversion. Every TFLite op is mapped back to the Keras layers
its output tensor names carry (`model_1/block_1/dense_1_2/MatMul`: Keras 3 adds `_N` suffixes to
the model and layer name scopes; fused ops carry several `;`-separated locations). The same
frozen TensorFlow graph gives the ONNX route: each TensorFlow op is looked up in tf2onnx's
handler registry at kdeploy's opset. TFLite Micro support is read from the op registrations
compiled into the installed `tflite-micro` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdeploy.errors import ConversionError
from kdeploy.loading import LoadedModel, TensorInfo, call_keras
from kdeploy.util import native_section

# TensorFlow graph plumbing that tf2onnx handles itself (no handler in its registry).
_TF_STRUCTURAL = {"Placeholder", "Const", "Identity", "NoOp", "IdentityN"}
# What freezing turns into constants: in a graph traced without freezing, weights are variable reads.
_TF_VARIABLE_READS = {"ReadVariableOp"}
_SUFFIX = re.compile(r"^(.*)_\d+$")


@dataclass
class OpsFound:
    """What the one conversion found, by Keras layer path."""

    tflite_ops: dict[str, list[str]] = field(default_factory=dict)  # layer path -> TFLite ops (Flex ones as "Flex...")
    tf_ops: dict[str, list[str]] = field(default_factory=dict)  # layer path -> TensorFlow op types
    unmapped_ops: list[str] = field(default_factory=list)  # TFLite ops no layer name could be read from
    graph: Any = None  # kdeploy.compute.TfliteGraph of the converted model
    tensor_names: list[str] = field(default_factory=list)  # the converted model's tensor names, by index
    tflite_bytes: int = 0
    error: str | None = None
    seconds: float = 0.0


def layer_index(keras_model: Any) -> dict[str, Any]:
    """Layer path ('outer/inner') -> layer, for the model and every nested model, in graph order (a
    subclassed model: attribute paths, `debug.names.attribute_tree`)."""
    from kdeploy.debug.names import attribute_tree
    from kdeploy.subclassed import has_symbolic_inputs

    if not has_symbolic_inputs(keras_model):
        return {path: layer for path, (layer, _) in attribute_tree(keras_model, inner=True).items()}
    out: dict[str, Any] = {}

    def walk(model: Any, prefix: str) -> None:
        for layer in model.layers:
            path = f"{prefix}{layer.name}"
            out[path] = layer
            if hasattr(layer, "layers") and layer is not model:
                walk(layer, path + "/")

    walk(keras_model, "")
    return out


def scope_index(keras_model: Any) -> dict[str, str]:
    """Name-scope path -> `layer_index` path: the same unless subclassed (scopes carry layer names, not
    attribute paths); `layer_of` takes it for its `paths`."""
    from kdeploy.debug.names import attribute_tree
    from kdeploy.subclassed import has_symbolic_inputs

    if not has_symbolic_inputs(keras_model):
        return {scope: path for path, (_, scope) in attribute_tree(keras_model, inner=True).items()}
    return {p: p for p in layer_index(keras_model)}


def layer_of(location: str, model_name: str, paths: set[str] | dict[str, str]) -> str | None:
    """The deepest Keras layer path a TensorFlow/TFLite name scope points at, or None.

    Args:
        location: one name, e.g. `cnn_1/conv_1/Conv2D` (a `;`-separated fused name is split by the caller).
        model_name: the outer model's name (the first scope, possibly with a `_N` suffix).
        paths: from `layer_index`; or `scope_index` (the path a matched scope stands for is returned).

    Each scope matches a layer named like it, or like it without a trailing `_N` (Keras 3's
    uniquified scopes); the suffix-free reading is preferred when both name a layer.
    """
    parts = location.split("/")
    if parts and _unsuffixed(parts[0], {model_name}) is not None:
        parts = parts[1:]
    found, prefix = None, ""
    for part in parts[:-1]:  # the last part names the op, not a layer
        options = {p[len(prefix):] for p in paths if p.startswith(prefix) and "/" not in p[len(prefix):]}
        name = _unsuffixed(part, options)
        if name is None:
            break
        found = prefix + name
        prefix = found + "/"
    return paths[found] if isinstance(paths, dict) and found is not None else found


def _unsuffixed(part: str, names: set[str]) -> str | None:
    m = _SUFFIX.match(part)
    if m and m.group(1) in names:
        return m.group(1)
    return part if part in names else None


def trace(loaded: LoadedModel, keras_model: Any, inputs: list[TensorInfo], freeze: bool = True):
    """Concrete function of the Keras call in inference mode, with `inputs`' shapes (None = dynamic).

    Args:
        freeze: variables as constants (what the converter takes); False keeps them as variable
            reads, which costs no copy of the weights (a frozen ResNet50V2 took 1 GB more here).
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in inputs]
    fn = tf.function(lambda *args: call_keras(keras_model, list(args), loaded), input_signature=specs)
    try:
        with native_section():
            concrete = fn.get_concrete_function()
            return convert_variables_to_constants_v2(concrete) if freeze else concrete
    except Exception as e:
        from kdeploy.util import first_error_line

        raise ConversionError(f"tracing the Keras model failed: {first_error_line(e)}") from e


def find_ops(loaded: LoadedModel, keras_model: Any, inputs: list[TensorInfo], tflite: bytes | None = None) -> OpsFound:
    """Converts once (fp32, Select TF ops allowed) and attributes TFLite and TensorFlow ops to layers.

    Args:
        tflite: an fp32 `.tflite` of the same traced model that converted with builtin ops only
            (`optimize`'s fp32 candidate): its ops are the ones a Select-TF-ops conversion would
            give, so it is read instead of converting again, and the TensorFlow ops are read from
            the traced graph without freezing it.
    """
    import time

    from kdeploy.artifacts.flatbuffer import read_tflite
    from kdeploy.util import first_error_line
    from kdeploy.artifacts.tflite import convert_function

    started = time.perf_counter()
    found = OpsFound()
    paths = scope_index(keras_model)
    name = keras_model.name
    try:
        traced = trace(loaded, keras_model, inputs, freeze=tflite is None)
        for node in traced.graph.as_graph_def().node:
            if node.op in _TF_STRUCTURAL or (tflite is not None and node.op in _TF_VARIABLE_READS):
                continue
            layer = layer_of(node.name, name, paths)
            if layer is not None:
                found.tf_ops.setdefault(layer, []).append(node.op)
        data = tflite if tflite is not None else convert_function(traced, select_tf_ops=True)
        del traced
    except ConversionError as e:
        found.error = first_error_line(e)
        found.seconds = time.perf_counter() - started
        return found
    found.tflite_bytes = len(data)
    found.graph = read_tflite(data)
    names = found.tensor_names = tensor_names(data)
    for op in found.graph.ops:
        layers = _op_layers(op, found.graph, names, name, paths)
        if not layers:
            found.unmapped_ops.append(op.name)
        for layer in layers:
            found.tflite_ops.setdefault(layer, []).append(op.name)
    found.seconds = time.perf_counter() - started
    return found


def _op_layers(op, graph, names: list[str], model_name: str, paths: set[str]) -> list[str]:
    """Layers an op belongs to: from its output names; graph outputs lose theirs, so then from its
    constant inputs (weights carry their layer's scope), else from its other inputs."""
    ins = [i for i in op.inputs if i >= 0]
    consts = [names[i] for i in ins if graph.tensors[i].constant]
    others = [names[i] for i in ins if not graph.tensors[i].constant and i not in graph.inputs]
    for candidates in ([names[i] for i in op.outputs if i >= 0], consts, others):
        layers = []
        for full in candidates:
            for loc in full.split(";"):
                layer = layer_of(loc, model_name, paths)
                if layer is not None and layer not in layers:
                    layers.append(layer)
        if layers:
            return layers
    return []


def tensor_names(data: bytes) -> list[str]:
    """Names of the primary subgraph's tensors, by index."""
    from ai_edge_litert import schema_py_generated as fb

    sg = fb.Model.GetRootAs(data, 0).Subgraphs(0)
    return [(sg.Tensors(i).Name() or b"").decode("utf-8", "replace") for i in range(sg.TensorsLength())]


@lru_cache(maxsize=1)
def tflm_ops() -> frozenset[str]:
    """Builtin ops TFLite Micro can run: the `Register_<OP>` kernels compiled into the installed package.

    The Python interpreter of `tflite-micro` resolves ops with its all-ops resolver; its kernel
    registration functions are exported symbols of `_runtime.so` (mangled `...Register_CONV_2DEv`).

    Raises:
        ConversionError: the package is not installed or its library has no registrations.
    """
    import importlib.util

    spec = importlib.util.find_spec("tflite_micro")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("tflite-micro is not installed (pip install tflite-micro): TFLM support unknown")
    lib = Path(list(spec.submodule_search_locations)[0]) / "python" / "tflite_micro" / "_runtime.so"
    ops = frozenset(m.decode() for m in re.findall(rb"Register_([A-Z][A-Z0-9_]*)Ev", lib.read_bytes()))
    if not ops:
        raise ConversionError(f"no op registrations found in {lib}: TFLM support unknown")
    return ops


@lru_cache(maxsize=1)
def onnx_handlers() -> frozenset[str]:
    """TensorFlow op types with an ONNX route: a tf2onnx handler at kdeploy's opset, or kdeploy's rewrite."""
    from tf2onnx import handler, tfonnx  # noqa: F401  (tfonnx registers the handlers)

    from kdeploy.artifacts.onnx import OPSET
    from kdeploy.artifacts.onnx_ops import REWRITTEN_TF_OPS

    return frozenset(handler.tf_op.create_mapping(OPSET, [])) | REWRITTEN_TF_OPS
