"""Where a runtime failure happened: the op, its node index and the Keras layer (or SavedModel node) it comes from.

LiteRT names the failing node of its execution plan (`... Node number 198 (DIV) failed to
invoke.`), ONNX Runtime the node's name (`Non-zero status code returned while running Div node.
Name:'model/div' ...`). `crash_site` parses that text and reads the artifact itself (the
flatbuffer reader for `.tflite`, the ONNX graph for `.onnx`) for the node's output tensor, whose
name carries the TensorFlow scope of the traced model: `LayerNamer` turns it into the Keras layer;
for a SavedModel (no Keras layers) the node name is the answer. No runtime is loaded here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdeploy.debug.names import LayerNamer

_LITERT = re.compile(r"Node number (\d+) \(([A-Za-z0-9_]+)\) failed to (invoke|prepare)")
_ORT = re.compile(r"running (\S+) node\.\s*Name:\s*'([^']*)'")


def parse_failure(message: str) -> dict[str, Any] | None:
    """The failing node named in a runtime's error text, or None when it names none.

    Returns:
        LiteRT: `{op, node, phase, reason}` (node: index in the execution plan; reason: the
        kernel's own text before it, e.g. `tflite/kernels/div.cc:262 data[i] != zero_point was
        not true`). ONNX Runtime: `{op, node_name, reason}`.
    """
    m = _LITERT.search(message)
    if m:
        before = message[: m.start()]
        reason = before[before.rfind("tflite/"):] if "tflite/" in before else before.rsplit(": ", 1)[-1]
        return {"op": m.group(2), "node": int(m.group(1)), "phase": m.group(3), "reason": _clean(reason)}
    m = _ORT.search(message)
    if m:
        after = message[m.end():]
        status = after.split("Status Message:", 1)[-1] if "Status Message:" in after else after
        return {"op": m.group(1), "node_name": m.group(2), "reason": _clean(status)}
    return None


def _clean(text: str) -> str:
    return " ".join(text.split()).strip(" .:;")[:300]


def crash_site(path: Path, fmt: str, message: str, namer: LayerNamer | None) -> dict[str, Any] | None:
    """Where `message` (a runtime's failure text for the artifact at `path`) says the artifact failed.

    Args:
        fmt: "tflite" or "onnx".
        namer: maps tensor names to Keras layer paths; None for a SavedModel (no Keras layers).

    Returns:
        `{op, node, node_name, layer, inputs_from, reason}` or None when the text names no node
        or the artifact has no such node. `node` is the op's index (LiteRT: in the subgraph's
        execution plan, as the runtime counts; ONNX: in `graph.node`); `node_name` the op's first
        output tensor (TFLite) or node name (ONNX) — the SavedModel's node for a SavedModel;
        `layer` the Keras layer it comes from, or None (a SavedModel, or an op between layers,
        e.g. `keras.ops.divide` in a functional model); `inputs_from`: the layers (else nodes)
        producing its inputs.
    """
    parsed = parse_failure(message)
    if parsed is None:
        return None
    try:
        if fmt == "tflite" and "node" in parsed:
            return _tflite_site(path, parsed, namer)
        if fmt == "onnx" and "node_name" in parsed:
            return _onnx_site(path, parsed, namer)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return None


def _tflite_site(path: Path, parsed: dict, namer: LayerNamer | None) -> dict[str, Any] | None:
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    graph = read_tflite_file(path)
    subgraphs = [(graph.ops, graph.tensors)] + [sg for sg in graph.all_subgraphs[1:]]
    for ops, tensors in subgraphs:  # the primary subgraph first; a nested one (WHILE body) when it fits there
        i = parsed["node"]
        if i < len(ops) and ops[i].name == parsed["op"]:
            return _site(ops, tensors, i, parsed, namer)
    return None


def _site(ops, tensors, i: int, parsed: dict, namer: LayerNamer | None) -> dict[str, Any]:
    op = ops[i]
    name = tensors[op.outputs[0]].name if op.outputs else ""
    producer = {t: o for o in ops for t in o.outputs}
    layer = node_layer(name, namer)

    def label(tensor: int) -> str:
        while tensor in producer and producer[tensor].name in ("QUANTIZE", "DEQUANTIZE"):
            tensor = producer[tensor].inputs[0]  # a conversion at a float/int8 boundary, not a source
        tname = tensors[tensor].name
        if tensor not in producer:
            return f"input {tname.split(';')[0]}"
        return (namer.layer_of(tname) if namer else None) or tname.split(";")[0]

    inputs = [t for t in op.inputs if t >= 0 and tensors[t].data is None]
    return {"op": parsed["op"], "node": i, "node_name": name.split(";")[0], "layer": layer,
            "inputs_from": [x for x in dict.fromkeys(label(t) for t in inputs) if x != layer],
            "reason": parsed["reason"]}


def node_layer(tensor_name: str, namer: LayerNamer | None) -> str | None:
    """The Keras layer of a node's output tensor, or None (SavedModel, or no layer scope)."""
    return namer.layer_of(tensor_name) if namer is not None else None


def _onnx_site(path: Path, parsed: dict, namer: LayerNamer | None) -> dict[str, Any] | None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    index = next((k for k, n in enumerate(graph.node) if n.name == parsed["node_name"]), None)
    if index is None:
        return None
    node = graph.node[index]
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {t.name for t in graph.initializer}
    layer = node_layer(node.name, namer) or next((node_layer(o, namer) for o in node.output if node_layer(o, namer)),
                                                 None)

    def label(tensor: str) -> str:
        while tensor in producer and producer[tensor].op_type in ("QuantizeLinear", "DequantizeLinear"):
            tensor = producer[tensor].input[0]  # a conversion at a float/int8 boundary, not a source
        if tensor not in producer:
            return f"input {tensor}"
        n = producer[tensor]
        return (namer.layer_of(n.name) if namer else None) or n.name

    feeds = [t for t in node.input if t and t not in initializers]
    return {"op": node.op_type, "node": index, "node_name": node.name, "layer": layer,
            "inputs_from": [x for x in dict.fromkeys(label(t) for t in feeds) if x != layer],
            "reason": parsed["reason"]}


def matching_node(ops, tensors, op_name: str, tensor_name: str) -> str | None:
    """The output tensor name (the QuantizationDebugger's node name) of the op in another conversion of the same
    model (e.g. the float `.tflite`) that is the op `op_name` writing `tensor_name` in this one.

    Conversions of one SavedModel name an op's output alike, up to a numeric suffix the
    quantizer appends (`.../MatMul1`); the op type must match too.
    """
    want = tensor_name.split(";")[0]
    base = want.rstrip("0123456789")
    fallback = None
    for op in ops:
        if op.name != op_name or not op.outputs:
            continue
        got = tensors[op.outputs[0]].name
        if got.split(";")[0] == want:
            return got
        if fallback is None and got.split(";")[0].rstrip("0123456789") == base:
            fallback = got
    return fallback


def describe(site: dict[str, Any], keras_layers: bool = True) -> str:
    """One line: `node 4 (DIV) 'gainnet_1/gain_1/truediv', Keras layer 'gain'`.

    Args:
        keras_layers: the model has Keras layers (False: a SavedModel, named by its node).
    """
    text = f"node {site['node']} ({site['op']}) '{site['node_name']}'"
    if site.get("layer"):
        return f"{text}, Keras layer '{site['layer']}'"
    fed = ", ".join(f"'{x}'" for x in site.get("inputs_from", []))
    if not keras_layers:
        return f"{text} (SavedModel node" + (f", fed by {fed})" if fed else ")")
    return f"{text}, in no Keras layer" + (f" (an op between layers, fed by {fed})" if fed else "")
