"""Build stage: the reference SavedModel, then every recipe the target allows (`kdeploy.recipes`).

Post-training recipes convert the reference; ONNX Runtime quantization starts from the fp32
ONNX model; pruning/clustering recipes come from the TFMOT child (`kdeploy.run.compress`). All
TFLite conversions go through `kdeploy.run.convert`.
"""

from __future__ import annotations

from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.artifacts.flatbuffer import read_tflite_file, tflite_precision
from kdeploy.errors import ConversionError
from kdeploy.recipes import Recipe, ort_recipes, ptq_recipes
from kdeploy.report.model import Inspection
from kdeploy.run.context import Build, Built, Context
from kdeploy.run.convert import (ConversionLane, ReferenceModel, add_onnx_twin, attach_twin, convert_tflite,
                                keeps_tflite, new_build, release_tflite)
from kdeploy.run.evaluate import RunsAhead
from kdeploy.run.ladder import repair_ladder
from kdeploy.util import file_sha256, release_memory


# TensorFlow orders a traced function's captured variables by object identity, so Keras'
# SavedModel export lists the same variables in a different order each run (seen here on the
# digits CNN); the TFLite and ONNX files converted from it are byte-identical all the same.
SAVEDMODEL_NOT_REPRODUCIBLE = ("same values, not the same bytes: TensorFlow orders the variables of Keras' SavedModel "
                               "export differently from run to run; artifacts converted from it are byte-identical")


def build_candidates(ctx: Context) -> Built:
    """Exports the reference SavedModel and every recipe the target allows.

    Raises:
        ConversionError: no candidate could be converted at all (exit 3).
    """
    from kdeploy.artifacts import onnx as onnx_export

    m, prof = ctx.model, ctx.profile
    recipes = ptq_recipes(prof)
    lane, ctx.lane = ctx.lane, None  # started before the model loaded (`ConversionLane.early`), or None
    if not ConversionLane.applies(ctx, recipes):
        if lane is not None:
            lane.close()
        lane = None
    elif lane is None:
        lane = ConversionLane(ctx.work)
    if lane is not None:
        lane.assign(ctx, recipes)
        ctx.lane_busy = lane.busy
    try:
        try:
            ref, reference_artifacts, conversion = _reference(ctx)
        except Exception:
            ctx.reference  # noqa: B018 - a model that fails on the inputs says so (exit 2) before the export's error
            raise
        if lane is not None:
            lane.reference(ref)
        ctx.reference  # noqa: B018 - Keras' outputs, taken while the lane converts the SavedModel
        builds, kept, seen = _ptq_builds(ctx, ref, recipes, lane)
        _resolve_kinds(ctx, kept)
        inspection: list[Inspection | None] = []

        def finish_build() -> None:  # once: before the ladder's first heavy work (`repair_ladder`), or after it
            if inspection:
                return
            if lane is not None:
                # evaluation's runs of the artifacts built so far (the lane's too, as they come), from here on
                # beside the build, at a lower priority (`evaluate.RunsAhead`); `evaluate` stops them
                ahead = RunsAhead(ctx, builds)
                ctx.stop_ahead, ctx.run_ahead = ahead.stop, ahead.add
            # after full int8 is judged: the ladder's search waits for that judgement, not for the inspection,
            # which runs while the lane finishes and a failing int8's per-layer errors are measured (1 s on
            # MobileNetV2-224)
            inspection.append(_inspection(ctx, conversion, kept))  # reads the fp32 .tflite
            if lane is not None:
                _lane_builds(ctx, ref, recipes, lane, builds, kept, seen)

        # The int8 repair ladder, where full int8 fails (`run.ladder`): recalibration, float layers, training,
        # stopping at the first that passes.
        repairs = repair_ladder(ctx, ref, builds, before_steps=finish_build)
        finish_build()
    finally:
        if lane is not None:
            lane.close()
            ctx.lane_busy = lambda: False
    for b, tfl in kept:
        release_tflite(ctx, b, tfl)
    builds += repairs
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
    return Built(builds, reference_artifacts, inspection[0])


