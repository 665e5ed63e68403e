"""One way to convert a recipe: its `.tflite`, its ONNX twin, which are kept, what a missing twin means.

Every TFLite candidate (post-training, pruned, clustered) goes through `convert_tflite` and
`add_onnx_twin` (or, for post-training recipes on a multi-core host, the `ConversionLane`, a second
process): a `.tflite` is kept when a runtime of the target runs it, an ONNX twin is made when
ONNX Runtime is deployed or cross-checks, and a missing twin fails the candidate only where ONNX
Runtime is deployed (elsewhere it is a finding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.errors import ConversionError
from kdeploy.profiles import TargetProfile
from kdeploy.recipes import Recipe, tolerance_for
from kdeploy.run.context import Build, Context, wanted_runtimes
from kdeploy.runtimes import RUNTIME_FORMATS


SAME_TFLITE = "tf2onnx from the same .tflite"  # how the report names the ONNX route of a twin (`recipe.onnx`)
CALIBRATED_INT8 = "int8.calibrated.tflite"  # in ctx.work: post-training int8's calibrated model (selective int8's start)


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
    b = new_build(ctx, recipe)
    ctx.progress("convert", f"TFLite {recipe.name}")
    post_training_int8 = recipe.name == "int8" and savedmodel is None
    float_model = None
    if post_training_int8:  # calibrated from the fp32 .tflite (`artifacts.tflite.calibrated`) where there is one
        try:
            float_model = reference_float(ctx, ref)
        except ConversionError:
            pass  # the converter refused fp32: int8 converts the SavedModel itself and says why it fails
    try:
        tfl = tflite_file(ctx, ref, savedmodel or ref.savedmodel, recipe.precision,
                          ctx.staging / "artifacts" / f"{recipe.name}.tflite", sparse=recipe.sparse,
                          calibrated_out=ctx.work / CALIBRATED_INT8 if post_training_int8 else None,
                          float_model=float_model)
    except ConversionError as e:
        b.errors.append(str(e))
        return b, None
    if keeps_tflite(ctx):
        b.artifacts.append(tfl)
    return b, tfl


def new_build(ctx: Context, recipe: Recipe) -> Build:
    """The recipe's Build before any artifact: its name, precision, description and tolerance."""
    return Build(recipe.name, recipe.precision, recipe.describe(len(ctx.calibration)),
                 tolerance=tolerance_for(ctx.profile, recipe), spec=recipe)


def tflite_file(ctx: Context, ref: ReferenceModel, savedmodel: Path, precision: str, out: Path,
                sparse: bool = False, calibrated_out: Path | None = None, float_model: Path | None = None,
                ) -> Artifact:
    """`savedmodel` converted at `precision` (calibrated on the run's calibration split) to `out`.

    Args:
        calibrated_out: int8: also keep the calibrated model there (`artifacts.tflite.convert`).
        float_model: int8: the fp32 `.tflite` of `savedmodel`, calibrated instead of converting again.

    Raises:
        ConversionError: the converter refused it.
    """
    from kdeploy.artifacts import tflite

    return tflite.convert(savedmodel, precision, out, ctx.calibration.inputs, [t.name for t in ctx.model.inputs],
                          ref.signature_outputs, sparse=sparse, calibrated_out=calibrated_out, float_model=float_model)


