"""The TFMOT child process: `python -m kdeploy.compress.tfmot_worker JOB.json`.

TFMOT 0.8 works only on tf_keras models and importing it sets `TF_USE_LEGACY_KERAS=1` for the
whole process, so all of it happens here, never in the parent (which uses Keras 3). Steps:

1. load the user's model with Keras 3 `load_model(safe_mode=True, compile=False)` (`.keras` and
   `.h5` alike; a `.h5` never goes through tf_keras, whose loader runs Lambda bytecode);
2. compute the original model's outputs (distillation targets) and a hash of its weights;
3. translate it to tf_keras (`bridge.to_tf_keras`) and trust the copy only if its outputs equal
   the original's on the validation inputs (max abs diff <= 1e-5);
4. import TFMOT; per recipe: a fresh bridged copy, wrap (prune / cluster), fine-tune, strip,
   and write a SavedModel whose serving signature has the model's input names and the parent's
   output keys;
   (quantization-aware training, `kind = "qat"`: annotate, apply, set the activation ranges,
   fine-tune and export with the FakeQuant ops; see `kdeploy.compress.qat`);
5. hash the original's weights again (the reference must be untouched) and write result.json.

Progress lines go to stdout as `PROGRESS <text>`; the parent relays them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from kdeploy.child import child_main, progress

def weights_sha256(model: Any) -> str:
    """sha256 over every weight array of a model (names, shapes and bytes)."""
    h = hashlib.sha256()
    for w in model.weights:
        a = np.ascontiguousarray(np.asarray(w))
        h.update(f"{w.path if hasattr(w, 'path') else w.name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _short(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def _predict(model: Any, inputs: list[np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    from kdeploy.compress.bridge import _as_list, _feed

    parts = []
    for s in range(0, len(inputs[0]), batch_size):
        out = model(_feed(model, [a[s : s + batch_size] for a in inputs]), training=False)
        parts.append([np.asarray(o) for o in _as_list(out, model)])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def export_savedmodel(model: Any, inputs: list[dict], output_keys: list[str], out_dir: Path) -> None:
    """Writes a tf_keras model as a SavedModel with a `serving_default` signature.

    Signature inputs are named after the model inputs; outputs are keyed by `output_keys`
    (the keys of the parent's reference SavedModel), in model output order.
    """
    import tensorflow as tf

    specs = [tf.TensorSpec([None, *t["shape"][1:]], t["dtype"], name=t["name"]) for t in inputs]

    @tf.function(input_signature=specs)
    def serve(*args):
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        return {k: o for k, o in zip(output_keys, out)}

    tf.saved_model.save(model, str(out_dir), signatures={"serving_default": serve.get_concrete_function()})


def layer_stats(model: Any, names: list[str]) -> dict[str, dict]:
    """Zeros and unique values in the main kernel of each named layer of a stripped tf_keras model."""
    out = {}
    for layer in model.layers:
        if layer.name not in names:
            continue
        kernels = [w for w in layer.trainable_weights if "bias" not in w.name and len(w.shape) >= 2]
        vals = np.concatenate([np.asarray(w).ravel() for w in kernels]) if kernels else np.zeros(0)
        out[layer.name] = {"class": type(layer).__name__, "weights": int(vals.size),
                           "sparsity": round(float(np.mean(vals == 0)), 4) if vals.size else 0.0,
                           "unique": int(len(np.unique(vals)))}
    return out


def run(job: dict) -> dict:
    """Does the work described by `job`; returns the result dict (see module docstring)."""
    from kdeploy.util import native_quiet

    with native_quiet():
        import keras
        import tensorflow as tf  # noqa: F401
    result: dict[str, Any] = {"recipes": []}
    progress("loading the model with Keras 3 (safe mode)")
    try:
        original = keras.saving.load_model(job["model_path"], safe_mode=True, compile=False)
    except Exception as e:
        result["load_error"] = _short(e)
        return result
    with np.load(job["data_path"], allow_pickle=False) as z:
        train = [z[f"train__{t['name']}"] for t in job["inputs"]]
        val = [z[f"val__{t['name']}"] for t in job["inputs"]]
        labels = {k[len("label__"):]: z[k] for k in z.files if k.startswith("label__")} or None
    sha_before = weights_sha256(original)
    teacher = _predict(original, train)

    from kdeploy.compress import bridge

    progress("translating Keras 3 → tf_keras")
    t0 = time.perf_counter()
    try:
        with native_quiet():
            bridged, info = bridge.to_tf_keras(original)
            diff = bridge.verify(original, bridged, val)
    except bridge.BridgeError as e:
        result["bridge"] = {"ok": False, "layer": e.layer, "class": e.cls, "reason": e.reason}
        result["reference_weights_sha256"] = {"before": sha_before, "after": weights_sha256(original)}
        return result
    ok = bool(np.isfinite(diff) and diff <= bridge.BRIDGE_ATOL)
    result["bridge"] = {"ok": ok, "max_abs_diff": diff, "atol": bridge.BRIDGE_ATOL, "samples": len(val[0]),
                        "seconds": round(time.perf_counter() - t0, 3), **info.to_dict()}
    if ok and job.get("baseline", True):
        # The same graph without TFMOT, exported the same way: the parent measures its size so the
        # report separates what pruning/clustering saved from what the tf_keras export path saves.
        with native_quiet():
            export_savedmodel(bridged, job["inputs"], job["signature_outputs"], Path(job["out_dir"]) / "baseline")
        result["baseline_savedmodel"] = str(Path(job["out_dir"]) / "baseline")
    del bridged
    if ok:
        with native_quiet():
            import tensorflow_model_optimization  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 here only)
        for recipe in job["recipes"]:
            progress(f"{recipe['name']}: wrapping")
            t1 = time.perf_counter()
            try:
                row = _run_recipe(recipe, job, original, train, teacher, labels)
            except Exception as e:  # one recipe failing leaves the others
                row = {"name": recipe["name"], "error": _short(e)}
                if os.environ.get("KDEPLOY_DEBUG"):
                    traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - t1, 3)
            result["recipes"].append(row)
    result["reference_weights_sha256"] = {"before": sha_before, "after": weights_sha256(original)}
    return result


def _run_recipe(recipe: dict, job: dict, original: Any, train: list, teacher: list, labels: dict | None) -> dict:
    import tensorflow as tf
    import tf_keras

    from kdeploy.util import native_quiet
    from kdeploy.compress import bridge, cluster, finetune, prune

    name, ft = recipe["name"], job["finetune"]
    seed = int(job["seed"])
    tf_keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    if recipe["kind"] == "qat":
        return _run_qat(recipe, job, original, train, teacher, labels)
    targets, losses, described = finetune.choose_targets(job["output_kinds"], job["outputs"], teacher, labels,
                                                         ft["targets"], ft["loss"])
    with native_quiet():
        copy, _ = bridge.to_tf_keras(original)  # a fresh copy per recipe: TFMOT writes into what it wraps
    epochs = int(recipe["epochs"])
    if recipe["kind"] == "prune":
        steps = finetune.steps_for(len(train[0]), ft["batch_size"], epochs)
        m_by_n = tuple(recipe["m_by_n"]) if recipe.get("m_by_n") else None
        end_step = max(1, steps // 2)
        wrapped, done, skipped = prune.wrap(copy, sparsity=recipe.get("sparsity"), m_by_n=m_by_n, end_step=end_step,
                                            min_layer_weights=recipe["min_layer_weights"])
        module, schedule = prune, {"schedule": "PolynomialDecay", "initial_sparsity": 0.0,
                                   "final_sparsity": 0.5 if m_by_n else recipe["sparsity"],
                                   "begin_step": 0, "end_step": end_step, "frequency": 1}
    else:
        wrapped, done, skipped = cluster.wrap(copy, clusters=int(recipe["clusters"]),
                                              min_layer_weights=recipe["min_layer_weights"])
        module, schedule = cluster, {"init": "kmeans++"}
    if not done:
        return {"name": name, "skipped": "no layer could be wrapped" + (
            f" ({'; '.join(s['layer'] + ': ' + s['reason'] for s in skipped)})" if skipped else " (no prunable kernels)"),
            "skipped_layers": skipped}
    tuned = finetune.fit(wrapped, train, targets, losses, epochs=epochs, batch_size=ft["batch_size"],
                         learning_rate=recipe["learning_rate"], callbacks=module.callbacks(), progress=progress,
                         label=name)
    stripped = module.strip(wrapped)
    out_dir = Path(job["out_dir"]) / name
    progress(f"{name}: writing SavedModel")
    with native_quiet():
        export_savedmodel(stripped, job["inputs"], job["signature_outputs"], out_dir)
    return {"name": name, "savedmodel": str(out_dir), "layers": layer_stats(stripped, done), "skipped_layers": skipped,
            "finetune": {**tuned, **described}, **schedule}


def _run_qat(recipe: dict, job: dict, original: Any, train: list, teacher: list, labels: dict | None) -> dict:
    """Quantization-aware training (`kdeploy.compress.qat`): annotate, apply, set ranges, fine-tune, export.

    Trained on the labels when every output has usable ones, else distilled from the original
    model's outputs on the same inputs (the parent's training set: the calibration split plus any samples held
    back from validation); the SavedModel keeps the FakeQuant ops.
    """
    import tf_keras

    from kdeploy.compress import bridge, finetune, qat
    from kdeploy.util import native_quiet

    name = recipe["name"]
    targets, losses, described = finetune.choose_targets(job["output_kinds"], job["outputs"], teacher, labels,
                                                         "auto", "auto")
    with native_quiet():
        copy, _ = bridge.to_tf_keras(original)
        annotated, done, floats = qat.annotate(copy)
    if not done:
        return {"name": name, "skipped": "no layer is supported by TFMOT's quantization registry", "skipped_layers": floats}
    progress(f"{name}: quantize_apply ({len(done)} layers annotated, {len(floats)} left float)")
    with native_quiet():
        model = qat.apply(annotated)
    t0 = time.perf_counter()
    batches = qat.init_ranges(model, train, int(recipe["batch_size"]))
    limit = qat.time_limit(float(recipe["max_seconds"]), tf_keras)
    with qat.ema_decay(lambda: qat.TRAIN_EMA_DECAY):
        tuned = finetune.fit(model, train, targets, losses, epochs=int(recipe["epochs"]),
                             batch_size=int(recipe["batch_size"]), learning_rate=float(recipe["learning_rate"]),
                             callbacks=[limit], progress=progress, label=name)
    seconds = round(time.perf_counter() - t0, 3)
    out_dir = Path(job["out_dir"]) / name
    progress(f"{name}: writing SavedModel")
    with native_quiet():
        export_savedmodel(model, job["inputs"], job["signature_outputs"], out_dir)
    return {"name": name, "savedmodel": str(out_dir), "layers": {k: {} for k in done}, "skipped_layers": floats,
            "finetune": {**tuned, **described, "train_seconds": seconds, "stopped_at_max_seconds": limit.stopped,
                         "range_init_batches": batches, "range_ema_decay": qat.TRAIN_EMA_DECAY}}


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    child_main(sys.argv[1:], run)
