"""Every intermediate tensor of `.tflite` models, per Keras layer, from LiteRT with all tensors preserved.

`python -m kdeploy.debug.tensors JOB.json` (through `kdeploy.child`) runs each artifact of the
job with `experimental_preserve_all_tensors=True`, sample by sample (batch 1, so it runs any
batch-1 graph), and writes, per artifact, the output of the last op of each Keras layer,
dequantized to float32 (`layers.npz` keyed `<artifact index>/<layer>`) with the op type and
dtype of that layer's ops in `result.json`. No TensorFlow here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from kdeploy.child import child_main
from kdeploy.debug.names import LayerNamer

SKIP_OPS = ("QUANTIZE", "DEQUANTIZE")  # conversions at the edges of kept-float ops, not layers


def layer_ops(graph, namer: LayerNamer) -> tuple[dict[str, list[int]], dict[int, str]]:
    """Keras layer path -> indices of its ops in op order (QUANTIZE/DEQUANTIZE excluded).

    An op whose tensors name no layer (e.g. the fused activation writing the graph output)
    belongs to the layer that produced its first non-constant input.
    """
    producer_layer: dict[int, str] = {}
    out: dict[str, list[int]] = {}
    for i, op in enumerate(graph.ops):
        layer = next((namer.layer_of(graph.tensors[t].name) for t in op.outputs if namer.layer_of(graph.tensors[t].name)),
                     None)
        if layer is None:
            layer = next((producer_layer[t] for t in op.inputs if t in producer_layer), None)
        if layer is None:
            continue
        for t in op.outputs:
            producer_layer[t] = layer
        if op.name not in SKIP_OPS:
            out.setdefault(layer, []).append(i)
    return out, producer_layer


def _run(job: dict) -> dict:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from kdeploy.artifacts.flatbuffer import read_tflite
    from kdeploy.runtimes.quant import dequantize, quantize

    with np.load(job["feeds_path"]) as z:
        feeds = {k: z[k] for k in z.files}
    namer = LayerNamer(job["model_name"], job["layers"])
    n = min(len(next(iter(feeds.values()))), job["samples"])
    saved: dict[str, np.ndarray] = {}
    meta = []
    for a, art in enumerate(job["artifacts"]):
        data = Path(art["path"]).read_bytes()
        graph = read_tflite(data)
        ops, producer = layer_ops(graph, namer)
        # Without the default (XNNPACK) delegate: a delegated subgraph keeps its intermediate
        # tensors to itself (int8 ones read back as zeros here, even with preserve_all_tensors).
        it = Interpreter(model_content=data, experimental_preserve_all_tensors=True, num_threads=1,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        runner = it.get_signature_runner("serving_default")
        in_details = runner.get_input_details()
        details = {d["index"]: d for d in it.get_tensor_details()}
        last = {layer: graph.ops[idx[-1]].outputs[0] for layer, idx in ops.items()}
        rows: dict[str, list[np.ndarray]] = {layer: [] for layer in last}
        for s in range(n):
            args = {}
            for model_name, sig_name in art["io"]["inputs"].items():
                d = in_details[sig_name]
                args[sig_name] = quantize(feeds[model_name][s : s + 1], d["dtype"], *d["quantization"])
            runner(**args)
            for layer, t in last.items():
                rows[layer].append(dequantize(it.get_tensor(t), *details[t]["quantization"]).astype(np.float32))
        for layer, r in rows.items():
            saved[f"{a}/{layer}"] = np.concatenate(r) if r[0].ndim else np.stack(r)
        meta.append({layer: {"op": graph.ops[idx[-1]].name, "ops": [graph.ops[i].name for i in idx],
                             "input_dtypes": sorted({graph.tensors[t].dtype for i in idx for t in graph.ops[i].inputs
                                                     if t >= 0 and graph.tensors[t].data is None}),
                             "nodes": [graph.tensors[graph.ops[i].outputs[0]].name for i in idx],
                             "fed_by": sorted({producer[t] for i in idx for t in graph.ops[i].inputs
                                               if producer.get(t, layer) != layer})}
                     for layer, idx in ops.items()})
    np.savez(Path(job["out_path"]), **saved)
    return {"artifacts": meta, "samples": n}


if __name__ == "__main__":
    child_main(sys.argv[1:], _run)
