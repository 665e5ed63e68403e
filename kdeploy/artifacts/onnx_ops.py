"""Rewrites of the ops tf2onnx leaves unconverted into standard ONNX ops: one table row per op.

tf2onnx copies an op it has no handler for (or whose handler raised) into the ONNX graph as it
is: a TFLite op as `TFL_<NAME>`, a TensorFlow op under its own name, in ONNX's default domain,
where no opset defines it, so ONNX Runtime refuses the whole model ("No Op registered for
TFL_BROADCAST_ARGS with domain_version of 17"). Keras' own `model.export(format="onnx")` goes
through the same tf2onnx. What real Keras graphs emit (tf2onnx 1.17, opset 17; the fp32, dynamic,
fp16 and int8 `.tflite` alike, since a quantized graph feeds these ops dequantized tensors):

- `Erfc` (TF): exact GELU on the SavedModel route (`0.5 x erfc(-x/sqrt(2))`) -> `1 - Erf(x)`;
- `TFL_GELU`: `gelu` (BERT, GPT-2, Gemma feed-forward) -> `0.5 x (1 + Erf(x/sqrt(2)))`, or its
  Tanh form for `approximate=1`;
- `TFL_BROADCAST_ARGS`: a broadcast of a 5-D tensor with a dynamic dimension (Gemma's attention
  mask, `softmax/Greater`) -> both shape vectors left-padded with 1s, then per dimension the
  other's size where one is 1 (BroadcastArgs' own rule; exact for size 0, unlike a Max);
- `TFL_BUCKETIZE`: `keras.layers.Discretization` -> how many boundaries are <= x;
- `TFL_RELU_N1_TO_1`, `TFL_RELU_0_TO_1`: `clip(x, -1, 1)`, `clip(x, 0, 1)` on their own -> `Clip`.

The same two clamps fused into the op before them (`clip(dense(x), -1, 1)`: FULLY_CONNECTED,
ADD, ... with `fused_activation_function=RELU_N1_TO_1`) make tf2onnx's handler raise after it
dropped the attribute, leaving e.g. `TFL_FULLY_CONNECTED` without its clamp: no rewrite after
the fact can restore that, so `teach_fused_activations` adds them to tf2onnx's own helper before
it converts. Anything else left (`RewriteResult.left`: e.g. `RFFT2D`, `TFL_REAL`, `TFL_IMAG` of
`keras.ops.rfft`, whose Real/Imag consumers tf2onnx's RFFT handler refuses) is for the caller to
name, with the Keras layer it comes from. Each replacement yields the original op's output type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Domains ONNX Runtime's CPU provider resolves: ONNX's own, ONNX-ML and Microsoft's contrib ops.
_STANDARD_DOMAINS = ("", "ai.onnx")
_ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


@dataclass(frozen=True)
class Unconverted:
    """One node tf2onnx left unconverted and no row of `REWRITES` replaces."""

    op: str  # its op type: `TFL_<NAME>` for a TFLite op, else the TensorFlow op name
    node: str  # the node's name: tf2onnx names it after the op's first output tensor (TFLite) or TF node


@dataclass
class RewriteResult:
    """What `rewrite_unsupported_ops` did to a file."""

    rewritten: list[str] = field(default_factory=list)  # op types replaced, one entry per node
    left: list[Unconverted] = field(default_factory=list)  # nodes still unloadable by ONNX Runtime


class _Emit:
    """Writes the standard nodes that replace one node (named under it), with shared constants."""

    def __init__(self, node: Any, consts: Callable[[Any, int], str]):
        self.base = f"{node.name or node.output[0]}/kdeploy"
        self.nodes: list[Any] = []
        self._const = consts
        self._n = 0

    def const(self, value: Any, dtype: int | None = None) -> str:
        """A constant initializer (float32 unless `dtype`, an onnx.TensorProto type); lists make a 1-D tensor."""
        import onnx

        return self._const(value, onnx.TensorProto.FLOAT if dtype is None else dtype)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        """Appends one node; returns its output (`out`, else a fresh name)."""
        import onnx

        name = f"{self.base}/{op_type.lower()}_{self._n}"
        self._n += 1
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _erfc(e: _Emit, node: Any) -> None:
    e.op("Sub", e.const(1.0), e.op("Erf", node.input[0]), out=node.output[0])


def _gelu(e: _Emit, node: Any) -> None:
    x = node.input[0]
    if _attr(node, "approximate", 0):  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = e.op("Mul", e.op("Mul", x, x), x)
        poly = e.op("Add", x, e.op("Mul", x3, e.const(0.044715)))
        t = e.op("Tanh", e.op("Mul", poly, e.const(math.sqrt(2.0 / math.pi))))
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        t = e.op("Erf", e.op("Mul", x, e.const(1.0 / math.sqrt(2.0))))
    e.op("Mul", e.op("Mul", x, e.op("Add", t, e.const(1.0))), e.const(0.5), out=node.output[0])


def _broadcast_args(e: _Emit, node: Any) -> None:
    """The broadcast shape of two shape vectors: both left-padded with 1s to one length, then per
    dimension the other's size where one is 1 (exact for sizes 0 too, unlike a plain Max)."""
    import onnx

    i64 = onnx.TensorProto.INT64
    a, b = (e.op("Cast", s, to=i64) for s in node.input[:2])
    na, nb = e.op("Shape", a), e.op("Shape", b)
    n = e.op("Max", na, nb)
    one = onnx.helper.make_tensor("one", i64, [1], [1])
    pa, pb = (e.op("Concat", e.op("ConstantOfShape", e.op("Sub", n, nv), value=one), v, axis=0)
              for v, nv in ((a, na), (b, nb)))
    shape = e.op("Where", e.op("Equal", pa, e.const(1, i64)), pb, pa)
    e.op("CastLike", shape, node.input[0], out=node.output[0])  # BroadcastArgs keeps its inputs' type


