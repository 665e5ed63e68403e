"""Selective int8: when full int8 fails, find a small set of Keras layers to keep in float.

The search starts from full int8's per-layer error (`kdeploy.run.diagnose`): it keeps the worst
layer in float, converts (`artifacts.tflite.convert_selective`), runs the result on LiteRT and
judges it with the int8 tolerance and the task budgets — the same comparisons evaluation makes;
while it fails, it measures the per-layer error again and keeps the next worst layer. A passing
set is then thinned: each layer but the last added is dropped again if the candidate still
passes. At most `selective.max_tries` conversions. The candidate (`int8-mixed`,
`recipe.float_layers`) then goes through evaluation, checks and selection like every other one.

Targets that run integer kernels only (`full_integer`, the `mcu` profile) get no float layers:
the layers that break int8 are named in a finding, with the fix a user can make.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from kdeploy.artifacts import Artifact
from kdeploy.compare import compare
from kdeploy.debug.attribution import ranked_layers, sensitivity
from kdeploy.errors import ConversionError
from kdeploy.recipes import selective_recipe
from kdeploy.report.model import Candidate
from kdeploy.run.checks import add_fidelity
from kdeploy.run.context import Build, Context
from kdeploy.run.convert import ReferenceModel, add_onnx_twin, keeps_tflite, tflite_file
from kdeploy.run.diagnose import FLOAT_REFERENCE, float_tflite, layer_tensors, model_layers, task_checks
from kdeploy.runtimes.jobs import RunJob
from kdeploy.runtimes.worker import RuntimeFailure, run_isolated

INPUT_LAYERS = ("Normalization", "Rescaling")  # in-model preprocessing a user can move before the model


def selective_builds(ctx: Context, ref: ReferenceModel, builds: list[Build]) -> list[Build]:
    """The `int8-mixed` candidate when full int8 fails and some float layers fix it; else none (with a finding)."""
    prof = ctx.profile
    int8 = next((a for b in builds if b.name == "int8" for a in b.artifacts if a.format == "tflite"), None)
    if int8 is None or ctx.model.keras_model is None or "int8" not in prof.precisions or not prof.selective.enabled:
        return []
    started = time.perf_counter()
    ctx.progress("selective", "judging full int8 on litert")
    passed, detail = judge(ctx, int8)
    if passed:
        return []
    float_path = float_tflite(ctx) or tflite_file(ctx, ref, ref.savedmodel, "fp32", ctx.work / FLOAT_REFERENCE).path
    order = model_layers(ctx)
    float_t, full = layer_tensors(ctx, [float_path, int8.path], int8.io)
    rows = sensitivity(float_t, full, order)
    if prof.full_integer:
        ctx.finding("error", "int8-breaking-layers", _breaking(ctx, rows, full.meta, detail))
        return []
    recipe = selective_recipe(prof)
    kept: list[str] = []
    tries: list[dict] = []
    ranking = ranked_layers(rows)
    best: Artifact | None = None
    while len(tries) < prof.selective.max_tries:
        nxt = next((layer for layer in ranking if layer not in kept), None)
        if nxt is None or len(kept) + 1 >= len(order):  # every layer in float is the fp32 candidate
            break
        art, ok, why = _try(ctx, ref, float_t, [*kept, nxt], len(tries), tries)
        kept.append(nxt)
        if art is None:
            break
        if ok:
            best = art
            break
        ranking = ranked_layers(sensitivity(float_t, layer_tensors(ctx, [art.path], art.io)[0], order))
    for layer in list(kept[:-1]) if best is not None else []:  # thin: drop layers that are not needed
        if len(tries) >= prof.selective.max_tries:
            break
        art, ok, _ = _try(ctx, ref, float_t, [k for k in kept if k != layer], len(tries), tries)
        if art is not None and ok:
            kept.remove(layer)
            best = art
    seconds = round(time.perf_counter() - started, 3)
    if best is None:
        ctx.finding("warning", "selective-int8-failed",
                    f"full int8 fails ({detail}); keeping {', '.join(kept) or 'no layer'} in float did not pass "
                    f"within selective.max_tries = {prof.selective.max_tries} conversion(s) ({seconds} s); tries: "
                    + " | ".join(f"{'+'.join(t['float_layers'])}: {t['detail']}" for t in tries))
        return []
    kept = [layer for layer in order if layer in kept]
    b = Build(recipe.name, recipe.precision, recipe.describe(len(ctx.calibration)), spec=recipe)
    worst = {r["layer"]: r["value"] for r in rows if r["metric"] == "cosine_mean"}
    b.recipe.update({
        "converter": "tflite (QuantizationDebugger denylisted_nodes)",
        "float_layers": kept,
        "why": f"full int8 fails ({detail}); kept in float, by per-layer error: "
               + ", ".join(f"{k} (int8 output cosine {worst.get(k, float('nan')):.3f} vs float)" for k in kept),
        "search": {"tries": tries, "max_tries": prof.selective.max_tries, "seconds": seconds,
                   "ranking": "per-layer error of full int8 against the float .tflite (LiteRT, all tensors kept)"},
    })
    tfl = Artifact(format="tflite", path=ctx.staging / "artifacts" / f"{recipe.name}.tflite", precision="int8",
                   source=best.source, io=best.io)
    tfl.path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best.path, tfl.path)
    tfl.measure()
    if keeps_tflite(ctx):
        b.artifacts.append(tfl)
    add_onnx_twin(ctx, b, recipe, tfl, ref)
    if not keeps_tflite(ctx):
        tfl.path.unlink(missing_ok=True)
    return [b]


def _try(ctx: Context, ref: ReferenceModel, float_t, layers: list[str], n: int,
         tries: list[dict]) -> tuple[Artifact | None, bool, str]:
    """Converts with `layers` in float and judges it; records the try."""
    from kdeploy.artifacts.tflite import convert_selective

    nodes = [node for layer in layers for node in float_t.meta.get(layer, {}).get("nodes", [])]
    ctx.progress("selective", f"try {n + 1}: {', '.join(layers)} in float")
    try:
        art = convert_selective(ref.savedmodel, ctx.work / f"int8-mixed-{n}.tflite", ctx.calibration.inputs,
                                _input_order(float_tflite(ctx) or ctx.work / FLOAT_REFERENCE, ctx),
                                ref.signature_outputs, nodes)
    except ConversionError as e:
        tries.append({"float_layers": layers, "passed": False, "detail": str(e)})
        return None, False, str(e)
    ok, detail = judge(ctx, art)
    tries.append({"float_layers": layers, "passed": ok, "size_bytes": art.size_bytes, "detail": detail})
    return art, ok, detail


def _input_order(float_path: Path, ctx: Context) -> list[str]:
    """Model input names in the order of the float graph's input tensors (the debugger feeds lists)."""
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    sig = read_tflite_file(float_path).signature.get("inputs", {})
    names = [t.name for t in ctx.model.inputs]
    return sorted(names, key=lambda n: sig.get(n, names.index(n)))


