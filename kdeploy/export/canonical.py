"""Byte-reproducible ONNX files: tf2onnx's generated names, renumbered in graph order.

tf2onnx names the tensors and nodes it creates `<base>__<counter>`, and the counter values
depend on the order in which its optimizers visit sets of nodes, which differs from process to
process (object addresses and string hashes). Two conversions of the same model therefore give
the same graph with different names and initializer order, so different bytes and sha256. This
renumbers every such counter by its first appearance in the (deterministic) node order, names
generated constants by position alone (tf2onnx's constant de-duplication keeps an arbitrary one of
equal constants, e.g. `const_axes__12` or `const_starts__13`), and sorts initializers the same
way; the source path tf2onnx writes into the graph's doc_string is cut to its last component.
Graph input and output names are never touched.
"""

from __future__ import annotations

import re
from pathlib import Path

_COUNTER = re.compile(r"__(\d+)")
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
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        return False
    keep = {v.name for v in g.input} | {v.name for v in g.output}
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
    counters: dict[str, str] = {}
    for name in order:
        if name not in keep:
            for num in _COUNTER.findall(name):
                counters.setdefault(num, f"__k{len(counters)}")
    initializers = {t.name for t in g.initializer}
    mapping: dict[str, str] = {}
    for name in order:
        if name in keep or not _COUNTER.search(name):
            continue
        if name in initializers:
            mapping[name] = f"const__k{len(mapping)}"
        else:
            mapping[name] = _COUNTER.sub(lambda m: counters[m.group(1)], name)
    untouched = seen - set(mapping)
    if not mapping or untouched & set(mapping.values()) or len(set(mapping.values())) != len(mapping):
        if path_free:
            onnx.save(model, str(path))
        return path_free
    rank = {name: i for i, name in enumerate(order)}

    def rename(graph) -> None:
        for node in graph.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
            node.name = mapping.get(node.name, node.name)
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
    onnx.save(model, str(path))
    return True


def _path_free(doc: str) -> str:
    """tf2onnx's "converted from <path>" with the path cut to its last component (spaces allowed)."""
    if not doc.startswith(_CONVERTED_FROM):
        return doc
    source = doc[len(_CONVERTED_FROM):].rstrip("/\\")
    return _CONVERTED_FROM + re.split(r"[/\\]", source)[-1]
