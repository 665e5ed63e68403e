"""Models without symbolic inputs: subclassed Keras models (`class Net(keras.Model)` with `call()`) and
models never called on an `Input`.

Such a model has no `inputs`/`outputs` until it is called, so its signature cannot be read from the
file: the inputs come from the user (`--input-shape`) or from the data (`--data`: names, dtypes and
non-batch shapes of its arrays), the outputs from calling the model once. This module works on plain
`(name, shape, dtype)` tuples; `kdeploy.loading` wraps them (it imports this module, not the reverse).
"""

from __future__ import annotations

from typing import Any, Sequence

from kdeploy.errors import ModelLoadError, UsageError

Spec = tuple[str, tuple, str]  # (name, shape with the batch dimension first, dtype)


def has_symbolic_inputs(m: Any) -> bool:
    """True when the Keras model has symbolic inputs (functional, or a Sequential built on an input)."""
    try:
        return bool(m.inputs)
    except (AttributeError, ValueError):  # Keras 3 subclassed models have no `inputs` attribute at all
        return False


def input_signature(overrides: dict[str, tuple[int, ...]], data: Sequence[Any] | None, what: str) -> list[Spec]:
    """The input signature of a model without symbolic inputs.

    Args:
        overrides: `--input-shape` NAME -> non-batch shape, in flag order (names become input names).
        data: the data's signature (`kdeploy.data.data_signature`: objects with name, shape, dtype), or None.
        what: the model, for messages (e.g. "subclassed_net.keras (a subclassed DigitsNet)").

    Returns:
        (name, (None, *dims), dtype) per input: shapes from `overrides` where given, else from the
        data; dtypes from the data, else float32.

    Raises:
        UsageError: neither gives the signature, or `overrides` name an input the data does not hold.
    """
    data = list(data or [])
    if not overrides and not data:
        raise UsageError(
            f"{what} has no symbolic inputs, so its input signature is not in the file; pass --data FILE "
            "(its arrays' names, dtypes and shapes become the inputs) or --input-shape NAME=D1,D2,... "
            "(one per input, e.g. --input-shape input_0=224,224,3)")
    if not overrides:
        return [(t.name, (None, *t.shape[1:]), t.dtype) for t in data]
    if len(overrides) == 1 and len(data) <= 1:  # one input: any name names it
        (name, dims), = overrides.items()
        return [(name, (None, *dims), data[0].dtype if data else "float32")]
    if not data:
        return [(n, (None, *d), "float32") for n, d in overrides.items()]
    unknown = [n for n in overrides if n not in {t.name for t in data}]
    if unknown:
        raise UsageError(f"--input-shape names {unknown}, which the data does not hold (its input arrays: "
                         f"{[t.name for t in data]}); name the data's arrays")
    return [(t.name, (None, *overrides.get(t.name, t.shape[1:])), t.dtype) for t in data]


def trace_outputs(m: Any, inputs: list[Spec], what: str) -> tuple[bool, list[Spec], list[str]]:
    """Calls the model once on a zero batch (building it if needed), then traces it for its outputs.

    Several inputs are passed as a dict keyed by input name when the model accepts that, else as a
    list in signature order.

    Returns:
        (takes_dict, outputs, kinds): outputs in `keras.tree.flatten` order (dict keys, nested
        paths joined by '_', else output_<i>); kinds from the op that makes each output (Softmax:
        multiclass, Sigmoid: binary/multilabel, else regression: nothing else is visible).

    Raises:
        ModelLoadError: the model cannot be called on inputs of this signature.
    """
    import numpy as np
    import tensorflow as tf

    def arrange(args: list, as_dict: bool) -> Any:
        if as_dict:
            return {n: a for (n, _, _), a in zip(inputs, args)}
        return list(args) if len(args) > 1 else args[0]

    zeros = [np.zeros((1, *shape[1:]), dtype=dtype) for _, shape, dtype in inputs]
    errors = []
    for as_dict in ([True, False] if len(inputs) > 1 else [False]):
        try:
            m(arrange(zeros, as_dict), training=False)  # builds an unbuilt model outside of any trace
            specs = [tf.TensorSpec(shape, dtype, name=n) for n, shape, dtype in inputs]
            fn = tf.function(lambda *args: m(arrange(list(args), as_dict), training=False))
            struct = fn.get_concrete_function(*specs).structured_outputs
            break
        except Exception as e:  # the user's call(): any error means "not with these inputs"
            errors.append(_call_error(e))
    else:
        sig = ", ".join(f"{n} {tuple(s[1:])} {d}" for n, s, d in inputs)
        raise ModelLoadError(f"{what} cannot be called on inputs {sig} (from --data / --input-shape): "
                             f"{errors[-1]}; give the inputs the model's call() expects")
    names, tensors = _flat(struct)
    outputs = [(n, tuple(t.shape), t.dtype.name) for n, t in zip(names, tensors)]
    return as_dict, outputs, [_kind(t) for t in tensors]


def _call_error(e: Exception) -> str:
    """The telling line of an error from a Keras call (without its 'Exception encountered when calling' header,
    the arguments' listing and terminal colour codes)."""
    import re

    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Exception encountered when calling", "Arguments received", "•"))]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"


def _flat(struct: Any) -> tuple[list[str], list]:
    import keras

    if isinstance(struct, dict) or (isinstance(struct, (list, tuple)) and any(
            isinstance(s, (dict, list, tuple)) for s in struct)):
        pairs = keras.tree.flatten_with_path(struct)
        names = ["_".join(str(p) for p in path) for path, _ in pairs]
        if len(set(names)) == len(names) and isinstance(struct, dict):
            return names, [t for _, t in pairs]
        return [f"output_{i}" for i in range(len(pairs))], [t for _, t in pairs]
    flat = list(struct) if isinstance(struct, (list, tuple)) else [struct]
    return [f"output_{i}" for i in range(len(flat))], flat


def _kind(t: Any) -> str:
    """The output's kind from the graph op that makes it (through Identity ops), when it is an activation.

    TF's Softmax op normalizes the last axis (another axis is a Transpose around it: regression here),
    so "multiclass" of any rank is judged top-1 along the last axis, per location for a map
    (`acceptance.decisions`).
    """
    op = t.op
    while op.type in ("Identity", "IdentityN") and op.inputs:
        op = op.inputs[0].op
    width = t.shape[-1] if t.shape.rank and t.shape.rank >= 2 else 1
    if op.type == "Softmax" and (width or 0) > 1:
        return "multiclass"
    if op.type == "Sigmoid":
        return "binary" if width == 1 else "multilabel"
    return "regression"


def layer_outputs(model: Any, paths: dict[str, Any], x: Any) -> dict[str, Any]:
    """Each layer's output (NumPy, its last call) from one inference-mode call of the model on `x`.

    There is no `keras.Model(model.inputs, [layer.output, ...])` of a model without symbolic
    inputs: each layer's `call` is wrapped on the instance for that one call (Keras' `__call__`
    looks it up there) and restored after it.

    Args:
        paths: layer path -> layer (`kdeploy.debug.names.layer_paths`).
        x: the model's inputs as it takes them (`loading.keras_args`).
    """
    import numpy as np

    got: dict[str, Any] = {}

    def wrap(path: str, original: Any) -> Any:
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            if not isinstance(out, (list, tuple, dict)):
                got[path] = np.asarray(out)
            return out
        return call

    wrapped = []
    try:
        for path, layer in paths.items():
            layer.call = wrap(path, layer.call)
            wrapped.append(layer)
        model(x, training=False)
    finally:
        for layer in wrapped:
            del layer.call
    return got