def _ptq_builds(ctx: Context, ref: ReferenceModel, recipes: list[Recipe], lane: ConversionLane | None,
                ) -> tuple[list[Build], list[tuple[Build, Artifact]], dict[str, str]]:
    """The post-training recipes' builds: each `.tflite` and ONNX twin converted here, unless a lane runs: then
    `_lane_builds` completes the builds (the lane's `.tflite` files and twins, and this process' twins).

    Returns:
        The builds (in recipe order); (build, its `.tflite`) of each candidate kept so far
        (`release_tflite` is the caller's); the sha256 -> precision of those `.tflite` files.
    """
    made: dict[str, Build] = {}
    kept: list[tuple[Build, Artifact]] = []
    seen: dict[str, str] = {}  # sha256 -> precision, to drop recipes that changed nothing
    # fp32 first (the calibrated recipes start from its .tflite, the inspection reads it), then the calibrated
    # ones (the ladder's full int8, and the lane's ONNX twin of it, wait for them), then the rest
    for recipe in sorted(recipes, key=lambda r: (r.precision != "fp32", not r.calibration)):
        if lane is not None and lane.converts(recipe):
            made[recipe.name] = new_build(ctx, recipe)  # its .tflite comes from the lane (`finish`)
            continue
        # with a lane, a twin it does not take (a calibrated recipe's) is made in `_lane_builds`, after judging
        b, tfl = _convert_here(ctx, ref, recipe, seen, twin=lane is None)
        if b is not None:
            made[recipe.name] = b
        if tfl is None:
            if lane is not None:
                lane.skip(recipe)
            continue
        if lane is not None and lane.takes(recipe):
            lane.ready(recipe)
        kept.append((b, tfl))
    return [made[r.name] for r in recipes if r.name in made], kept, seen


def _convert_here(ctx: Context, ref: ReferenceModel, recipe: Recipe, seen: dict[str, str], twin: bool,
                  ) -> tuple[Build | None, Artifact | None]:
    """Converts `recipe` in this process (its ONNX twin too when `twin`).

    Returns:
        (build, its `.tflite`); the `.tflite` is None when the conversion failed (the build says
        why), and both are None when it was an earlier candidate's model again (`_duplicate`).
    """
    b, tfl = convert_tflite(ctx, recipe, ref)
    release_memory()  # the converter's freed intermediates go back to the OS before the next one
    if tfl is None:
        return b, None
    if _duplicate(ctx, recipe, tfl, seen):
        return None, None
    if twin:
        add_onnx_twin(ctx, b, recipe, tfl, ref)
        release_memory()  # tf2onnx's freed graphs (gigabytes on ResNet50V2) before the next conversion
    return b, tfl


def _lane_builds(ctx: Context, ref: ReferenceModel, recipes: list[Recipe], lane: ConversionLane,
                 builds: list[Build], kept: list[tuple[Build, Artifact]], seen: dict[str, str]) -> None:
    """Waits for the lane; adds its `.tflite` files and ONNX twins to `builds` and `kept` (in recipe order).

    First the twins of this process' `.tflite` files the lane does not take (the calibrated recipes': ready last,
    when the lane is still busy and this process idle), while the lane finishes. When the lane's process
    failed, its share is converted here instead (and a finding says so): a crashed helper must not cost
    candidates that one process would have made.
    """
    by_recipe = {r.name: r for r in recipes}
    for b, tfl in kept:
        if not lane.takes(by_recipe[b.name]):
            add_onnx_twin(ctx, b, by_recipe[b.name], tfl, ref)
            release_memory()
    results = lane.finish()
    if lane.failure is not None:
        ctx.finding("warning", "lane-failed", f"the conversion lane failed ({lane.failure}); its conversions "
                                              "were made in this process instead")
    for b in list(builds):
        recipe, res = by_recipe[b.name], results.get(b.name)
        if lane.failure is not None:
            _instead_of_lane(ctx, ref, recipe, lane, b, builds, kept, seen)
            continue
        if not lane.converts(recipe):
            attach_twin(ctx, b, recipe, res)
            continue
        if res is None or res.tflite is None:
            b.errors.append(res.tflite_error if res is not None and res.tflite_error else
                            f"TFLite {recipe.precision} conversion did not run")
            continue
        if _duplicate(ctx, recipe, res.tflite, seen):
            builds.remove(b)
            if res.onnx is not None:
                res.onnx.path.unlink(missing_ok=True)
            continue
        if keeps_tflite(ctx):
            b.artifacts.append(res.tflite)
        attach_twin(ctx, b, recipe, res)
        kept.append((b, res.tflite))
    order = {b.name: i for i, b in enumerate(builds)}
    kept.sort(key=lambda bt: order[bt[0].name])


