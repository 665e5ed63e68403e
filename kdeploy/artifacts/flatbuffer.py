"""The one `.tflite` flatbuffer reader: ops, tensors (with their constant buffers), signature.

Read with LiteRT's generated schema module (no TensorFlow, no interpreter). Everything that
looks inside a `.tflite` goes through `read_tflite`: compute counting (`kdeploy.compute`), the
TFLite Micro runner's signature mapping, weight statistics (sparsity, unique values) and
precision detection of artifacts built elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# TensorType code -> (name, bytes per element); 4-bit and 2-bit types are packed.
_TYPES: dict[int, tuple[str, float]] = {
    0: ("float32", 4), 1: ("float16", 2), 2: ("int32", 4), 3: ("uint8", 1), 4: ("int64", 8), 5: ("string", 1),
    6: ("bool", 1), 7: ("int16", 2), 8: ("complex64", 8), 9: ("int8", 1), 10: ("float64", 8),
    11: ("complex128", 16), 12: ("uint64", 8), 13: ("resource", 0), 14: ("variant", 0), 15: ("uint32", 4),
    16: ("uint16", 2), 17: ("int4", 0.5), 18: ("bfloat16", 2), 19: ("int2", 0.25),
}
_NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
          "int32": np.int32, "int64": np.int64, "float64": np.float64, "int4": np.int8}


@dataclass
class TensorLite:
    shape: tuple[int, ...]
    dtype: str
    itemsize: float
    constant: bool
    name: str = ""
    data: bytes | None = None  # the constant buffer's bytes (None for activations)
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0
    sparse: bool = False  # stored in the TFLite sparse format

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> float:
        return self.elements * self.itemsize

    def values(self) -> np.ndarray:
        """The constant buffer as numpy values (as stored: packed types read as bytes)."""
        return np.frombuffer(self.data or b"", dtype=_NUMPY.get(self.dtype, np.uint8))


@dataclass
class OpLite:
    name: str
    inputs: list[int]
    outputs: list[int]
    options: Any = None


@dataclass
class TfliteGraph:
    """The primary subgraph of a `.tflite` model (ops, tensors, serving signature) and the others."""

    ops: list[OpLite]
    tensors: list[TensorLite]
    inputs: list[int]
    outputs: list[int]
    subgraphs: int
    signature: dict[str, dict[str, int]] = field(default_factory=dict)  # inputs/outputs: name -> position
    all_subgraphs: list[tuple[list[OpLite], list[TensorLite]]] = field(default_factory=list)


def _op_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as fb

    return {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _buffer(m: Any, index: int, data: bytes) -> bytes | None:
    b = m.Buffers(index) if index < m.BuffersLength() else None
    if b is None:
        return None
    if b.Offset() > 1:  # large models keep buffers after the flatbuffer
        return data[b.Offset() : b.Offset() + b.Size()]
    return b.DataAsNumpy().tobytes() if b.DataLength() else None


def _tensor(m: Any, t: Any, data: bytes) -> TensorLite:
    name, size = _TYPES.get(t.Type(), (str(t.Type()), 4))
    buf = _buffer(m, t.Buffer(), data)
    q = t.Quantization()
    scales = tuple(float(s) for s in q.ScaleAsNumpy()) if q is not None and q.ScaleLength() else ()
    zps = tuple(int(z) for z in q.ZeroPointAsNumpy()) if q is not None and q.ZeroPointLength() else ()
    return TensorLite(
        shape=tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else (),
        dtype=name, itemsize=size, constant=buf is not None,
        name=t.Name().decode("utf-8", "replace") if t.Name() else "",
        data=buf, scales=scales, zero_points=zps,
        quantized_dimension=int(q.QuantizedDimension()) if q is not None else 0,
        sparse=t.Sparsity() is not None,
    )


def read_tflite(data: bytes) -> TfliteGraph:
    """Parses a `.tflite` flatbuffer.

    Args:
        data: the model file's bytes.

    Returns:
        A TfliteGraph of the primary subgraph; `signature` maps the serving signature's input
        and output names to their positions in the subgraph's input and output lists (empty when
        there is no signature); `all_subgraphs` holds (ops, tensors) of every subgraph.

    Raises:
        ValueError: the bytes are not a TFLite model.
    """
    from ai_edge_litert import schema_py_generated as fb

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    m = fb.Model.GetRootAs(data, 0)
    names = _op_names()
    codes = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        custom = oc.CustomCode()
        codes.append(custom.decode() if code == fb.BuiltinOperator.CUSTOM and custom else names.get(code, str(code)))
    subgraphs = []
    for g in range(m.SubgraphsLength()):
        sg = m.Subgraphs(g)
        tensors = [_tensor(m, sg.Tensors(i), data) for i in range(sg.TensorsLength())]
        ops = []
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            options = None
            if codes[op.OpcodeIndex()] == "BATCH_MATMUL" and op.BuiltinOptions() is not None:
                options = fb.BatchMatMulOptions()
                options.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
                options = (bool(options.AdjX()), bool(options.AdjY()))
            ops.append(OpLite(codes[op.OpcodeIndex()],
                              [int(x) for x in op.InputsAsNumpy()] if op.InputsLength() else [],
                              [int(x) for x in op.OutputsAsNumpy()] if op.OutputsLength() else [], options))
        subgraphs.append((ops, tensors))
    sg = m.Subgraphs(0)
    g_in = [int(x) for x in sg.InputsAsNumpy()] if sg.InputsLength() else []
    g_out = [int(x) for x in sg.OutputsAsNumpy()] if sg.OutputsLength() else []
    signature: dict[str, dict[str, int]] = {}
    for s in range(m.SignatureDefsLength()):
        sd = m.SignatureDefs(s)
        if sd.SignatureKey() in (b"serving_default", None) or m.SignatureDefsLength() == 1:
            signature = {
                "inputs": {sd.Inputs(j).Name().decode(): g_in.index(sd.Inputs(j).TensorIndex())
                           for j in range(sd.InputsLength()) if sd.Inputs(j).TensorIndex() in g_in},
                "outputs": {sd.Outputs(j).Name().decode(): g_out.index(sd.Outputs(j).TensorIndex())
                            for j in range(sd.OutputsLength()) if sd.Outputs(j).TensorIndex() in g_out},
            }
            break
    ops, tensors = subgraphs[0]
    return TfliteGraph(ops, tensors, g_in, g_out, m.SubgraphsLength(), signature, subgraphs)


def read_tflite_file(path: str | Path) -> TfliteGraph:
    return read_tflite(Path(path).read_bytes())


def output_producers(graph: TfliteGraph) -> dict[str, list[str]]:
    """Signature output name -> the types of the ops that write it, from the output back to the first op that
    computes values (e.g. ["RESHAPE", "LOGISTIC"]): QUANTIZE/DEQUANTIZE at a quantized graph's edge and
    shape-only ops are followed to their input; {} without a signature."""
    writer = {t: op for op in graph.ops for t in op.outputs}

    def chain(t: int) -> list[str]:
        out, op = [], writer.get(t)
        while op is not None:
            out.append(op.name)
            if op.name not in _VALUE_PRESERVING or not op.inputs:
                break
            op = writer.get(op.inputs[0])
        return out

    return {name: chain(graph.outputs[pos]) for name, pos in graph.signature.get("outputs", {}).items()}


_VALUE_PRESERVING = ("QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS")


def tflite_precision(graph: TfliteGraph) -> str:
    """Precision of a `.tflite` from its tensor types.

    Full-integer graphs may keep float inputs/outputs (with QUANTIZE/DEQUANTIZE at the edges);
    dynamic-range graphs keep float activations inside.
    """
    types = {t.dtype for t in graph.tensors}
    edge = set(graph.inputs) | set(graph.outputs)
    float_inside = any(t.dtype == "float32" and i not in edge and len(t.shape) > 1 for i, t in enumerate(graph.tensors))
    if "int16" in types and "int8" in types:
        return "int16x8"
    if "int8" in types:
        return "dynamic" if float_inside else "int8"
    if "float16" in types:
        return "fp16"
    return "fp32"


# op name -> index of its weight input
_WEIGHT_INPUT = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "CONV_3D": 1, "DEPTHWISE_CONV_2D": 1, "TRANSPOSE_CONV": 1,
                 "BATCH_MATMUL": 1, "EMBEDDING_LOOKUP": 1, "GATHER": 0}
_PASS_THROUGH = ("DENSIFY", "DEQUANTIZE")


def weight_stats(path: str | Path) -> dict[str, Any]:
    """Counts zeros and unique values in the weight tensors of a `.tflite` file.

    What ships, not what a pruning schedule promised: a weight tensor is the constant
    filter/weights input of a FULLY_CONNECTED, CONV_2D, CONV_3D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV,
    BATCH_MATMUL, EMBEDDING_LOOKUP or GATHER op, followed back through DENSIFY (sparse-encoded
    weights) and DEQUANTIZE (fp16 weights) ops. Quantized values are compared with their zero point.

    Returns:
        `{"sparsity", "weights", "zeros", "unique_max", "unique_per_channel_max", "sparse_encoded",
        "tensors": [...]}` where sparsity is zeros / weights over all weight tensors, unique_max the
        most distinct values in one tensor, unique_per_channel_max the same per quantization
        channel (per-channel int8 weights scale each channel differently), sparse_encoded how many
        tensors use the TFLite sparse format, and each tensor row has name, op, shape, dtype,
        weights, zeros, unique, unique_per_channel and sparse_encoded.
    """
    graph = read_tflite_file(path)
    rows, seen = [], set()
    for g, (ops, tensors) in enumerate(graph.all_subgraphs):
        producer = {t: op for op in ops for t in op.outputs}
        for op in ops:
            slot = _WEIGHT_INPUT.get(op.name)
            if slot is None or len(op.inputs) <= slot:
                continue
            t = op.inputs[slot]
            while t >= 0 and tensors[t].data is None and t in producer and producer[t].name in _PASS_THROUGH:
                t = producer[t].inputs[0]
            if t < 0 or (g, t) in seen or tensors[t].data is None:
                continue  # not a constant (e.g. an activation fed to BATCH_MATMUL)
            seen.add((g, t))
            rows.append(_tensor_row(tensors[t], op.name))
    weights = sum(r["weights"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {
        "sparsity": round(zeros / weights, 6) if weights else 0.0,
        "weights": weights,
        "zeros": zeros,
        "unique_max": max((r["unique"] for r in rows), default=0),
        "unique_per_channel_max": max((r["unique_per_channel"] for r in rows), default=0),
        "sparse_encoded": sum(1 for r in rows if r["sparse_encoded"]),
        "tensors": rows,
    }


def _tensor_row(tensor: TensorLite, op: str) -> dict:
    values = tensor.values()
    shape = list(tensor.shape)
    dense = int(np.prod(shape)) if shape else len(values)
    zps = tensor.zero_points
    zero_point = zps[0] if zps and all(z == zps[0] for z in zps) else 0  # per-channel weights are symmetric (0)
    stored_zeros = int(np.count_nonzero(values == zero_point))
    sparse = tensor.sparse
    # A sparse-encoded tensor stores only its non-zero blocks: the rest are zeros that are not stored.
    zeros = (dense - len(values) + stored_zeros) if sparse else stored_zeros
    unique = len(np.unique(values)) + (1 if sparse and dense > len(values) and stored_zeros == 0 else 0)
    per_channel = unique
    if len(tensor.scales) > 1 and not sparse and len(values) == dense and shape:
        per_channel = max(len(np.unique(c)) for c in np.moveaxis(values.reshape(shape), tensor.quantized_dimension, 0))
    return {"name": tensor.name, "op": op, "shape": shape, "dtype": tensor.dtype, "weights": dense, "zeros": zeros,
            "unique": unique, "unique_per_channel": per_channel, "sparse_encoded": sparse}