def _bucketize(e: _Emit, node: Any) -> None:
    """int32 bucket index: how many boundaries are <= x (TensorFlow's Bucketize)."""
    import onnx

    bounds = [float(v) for v in (_attr(node, "boundaries", []) or [])]
    x = e.op("Cast", node.input[0], to=onnx.TensorProto.FLOAT)
    above = e.op("GreaterOrEqual", e.op("Unsqueeze", x, e.const([-1], onnx.TensorProto.INT64)), e.const(bounds))
    e.op("ReduceSum", e.op("Cast", above, to=onnx.TensorProto.INT32), e.const([-1], onnx.TensorProto.INT64),
         keepdims=0, out=node.output[0])


def _clip(lo: float, hi: float) -> Callable[[_Emit, Any], None]:
    def rewrite(e: _Emit, node: Any) -> None:
        e.op("Clip", node.input[0], e.const(lo), e.const(hi), out=node.output[0])

    return rewrite


# One row per op tf2onnx 1.17 leaves unconverted on real Keras graphs (module docstring).
REWRITES: dict[str, Callable[[_Emit, Any], None]] = {
    "Erfc": _erfc,
    "TFL_GELU": _gelu,
    "TFL_BROADCAST_ARGS": _broadcast_args,
    "TFL_BUCKETIZE": _bucketize,
    "TFL_RELU_N1_TO_1": _clip(-1.0, 1.0),
    "TFL_RELU_0_TO_1": _clip(0.0, 1.0),
}
UNSUPPORTED = tuple(REWRITES)
# The TensorFlow op types among them: tf2onnx has no handler, yet their ONNX export works after the rewrite.
REWRITTEN_TF_OPS = frozenset(op for op in REWRITES if not op.startswith("TFL_"))


def loadable(node: Any) -> bool:
    """True when ONNX Runtime knows the node's op: a standard ONNX op, or one of its contrib domains."""
    import onnx

    if node.domain in _STANDARD_DOMAINS:
        return onnx.defs.has(node.op_type)
    return node.domain in _ORT_DOMAINS


