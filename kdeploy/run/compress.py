"""Pruning and clustering candidates: the TFMOT child fine-tunes, the build stage converts.

The child (`kdeploy.compress.tfmot_worker`, run through `kdeploy.child`) does everything that
touches TFMOT and tf_keras and writes one SavedModel per plan. Here each SavedModel is converted
by the same `convert_tflite` / `add_onnx_twin` as the post-training candidates, its weight
buffers are inspected (sparsity and unique values actually shipped), and each recipe becomes a
Build held to its section's own tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdeploy.artifacts.flatbuffer import weight_stats
from kdeploy.child import ChildFailure, run_child
from kdeploy.data import Dataset
from kdeploy.errors import ConversionError
from kdeploy.recipes import SPARSE_RUNNABLE, Recipe, tfmot_plans, tfmot_precisions, tfmot_recipes
from kdeploy.run.context import Build, Context
from kdeploy.run.convert import (ReferenceModel, add_onnx_twin, convert_tflite, keeps_tflite, release_tflite,
                                tflite_file)

# Keys of a child's recipe row that describe the schedule (copied into the report's recipe).
_SCHEDULE_KEYS = ("schedule", "initial_sparsity", "final_sparsity", "end_step", "init")


def compressed_builds(ctx: Context, ref: ReferenceModel) -> list[Build]:
    """Pruned and clustered candidates for the run, or [] (with a finding saying why)."""
    prof, m = ctx.profile, ctx.model
    plans = tfmot_plans(prof)
    if not plans:
        return []
    names = ", ".join(p.name for p in plans)
    if m.keras_model is None or m.format not in ("keras", "h5"):
        ctx.finding("warning", "tfmot-skipped",
                    f"pruning/clustering recipes ({names}) skipped: they need a .keras or .h5 model, received a {m.format}")
        return []
    if not m.symbolic:
        ctx.finding("warning", "tfmot-skipped",
                    f"pruning/clustering recipes ({names}) skipped: {type(m.keras_model).__name__} is a subclassed "
                    "model (its call() is Python code, not a layer graph); TFMOT trains a tf_keras copy made by "
                    "translating a functional or Sequential layer graph")
        return []
    result = train_plans(ctx, ref, plans, f"pruning/clustering recipes ({names})")
    if result is None:
        return []
    bridge_out = result["bridge_out"]
    baseline = _baseline_sizes(ctx, ref, result.get("baseline_savedmodel"))
    by_name = {p.name: p for p in plans}
    builds: list[Build] = []
    for row in result["recipes"]:
        if "error" in row:
            ctx.finding("warning", "tfmot-recipe-failed", f"recipe {row['name']} failed: {row['error']}")
            continue
        if "skipped" in row:
            ctx.finding("info", "tfmot-recipe-skipped", f"recipe {row['name']} skipped: {row['skipped']}")
            continue
        builds += _convert(ctx, ref, row, tfmot_recipes(prof, by_name[row["name"]]), bridge_out, baseline)
    return builds


def train_plans(ctx: Context, ref: ReferenceModel, plans: list, what: str, baseline: bool = True,
                train: Dataset | None = None) -> dict | None:
    """Runs the TFMOT child on `plans`; None (with a finding) when its models cannot be used.

    Args:
        what: how findings name the recipes (e.g. "pruning/clustering recipes (prune50, cluster16)").
        baseline: also export the bridged model untouched (pruning/clustering size baseline).
        train: the samples to fine-tune on (never validation samples); default the calibration split.
    """
    prof, m = ctx.profile, ctx.model
    train = train if train is not None else ctx.calibration
    job_dir = ctx.work / "tfmot"
    job_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"train__{k}": v for k, v in train.inputs.items()}
    arrays.update({f"val__{k}": v for k, v in ctx.validation.inputs.items()})
    if train.labels and not ctx.data.synthetic:
        arrays.update({f"label__{k}": v for k, v in train.labels.items()})
    np.savez(job_dir / "data.npz", **arrays)
    ft = prof.finetune
    job = {
        "model_path": str(Path(m.path).resolve()),
        "inputs": [t.to_dict() for t in m.inputs],
        "outputs": [t.name for t in m.outputs],
        "output_kinds": list(m.output_kinds),
        "signature_outputs": list(ref.signature_outputs),
        "data_path": str(job_dir / "data.npz"),
        "out_dir": str(job_dir / "models"),
        "recipes": [p.job() for p in plans],
        "finetune": ft.model_dump(exclude={"timeout_s"}),
        "baseline": baseline,
        "seed": ctx.seed,
    }
    ctx.progress("tfmot", f"{what}: TFMOT in a child process")
    try:
        result = run_child("kdeploy.compress.tfmot_worker", job, job_dir, timeout_s=ft.timeout_s,
                           what="the TFMOT child process", on_progress=lambda t: ctx.progress("tfmot", t),
                           timeout_hint="; finetune.timeout_s")
    except ChildFailure as e:
        ctx.finding("error", "tfmot-failed", f"{what} skipped: {e}")
        return None
    if "load_error" in result:
        ctx.finding("warning", "tfmot-skipped",
                    f"{what} skipped: Keras 3 safe loading in the TFMOT child failed "
                    f"({result['load_error']}); models that need custom code are not translated to tf_keras")
        return None
    sha = result.get("reference_weights_sha256", {})
    if sha.get("before") != sha.get("after"):
        ctx.finding("error", "reference-mutated", f"the original model's weights changed during {what} "
                    f"(sha256 {sha.get('before')} → {sha.get('after')}); TFMOT candidates discarded")
        return None
    bridge = result["bridge"]
    if not bridge["ok"]:
        if "layer" in bridge:
            why = f"layer '{bridge['layer']}' ({bridge['class']}): {bridge['reason']}"
        else:
            why = (f"the tf_keras translation differs from the original by {bridge['max_abs_diff']:.2e} "
                   f"(> {bridge['atol']:.0e}) on {bridge['samples']} validation samples")
        ctx.finding("warning", "tfmot-bridge-unsupported",
                    f"{what} skipped: the Keras 3 → tf_keras bridge cannot be trusted "
                    f"for this model: {why}")
        return None
    if bridge.get("dropped_config_keys"):
        ctx.finding("info", "tfmot-bridge-dropped-keys",
                    f"Keras 3 → tf_keras bridge dropped config keys tf_keras does not know: {bridge['dropped_config_keys']} "
                    f"(outputs still equal within {bridge['atol']:.0e})")
    bridge_out = {k: bridge[k] for k in ("max_abs_diff", "atol", "samples", "classes", "unrolled")}
    bridge_out["reference_weights_sha256"] = sha["after"]  # equal before and after the TFMOT work (checked above)
    return {**result, "bridge_out": bridge_out}


def _baseline_sizes(ctx: Context, ref: ReferenceModel, savedmodel: str | None) -> dict[str, dict]:
    """Sizes of the bridged model without pruning/clustering, per precision the sections use."""
    if not savedmodel:
        return {}
    prof = ctx.profile
    precisions = list(dict.fromkeys([*tfmot_precisions(prof, "pruning"), *tfmot_precisions(prof, "clustering")]))
    sizes = {}
    for precision in precisions:
        path = ctx.work / "tfmot" / f"baseline-{precision}.tflite"
        try:
            art = tflite_file(ctx, ref, Path(savedmodel), precision, path)
        except ConversionError:
            continue
        sizes[precision] = {"size_bytes": art.size_bytes, "gzip_bytes": art.gzip_bytes}
        path.unlink(missing_ok=True)
    return sizes


def _convert(ctx: Context, ref: ReferenceModel, row: dict, recipes: list[Recipe], bridge_out: dict,
             baseline: dict[str, dict]) -> list[Build]:
    """The candidates of one fine-tuned model: its recipes converted, measured and described."""
    technique = recipes[0].technique
    schedule = {k: row[k] for k in _SCHEDULE_KEYS if k in row}
    common = {"technique": technique, "bridge": bridge_out, "finetune": row["finetune"], "layers": row["layers"],
              "skipped_layers": row["skipped_layers"], "child_seconds": row.get("seconds")}
    builds: list[Build] = []
    dense: dict[str, tuple[Build, object, object]] = {}  # name -> (build, .tflite, .onnx) for sparse twins
    for recipe in recipes:
        if recipe.sparse:
            twin = _sparse_twin(ctx, ref, row, recipe, schedule, *dense.get(recipe.twin_of, (None, None, None)))
            if twin is not None:
                builds.append(twin)
            continue
        b, tfl = convert_tflite(ctx, recipe, ref, Path(row["savedmodel"]))
        b.recipe.update(schedule)
        builds.append(b)
        if tfl is None:
            b.optimization = common
            continue
        b.optimization = {**common, "tflite": _summary(weight_stats(tfl.path))}
        if recipe.precision in baseline:
            # Same export path, original weights: the size difference to this is what the recipe saved.
            b.optimization["unoptimized_same_export"] = baseline[recipe.precision]
        onnx_art = add_onnx_twin(ctx, b, recipe, tfl, ref)
        dense[recipe.name] = (b, tfl, onnx_art)
    for b, tfl, _ in dense.values():
        release_tflite(ctx, b, tfl)
    return builds


def _sparse_twin(ctx: Context, ref: ReferenceModel, row: dict, recipe: Recipe, schedule: dict,
                 dense_build: Build | None, dense, dense_onnx) -> Build | None:
    """The same model converted with Optimize.EXPERIMENTAL_SPARSITY, as its own candidate when smaller."""
    if dense_build is None or dense is None or not keeps_tflite(ctx):
        return None
    b, art = convert_tflite(ctx, recipe, ref, Path(row["savedmodel"]))
    optimization = dense_build.optimization
    if art is None:
        optimization["sparse_encoding"] = {"built": False, "error": b.errors[0]}
        return None
    stats = weight_stats(art.path)
    smaller = bool(stats["sparse_encoded"] and art.size_bytes < dense.size_bytes)
    info = {"size_bytes": art.size_bytes, "gzip_bytes": art.gzip_bytes, "dense_size_bytes": dense.size_bytes,
            "dense_gzip_bytes": dense.gzip_bytes, "sparse_encoded_tensors": stats["sparse_encoded"],
            "kept_as_candidate": smaller and recipe.precision in SPARSE_RUNNABLE}
    if smaller and recipe.precision not in SPARSE_RUNNABLE:
        info["why_not"] = ("sparse-encoded int8 FULLY_CONNECTED fails to prepare in LiteRT's XNNPACK delegate "
                           "(seen with ai-edge-litert 2.3)")
    elif not smaller:
        info["why_not"] = "not smaller than the dense encoding"
    optimization["sparse_encoding"] = info
    if not info["kept_as_candidate"]:
        art.path.unlink(missing_ok=True)
        return None
    b.recipe = {**dense_build.recipe, "tflite_optimizations": "EXPERIMENTAL_SPARSITY"}
    b.optimization = {**optimization, "tflite": _summary(stats)}
    if dense_onnx is not None:
        # tf2onnx cannot read sparse-encoded TFLite tensors: the ONNX twin comes from the dense
        # .tflite of the same model (identical weight values once densified).
        add_onnx_twin(ctx, b, recipe, art, ref, source=dense,
                      note=f"tf2onnx from the dense-encoded .tflite of {recipe.twin_of} (same weights)")
    return b


def _summary(stats: dict) -> dict:
    rows = [{k: t[k] for k in ("name", "op", "shape", "dtype", "weights", "zeros", "unique", "unique_per_channel",
                               "sparse_encoded")} for t in stats["tensors"]]
    return {**{k: v for k, v in stats.items() if k != "tensors"}, "tensors": rows}
