"""Every intermediate tensor of `.tflite` models, per Keras layer, from LiteRT with all tensors preserved.

`python -m kdeploy.debug.tensors JOB.json` (through `kdeploy.child`) runs each artifact of the
job with `experimental_preserve_all_tensors=True`, sample by sample (batch 1, so it runs any
batch-1 graph), and takes, per artifact, the output of the last op of each Keras layer,
dequantized to float32, with the op type and dtype of that layer's ops in `result.json`, and
where non-finite values appear: the ops whose float output holds NaN/Inf on some sample, in op
order (`non_finite`). The outputs are written to `out_path` (`layers.npz` keyed `<artifact
index>/<layer>`) when the job names one, and compared here as the job's `compare` entries ask
(`attribution.compare_layers`: `compared` in the result). With `layers` None (a SavedModel: no
Keras layers) ops are grouped by their name scope (`names.ScopeNamer`). No TensorFlow here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kdeploy.child import child_main
from kdeploy.debug.attribution import LayerTensors, compare_layers
from kdeploy.debug.names import LayerNamer, ScopeNamer

SKIP_OPS = ("QUANTIZE", "DEQUANTIZE")  # conversions at the edges of kept-float ops, not layers
NON_FINITE_OPS = 10  # ops listed in `non_finite`: the first ones in op order (where the NaN/Inf start)


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


def _keep(kept: dict[str, np.ndarray], layer: str, s: int, n: int, value: np.ndarray) -> None:
    """Sample `s` of `n` of a layer's output into its array (allocated at the first sample), as float32: samples
    stacked along the first axis (a value without one: a vector of one per sample)."""
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 0:
        value = value.reshape(1)
    rows = value.shape[0]
    if layer not in kept:
        kept[layer] = np.empty((n * rows, *value.shape[1:]), np.float32)
    kept[layer][s * rows : (s + 1) * rows] = value


def _run(job: dict) -> dict:
    from ai_edge_litert.interpreter import OpResolverType

    from kdeploy.artifacts.flatbuffer import read_tflite
    from kdeploy.runtimes.litert import LiteRTRunner
    from kdeploy.runtimes.quant import dequantize

    with np.load(job["feeds_path"]) as z:
        feeds = {k: z[k] for k in z.files}
    namer = ScopeNamer() if job["layers"] is None else LayerNamer(job["model_name"], job["layers"])
    n = min(len(next(iter(feeds.values()))), job["samples"])
    outputs: list[dict[str, np.ndarray]] = []
    meta = []
    non_finite = []
    for a, art in enumerate(job["artifacts"]):
        data = Path(art["path"]).read_bytes()
        graph = read_tflite(data)
        ops, producer = layer_ops(graph, namer)
        # Without the default (XNNPACK) delegate: a delegated subgraph keeps its intermediate
        # tensors to itself (int8 ones read back as zeros here, even with preserve_all_tensors).
        runner = LiteRTRunner(SimpleNamespace(path=Path(art["path"]), io=art["io"]), threads=1,
                              experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        last = {layer: graph.ops[idx[-1]].outputs[0] for layer, idx in ops.items()}
        kept: dict[str, np.ndarray] = {}  # layer -> its outputs on every sample, filled in place (no list to join)
        float_outs = [(i, op.outputs[0]) for i, op in enumerate(graph.ops)
                      if op.outputs and graph.tensors[op.outputs[0]].dtype in ("float32", "float16")]
        bad = dict.fromkeys((i for i, _ in float_outs), 0)
        size = dict.fromkeys(bad, 0)
        with runner:  # fed through its signature, or its tensors where the file has none
            it = runner.interpreter
            details = {d["index"]: d for d in it.get_tensor_details()}
            for s in range(n):
                runner.infer({k: v[s : s + 1] for k, v in feeds.items()})
                for layer, t in last.items():
                    _keep(kept, layer, s, n, dequantize(it.get_tensor(t), *details[t]["quantization"]))
                for i, t in float_outs:
                    v = it.get_tensor(t)
                    bad[i] += int(v.size - np.count_nonzero(np.isfinite(v)))
                    size[i] += int(v.size)
        outputs.append(kept)
        meta.append({layer: {"op": graph.ops[idx[-1]].name, "ops": [graph.ops[i].name for i in idx],
                             "input_dtypes": sorted({graph.tensors[t].dtype for i in idx for t in graph.ops[i].inputs
                                                     if t >= 0 and graph.tensors[t].data is None}),
                             "nodes": [graph.tensors[graph.ops[i].outputs[0]].name for i in idx],
                             "fed_by": sorted({producer[t] for i in idx for t in graph.ops[i].inputs
                                               if producer.get(t, layer) != layer})}
                     for layer, idx in ops.items()})
        non_finite.append([
            {"node": i, "op": graph.ops[i].name, "node_name": graph.tensors[graph.ops[i].outputs[0]].name.split(";")[0],
             "layer": producer.get(graph.ops[i].outputs[0]), "count": c,
             "elements": size[i]}
            for i, c in bad.items() if c][:NON_FINITE_OPS])
    if job.get("out_path"):
        np.savez(Path(job["out_path"]), **{f"{a}/{layer}": v for a, out in enumerate(outputs) for layer, v in out.items()})
    compared = []
    for c in job.get("compare", []):
        r, k = c["reference"], c["candidate"]
        compared.append(compare_layers(LayerTensors(outputs[r], meta[r], non_finite[r]),
                                       LayerTensors(outputs[k], meta[k], non_finite[k]), c))
    return {"artifacts": meta, "non_finite": non_finite, "samples": n, "compared": compared}


if __name__ == "__main__":
    child_main(sys.argv[1:], _run)
