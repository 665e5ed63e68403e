"""The reference SavedModel: exported once, then every TFLite recipe converts from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdeploy.errors import ConversionError
from kdeploy.util import first_error_line, native_quiet
from kdeploy.loading import LoadedModel, call_keras, is_nested, takes_dict

RNN_CLASSES = ("LSTM", "GRU", "SimpleRNN")


def conversion_model(model: LoadedModel, probe_feeds: dict[str, np.ndarray]) -> tuple[Any, list[tuple[str, str, str]]]:
    """The Keras model to convert: the original, or a verified copy with recurrent layers unrolled.

    Non-unrolled LSTM/GRU layers lower to TensorList/While ops that LiteRT's builtin op set cannot
    run; with static time steps, `unroll=True` gives builtin ops only. The copy is trusted only if
    its outputs equal the original's on `probe_feeds` (max abs diff <= 1e-5).

    Returns:
        (keras model, findings as (severity, code, message)).
    """
    import keras

    m = model.keras_model
    if not model.symbolic:  # clone_model takes functional and Sequential models only
        rnns = [l for l in m._flatten_layers(include_self=False) if type(l).__name__ in RNN_CLASSES
                and not getattr(l, "unroll", False)]
        return m, [("warning", "rnn-unroll-skipped", (
            f"recurrent layer(s) {', '.join(l.name for l in rnns)} of the subclassed model {type(m).__name__} are "
            "converted as they are, not unrolled (the unrolled copy is made with keras.models.clone_model, which takes "
            "functional and Sequential models only); if they need Select TF ops, set unroll=True in the model's code"))
                   ] if rnns else []
    rnns = [l for l in _all_layers(m) if _is_rolled_rnn(l)]
    if not rnns:
        return m, []

    def clone_fn(layer):
        cfg = layer.get_config()
        if _is_rolled_rnn(layer):
            cfg = _unrolled_config(layer, cfg)
        return layer.__class__.from_config(cfg)

    try:
        clone = keras.models.clone_model(m, clone_function=clone_fn)
        clone.set_weights(m.get_weights())
    except Exception as e:
        return m, [("warning", "rnn-unroll-failed", f"could not unroll recurrent layers for conversion: {first_error_line(e)}")]
    a = model.predict(probe_feeds)
    b = call_keras(clone, [probe_feeds[t.name] for t in model.inputs], model)
    diff = max(float(np.max(np.abs(x - np.asarray(y)))) for x, y in zip(a, b))
    names = ", ".join(f"{l.name} ({type(l).__name__})" for l in rnns)
    if diff > 1e-5:
        return m, [("warning", "rnn-unroll-mismatch", f"unrolled copy of {names} differs by {diff:.2e} (> 1e-5); converting the original")]
    return clone, [("info", "rnn-unrolled", f"recurrent layer(s) {names} unrolled for conversion (static time steps); max abs diff vs original {diff:.1e}")]


def _all_layers(m: Any) -> list:
    out = []
    for l in m.layers:
        out.append(l)
        if hasattr(l, "layers") and l is not m:
            out.extend(_all_layers(l))
        inner = getattr(l, "forward_layer", None)
        if inner is not None:
            out.append(inner)
    return out


def _is_rolled_rnn(layer: Any) -> bool:
    if type(layer).__name__ in RNN_CLASSES:
        return not getattr(layer, "unroll", False)
    if type(layer).__name__ == "Bidirectional":
        return _is_rolled_rnn(layer.forward_layer)
    return False


def _unrolled_config(layer: Any, cfg: dict) -> dict:
    cfg = dict(cfg)
    if type(layer).__name__ == "Bidirectional":
        inner = dict(cfg["layer"])
        inner["config"] = {**inner["config"], "unroll": True}
        cfg["layer"] = inner
        if cfg.get("backward_layer"):
            back = dict(cfg["backward_layer"])
            back["config"] = {**back["config"], "unroll": True}
            cfg["backward_layer"] = back
    else:
        cfg["unroll"] = True
    return cfg


def export_savedmodel(keras_model: Any, model: LoadedModel, out_dir: Path) -> list[str]:
    """Writes the serving SavedModel (signature inputs named after the model inputs).

    A SavedModel signature returns a flat dict of tensors: a model with nested outputs (a dict
    holding dicts or lists) is exported through a functional wrapper whose flat dict outputs are
    named as in `model.outputs`.

    Returns:
        the serving signature's output keys, in model output order.
    """
    import keras
    import tensorflow as tf

    struct = getattr(keras_model, "_outputs_struct", None)
    flat_dict = isinstance(struct, dict) and not any(isinstance(v, (dict, list, tuple)) for v in struct.values())
    if is_nested(struct) and not flat_dict:
        keras_model = keras.Model(keras_model.input, {t.name: o for t, o in zip(model.outputs, keras_model.outputs)},
                                  name=keras_model.name)

    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in model.inputs]
    if takes_dict(keras_model, model):
        signature = [{t.name: s for t, s in zip(model.inputs, specs)}]
    else:
        signature = [specs] if len(specs) > 1 else specs
    try:
        with native_quiet():
            if model.symbolic:
                keras_model.export(str(out_dir), format="tf_saved_model", input_signature=signature, verbose=False)
            else:
                _export_flat(keras_model, model, out_dir, signature)
    except Exception as e:
        raise ConversionError(f"SavedModel export failed: {first_error_line(e)}") from e
    return signature_output_keys(out_dir, model)


def _export_flat(keras_model: Any, model: LoadedModel, out_dir: Path, signature: list) -> None:
    """Exports a model without symbolic outputs (a subclassed model: no functional wrapper can be built on it)
    through a serving function that returns its outputs as a flat dict named as in `model.outputs`
    (whatever structure its call() returns; what `model.export` does, with the outputs flattened)."""
    import keras

    from kdeploy.loading import flatten_outputs

    def serve(x):
        return {t.name: o for t, o in zip(model.outputs, flatten_outputs(keras_model(x, training=False)))}

    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(str(out_dir), verbose=False)


def signature_output_keys(saved_model_dir: Path, model: LoadedModel) -> list[str]:
    """Output keys of the serving signature in model output order (named outputs, else output_i)."""
    from tensorflow.core.protobuf import saved_model_pb2

    # Read from saved_model.pb: `tf.saved_model.load` would restore every variable and function
    # (seconds, and a second copy of the weights in memory) to list a few names.
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    keys = list(proto.meta_graphs[0].signature_def["serving_default"].outputs)
    names = [t.name for t in model.outputs]
    if set(names) <= set(keys):
        return names
    wanted = [f"output_{i}" for i in range(len(names))]
    if set(wanted) <= set(keys):
        return wanted
    raise ConversionError(f"cannot map SavedModel signature outputs {keys} to model outputs {names}")
