"""Rewrites of the ops tf2onnx passes through unconverted into ops ONNX Runtime has.

tf2onnx 1.17 has no handler for TensorFlow's `Erfc` (how TF lowers an exact GELU,
`0.5 * x * erfc(-x / sqrt(2))`) nor for TFLite's fused `GELU`: it copies them into the ONNX graph
as ops `Erfc` / `TFL_GELU` of the default domain, which no ONNX opset defines, so ONNX Runtime
refuses the whole model ("No Op registered for Erfc with domain_version of 17"). Keras' own
`model.export(format="onnx")` goes through the same tf2onnx conversion and gives the same graph.
Each rewrite below replaces one such node with standard ops of the opsets tf2onnx writes (Erf and
Tanh exist from opset 9; ONNX's own `Gelu` only from opset 20):

- `Erfc(x)`            -> `1 - Erf(x)`
- `TFL_GELU(x)`        -> `0.5 * x * (1 + Erf(x / sqrt(2)))`                     (approximate=0)
- `TFL_GELU(x)`        -> `0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3)))` (approximate=1)

The replacements compute in float32, as the original ops do (a quantized TFLite graph feeds GELU
a dequantized tensor and quantizes its output again).
"""

from __future__ import annotations

import math
from pathlib import Path

UNSUPPORTED = ("Erfc", "TFL_GELU")
# The TensorFlow op types among them: tf2onnx has no handler, yet their ONNX export works after the rewrite.
REWRITTEN_TF_OPS = frozenset({"Erfc"})


def rewrite_unsupported_ops(path: str | Path) -> list[str]:
    """Rewrites the ONNX file at `path` in place, replacing the ops in `UNSUPPORTED`.

    Returns:
        The op types rewritten, one entry per node (empty when the file was left as it was).
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if not any(n.op_type in UNSUPPORTED and n.domain in ("", "ai.onnx") for n in g.node):
        return []
    rewritten: list[str] = []
    nodes = []
    consts: dict[float, str] = {}

    def const(value: float) -> str:
        if value not in consts:
            name = f"kdeploy_rewrite_const_{len(consts)}"
            g.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))
            consts[value] = name
        return consts[value]

    for n in g.node:
        if n.op_type not in UNSUPPORTED or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        rewritten.append(n.op_type)
        x, y, base = n.input[0], n.output[0], f"{n.name or n.output[0]}/kdeploy"
        make = onnx.helper.make_node
        if n.op_type == "Erfc":
            nodes += [make("Erf", [x], [f"{base}/erf"], name=f"{base}/erf"),
                      make("Sub", [const(1.0), f"{base}/erf"], [y], name=f"{base}/one_minus")]
            continue
        approximate = next((a.i for a in n.attribute if a.name == "approximate"), 0)
        if approximate:
            inner = [make("Mul", [x, x], [f"{base}/x2"], name=f"{base}/x2"),
                     make("Mul", [f"{base}/x2", x], [f"{base}/x3"], name=f"{base}/x3"),
                     make("Mul", [f"{base}/x3", const(0.044715)], [f"{base}/cx3"], name=f"{base}/cx3"),
                     make("Add", [x, f"{base}/cx3"], [f"{base}/poly"], name=f"{base}/poly"),
                     make("Mul", [f"{base}/poly", const(math.sqrt(2.0 / math.pi))], [f"{base}/arg"], name=f"{base}/arg"),
                     make("Tanh", [f"{base}/arg"], [f"{base}/t"], name=f"{base}/t")]
        else:
            inner = [make("Mul", [x, const(1.0 / math.sqrt(2.0))], [f"{base}/arg"], name=f"{base}/arg"),
                     make("Erf", [f"{base}/arg"], [f"{base}/t"], name=f"{base}/t")]
        nodes += inner + [make("Add", [f"{base}/t", const(1.0)], [f"{base}/one_plus"], name=f"{base}/one_plus"),
                          make("Mul", [x, f"{base}/one_plus"], [f"{base}/x_times"], name=f"{base}/x_times"),
                          make("Mul", [f"{base}/x_times", const(0.5)], [y], name=f"{base}/half")]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(path))
    return rewritten
