"""Byte-reproducible ONNX files: tf2onnx's generated names, renamed by position in graph order.

tf2onnx names the tensors and nodes it creates `<base>__<counter>`, and the counter values
depend on the order in which its optimizers visit sets of nodes, which differs from process to
process (object addresses and string hashes). Two conversions of the same model therefore give
the same graph with different names and initializer order, so different bytes and sha256. The
bases vary too: merging equal nodes and de-duplicating equal constants keeps an arbitrary one of
them (`softmax_1/SelectV2_prequant__7` in one run, `softmax_1/SelectV2_1_prequant__7` in the
next; a generated `const_axes__12` or a TF `softmax_1/Const_1:0`, seen on a KerasHub BERT). So
the nodes are first put in a canonical topological order (`_sort_nodes`: tf2onnx's own order
of independent nodes varies too), then every generated name becomes `gen__k<position>` and every
initializer `const__k<position>`, by first appearance, and initializers are sorted the same way;
names TensorFlow gave its nodes stay, and symbolic dimensions (`unk__441`) are renumbered. The source path tf2onnx writes into the graph's
doc_string is cut to its last component. Graph input and output names are never touched.
"""

from __future__ import annotations

import re
from pathlib import Path

_COUNTER = re.compile(r"__(\d+)")
# Nodes tf2onnx inserts around quantized tensors of a `.tflite` (named `<tensor>_dequant`,
# `tfl.quantize`, ...): merging equal ones keeps an arbitrary one's name, so theirs are generated.
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_CONVERTED_FROM = "converted from "


def canonicalize_onnx(path: str | Path) -> bool:
    """Rewrites `path` in place with canonical generated names.

    Returns:
        True when the file was rewritten; False when it was left as it was (no generated names
        and no path in doc_string, external data, or a renaming that would collide with an
        existing name; the doc_string path is removed even then).
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if external_weights(g):
        return False
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    qdq_nodes = {node.name for node in g.node if node.op_type in _QDQ_OPS}
    generated = {n for node in g.node if node.op_type in _QDQ_OPS for n in node.output}
    generated |= {n for node in g.node for n in [node.name, *node.input, *node.output] if _COUNTER.search(n)}
    generated = (generated - keep) | qdq_nodes  # a node may be named like the graph output it writes
    _sort_nodes(g, generated)
    # Node names live apart from tensor names: a generated node named like a graph output gets its own.
    node_names = {node.name: f"node__k{i}" for i, node in enumerate(g.node) if node.op_type in _QDQ_OPS}
    tensors = keep | {n for node in g.node for n in [*node.input, *node.output]} | {t.name for t in g.initializer}
    order: list[str] = []
    seen: set[str] = set()

    def note(name: str) -> None:
        if name and name not in seen:
            seen.add(name)
            order.append(name)

    def visit(graph) -> None:
        for v in graph.input:
            note(v.name)
        for node in graph.node:
            for n in node.input:
                note(n)
            for n in node.output:
                note(n)
            note(node.name)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub)
        for t in graph.initializer:
            note(t.name)
        for v in list(graph.output) + list(graph.value_info):
            note(v.name)

    visit(g)
    # tf2onnx writes the source path into doc_string ("converted from /tmp/.out.partial-x1y2/...");
    # keep only the last path component, so neither the staging folder's random name nor any
    # local path is in the artifact.
    doc = _path_free(g.doc_string)
    path_free = doc != g.doc_string
    g.doc_string = doc
    initializers = {t.name for t in g.initializer}
    mapping: dict[str, str] = {}
    for name in order:
        if name in keep or (name in node_names and name not in tensors):
            continue
        if name in initializers:  # every one: de-duplication may have kept a TF-named or a generated one
            mapping[name] = f"const__k{len(mapping)}"
        elif name in generated:  # its base too: merging equal nodes keeps an arbitrary one's name
            mapping[name] = f"gen__k{len(mapping)}"
    untouched = seen - set(mapping) - set(node_names)
    if not mapping or untouched & set(mapping.values()) or len(set(mapping.values())) != len(mapping):
        if path_free:
            onnx.save(model, str(path))
        return path_free
    rank = {name: i for i, name in enumerate(order)}

    def rename(graph) -> None:
        for node in graph.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
            node.name = node_names.get(node.name) or mapping.get(node.name, node.name)
            if not node.domain:  # an explicit "" on some nodes only (proto2 field presence)
                node.ClearField("domain")
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    rename(sub)
        for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
            for v in coll:
                v.name = mapping.get(v.name, v.name)
        inits = sorted(graph.initializer, key=lambda t: rank.get(_original(t.name), len(rank)))
        del graph.initializer[:]
        graph.initializer.extend(inits)
        infos = sorted(graph.value_info, key=lambda v: rank.get(_original(v.name), len(rank)))
        del graph.value_info[:]
        graph.value_info.extend(infos)

    reverse = {v: k for k, v in mapping.items()}

    def _original(name: str) -> str:
        return reverse.get(name, name)

    rename(g)
    _rename_dim_params(g)
    onnx.save(model, str(path))
    return True


def _path_free(doc: str) -> str:
    """tf2onnx's "converted from <path>" with the path cut to its last component (spaces allowed)."""
    if not doc.startswith(_CONVERTED_FROM):
        return doc
    source = doc[len(_CONVERTED_FROM):].rstrip("/\\")
    return _CONVERTED_FROM + re.split(r"[/\\]", source)[-1]


