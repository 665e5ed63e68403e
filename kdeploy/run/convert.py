"""One way to convert a recipe: its `.tflite`, its ONNX twin, which are kept, what a missing twin means.

Every TFLite candidate (post-training, pruned, clustered) goes through `convert_tflite` and
`add_onnx_twin`: a `.tflite` is kept when a runtime of the target runs it, an ONNX twin is made
when ONNX Runtime is deployed or cross-checks, and a missing twin fails the candidate only where
ONNX Runtime is deployed (elsewhere it is a finding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.errors import ConversionError
from kdeploy.recipes import Recipe, tolerance_for
from kdeploy.run.context import Build, Context
from kdeploy.runtimes import RUNTIME_FORMATS


@dataclass
class ReferenceModel:
    """The SavedModel every recipe converts from, and its serving signature's output keys."""

    savedmodel: Path
    signature_outputs: list[str]


def convert_tflite(ctx: Context, recipe: Recipe, ref: ReferenceModel, savedmodel: Path | None = None,
                   ) -> tuple[Build, Artifact | None]:
    """Converts `savedmodel` (default: the reference) with `recipe`; the Build carries the error when it fails.

    The `.tflite` is written even for ONNX-only targets: quantized ONNX twins are converted from
    it (`release_tflite` removes it afterwards when no runtime of the target runs it).
    """
    b = Build(recipe.name, recipe.precision, recipe.describe(len(ctx.calibration)),
              tolerance=tolerance_for(ctx.profile, recipe), spec=recipe)
    ctx.progress("convert", f"TFLite {recipe.name}")
    try:
        tfl = tflite_file(ctx, ref, savedmodel or ref.savedmodel, recipe.precision,
                          ctx.staging / "artifacts" / f"{recipe.name}.tflite", sparse=recipe.sparse)
    except ConversionError as e:
        b.errors.append(str(e))
        return b, None
    if keeps_tflite(ctx):
        b.artifacts.append(tfl)
    return b, tfl


def tflite_file(ctx: Context, ref: ReferenceModel, savedmodel: Path, precision: str, out: Path,
                sparse: bool = False) -> Artifact:
    """`savedmodel` converted at `precision` (calibrated on the run's calibration split) to `out`.

    Raises:
        ConversionError: the converter refused it.
    """
    from kdeploy.artifacts import tflite

    return tflite.convert(savedmodel, precision, out, ctx.calibration.inputs, [t.name for t in ctx.model.inputs],
                          ref.signature_outputs, sparse=sparse)


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
