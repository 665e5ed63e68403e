"""Keras 3 → tf_keras translation, so TFMOT (which only accepts tf_keras models) can work on it.

TFMOT 0.8 refuses Keras 3 models and tf_keras cannot read Keras 3 files (see STACK.md). The
bridge rebuilds the architecture in tf_keras: it walks the Keras 3 graph node by node, creates
the tf_keras layer class of the same name from the Keras 3 `get_config()` (dtype policies reduced
to their name, initializer/regularizer/constraint dicts to `{class_name, config}`, keys the
tf_keras constructor does not accept dropped), calls it on the mapped inputs, and copies the
weights layer by layer (as copies: the Keras 3 model is never written to).

A translation is trusted only after `verify` shows its outputs equal the original's. Classes
covered and checked by tests: Dense, Conv1D, Conv2D, DepthwiseConv2D, SeparableConv2D,
BatchNormalization, LayerNormalization, Activation, ReLU, Softmax, Dropout, Flatten, Reshape,
MaxPooling1D/2D, AveragePooling1D/2D, GlobalAveragePooling1D/2D, GlobalMaxPooling1D/2D,
ZeroPadding2D, Add, Multiply, Concatenate, Embedding, LSTM, GRU, MultiHeadAttention, Rescaling,
Normalization, nested Sequential/functional models. Other built-in Keras layers whose class
exists in tf_keras are translated the same way and stand or fall by `verify`.

Importing this module does not import a framework; `to_tf_keras` imports tf_keras (not TFMOT).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdeploy.errors import KdeployError

BRIDGE_ATOL = 1e-5  # a faithful translation runs the same kernels: differences are accumulation order only
RNN_CLASSES = ("LSTM", "GRU", "SimpleRNN")
# Keyword arguments the tf_keras base Layer accepts besides its named parameters.
_BASE_KWARGS = {"input_dim", "input_shape", "batch_input_shape", "batch_size", "weights",
                "activity_regularizer", "autocast", "implementation"}
# Keras 3 config keys that only describe the Keras 3 object and never change what it computes.
_SILENT_DROPS = {"quantization_config", "lora_rank", "lora_alpha", "seed", "optional", "ragged", "build_config",
                 "flash_attention", "use_cudnn"}


class BridgeError(KdeployError):
    """A layer the bridge cannot translate (turned into a finding, never reaches the CLI)."""

    def __init__(self, layer: str, cls: str, reason: str):
        super().__init__(f"layer '{layer}' ({cls}): {reason}")
        self.layer, self.cls, self.reason = layer, cls, reason


@dataclass
class BridgeInfo:
    """What the translation did: layer classes seen, config keys dropped, RNNs unrolled."""

    classes: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    unrolled: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"classes": sorted(set(self.classes)), "dropped_config_keys": self.dropped, "unrolled": self.unrolled}


def to_tf_keras(model: Any, *, unroll_rnn: bool = True) -> tuple[Any, BridgeInfo]:
    """Translates a Keras 3 model (Sequential or functional) into a tf_keras functional model.

    Args:
        model: a built Keras 3 `keras.Model`.
        unroll_rnn: rebuild LSTM/GRU/SimpleRNN layers with `unroll=True` when their time steps are
            static, so the exported graph uses LiteRT builtin ops only (see STACK.md).

    Returns:
        (tf_keras model with inputs and outputs in the Keras 3 model's order, BridgeInfo).

    Raises:
        BridgeError: a layer has no tf_keras counterpart, or its config or weights do not fit it.
    """
    import tf_keras

    info = BridgeInfo()
    return _bridge_model(model, tf_keras, info, unroll_rnn), info


def verify(original: Any, bridged: Any, inputs: list[np.ndarray], batch_size: int = 256) -> float:
    """Max abs difference between the two models' outputs on `inputs` (model input order).

    Raises:
        BridgeError: the outputs differ in number or shape.
    """
    worst = 0.0
    n = len(inputs[0])
    for s in range(0, n, batch_size):
        part = [a[s : s + batch_size] for a in inputs]
        a = _as_list(original(_feed(original, part), training=False), original)
        b = _as_list(bridged(part if len(part) > 1 else part[0], training=False), bridged)
        if len(a) != len(b):
            raise BridgeError("(model)", type(original).__name__, f"{len(b)} outputs instead of {len(a)}")
        for x, y in zip(a, b):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                raise BridgeError("(model)", type(original).__name__, f"output shape {y.shape} instead of {x.shape}")
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0)
    return worst


def _feed(model: Any, args: list) -> Any:
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return {t.name: a for t, a in zip(model.inputs, args)}
    return list(args) if len(args) > 1 else args[0]


def _as_list(out: Any, model: Any) -> list:
    if isinstance(out, dict):
        names = list(getattr(model, "output_names", None) or out)
        return [out[k] for k in names]
    return list(out) if isinstance(out, (list, tuple)) else [out]


# ----------------------------------------------------------------------------------------------
def _bridge_model(model: Any, tfk: Any, info: BridgeInfo, unroll: bool) -> Any:
    import keras

    graph = model._functional if isinstance(model, keras.Sequential) else model
    if graph is None or not hasattr(graph, "_nodes_by_depth"):
        raise BridgeError(model.name, type(model).__name__, "model is not built (no input shape); cannot walk its graph")
    tensors: dict[int, Any] = {}
    new_inputs = []
    for t in graph.inputs:
        x = tfk.Input(batch_shape=tuple(t.shape), dtype=str(t.dtype), name=t.name)
        tensors[id(t)] = x
        new_inputs.append(x)
    made: dict[int, tuple[Any, Any]] = {}  # id(Keras 3 layer) -> (it, tf_keras layer); shared layers made once
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            op = node.operation
            if isinstance(op, keras.layers.InputLayer):
                continue
            if id(op) not in made:
                made[id(op)] = (op, _make_layer(op, tfk, info, unroll))
            layer = made[id(op)][1]
            args = keras.tree.map_structure(lambda v: _map_tensor(v, tensors, op), node.arguments.args)
            kwargs = keras.tree.map_structure(lambda v: _map_tensor(v, tensors, op), node.arguments.kwargs)
            try:
                out = layer(*args, **kwargs)
            except Exception as e:
                raise BridgeError(op.name, type(op).__name__, f"tf_keras call failed: {_short(e)}") from None
            outs = keras.tree.flatten(out)
            if len(outs) != len(node.outputs):
                raise BridgeError(op.name, type(op).__name__, f"{len(outs)} outputs instead of {len(node.outputs)}")
            for k3, k2 in zip(node.outputs, outs):
                tensors[id(k3)] = k2
    missing = [t.name for t in graph.outputs if id(t) not in tensors]
    if missing:
        raise BridgeError(model.name, type(model).__name__, f"outputs {missing} not reached from the inputs")
    new = tfk.Model(inputs=new_inputs, outputs=[tensors[id(t)] for t in graph.outputs], name=model.name)
    for src, layer in made.values():
        if not isinstance(src, keras.Model):  # nested models copied their weights when translated
            _copy_weights(src, layer)
    return new


def _map_tensor(v: Any, tensors: dict[int, Any], op: Any) -> Any:
    import keras

    if isinstance(v, keras.KerasTensor):
        if id(v) not in tensors:
            raise BridgeError(op.name, type(op).__name__, f"input tensor {v.name} was not produced by a translated layer")
        return tensors[id(v)]
    return v


def _make_layer(op: Any, tfk: Any, info: BridgeInfo, unroll: bool) -> Any:
    import keras

    cls_name = type(op).__name__
    if isinstance(op, keras.Model):
        info.classes.append(cls_name)
        return _bridge_model(op, tfk, info, unroll)
    if not isinstance(op, keras.layers.Layer):
        raise BridgeError(getattr(op, "name", "?"), cls_name, "a raw keras.ops operation in the graph, not a layer; "
                          "tf_keras has no counterpart (wrap it in a built-in layer)")
    module = type(op).__module__
    target = getattr(tfk.layers, cls_name, None)
    if not module.startswith("keras.") or target is None or not isinstance(target, type):
        why = "a custom class" if not module.startswith("keras.") else "no tf_keras layer of that name"
        raise BridgeError(op.name, cls_name, f"{why}; the bridge cannot translate it")
    cfg = _reduce(op.get_config())
    if unroll and cls_name in RNN_CLASSES and not cfg.get("unroll", False):
        steps = op._inbound_nodes[0].input_tensors[0].shape[1] if op._inbound_nodes else None
        if steps is not None:
            cfg["unroll"] = True
            info.unrolled.append(op.name)
    accepted = _accepted_keys(target)
    dropped = sorted(k for k in cfg if k not in accepted)
    loud = [k for k in dropped if k not in _SILENT_DROPS and cfg[k] not in (None, False, [], {})]
    if loud:  # a dropped setting that is on may change the maths: `verify` has the last word
        info.dropped[op.name] = loud
    cfg = {k: v for k, v in cfg.items() if k in accepted}
    if cls_name == "MultiHeadAttention":  # tf_keras from_config wants these; None builds on first call
        cfg.update(query_shape=None, key_shape=None, value_shape=None)
    try:
        layer = target.from_config(cfg)
    except Exception as e:
        raise BridgeError(op.name, cls_name, f"tf_keras refused its config: {_short(e)}") from None
    info.classes.append(cls_name)
    return layer


def _accepted_keys(cls: type) -> set[str]:
    keys: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        keys.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return keys - {"self"}
        if klass.__name__ == "Layer":
            break
    return (keys | _BASE_KWARGS) - {"self"}


def _reduce(value: Any) -> Any:
    """Keras 3 serialized objects → the forms tf_keras reads."""
    if isinstance(value, dict):
        if "class_name" in value and "config" in value:
            if value["class_name"] in ("DTypePolicy", "FloatDTypePolicy") and "name" in (value["config"] or {}):
                return value["config"]["name"]
            return _reduce_object(value)
        return {k: _reduce(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reduce(v) for v in value]
    return value


def _reduce_object(value: dict) -> dict:
    """An initializer / regularizer / constraint dict: `{class_name, config}` with keys tf_keras knows."""
    import tf_keras

    name, cfg = value["class_name"], dict(value.get("config") or {})
    for getter in (tf_keras.initializers, tf_keras.regularizers, tf_keras.constraints):
        cls = getattr(getter, name, None)
        if isinstance(cls, type):
            accepted = _accepted_keys(cls)
            cfg = {k: v for k, v in cfg.items() if k in accepted}
            break
    return {"class_name": name, "config": _reduce(cfg)}


def _copy_weights(src: Any, dst: Any) -> None:
    """Copies weight values (numpy copies) from a Keras 3 layer into its tf_keras counterpart."""
    values = [np.array(w) for w in src.get_weights()]
    have = dst.get_weights()
    shapes_src = [v.shape for v in values]
    shapes_dst = [w.shape for w in have]
    if shapes_src != shapes_dst:
        # tf_keras Normalization keeps mean/variance with the broadcast shape; same values.
        if len(values) == len(have) and all(v.size == w.size for v, w in zip(values, have)):
            values = [v.reshape(w.shape) for v, w in zip(values, have)]
        else:
            raise BridgeError(src.name, type(src).__name__,
                              f"weight shapes differ: Keras 3 {shapes_src}, tf_keras {shapes_dst}")
    dst.set_weights(values)


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}"