def _sort_nodes(g, generated: set[str]) -> None:
    """Reorders the top-level nodes topologically, ties broken by a label that does not depend on generated names.

    A node's label hashes its op, attributes, its name unless `generated` and, per input, the
    graph input or TF tensor name, the initializer's contents, or (for a generated tensor) the
    producing node's label and output index.
    """
    import hashlib
    import heapq

    inits = {t.name: t for t in g.initializer}
    producer: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(g.node):
        for j, out in enumerate(node.output):
            producer[out] = (i, j)
    labels: dict[int, str] = {}

    def tensor_label(name: str) -> str:
        if name in inits:
            t = type(inits[name])()
            t.CopyFrom(inits[name])
            t.name = ""
            return "c:" + hashlib.sha256(t.SerializeToString(deterministic=True)).hexdigest()
        if name in producer and name in generated:
            i, j = producer[name]
            return f"p:{node_label(i)}:{j}"
        return "n:" + name

    def node_label(i: int) -> str:
        if i not in labels:
            node = g.node[i]
            h = hashlib.sha256()
            h.update(f"{node.domain}/{node.op_type}/{'' if node.name in generated else node.name}".encode())
            for a in sorted(node.attribute, key=lambda a: a.name):
                h.update(a.SerializeToString(deterministic=True))
            for n in node.input:
                h.update(b"\0" + tensor_label(n).encode())
            labels[i] = h.hexdigest()
        return labels[i]

    for i in range(len(g.node)):  # producers come first in a valid graph: shallow recursion
        node_label(i)
    needs = [{producer[n][0] for n in node.input if n in producer} for node in g.node]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            users.setdefault(d, []).append(i)
    missing = [len(d) for d in needs]
    ready = [(labels[i], i) for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, (labels[u], u))
    if len(order) != len(g.node):  # not a DAG as read (should not happen): leave the order alone
        return
    nodes = [g.node[i] for i in order]
    copies = [type(n)() for n in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def _rename_dim_params(g) -> None:
    """tf2onnx's symbolic dimensions (`unk__441`) renumbered by first appearance (inputs, outputs, value_info)."""
    names: dict[str, str] = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if not v.type.HasField("tensor_type"):
            continue
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and _COUNTER.search(d.dim_param):
                d.dim_param = names.setdefault(d.dim_param, f"unk__k{len(names)}")


def external_weights(graph) -> bool:
    """Whether an ONNX graph (loaded with `load_external_data=False`) keeps initializers in files beside it (a model
    past protobuf's 2 GB): rewriting it in place would inline them, so the rewrites leave such files as they are."""
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