def _instead_of_lane(ctx: Context, ref: ReferenceModel, recipe: Recipe, lane: ConversionLane, b: Build,
                     builds: list[Build], kept: list[tuple[Build, Artifact]], seen: dict[str, str]) -> None:
    """What the failed lane would have made of `b`'s recipe, made in this process (`b` replaced in `builds`)."""
    if not lane.converts(recipe):  # converted here already: only its twin was the lane's
        tfl = next((t for k, t in kept if k is b), None)
        if tfl is not None and lane.takes(recipe):
            add_onnx_twin(ctx, b, recipe, tfl, ref)
        return
    fresh, tfl = _convert_here(ctx, ref, recipe, seen, twin=True)
    if fresh is None:
        builds.remove(b)
        return
    builds[builds.index(b)] = fresh
    if tfl is not None:
        kept.append((fresh, tfl))


def _duplicate(ctx: Context, recipe: Recipe, tfl: Artifact, seen: dict[str, str]) -> bool:
    """True (and the file removed, and said) when `tfl` is an earlier candidate's model again.

    e.g. dynamic range on a model whose weight tensors are all below the converter's size
    threshold (1024 elements): nothing was quantized. Not a second candidate. `seen` maps the
    sha256 of each candidate kept so far to its precision.
    """
    twin = seen.get(tfl.sha256)
    if twin is None and recipe.precision != "fp32" and "fp32" in seen.values() \
            and tflite_precision(read_tflite_file(tfl.path)) == "fp32":
        twin = "fp32"
    if twin is None:
        seen[tfl.sha256] = recipe.precision
        return False
    tfl.path.unlink()
    ctx.finding("info", "identical-artifact",
                f"TFLite {recipe.precision} quantized nothing (every weight tensor is below the converter's "
                f"threshold), so it is the {twin} model again; not evaluated as a separate candidate")
    return True


def _reference(ctx: Context) -> tuple[ReferenceModel, list[dict], tuple | None]:
    """The SavedModel the recipes convert from (exported from a Keras model, or the user's own SavedModel),
    and the Keras model it was exported from with the findings of `conversion_model` (None for a SavedModel)."""
    from kdeploy.artifacts.savedmodel import conversion_model, export_savedmodel

    m = ctx.model
    if m.keras_model is None:  # the user's SavedModel is the reference artifact; it is not copied
        return ReferenceModel(Path(m.path), list(m.signature_outputs)), [], None
    probe = {k: v[:16] for k, v in ctx.validation.inputs.items()}
    keras_model, found = conversion_model(m, probe)
    for sev, code, msg in found:
        ctx.finding(sev, code, msg)
    sm_dir = ctx.staging / "reference" / "savedmodel"
    ctx.progress("export", "SavedModel")
    keys = export_savedmodel(keras_model, m, sm_dir)
    release_memory()  # tracing's intermediates
    art = {**_dir_artifact("savedmodel", sm_dir, ctx.staging), "byte_reproducible": False,
           "note": SAVEDMODEL_NOT_REPRODUCIBLE}
    return ReferenceModel(sm_dir, keys), [art], (keras_model, found)


def _resolve_kinds(ctx: Context, kept: list[tuple[Build, Artifact]]) -> None:
    """A SavedModel's output kinds from the ops writing them in a converted `.tflite` (`loading.resolve_kinds`)."""
    from kdeploy.artifacts.flatbuffer import output_producers
    from kdeploy.loading import resolve_kinds

    m = ctx.model
    tfl = next((t for _, t in kept if t.path.is_file()), None)
    if tfl is None or "unknown" not in m.output_kinds:
        return
    m.output_kinds = resolve_kinds(m, output_producers(read_tflite_file(tfl.path)))


def _inspection(ctx: Context, conversion: tuple | None, kept: list[tuple[Build, Artifact]]) -> Inspection | None:
    """Op compatibility and hazards of the converted Keras model (`kdeploy.inspection`), read off the fp32
    candidate's `.tflite` when there is one (no second conversion), else from its own conversion."""
    from kdeploy.inspection import inspect_loaded

    if conversion is None:
        return None
    fp32 = next((tfl for _, tfl in kept if tfl.precision == "fp32" and tfl.path.is_file()), None)
    ctx.progress("inspect", "op compatibility by Keras layer and hazards")
    inspection = inspect_loaded(ctx.model, ctx.profile, None if ctx.data.synthetic else ctx.data.inputs, seed=ctx.seed,
                                conversion=conversion, tflite=fp32.path.read_bytes() if fp32 is not None else None)
    release_memory()  # the traced graph
    return inspection


def _dir_artifact(fmt: str, path: Path, base: Path) -> dict:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"format": fmt, "path": str(path.relative_to(base)), "size_bytes": size, "sha256": file_sha256(path)}