def judge(ctx: Context, art: Artifact) -> tuple[bool, str]:
    """Runs `art` on LiteRT and applies the int8 tolerance and task budgets, as evaluation does."""
    prof = ctx.profile
    feeds = ctx.work / "selective-feeds.npz"
    if not feeds.is_file():
        import numpy as np

        np.savez(feeds, **ctx.validation.inputs)
    job = RunJob(runtime="litert", artifact_path=str(art.path), io=art.io, feeds_path=str(feeds))
    try:
        outs, _ = run_isolated(job, ctx.work / f"judge-{art.path.stem}", timeout_s=prof.timing.timeout_s)
    except RuntimeFailure as e:
        return False, f"litert failed: {e}"
    tol = prof.tolerances["int8"]
    c = Candidate(name=art.path.stem, recipe={}, passed=False)
    names = [t.name for t in ctx.model.outputs]
    for f in compare(ctx.reference, outs, names=names, kinds=ctx.model.output_kinds, tol=tol, runtime="litert",
                     reference="keras", precision="int8"):
        add_fidelity(c, f, tol)
    task_checks(ctx, c, Build(c.name, "int8", {}), {"litert": outs})
    failed = [k for k in c.checks if not k.passed]
    return not failed, "; ".join(k.detail for k in (failed or c.checks))


def _breaking(ctx: Context, rows: list[dict], meta: dict, detail: str) -> str:
    """The finding for a full-integer target: which layers break int8, and what a user can change."""
    cos = {r["layer"]: r["value"] for r in rows if r["metric"] == "cosine_mean"}
    added = {r["layer"]: r["value"] for r in rows if r["metric"] == "added_cosine_loss"}
    worst = [layer for layer in ranked_layers(rows) if added.get(layer, 0) > 0.01][:3] or ranked_layers(rows)[:1]
    from kdeploy.debug.names import layer_paths

    kinds = {p: type(layer).__name__ for p, layer in layer_paths(ctx.model.keras_model).items()}
    fixes = []
    for layer in worst:
        if kinds.get(layer) in INPUT_LAYERS and not meta.get(layer, {}).get("fed_by"):
            fixes.append(f"normalize the inputs before the model and remove its {kinds[layer]} layer '{layer}' (the "
                         "int8 input tensor has one scale, so small-range features are quantized to a few levels)")
        else:
            fixes.append(f"quantization-aware training for '{layer}', or a target with float kernels "
                         "(selective int8 keeps it in float there)")
    return (f"full int8 fails ({detail}); target {ctx.profile.name} runs integer kernels only, so no layer is kept "
            "in float. Layers that break int8, worst first: "
            + ", ".join(f"{k} ({kinds.get(k, '?')}, {meta.get(k, {}).get('op', '?')}; int8 output cosine "
                        f"{cos.get(k, float('nan')):.3f} vs float)" for k in worst)
            + ". Fix: " + "; ".join(fixes))
