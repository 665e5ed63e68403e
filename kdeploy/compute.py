"""Compute cost of an artifact from its `.tflite` op list, and an analytic latency lower bound.

MACs are counted from the graph that is actually deployed (the `.tflite` flatbuffer, read with
LiteRT's generated schema; no TensorFlow import): multiply-accumulates of CONV_2D,
DEPTHWISE_CONV_2D, CONV_3D, TRANSPOSE_CONV, FULLY_CONNECTED, BATCH_MATMUL and the recurrent
sequence ops, from the weight and output shapes at batch 1. FLOPs are `2 * MACs` plus one
operation per output element of the element-wise, activation and pooling ops.

The estimate is a roofline lower bound: `max(operations / peak rate, bytes that must move /
bandwidth)`, with the device's nominal figures from the profile. It says how fast the target
could possibly be, not how fast it will be; it is always labelled an estimate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdeploy.artifacts.flatbuffer import OpLite, TensorLite, TfliteGraph, read_tflite_file

# Ops costing about one operation per output element (element-wise arithmetic and activations).
_ELEMENTWISE = {
    "ADD", "SUB", "MUL", "DIV", "SQUARED_DIFFERENCE", "MAXIMUM", "MINIMUM", "RELU", "RELU6", "RELU_N1_TO_1",
    "RELU_0_TO_1", "LEAKY_RELU", "PRELU", "LOGISTIC", "TANH", "HARD_SWISH", "ELU", "GELU", "EXP", "LOG", "SQRT",
    "RSQRT", "SQUARE", "ABS", "NEG", "POW", "SOFTMAX", "LOG_SOFTMAX", "QUANTIZE", "DEQUANTIZE", "SUM", "MEAN",
}
# Compute precision classes a candidate precision may run at, fastest plausible first (the
# estimate is a lower bound, so it takes the fastest rate the device lists).
_PRECISION_CLASSES: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "fp16": ("fp16", "fp32"),
    "dynamic": ("int8", "fp32"),  # hybrid kernels quantize activations on the fly and multiply in int8
    "int8": ("int8", "fp32"),
    "int16x8": ("int16", "int8", "fp32"),
}


def _op_macs(op: OpLite, t: list[TensorLite]) -> int:
    def shape(i):
        return t[op.inputs[i]].shape if len(op.inputs) > i and op.inputs[i] >= 0 else ()

    out = t[op.outputs[0]] if op.outputs else None
    if out is None:
        return 0
    if op.name == "CONV_2D" and len(shape(1)) == 4:
        _, kh, kw, cin = shape(1)
        return out.elements * kh * kw * cin
    if op.name == "DEPTHWISE_CONV_2D" and len(shape(1)) == 4:
        _, kh, kw, _ = shape(1)
        return out.elements * kh * kw
    if op.name == "CONV_3D" and len(shape(1)) == 5:
        kd, kh, kw, cin, _ = shape(1)
        return out.elements * kd * kh * kw * cin
    if op.name == "TRANSPOSE_CONV" and len(shape(1)) == 4 and shape(2):
        cout, kh, kw, _ = shape(1)
        return int(np.prod(shape(2))) * kh * kw * cout
    if op.name == "FULLY_CONNECTED" and len(shape(1)) == 2:
        return out.elements * shape(1)[1]
    if op.name == "BATCH_MATMUL" and len(shape(0)) >= 2:
        adj_x = bool(op.options and op.options[0])
        return out.elements * shape(0)[-2 if adj_x else -1]
    if op.name in ("UNIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN", "BIDIRECTIONAL_SEQUENCE_LSTM",
                   "LSTM", "SVDF") and shape(0):
        steps = int(np.prod(shape(0)[:-1]))  # batch x time
        weights = sum(t[i].elements for i in op.inputs if i >= 0 and t[i].constant and len(t[i].shape) == 2)
        return steps * weights
    return 0


def _op_other_ops(op: OpLite, t: list[TensorLite]) -> int:
    out = t[op.outputs[0]] if op.outputs else None
    if out is None:
        return 0
    if op.name in _ELEMENTWISE:
        return out.elements
    if op.name in ("MAX_POOL_2D", "AVERAGE_POOL_2D", "L2_POOL_2D"):
        inp = t[op.inputs[0]]
        return inp.elements  # each input element is read into about one window
    return 0


def graph_compute(graph: TfliteGraph, artifact: str | None = None) -> dict[str, Any]:
    """MACs, FLOPs, weights and memory traffic of a parsed `.tflite` graph at batch 1.

    Args:
        graph: from `read_tflite`.
        artifact: file name, recorded as the figures' source.

    Returns:
        A dict: `source`, `macs`, `flops`, `weight_elements`, `weight_bytes`, `io_bytes`,
        `activation_traffic_bytes`, `ops` (op name -> count), `macs_by_op`, `notes`.
    """
    t = graph.tensors
    macs = 0
    other = 0
    op_count: dict[str, int] = {}
    macs_by_op: dict[str, int] = {}
    traffic = 0.0
    for op in graph.ops:
        op_count[op.name] = op_count.get(op.name, 0) + 1
        m = _op_macs(op, t)
        if m:
            macs_by_op[op.name] = macs_by_op.get(op.name, 0) + m
        macs += m
        other += _op_other_ops(op, t)
        traffic += sum(t[i].nbytes for i in op.inputs + op.outputs if i >= 0 and not t[i].constant)
    const = [x for x in t if x.constant]
    notes = [f"counted at batch 1 from the op list of {artifact or 'the .tflite artifact'}"]
    if graph.subgraphs > 1:
        notes.append(f"{graph.subgraphs - 1} control-flow subgraph(s) (e.g. a WHILE loop) not counted: they run a "
                     "data-dependent number of times, so MACs are a lower bound")
    return {
        "source": f"tflite op list ({artifact})" if artifact else "tflite op list",
        "macs": int(macs),
        "flops": int(2 * macs + other),
        "weight_elements": int(sum(x.elements for x in const)),
        "weight_bytes": int(sum(x.nbytes for x in const)),
        "io_bytes": int(sum(t[i].nbytes for i in graph.inputs + graph.outputs)),
        "activation_traffic_bytes": int(traffic),
        "ops": dict(sorted(op_count.items())),
        "macs_by_op": macs_by_op,
        "notes": notes,
    }


def tflite_compute(path: str | Path) -> dict[str, Any]:
    """`graph_compute` of a `.tflite` file."""
    path = Path(path)
    return graph_compute(read_tflite_file(path), path.name)


def estimate_latency(compute: dict[str, Any], precision: str, device) -> dict[str, Any] | None:
    """Roofline lower bound of one inference on `device` (a profile `Device`), from counted work.

    The compute term is `flops / peak rate` at the fastest compute precision the candidate may
    run at; the memory term is the bytes that must move at least once (weights + model inputs
    and outputs) over the bandwidth. Real latency is higher: kernels reach a fraction of peak,
    and activations that do not fit in cache move too (`activation_traffic_bytes`).

    Returns:
        None when `compute` has no counted work or no device rate fits the precision.
    """
    if device is None or not compute or not compute.get("flops"):
        return None
    cls = next((k for k in _PRECISION_CLASSES.get(precision, ("fp32",)) if k in device.peak_gops), None)
    if cls is None:
        return None
    compute_ms = compute["flops"] / (device.peak_gops[cls] * 1e9) * 1e3
    moved = compute["weight_bytes"] + compute["io_bytes"]
    memory_ms = moved / (device.memory_bandwidth_gb_s * 1e9) * 1e3 if device.memory_bandwidth_gb_s else None
    bound = max(compute_ms, memory_ms or 0.0)
    return {
        "kind": "estimate",
        "method": "roofline lower bound: max(FLOPs / peak rate, (weights + I/O bytes) / bandwidth)",
        "device": device.name,
        "latency_ms_lower_bound": round(bound, 6),
        "compute_ms": round(compute_ms, 6),
        "memory_ms": round(memory_ms, 6) if memory_ms is not None else None,
        "bound_by": "memory" if memory_ms is not None and memory_ms > compute_ms else "compute",
        "compute_precision": cls,
        "peak_gops": device.peak_gops[cls],
        "memory_bandwidth_gb_s": device.memory_bandwidth_gb_s,
        "flops": compute["flops"],
        "bytes_moved_min": int(moved),
    }
