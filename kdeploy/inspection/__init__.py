"""`kdeploy inspect`: readiness before any full conversion.

One fp32 conversion at most: the model `optimize` would convert (recurrent layers unrolled when
that verifies, the target's static batch applied) is traced, frozen and converted once with
Select TF ops allowed (`inspection.ops`); summary figures and hazards are rules over what that
conversion shows (`inspection.rules`). The result is an `Inspection` (report section).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdeploy.errors import ConversionError, UsageError
from kdeploy.loading import LoadedModel
from kdeploy.profiles import TargetProfile, resolve_profile
from kdeploy.report.model import Inspection

PROBE_SAMPLES = 16


def inspect(
    model: str | Path,
    *,
    target: str | None = None,
    profile: str | Path | None = None,
    data: str | Path | None = None,
    trust_custom_code: bool = False,
    custom_objects: str | Path | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    progress: Callable[[str, str], None] | None = None,
) -> Inspection:
    """Predicts whether a model is ready for a target, per Keras layer, before building anything.

    Args:
        model: `.keras` / `.h5` file (loaded safely, as for `optimize`).
        target: built-in target name (default `cpu-edge` when no `profile`).
        profile: path of a user profile file (TOML).
        data: `.npz` / `.npy` / `.csv` inputs: enables the input-range rule and is the probe for
            the RNN unroll check.
        trust_custom_code: allow code from the model file (Lambda layers).
        custom_objects: a `.py` file whose classes the user trusts.
        input_shapes: non-batch shapes for inputs with dynamic dimensions.
        seed: seed for synthetic probe inputs.
        progress: callback `(stage, detail)`.

    Returns:
        The Inspection; `ready` is False when a hazard blocks the target.

    Raises:
        UsageError: bad model, profile, data or options (exit 2).
    """
    from kdeploy.data import data_signature, load_data
    from kdeploy.loading import load_custom_objects, load_model

    progress = progress or (lambda stage, detail="": None)
    prof = resolve_profile(target if target or profile else "cpu-edge", profile)
    if data is not None and not Path(data).is_file():
        raise UsageError(f"data file not found: {data} (allowed: .npz, .npy, .csv)")
    custom = load_custom_objects(custom_objects) if custom_objects else None
    progress("load", str(model))
    m = load_model(model, trust_custom_code=trust_custom_code, custom_objects=custom, input_shapes=input_shapes,
                   seed=seed, allow_dynamic=True,
                   data_signature=(lambda: data_signature(data)) if data is not None else None)
    if m.keras_model is None:
        raise UsageError(f"inspect needs a Keras model (.keras or .h5); received a {m.format} ({model})")
    arrays = None
    if data is not None and not any(d is None for t in m.inputs for d in t.shape[1:]):
        arrays = load_data(data, m.inputs).inputs
    return inspect_loaded(m, prof, arrays, seed=seed, progress=progress)


def inspect_loaded(m: LoadedModel, prof: TargetProfile, data: dict[str, np.ndarray] | None, *, seed: int = 0,
                   conversion: tuple[Any, list] | None = None, tflite: bytes | None = None,
                   progress: Callable[[str, str], None] | None = None) -> Inspection:
    """The inspection of a loaded Keras model (also called by `optimize`).

    Args:
        m: the loaded model (`keras_model` set).
        prof: the target profile.
        data: real inputs by name, or None (no input-range rule; synthetic probe inputs).
        seed: seed for synthetic probe inputs.
        conversion: `(keras model, findings)` from `conversion_model` when the caller already has
            it (optimize); else it is made here.
        tflite: the fp32 `.tflite` optimize converted from that model with builtin ops only, read
            instead of converting again (`ops.find_ops`).
        progress: callback `(stage, detail)`.
    """
    from kdeploy.compute import graph_compute
    from kdeploy.artifacts.savedmodel import conversion_model
    from kdeploy.inspection import ops, rules

    progress = progress or (lambda stage, detail="": None)
    started = time.perf_counter()
    inputs = rules.static_batch_inputs(m.inputs, prof)
    dynamic = any(d is None for t in inputs for d in t.shape[1:])
    if conversion is None:
        if dynamic:  # unrolling needs static time steps; convert the model as it is
            conversion = (m.keras_model, [])
        else:
            progress("inspect", "checking repairs (recurrent layers unrolled)")
            conversion = conversion_model(m, _probe(m, data, seed))
    keras_model, found_repairs = conversion
    index = ops.layer_index(m.keras_model)
    repaired = _repaired_layers(index, found_repairs)
    progress("inspect", "one fp32 TFLite conversion (Select TF ops allowed) and op lookup" if tflite is None else
             "op lookup in the fp32 .tflite")
    found = ops.find_ops(m, keras_model, inputs, tflite)
    tflm, onnx, notes = _registries()
    rows = rules.layer_rows(index, found, tflm, onnx, repaired)
    summary = _summary(m, index, inputs, found, prof)
    hazards = rules.hazards(m, index, rows, found, prof, inputs, data, summary, repaired)
    return Inspection(
        target=prof.name,
        ready=not any(h.blocks for h in hazards),
        summary=summary,
        layers=rows,
        hazards=hazards,
        conversion={
            "method": ("Keras call traced in inference mode, variables frozen, TFLiteConverter.from_concrete_functions "
                       "(fp32, TFLITE_BUILTINS + SELECT_TF_OPS); ONNX route: tf2onnx handler registry over the same "
                       "frozen TensorFlow graph" if tflite is None else
                       "the fp32 candidate's .tflite (converted from the reference SavedModel with builtin ops only); "
                       "ONNX route: tf2onnx handler registry over the Keras call traced in inference mode")
                      + "; TFLM: op registrations of the installed tflite-micro",
            "converted_model": "unrolled copy (as optimize converts it)" if keras_model is not m.keras_model
            else "the model as loaded",
            "error": found.error,
            "tflite_ops": graph_compute(found.graph)["ops"] if found.graph is not None else {},
            "unmapped_ops": sorted(set(found.unmapped_ops)),
            "seconds": round(found.seconds, 3),
            "notes": notes,
        },
        duration_s=round(time.perf_counter() - started, 3),
    )


def _probe(m: LoadedModel, data: dict[str, np.ndarray] | None, seed: int) -> dict[str, np.ndarray]:
    from kdeploy.data import synthetic_data

    if data is not None:
        return {k: v[:PROBE_SAMPLES] for k, v in data.items()}
    return synthetic_data(m.inputs, PROBE_SAMPLES, seed).inputs


def _repaired_layers(index: dict[str, Any], findings: list[tuple[str, str, str]]) -> dict[str, str]:
    """Layer path -> what `conversion_model` did to it (unrolled, or why not)."""
    from kdeploy.artifacts.savedmodel import _is_rolled_rnn

    rolled = [p for p, layer in index.items() if _is_rolled_rnn(layer)]
    out = {}
    for _, code, msg in findings:
        for p in rolled:
            out[p] = (f"{p} is a recurrent layer without unroll: it lowers to TensorList/While ops; "
                      + ("optimize converts an unrolled copy (static time steps): " if code == "rnn-unrolled" else
                         "the unroll repair did not apply: ") + msg)
    return out


def _registries() -> tuple[frozenset[str] | None, frozenset[str] | None, list[str]]:
    from kdeploy.inspection import ops

    notes = []
    try:
        tflm = ops.tflm_ops()
    except ConversionError as e:
        tflm = None
        notes.append(str(e))
    notes.append("TFLM support is per op (registered kernels), not per op and dtype")
    return tflm, ops.onnx_handlers(), notes


def _summary(m: LoadedModel, index: dict[str, Any], inputs, found, prof: TargetProfile) -> dict[str, Any]:
    from kdeploy.compute import graph_compute
    from kdeploy.inspection import ops, rules

    def spec(t):
        return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                "dynamic_axes": [i for i, d in enumerate(t.shape) if d is None]}

    out: dict[str, Any] = {
        "layers": len(index),
        "params": m.params,
        "inputs": [spec(t) for t in inputs],
        "outputs": [spec(t) for t in m.outputs],
        "macs": None,
        "fp32_bytes": None,
        "predicted_size_bytes": None,
    }
    if found.graph is None:
        return out
    out["macs"] = graph_compute(found.graph)["macs"]
    out["fp32_bytes"] = found.tflite_bytes
    sizes = rules.predicted_sizes(found.graph, found.tflite_bytes)
    out["predicted_size_bytes"] = {p: sizes[p] for p in prof.precisions}
    bud = prof.budgets
    if bud.max_size_bytes is not None:
        out["size_budget"] = {"max_size_bytes": bud.max_size_bytes,
                              "fits": {p: sizes[p] <= bud.max_size_bytes for p in prof.precisions}}
    if bud.max_arena_bytes is not None or "tflm" in prof.runtimes:
        act = rules.largest_activation(found.graph, found.tensor_names)
        scopes = ops.scope_index(m.keras_model)
        layers = [ops.layer_of(loc, m.keras_model.name, scopes) for loc in (act["tensor"] or "").split(";")]
        act["layer"] = next((x for x in layers if x), None)
        out["largest_activation"] = act
        out["mcu"] = {"predicted_flash_bytes": sizes["int8"], "max_size_bytes": bud.max_size_bytes,
                      "arena_lower_bound_bytes": act["bytes_int8"], "max_arena_bytes": bud.max_arena_bytes,
                      "arena_fits": None if bud.max_arena_bytes is None else act["bytes_int8"] <= bud.max_arena_bytes}
    return out
