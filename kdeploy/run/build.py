"""Build stage: the reference SavedModel, then every recipe the target allows, converted one way.

Every TFLite candidate (post-training, pruned, clustered) goes through `convert_tflite` and
`add_onnx_twin`, so a recipe's artifacts are made, kept or dropped by one rule: a `.tflite` is
kept when a runtime of the target runs it, an ONNX twin is made when ONNX Runtime is deployed or
cross-checks, and a missing twin fails the candidate only where ONNX Runtime is deployed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.artifacts.flatbuffer import read_tflite_file, tflite_precision
from kdeploy.errors import ConversionError
from kdeploy.recipes import Recipe, ort_recipes, ptq_recipes, tolerance_for
from kdeploy.run.assemble import SAVEDMODEL_NOT_REPRODUCIBLE
from kdeploy.run.context import Build, Built, Context
from kdeploy.runtimes import RUNTIME_FORMATS
from kdeploy.util import file_sha256


@dataclass
class ReferenceModel:
    """The SavedModel every recipe converts from, and its serving signature's output keys."""

    savedmodel: Path
    signature_outputs: list[str]


def build_candidates(ctx: Context) -> Built:
    """Exports the reference SavedModel and every recipe the target allows.

    Raises:
        ConversionError: no candidate could be converted at all (exit 3).
    """
    from kdeploy.artifacts import onnx as onnx_export

    m, prof = ctx.model, ctx.profile
    ref, reference_artifacts = _reference(ctx)
    builds: list[Build] = []
    tflite_hashes: dict[str, str] = {}  # sha256 -> precision, to drop recipes that changed nothing
    for recipe in ptq_recipes(prof):
        b, tfl = convert_tflite(ctx, recipe, ref)
        builds.append(b)
        if tfl is None:
            continue
        twin = tflite_hashes.get(tfl.sha256)
        if twin is None and recipe.precision != "fp32" and "fp32" in tflite_hashes.values() \
                and tflite_precision(read_tflite_file(tfl.path)) == "fp32":
            twin = "fp32"
        if twin is not None:
            # e.g. dynamic range on a model whose weight tensors are all below the converter's
            # size threshold (1024 elements): nothing was quantized. Not a second candidate.
            tfl.path.unlink()
            builds.remove(b)
            ctx.finding("info", "identical-artifact",
                        f"TFLite {recipe.precision} quantized nothing (every weight tensor is below the converter's "
                        f"threshold), so it is the {twin} model again; not evaluated as a separate candidate")
            continue
        tflite_hashes[tfl.sha256] = recipe.precision
        add_onnx_twin(ctx, b, recipe, tfl, ref)
        release_tflite(ctx, b, tfl)
    for recipe in ort_recipes(prof):
        b = Build(recipe.name, recipe.precision, recipe.describe(len(ctx.calibration)), spec=recipe)
        builds.append(b)
        try:
            fp32 = next((a for x in builds for a in x.artifacts if a.format == "onnx" and x.name == "fp32"), None)
            if fp32 is None:
                fp32 = onnx_export.from_saved_model(ref.savedmodel, m, ctx.work / "fp32.onnx", ref.signature_outputs)
            ctx.progress("convert", "ONNX Runtime dynamic quantization")
            b.artifacts.append(onnx_export.quantize_dynamic(fp32, ctx.staging / "artifacts" / f"{recipe.name}.onnx"))
        except ConversionError as e:
            b.errors.append(str(e))
    if m.keras_model is not None:
        from kdeploy.run.compress import compressed_builds

        builds += compressed_builds(ctx, ref)  # pruning / clustering recipes the profile enables (child process)
    if not any(b.artifacts for b in builds):
        errors = "; ".join(e for b in builds for e in b.errors)
        raise ConversionError(f"no candidate could be converted for target {prof.name}: {errors}")
    return Built(builds, reference_artifacts)


