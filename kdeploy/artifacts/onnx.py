"""ONNX exports: fp32 from the TF function, the same quantized artifact from its `.tflite`,
and onnxruntime dynamic quantization."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Callable

from kdeploy.errors import ConversionError
from kdeploy.artifacts import Artifact
from kdeploy.artifacts.canonical import canonicalize_onnx, external_weights
from kdeploy.artifacts.onnx_ops import Unconverted, rewrite_unsupported_ops, teach_fused_activations
from kdeploy.artifacts.tf2onnx_lean import converting
from kdeploy.util import first_error_line, native_quiet
from kdeploy.loading import LoadedModel

OPSET = 17  # tf2onnx 1.17 supports opsets up to 18; 17 is what ORT and tf2onnx were verified on here.
TFLITE_ROUTE, SAVEDMODEL_ROUTE = "tflite", "savedmodel"  # `Recipe.onnx` values of the two tf2onnx routes
_ROUTE_TEXT = {TFLITE_ROUTE: "the .tflite", SAVEDMODEL_ROUTE: "the SavedModel"}


class UnconvertedOps(ConversionError):
    """tf2onnx left ops in the graph that ONNX Runtime cannot load and `onnx_ops.REWRITES` has no row for.

    The message names each op, the Keras layer that emits it (when a `LayerNamer` is given) and
    its node; `ops` keeps them for a caller that tries another route.
    """

    def __init__(self, ops: list[Unconverted], what: str, namer: Any = None):
        self.ops = ops
        seen: dict[str, Unconverted] = {}
        for u in ops:
            seen.setdefault(u.op, u)
        named = [f"op {u.op} ({_where(u.node, namer)})" for u in list(seen.values())[:4]]
        more = f" and {len(seen) - 4} more op type(s)" if len(seen) > 4 else ""
        verb, it = ("has", "it") if len(seen) == 1 else ("have", "them")
        super().__init__(f"no ONNX twin ({what}): {', '.join(named)}{more} {verb} no ONNX equivalent "
                         f"(tf2onnx leaves {it} unconverted and kdeploy.artifacts.onnx_ops has no rewrite for {it})")


def _where(node: str, namer: Any) -> str:
    """`layer L, node N` for a node named after a TFLite tensor or TF node (`node N` when no layer is known)."""
    name = node.split(";")[0].split(":")[0]
    layer = None
    if namer is not None:
        segments = name.split("/")
        # The SavedModel route prefixes the model's scope with its call nodes (`StatefulPartitionedCall/...`).
        layer = next((hit for i in range(len(segments) - 1) if (hit := namer.layer_of("/".join(segments[i:])))), None)
    if layer:
        return f"layer {layer}, node {name}"
    return f"node {name}, in no Keras layer" if namer is not None else f"node {name}"


@contextlib.contextmanager
def _quiet():
    # tf2onnx logs unsupported ops at ERROR from its own child loggers; the cause reaches the
    # caller through the exception (or the ONNX Runtime load check), not through the log.
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("tf2onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), native_quiet():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def from_saved_model(saved_model_dir: Path, model: LoadedModel, out_path: Path, signature_outputs: list[str],
                     namer: Any = None) -> Artifact:
    """fp32 ONNX from the serving signature of the reference SavedModel (tf2onnx's `--saved-model` route).

    The SavedModel route freezes everything the graph captures. `from_function` on a Keras 3
    model turned captured constants (e.g. a Normalization layer's mean) into extra graph inputs,
    and `from_keras` fails on some Keras 3 models (STACK.md). ONNX names follow the signature keys
    (`signature_outputs`: the serving signature's output keys, in model output order).

    Raises:
        UnconvertedOps: tf2onnx left an op no rewrite replaces (named with its layer, via `namer`).
        ConversionError: any other conversion failure.
    """
    import tensorflow as tf
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common

    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            graph_def, inputs, outputs, tables, rename = tf_loader.from_saved_model(
                str(saved_model_dir), None, None, None, ["serving_default"], None, False,
                return_initialized_tables=True, return_tensors_to_rename=True)
            with tf.device("/cpu:0"):
                proto, _ = converting(lambda: _convert_common(
                    graph_def, name=str(saved_model_dir), opset=OPSET, input_names=inputs, output_names=outputs,
                    tensors_to_rename=rename, initialized_tables=tables, output_path=str(out_path)))
            graph_inputs = {i.name for i in proto.graph.input}
            graph_outputs = {o.name for o in proto.graph.output}
            del graph_def, proto  # two more copies of the weights, not needed for the checks below
        missing = [t.name for t in model.inputs if t.name not in graph_inputs]
        missing += [k for k in signature_outputs if k not in graph_outputs]
        if missing or len(graph_inputs) != len(model.inputs):
            raise ConversionError(f"ONNX graph names {sorted(graph_inputs)} -> {sorted(graph_outputs)} do not match "
                                  f"the signature (missing {missing})")
        rewrite = rewrite_unsupported_ops(out_path)  # e.g. Erfc from an exact GELU
        if rewrite.left:
            raise UnconvertedOps(rewrite.left, "tf2onnx from the SavedModel", namer)
        rewritten = rewrite.rewritten
        canonicalize_onnx(out_path)  # same model, same bytes (tf2onnx's generated names vary per process)
        _check_loads(out_path)
    except Exception as e:
        out_path.unlink(missing_ok=True)
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"ONNX fp32 conversion (tf2onnx) failed: {first_error_line(e)}") from e
    return Artifact(
        format="onnx",
        path=out_path,
        precision="fp32",
        source=_source("tf2onnx(saved_model)", rewritten),
        io={"inputs": {t.name: t.name for t in model.inputs}, "outputs": list(signature_outputs)},
    ).measure()


def from_tflite(tflite: Artifact, out_path: Path, namer: Any = None) -> Artifact:
    """Converts a `.tflite` (e.g. full int8) to ONNX so the same quantized graph runs on ORT.

    Raises:
        UnconvertedOps: tf2onnx left an op no rewrite replaces (named with its layer, via `namer`).
        ConversionError: any other conversion failure.
    """
    import tf2onnx
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tflite.path)).get_signature_runner("serving_default")
    in_names = {k: d["name"] for k, d in runner.get_input_details().items()}
    out_details = runner.get_output_details()
    out_names = [out_details[k]["name"] for k in tflite.io["outputs"]]
    try:
        teach_fused_activations()  # clamps fused into an op (clip(dense(x), -1, 1)), which tf2onnx drops
        with _quiet():
            converting(lambda: tf2onnx.convert.from_tflite(str(tflite.path), opset=OPSET, output_path=str(out_path)))
        rewrite = rewrite_unsupported_ops(out_path)  # e.g. TFL_GELU, which tf2onnx has no handler for
        if rewrite.left:
            raise UnconvertedOps(rewrite.left, f"tf2onnx from the {tflite.precision} .tflite", namer)
        rewritten = rewrite.rewritten
        if tflite.precision == "fp16" and half_weights(out_path):
            rewritten = [*rewritten, HALF_WEIGHTS]
        canonicalize_onnx(out_path)  # same model, same bytes (tf2onnx's generated names vary per process)
        _check_loads(out_path)
    except Exception as e:
        out_path.unlink(missing_ok=True)
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"ONNX from {tflite.precision} TFLite failed: {first_error_line(e)}") from e
    return Artifact(
        format="onnx",
        path=out_path,
        precision=tflite.precision,
        source=_source("tf2onnx(tflite)", rewritten),
        io={"inputs": in_names, "outputs": out_names},
    ).measure()


HALF_WEIGHTS = "float16 weights"  # `half_weights` in an artifact's `source`


def half_weights(path: Path) -> int:
    """Stores the float16 weights of an fp16 `.tflite`'s ONNX twin in float16, as the `.tflite` does; returns how many.

    tf2onnx folds each DEQUANTIZE of a float16 weight into a float32 initializer, so the "fp16" ONNX
    model was the fp32 one's size (14 MB on MobileNetV2-224, and gzip -6 took 2.4 s on its half-float
    values against 0.45 s for fp32's). Each float32 initializer of more than one value whose values
    are all float16 numbers (the weights; not a scalar such as a Clip bound) is stored in float16 and
    cast back to float32 before its uses: the same values (float16 to float32 is exact), half the
    bytes; ONNX Runtime folds the casts when it loads the model.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if external_weights(g):
        return 0  # weights beside the file (a model past protobuf's 2 GB): left as tf2onnx wrote them
    inputs = {v.name for v in g.input}
    kept, casts = [], []
    for t in g.initializer:
        w = numpy_helper.to_array(t) if t.data_type == onnx.TensorProto.FLOAT and t.name not in inputs else None
        if w is None or w.size < 2 or not np.array_equal(w.astype(np.float16).astype(np.float32), w):
            kept.append(t)
            continue
        kept.append(numpy_helper.from_array(w.astype(np.float16), f"{t.name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{t.name}__fp16"], [t.name], name=f"{t.name}__cast",
                                      to=onnx.TensorProto.FLOAT))
    if not casts:
        return 0
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = [*casts, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(path))
    return len(casts)


def twin(route: str, out_path: Path, tflite: Callable[[], Artifact | None], saved_model_dir: Path,
         model: LoadedModel, signature_outputs: list[str], namer: Any = None, fallback: bool = True) -> Artifact:
    """A candidate's ONNX twin by `route` (`TFLITE_ROUTE` or `SAVEDMODEL_ROUTE`), or by the other route for fp32.

    An fp32 twin whose route leaves an op unconverted (`UnconvertedOps`) is converted by the other
    route: fp32 is the one precision both routes give (a quantized twin must be the quantized
    graph itself). Its `source` then ends in `+fallback(<route>: <ops> unconverted)`.

    Args:
        tflite: returns the candidate's `.tflite` (None: there is none), called only when needed
            (route "tflite", or the fallback of an fp32 SavedModel twin).
        fallback: the candidate is the reference model itself (False for a pruned, clustered or
            re-encoded one, whose SavedModel is not `saved_model_dir`): only then may routes swap.

    Raises:
        UnconvertedOps: the route left ops unconverted and no fallback applies (or it failed too).
        ConversionError: any other conversion failure.
    """
    def by(which: str) -> Artifact:
        if which == SAVEDMODEL_ROUTE:
            return from_saved_model(saved_model_dir, model, out_path, signature_outputs, namer)
        src = tflite()
        if src is None:
            raise ConversionError("no .tflite to convert")
        return from_tflite(src, out_path, namer)

    try:
        return by(route)
    except UnconvertedOps as e:
        src = None if route == SAVEDMODEL_ROUTE else tflite()
        if not fallback or (src is not None and src.precision != "fp32"):
            raise
        other = TFLITE_ROUTE if route == SAVEDMODEL_ROUTE else SAVEDMODEL_ROUTE
        try:
            art = by(other)
        except ConversionError as again:
            raise ConversionError(f"{e}; {_ROUTE_TEXT[other]} route failed too: {again}") from again
        art.source += f"+fallback({route}: {','.join(sorted({u.op for u in e.ops}))} unconverted)"
        return art


def fallback_note(art: Artifact) -> str | None:
    """How the report names the route of a twin made by `twin`'s fallback (`recipe.onnx`), else None."""
    if "+fallback(" not in art.source:
        return None
    first = art.source.split("+fallback(", 1)[1].rstrip(")")
    used = SAVEDMODEL_ROUTE if art.source.startswith("tf2onnx(saved_model)") else TFLITE_ROUTE
    route, ops = first.split(": ", 1)
    ops = ops.removesuffix(" unconverted")
    return f"tf2onnx from {_ROUTE_TEXT[used]} ({_ROUTE_TEXT[route]} route left {ops} unconverted)"


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


def _source(converter: str, rewritten: list[str]) -> str:
    """How the file was produced: the converter, and the ops rewritten after it (`onnx_ops`)."""
    return f"{converter}+rewrite({','.join(sorted(set(rewritten)))})" if rewritten else converter


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
