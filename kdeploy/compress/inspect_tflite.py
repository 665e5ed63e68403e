"""What a `.tflite` file really holds in its weight buffers: zeros (sparsity) and unique values.

Read straight from the flatbuffer (LiteRT's schema module), not from a pruning schedule or the
Keras model, so the report states what ships. A weight tensor is the constant filter/weights
input of a FULLY_CONNECTED, CONV_2D, CONV_3D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, BATCH_MATMUL,
EMBEDDING_LOOKUP or GATHER op, followed back through DENSIFY (sparse-encoded weights) and
DEQUANTIZE (fp16 weights) ops. Quantized values are compared with their zero point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# op name -> index of the weight input
_WEIGHT_INPUT = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "CONV_3D": 1, "DEPTHWISE_CONV_2D": 1, "TRANSPOSE_CONV": 1,
                 "BATCH_MATMUL": 1, "EMBEDDING_LOOKUP": 1, "GATHER": 0}
_PASS_THROUGH = ("DENSIFY", "DEQUANTIZE")
_NUMPY = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16,
          "INT32": np.int32, "INT64": np.int64, "FLOAT64": np.float64, "INT4": np.int8}


def weight_stats(path: str | Path) -> dict[str, Any]:
    """Counts zeros and unique values in the weight tensors of a `.tflite` file.

    Args:
        path: the `.tflite` file.

    Returns:
        `{"sparsity", "weights", "zeros", "unique_max", "unique_per_channel_max", "sparse_encoded",
        "tensors": [...]}` where sparsity is zeros / weights over all weight tensors, unique_max the
        most distinct values in one tensor, unique_per_channel_max the same per quantization
        channel (per-channel int8 weights scale each channel differently), sparse_encoded how many
        tensors use the TFLite sparse format, and each tensor row has name, op, shape, dtype,
        weights, zeros, unique, unique_per_channel and sparse_encoded.
    """
    from ai_edge_litert import schema_py_generated as schema

    buf = Path(path).read_bytes()
    model = schema.Model.GetRootAs(buf, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "CUSTOM"))
    rows, seen = [], set()
    for g in range(model.SubgraphsLength()):
        sg = model.Subgraphs(g)
        producer = {}
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            for t in (op.OutputsAsNumpy() if op.OutputsLength() else []):
                producer[int(t)] = op
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            name = codes[op.OpcodeIndex()]
            slot = _WEIGHT_INPUT.get(name)
            if slot is None or op.InputsLength() <= slot:
                continue
            t = int(op.InputsAsNumpy()[slot])
            while t >= 0 and _buffer(model, sg.Tensors(t), buf) is None and t in producer \
                    and codes[producer[t].OpcodeIndex()] in _PASS_THROUGH:
                t = int(producer[t].InputsAsNumpy()[0])
            if t < 0 or (g, t) in seen:
                continue
            tensor = sg.Tensors(t)
            data = _buffer(model, tensor, buf)
            if data is None:
                continue  # not a constant (e.g. an activation fed to BATCH_MATMUL)
            seen.add((g, t))
            rows.append(_tensor_row(tensor, data, name, types))
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


def _buffer(model: Any, tensor: Any, buf: bytes) -> bytes | None:
    b = model.Buffers(tensor.Buffer())
    if b is None:
        return None
    if b.Offset() > 1:  # large models keep buffers after the flatbuffer
        return buf[b.Offset() : b.Offset() + b.Size()]
    n = b.DataLength()
    return b.DataAsNumpy().tobytes() if n else None


def _tensor_row(tensor: Any, data: bytes, op: str, types: dict) -> dict:
    dtype_name = types.get(tensor.Type(), "UNKNOWN")
    values = np.frombuffer(data, dtype=_NUMPY.get(dtype_name, np.uint8))
    shape = [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
    dense = int(np.prod(shape)) if shape else len(values)
    q = tensor.Quantization()
    zero_point = 0
    if q is not None and q.ZeroPointLength():
        zps = q.ZeroPointAsNumpy()
        zero_point = int(zps[0]) if np.all(zps == zps[0]) else 0  # per-channel weights are symmetric (0)
    stored_zeros = int(np.count_nonzero(values == zero_point))
    sparse = tensor.Sparsity() is not None
    # A sparse-encoded tensor stores only its non-zero blocks: the rest are zeros that are not stored.
    zeros = (dense - len(values) + stored_zeros) if sparse else stored_zeros
    unique = len(np.unique(values)) + (1 if sparse and dense > len(values) and stored_zeros == 0 else 0)
    per_channel = unique
    if q is not None and q.ScaleLength() > 1 and not sparse and len(values) == dense and shape:
        axis = q.QuantizedDimension()
        per_channel = max(len(np.unique(c)) for c in np.moveaxis(values.reshape(shape), axis, 0))
    name = tensor.Name().decode("utf-8", "replace") if tensor.Name() else ""
    return {"name": name, "op": op, "shape": shape, "dtype": dtype_name.lower(), "weights": dense, "zeros": zeros,
            "unique": unique, "unique_per_channel": per_channel, "sparse_encoded": sparse}