def _reference(ctx: Context) -> tuple[ReferenceModel, list[dict]]:
    """The SavedModel the recipes convert from: exported from a Keras model, or the user's own SavedModel."""
    from kdeploy.artifacts.savedmodel import conversion_model, export_savedmodel

    m = ctx.model
    if m.keras_model is None:  # the user's SavedModel is the reference artifact; it is not copied
        return ReferenceModel(Path(m.path), list(m.signature_outputs)), []
    probe = {k: v[:16] for k, v in ctx.validation.inputs.items()}
    keras_model, found = conversion_model(m, probe)
    for sev, code, msg in found:
        ctx.finding(sev, code, msg)
    sm_dir = ctx.staging / "reference" / "savedmodel"
    ctx.progress("export", "SavedModel")
    keys = export_savedmodel(keras_model, m, sm_dir)
    art = {**_dir_artifact("savedmodel", sm_dir, ctx.staging), "byte_reproducible": False,
           "note": SAVEDMODEL_NOT_REPRODUCIBLE}
    return ReferenceModel(sm_dir, keys), [art]


def convert_tflite(ctx: Context, recipe: Recipe, ref: ReferenceModel, savedmodel: Path | None = None,
                   ) -> tuple[Build, Artifact | None]:
    """Converts `savedmodel` (default: the reference) with `recipe`; the Build carries the error when it fails.

    The `.tflite` is written even for ONNX-only targets: quantized ONNX twins are converted from
    it (`release_tflite` removes it afterwards when no runtime of the target runs it).
    """
    from kdeploy.artifacts import tflite

    b = Build(recipe.name, recipe.precision, recipe.describe(len(ctx.calibration)),
              tolerance=tolerance_for(ctx.profile, recipe), spec=recipe)
    ctx.progress("convert", f"TFLite {recipe.name}")
    try:
        tfl = tflite.convert(savedmodel or ref.savedmodel, recipe.precision,
                             ctx.staging / "artifacts" / f"{recipe.name}.tflite", ctx.calibration.inputs,
                             [t.name for t in ctx.model.inputs], ref.signature_outputs, sparse=recipe.sparse)
    except ConversionError as e:
        b.errors.append(str(e))
        return b, None
    if keeps_tflite(ctx):
        b.artifacts.append(tfl)
    return b, tfl


def keeps_tflite(ctx: Context) -> bool:
    """A `.tflite` is kept when a runtime of the target runs it (litert, tflm)."""
    return any(RUNTIME_FORMATS[r] == "tflite" for r in ctx.wanted_runtimes)


def release_tflite(ctx: Context, b: Build, tfl: Artifact) -> None:
    """Removes a `.tflite` that was only the source of an ONNX twin."""
    if not keeps_tflite(ctx):
        tfl.path.unlink(missing_ok=True)


def add_onnx_twin(ctx: Context, b: Build, recipe: Recipe, tfl: Artifact, ref: ReferenceModel,
                  source: Artifact | None = None, note: str | None = None) -> Artifact | None:
    """The candidate's ONNX artifact by the recipe's route, when ONNX Runtime deploys or cross-checks.

    Args:
        source: the `.tflite` to convert instead of `tfl` (a sparse twin's dense encoding).
        note: how the report describes the route (default: "tf2onnx from the same .tflite").
    """
    from kdeploy.artifacts import onnx as onnx_export

    if "onnxruntime" not in ctx.wanted_runtimes:
        return None
    if recipe.onnx is None:
        onnx_missing(ctx, b, recipe.no_onnx or "no ONNX route for this recipe")
        return None
    ctx.progress("convert", f"ONNX {recipe.name}")
    out = ctx.staging / "artifacts" / f"{recipe.name}.onnx"
    try:
        if recipe.onnx == "savedmodel":
            art = onnx_export.from_saved_model(ref.savedmodel, ctx.model, out, ref.signature_outputs)
        else:
            art = onnx_export.from_tflite(source or tfl, out)
            b.recipe["onnx"] = note or "tf2onnx from the same .tflite"
    except ConversionError as e:
        onnx_missing(ctx, b, str(e))
        return None
    b.artifacts.append(art)
    return art


def onnx_missing(ctx: Context, b: Build, error: str) -> None:
    """No ONNX twin: a failed candidate where ONNX Runtime is deployed, a finding where it only cross-checks."""
    error = error.replace(str(ctx.staging) + os.sep, "")
    if "onnxruntime" in ctx.profile.runtimes:
        b.errors.append(error)
    else:
        ctx.finding("warning", "crosscheck-unavailable",
                    f"candidate {b.name}: no ONNX artifact, so it is not cross-checked on onnxruntime ({error})")


def _dir_artifact(fmt: str, path: Path, base: Path) -> dict:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"format": fmt, "path": str(path.relative_to(base)), "size_bytes": size, "sha256": file_sha256(path)}