def _graphs(graph: Any) -> list[Any]:
    """`graph` and every subgraph of its nodes (Loop / If / Scan bodies), outermost first."""
    import onnx

    out = [graph]
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    out += _graphs(g)
    return out


def rewrite_graph(model: Any) -> RewriteResult:
    """Replaces every node of `model` (an onnx.ModelProto, changed in place) that has a row in `REWRITES`.

    Returns:
        The op types rewritten and the nodes left that ONNX Runtime cannot load.
    """
    import numpy as np
    import onnx

    result = RewriteResult()
    for g in _graphs(model.graph):
        if all(loadable(n) for n in g.node):
            continue
        consts: dict[tuple, str] = {}

        def const(value: Any, dtype: int, g: Any = g, consts: dict = consts) -> str:
            key = (dtype, tuple(value) if isinstance(value, list) else value)
            if key not in consts:
                name = f"kdeploy_rewrite_const_{len(consts)}"
                arr = np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype))
                g.initializer.append(onnx.numpy_helper.from_array(arr, name))
                consts[key] = name
            return consts[key]

        nodes = []
        for n in g.node:
            rewrite = REWRITES.get(n.op_type) if n.domain in _STANDARD_DOMAINS else None
            if rewrite is None:
                nodes.append(n)
                if not loadable(n):
                    result.left.append(Unconverted(n.op_type, n.name or n.output[0]))
                continue
            e = _Emit(n, const)
            rewrite(e, n)
            nodes += e.nodes
            result.rewritten.append(n.op_type)
        del g.node[:]
        g.node.extend(nodes)
    return result


def rewrite_unsupported_ops(path: str | Path) -> RewriteResult:
    """Rewrites the ONNX file at `path` in place (`rewrite_graph`); the file is left as it was when nothing
    was rewritten."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    result = rewrite_graph(model)
    if result.rewritten:
        onnx.save(model, str(path))
    return result


# Fused activations tf2onnx's TFLite handlers drop (it knows NONE, RELU, RELU6, TANH): (low, high) of the clamp.
_FUSED_CLAMPS = {b"RELU_N1_TO_1": (-1.0, 1.0), b"RELU_0_TO_1": (0.0, 1.0)}


def teach_fused_activations() -> None:
    """Adds `RELU_N1_TO_1` / `RELU_0_TO_1` to tf2onnx's `separate_fused_activation_function` (once per process).

    tf2onnx 1.17 deletes the op's `fused_activation_function` attribute, then raises for these two,
    and the op stays unconverted without its clamp. The wrapper inserts Minimum/Maximum (TensorFlow
    ops, converted on tf2onnx's second pass like its own RELU6) and hands every other activation
    to tf2onnx's function unchanged.
    """
    import numpy as np
    from tf2onnx import utils
    from tf2onnx.tflite_handlers import tfl_math, tfl_nn

    original = tfl_math.separate_fused_activation_function
    if getattr(original, "kdeploy_clamps", False):
        return

    def separate(ctx: Any, node: Any) -> None:
        attr = node.attr.get("fused_activation_function")
        bounds = _FUSED_CLAMPS.get(attr.s if attr is not None else b"NONE")
        if bounds is None:
            return original(ctx, node)
        del node.attr["fused_activation_function"]
        out = node.output[0]
        shape, dtype = ctx.get_shape(out), ctx.get_dtype(out)
        np_dtype = utils.map_onnx_to_numpy_type(dtype)
        for op, bound in (("Minimum", bounds[1]), ("Maximum", bounds[0])):
            c = ctx.make_const(utils.make_name(f"{node.name}_{op.lower()}"), np.array(bound, dtype=np_dtype))
            clamp = ctx.make_node(op, [out, c.output[0]], shapes=[shape], dtypes=[dtype], skip_conversion=False)
            ctx.insert_node_on_output(clamp, out)
            out = clamp.output[0]
        return None

    separate.kdeploy_clamps = True  # type: ignore[attr-defined]
    for module in (tfl_math, tfl_nn):
        if getattr(module, "separate_fused_activation_function", None) is original:
            module.separate_fused_activation_function = separate
