"""Quantization-aware training (`qat-int8`), the repair when full int8 fails.

The TFMOT child (`kdeploy.compress.tfmot_worker`, through `run.compress.train_plans`) bridges
the Keras 3 model to tf_keras, annotates the layers TFMOT supports, sets the activation ranges
on the training inputs, fine-tunes (labels in `--data`, else distillation from the float
model) within `[qat]` epochs and seconds, and writes a SavedModel with its FakeQuant ops. Here it
is converted with the int8 recipe's converter settings (`convert_tflite`, calibrated like
post-training int8), given its ONNX twin, judged by `run.judge` (evaluation's gates on the
target's runtimes), and described; evaluation and selection then treat it like every other
candidate. It trains on the calibration split plus the samples held back from validation for the
calibration repair (`ctx.spare`, where validation keeps `[calibration] min_validation_samples`),
never on a validation sample.

It is the last step of the int8 repair ladder (`run.ladder`), which calls `qat_builds` with full
int8's verdict when the earlier steps did not pass (on `full_integer` targets it is the only
step besides recalibration).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from kdeploy.data import Dataset
from kdeploy.recipes import qat_plan, qat_recipe
from kdeploy.run.compress import train_plans
from kdeploy.run.context import Build, Context
from kdeploy.run.convert import ReferenceModel, add_onnx_twin, convert_tflite, release_tflite
from kdeploy.run.judge import judge

BREAKING = "int8-breaking-layers"  # the full-integer target's finding (`run.selective`) QAT's result is added to


def skip_reason(ctx: Context) -> str | None:
    """Why quantization-aware training cannot run on this model, or None.

    TFMOT trains tf_keras models, reached through the Keras 3 bridge, which walks a functional
    or Sequential graph: a SavedModel/TFLite input has no Keras model, a subclassed model no graph.
    """
    m = ctx.model
    if m.keras_model is None or m.format not in ("keras", "h5"):
        return f"it needs a .keras or .h5 model to train, received a {m.format}"
    import keras

    graph = m.keras_model._functional if isinstance(m.keras_model, keras.Sequential) else m.keras_model
    if graph is None or not hasattr(graph, "_nodes_by_depth"):
        return (f"{type(m.keras_model).__name__} is a subclassed model (its call() is Python code, not a layer "
                "graph); the Keras 3 → tf_keras bridge TFMOT needs translates functional and Sequential models only")
    return None


def qat_builds(ctx: Context, ref: ReferenceModel, why: str = "") -> list[Build]:
    """The `qat-int8` candidate, or [] with a finding saying why not.

    Args:
        why: the full int8 failure this repairs (recorded in the recipe).
    """
    plan = qat_plan(ctx.profile)
    if plan is None:
        return []
    reason = skip_reason(ctx)
    if reason is not None:
        ctx.finding("warning", "qat-skipped", f"quantization-aware training ({plan.name}) skipped: {reason}")
        offer(ctx, f"not tried ({reason})")
        return []
    started = time.perf_counter()
    train = training_set(ctx)
    result = train_plans(ctx, ref, [plan], f"quantization-aware training ({plan.name})", baseline=False,
                         train=train)
    if result is None:
        offer(ctx, "not available (see the qat/tfmot findings)")
        return []
    row = result["recipes"][0]
    if "error" in row or "skipped" in row:
        text = row.get("error") or row["skipped"]
        ctx.finding("warning", "qat-failed", f"quantization-aware training ({plan.name}) failed: {text}")
        offer(ctx, f"failed ({text})")
        return []
    recipe = qat_recipe(plan)
    b, tfl = convert_tflite(ctx, recipe, ref, Path(row["savedmodel"]))
    ft = row["finetune"]
    b.recipe["qat"] = {
        "mode": ft["targets"], "losses": ft["losses"], "epochs": ft["epochs_run"], "epochs_planned": ft["epochs"],
        "samples": ft["samples"], "calibration_samples": len(ctx.calibration),
        "held_back_samples": len(train) - len(ctx.calibration), "batch_size": ft["batch_size"], "learning_rate": ft["learning_rate"],
        "train_seconds": ft["train_seconds"], "stopped_at_max_seconds": ft["stopped_at_max_seconds"],
        "quantized_layers": len(row["layers"]), "float_layers": [s["layer"] for s in row["skipped_layers"]],
        "seconds": round(time.perf_counter() - started, 3), "repairs": _lead(why),
    }
    b.optimization = {"technique": "qat", "bridge": result["bridge_out"], "finetune": ft,
                      "quantized_layers": sorted(row["layers"]), "float_layers": row["skipped_layers"],
                      "child_seconds": row.get("seconds")}
    if tfl is None:
        offer(ctx, f"did not convert ({b.errors[0] if b.errors else 'no .tflite'})")
        return [b]
    passed, detail = judge(ctx, tfl)
    runtimes = ", ".join(ctx.profile.runtimes)
    b.recipe["qat"]["judge"] = {"runtime": runtimes, "passed": passed, "detail": detail}
    offer(ctx, f"{'passes' if passed else 'fails'} the int8 checks on {runtimes} ({detail}); its evaluation is "
                f"candidate {plan.name}'s")
    add_onnx_twin(ctx, b, recipe, tfl, ref)
    release_tflite(ctx, b, tfl)
    return [b]


def training_set(ctx: Context) -> Dataset:
    """The samples QAT trains on: the calibration split plus the spare samples held back from validation
    (`ctx.spare`, `data.hold_back`: only where validation keeps `[calibration] min_validation_samples`).
    Validation samples never train; without spare samples, the calibration split alone.
    """
    cal, spare = ctx.calibration, ctx.spare
    if spare is None or len(spare) == 0:
        return cal
    inputs = {k: np.concatenate([v, spare.inputs[k]]) for k, v in cal.inputs.items()}
    labels = None
    if cal.labels and spare.labels and set(cal.labels) == set(spare.labels):
        labels = {k: np.concatenate([v, spare.labels[k]]) for k, v in cal.labels.items()}
    return Dataset(inputs, labels, cal.synthetic, cal.source)


def _lead(text: str) -> str:
    """'full int8 fails (DETAIL)' from the start of a finding's message (its parentheses balanced), else the text."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == ")" and depth == 0:
            return text[: i + 1]
    return text


def offer(ctx: Context, result: str) -> None:
    """Adds quantization-aware training's result to the `int8-breaking-layers` finding (full-integer targets)."""
    for f in ctx.findings:
        if f.code == BREAKING:
            f.message = f"{f.message.rstrip('.')}. Quantization-aware training (candidate qat-int8): {result}."
