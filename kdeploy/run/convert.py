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


# The ONNX lane converts what the parent would convert in-process, where no time limit applies; this
# only bounds a child that somehow outlives its parent's markers (the parent kills it on any error).
LANE_TIMEOUT_S = 6 * 3600


class OnnxLane:
    """The ONNX twins of the post-training recipes, converted in one child process beside the parent's TFLite work.

    tf2onnx and the TFLite converter each keep about one core busy, so on a multi-core host the
    twins cost no wall time of their own, and tf2onnx's intermediates never sit in the parent.
    The child starts (and imports TensorFlow) while the parent exports the reference SavedModel;
    `reference` tells it the SavedModel is there; `ready` / `skip` tell it,
    recipe by recipe, whether its `.tflite` exists; `finish` waits and attaches the twins (or
    says why one is missing) exactly as `add_onnx_twin` does in-process.
    """

    def __init__(self, ctx: Context, recipes: list[Recipe]):
        import threading

        self.ctx = ctx
        self.recipes = {r.name: r for r in recipes if r.onnx in ("savedmodel", "tflite")}
        self.dir = ctx.work / "onnx-lane"
        self.markers = self.dir / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.result: dict | Exception | None = None
        self.proc = None
        job = {"inputs": [t.name for t in ctx.model.inputs], "markers": str(self.markers),
               "tasks": [{"name": r.name, "route": r.onnx, "precision": r.precision,
                          "src": str(ctx.staging / "artifacts" / f"{r.name}.tflite"),
                          "out": str(ctx.staging / "artifacts" / f"{r.name}.onnx")} for r in self.recipes.values()]}
        self.thread = threading.Thread(target=self._run, args=(job,), name="kdeploy-onnx-lane", daemon=True)
        self.thread.start()

    @staticmethod
    def applies(ctx: Context, recipes: list[Recipe]) -> bool:
        """When asked (`--parallel`), on a multi-core host, when ONNX Runtime runs the twins and some recipe has one.

        Not by default: the second process holds its own TensorFlow and tf2onnx's intermediates
        (about 1.5 GB more at the peak on MobileNetV2 here), against one process converting in turn.
        """
        return ctx.parallel and (os.cpu_count() or 1) > 1 and "onnxruntime" in ctx.wanted_runtimes \
            and any(r.onnx in ("savedmodel", "tflite") for r in recipes)

    def _run(self, job: dict) -> None:
        from kdeploy.child import run_child

        def started(proc) -> None:
            self.proc = proc

        try:
            self.result = run_child("kdeploy.artifacts.onnx_worker", job, self.dir, what="the ONNX conversion child",
                                    timeout_s=LANE_TIMEOUT_S, on_start=started,
                                    on_progress=lambda text: self.ctx.progress("convert", text))
        except BaseException as e:  # re-raised in the calling thread by `finish` (Ctrl-C included)
            self.result = e

    def reference(self, ref: ReferenceModel) -> None:
        """The reference SavedModel is exported: the child may start converting."""
        import json

        from kdeploy.artifacts.onnx_worker import REFERENCE

        tmp = self.markers / f"{REFERENCE}.tmp"
        tmp.write_text(json.dumps({"savedmodel": str(ref.savedmodel), "signature_outputs": list(ref.signature_outputs)}))
        tmp.rename(self.markers / f"{REFERENCE}.ready")

    def takes(self, recipe: Recipe) -> bool:
        """True when this lane makes the recipe's twin (recipes without an ONNX route go through `add_onnx_twin`)."""
        return recipe.name in self.recipes

    def ready(self, recipe: Recipe) -> None:
        """The recipe's `.tflite` is complete: the child may convert it."""
        (self.markers / f"{recipe.name}.ready").touch()

    def skip(self, recipe: Recipe) -> None:
        """The recipe has no `.tflite` (failed, or a duplicate): the child goes on without it."""
        if self.takes(recipe):
            (self.markers / f"{recipe.name}.skip").touch()

    def finish(self, builds: dict[str, Build]) -> None:
        """Waits for the child; attaches each twin to its build (`builds`: recipe name -> Build), or says why not."""
        from kdeploy.child import ChildFailure

        for name in self.recipes:
            if not (self.markers / f"{name}.ready").exists():
                (self.markers / f"{name}.skip").touch()
        self.thread.join()
        if isinstance(self.result, ChildFailure):
            self.result = {"results": {n: {"error": f"ONNX conversion failed: {self.result}"} for n in self.recipes}}
        elif isinstance(self.result, BaseException):
            raise self.result
        for name, res in self.result["results"].items():
            b, recipe = builds.get(name), self.recipes[name]
            if b is None or res.get("skipped"):
                continue
            if "error" in res:
                onnx_missing(self.ctx, b, res["error"])
                continue
            b.artifacts.append(Artifact(**{**res["artifact"], "path": Path(res["artifact"]["path"])}))
            if recipe.onnx == "tflite":
                b.recipe["onnx"] = "tf2onnx from the same .tflite"

    def close(self) -> None:
        """Stops the child if it still runs (an error or interruption in the parent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        for name in [*self.recipes, "reference"]:
            (self.markers / f"{name}.skip").touch()
        self.thread.join(timeout=10)