def reference_float(ctx: Context, ref: ReferenceModel) -> Path:
    """The fp32 `.tflite` of the reference model (`diagnose.float_tflite`), converted into work when the target
    builds none yet (an int8-only target).

    Raises:
        ConversionError: the converter refused fp32.
    """
    from kdeploy.run.diagnose import FLOAT_REFERENCE, float_tflite

    return float_tflite(ctx) or tflite_file(ctx, ref, ref.savedmodel, "fp32", ctx.work / FLOAT_REFERENCE).path


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
        note: how the report describes the route (default: SAME_TFLITE).
    """
    from kdeploy.artifacts import onnx as onnx_export

    if "onnxruntime" not in ctx.wanted_runtimes:
        return None
    if recipe.onnx is None:
        onnx_missing(ctx, b, recipe.no_onnx or "no ONNX route for this recipe")
        return None
    from kdeploy.run.diagnose import layer_namer

    ctx.progress("convert", f"ONNX {recipe.name}")
    out = ctx.staging / "artifacts" / f"{recipe.name}.onnx"
    try:
        # fp32 of the reference model may swap routes when one leaves an op unconverted (`onnx.twin`)
        art = onnx_export.twin(recipe.onnx, out, lambda: source or tfl, ref.savedmodel, ctx.model,
                               ref.signature_outputs, layer_namer(ctx),
                               fallback=recipe.plan is None and source is None)
    except ConversionError as e:
        onnx_missing(ctx, b, str(e))
        return None
    note_route(b, recipe, art, note)
    b.artifacts.append(art)
    return art


def note_route(b: Build, recipe: Recipe, art: Artifact, note: str | None = None) -> None:
    """`recipe.onnx` in the report: how the twin was made (`note`, default SAME_TFLITE), or the fallback route."""
    from kdeploy.artifacts.onnx import fallback_note

    fell_back = fallback_note(art)
    if fell_back is not None:
        b.recipe["onnx"] = fell_back
    elif recipe.onnx == "tflite":
        b.recipe["onnx"] = note or SAME_TFLITE


def namer_job(ctx: Context) -> dict | None:
    """What a child process needs to rebuild `diagnose.layer_namer(ctx)` (None: a SavedModel, no Keras layers)."""
    from kdeploy.run.diagnose import namer_layers

    layers = namer_layers(ctx)
    return None if layers is None else {"model_name": ctx.model.keras_model.name, "layers": layers}


def onnx_missing(ctx: Context, b: Build, error: str) -> None:
    """No ONNX twin: a failed candidate where ONNX Runtime is deployed, a finding where it only cross-checks."""
    error = error.replace(str(ctx.staging) + os.sep, "")
    if "onnxruntime" in ctx.profile.runtimes:
        b.errors.append(error)
    else:
        ctx.finding("warning", "crosscheck-unavailable",
                    f"candidate {b.name}: no ONNX artifact, so it is not cross-checked on onnxruntime ({error})")


# The lane converts what the parent would convert in-process, where no time limit applies; this
# only bounds a child that somehow outlives its parent's markers (the parent kills it on any error).
LANE_TIMEOUT_S = 6 * 3600


@dataclass
class LaneResult:
    """What the lane made of one recipe: its `.tflite` (when the lane converted it) and its ONNX twin, or why not."""

    tflite: Artifact | None = None
    tflite_error: str | None = None
    onnx: Artifact | None = None
    onnx_error: str | None = None


class ConversionLane:
    """A second process beside the parent's TFLite conversions: some recipes' `.tflite` files and the ONNX twins.

    Each conversion holds the GIL and keeps one core busy, so only a second process uses a second
    core. The lane converts the dynamic-range `.tflite` (and float16's where it started before the model
    loaded: `converts`) and every ONNX twin; the parent exports the SavedModel, takes Keras' reference
    outputs (after the export: the lane converts ~2.6 s sooner), converts fp32 (which the inspection
    reads and int8 is calibrated from), the calibrated ones (int8, int16x8) and any float16 left to it,
    inspects and judges full int8; the lane's intermediates never sit in the parent.
    The child starts (and imports TensorFlow) before the model loads (`early`), else as the build
    begins; `assign` gives it its tasks, `reference` tells it the SavedModel is there;
    `ready` / `skip` tell it, recipe by recipe, whether a parent's `.tflite` exists; `finish`
    waits and returns each recipe's `LaneResult`.
    """

    def __init__(self, work: Path, early: bool = False):
        """Starts the child (it imports TensorFlow, then waits for its tasks: `assign`); `early`: before the model
        loads (`ConversionLane.early`)."""
        import threading

        self.early_start = early
        self.ctx: Context | None = None
        self.recipes: dict[str, Recipe] = {}
        self.dir = work / "lane"
        self.markers = self.dir / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.result: dict | Exception | None = None
        self.failure: str | None = None  # why the child failed (crash, kill, exception), once `finish` saw it
        self.proc = None
        self.thread = threading.Thread(target=self._run, args=({"markers": str(self.markers)},), name="kdeploy-lane",
                                       daemon=True)
        self.thread.start()

    @classmethod
    def early(cls, model_path: Path, prof: TargetProfile, parallel: bool | None, work: Path) -> ConversionLane | None:
        """The lane started before the model loads, where it will likely be wanted (`applies`, the model file's size
        for `memory.lane_fits`): its TensorFlow import then takes the core the parent's own import and load leave
        idle (4 s of CPU that beside the SavedModel export slowed it by 0.8 s on MobileNetV2-224). `build` assigns
        its tasks, or closes it where the loaded model says it does not pay off."""
        from kdeploy.memory import lane_may_fit
        from kdeploy.recipes import ptq_recipes

        if parallel is False or (os.cpu_count() or 1) < 2 or not _lane_has_work(prof, ptq_recipes(prof)):
            return None
        if parallel is None and not lane_may_fit(model_path):
            return None
        return cls(work, early=True)

    def assign(self, ctx: Context, recipes: list[Recipe]) -> None:
        """The child's tasks: the recipes it converts or makes twins of (it starts once `reference` says the
        SavedModel is there).

        Not the twins of the calibrated recipes (full int8): their `.tflite` is the parent's last, and the parent,
        idle once it has judged full int8, converts them while the lane finishes its own (`build._lane_builds`);
        in the lane they came last and held back the per-layer errors that wait for the lane to end (1.5 s of
        tf2onnx on MobileNetV2-224's int8)."""
        import json

        from kdeploy.artifacts.lane_worker import TASKS

        self.ctx = ctx
        self.recipes = {r.name: r for r in recipes
                        if self.converts(r) or (r.onnx in ("savedmodel", "tflite") and not r.calibration)}
        twins = "onnxruntime" in ctx.wanted_runtimes
        job = {"inputs": [t.name for t in ctx.model.inputs], "namer": namer_job(ctx),
               "tasks": [{"name": r.name, "precision": r.precision, "tflite": self.converts(r),
                          "route": r.onnx if twins and r.onnx in ("savedmodel", "tflite") else None,
                          "src": str(ctx.staging / "artifacts" / f"{r.name}.tflite"),
                          "out": str(ctx.staging / "artifacts" / f"{r.name}.onnx")} for r in self.recipes.values()]}
        tmp = self.markers / f"{TASKS}.tmp"
        tmp.write_text(json.dumps(job))
        tmp.rename(self.markers / f"{TASKS}.ready")

    def converts(self, recipe: Recipe) -> bool:
        """True when the lane converts the recipe's `.tflite`: post-training dynamic range, and float16 where the
        lane started before the model loaded. Started then, it has the time: on MobileNetV2-224 the parent's
        conversions ended at 20.0 s of the run instead of 23.7 s. Started with the build, it has not: on the
        zoo's EfficientNetB0 (a 49 MB file, no early start) the parent, whose full int8 passed, waited 16 s for
        the lane's float16 and its twin (70.7 s, 56.7 s with float16 here)."""
        return _uncalibrated_ptq(recipe) and (recipe.precision == "dynamic" or self.early_start)

    @staticmethod
    def applies(ctx: Context, recipes: list[Recipe]) -> bool:
        """On a multi-core host when it has work: `--parallel` forces it, `--no-parallel` turns it off, and by
        default it runs when the model's weights are small enough (`memory.lane_fits`) for a second
        TensorFlow process to cost little memory beside the time it saves."""
        from kdeploy.memory import lane_fits

        if ctx.parallel is False or (os.cpu_count() or 1) < 2 or not _lane_has_work(ctx.profile, recipes):
            return False
        return ctx.parallel is True or lane_fits(ctx.model)

    def _run(self, job: dict) -> None:
        from kdeploy.child import run_child

        def started(proc) -> None:
            self.proc = proc

        try:
            self.result = run_child("kdeploy.artifacts.lane_worker", job, self.dir, what="the conversion lane child",
                                    timeout_s=LANE_TIMEOUT_S, on_start=started,
                                    on_progress=lambda text: self.ctx and self.ctx.progress("convert", f"{text} (lane)"))
        except BaseException as e:  # re-raised in the calling thread by `finish` (Ctrl-C included)
            self.result = e

    def busy(self) -> bool:
        """Whether the child still converts (it has a core of its own until then)."""
        return self.thread.is_alive()

    def reference(self, ref: ReferenceModel) -> None:
        """The reference SavedModel is exported: the child may start converting."""
        import json

        from kdeploy.artifacts.lane_worker import REFERENCE

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

    def finish(self) -> dict[str, LaneResult]:
        """Waits for the child; each recipe's `.tflite` (the lane's own) and ONNX twin, or why not (recipe name -> result).

        When the child itself failed (a crash, the OOM killer), `failure` says why and nothing is
        returned: the caller then makes the lane's share in its own process.
        """
        from kdeploy.child import ChildFailure

        for name in self.recipes:
            if not (self.markers / f"{name}.ready").exists():
                (self.markers / f"{name}.skip").touch()
        self.thread.join()
        if isinstance(self.result, ChildFailure):  # the caller converts the lane's share itself
            self.failure = str(self.result)
            return {}
        if isinstance(self.result, BaseException):
            raise self.result
        out: dict[str, LaneResult] = {}
        for name, res in self.result["results"].items():
            out[name] = LaneResult(tflite=_artifact(res.get("tflite")), tflite_error=res.get("tflite_error"),
                                   onnx=_artifact(res.get("artifact")), onnx_error=res.get("error"))
        return out

    def close(self) -> None:
        """Stops the child if it still runs (an error or interruption in the parent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        from kdeploy.artifacts.lane_worker import REFERENCE, TASKS

        for name in [*self.recipes, REFERENCE, TASKS]:
            (self.markers / f"{name}.skip").touch()
        self.thread.join(timeout=10)


def _lane_has_work(prof: TargetProfile, recipes: list[Recipe]) -> bool:
    """Whether the profile's recipes give the lane something: a `.tflite` it converts, or ONNX twins."""
    twins = "onnxruntime" in wanted_runtimes(prof) and any(r.onnx in ("savedmodel", "tflite") for r in recipes)
    return twins or any(_uncalibrated_ptq(r) and r.precision == "dynamic" for r in recipes)


def _uncalibrated_ptq(recipe: Recipe) -> bool:
    """A post-training dynamic-range or float16 recipe: its `.tflite` needs no calibration data (the lane's)."""
    return recipe.plan is None and recipe.technique == "ptq" and recipe.precision in ("dynamic", "fp16") \
        and not recipe.sparse


def _artifact(fields: dict | None) -> Artifact | None:
    """A lane artifact, its gzip size measured here (`artifacts.gzip_elsewhere`)."""
    return None if fields is None else Artifact(**{**fields, "path": Path(fields["path"])}).measure_gzip()


def attach_twin(ctx: Context, b: Build, recipe: Recipe, res: LaneResult | None) -> None:
    """The lane's ONNX twin of a kept candidate onto its build, or why it is missing (as `add_onnx_twin` does)."""
    if res is None or "onnxruntime" not in ctx.wanted_runtimes:
        return
    if res.onnx_error is not None:
        onnx_missing(ctx, b, res.onnx_error)
    elif res.onnx is not None:
        b.artifacts.append(res.onnx)
        note_route(b, recipe, res.onnx)
