"""Why a candidate is off, by Keras layer: task metrics with labels, per-layer error, the first diverging layer.

`task_checks` runs inside evaluation (its checks gate); `diagnose` runs after it and only
describes: the per-layer error of every quantized `.tflite` against the float one
(`candidates[].sensitivity`) and, for an fp32 `.tflite` that fails its tolerance, the first
Keras layer whose output is off (`candidates[].first_divergence`). The tensors come from one
LiteRT child process (`kdeploy.debug.tensors`); results are cached per artifact hash in
`Context.layer_errors` (the file, read again when needed), so the selective search and the report measure a
`.tflite` once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdeploy import taskmetrics
from kdeploy.child import ChildFailure
from kdeploy.compare import compare
from kdeploy.memory import layer_samples_for
from kdeploy.debug.attribution import LayerTensors, dump_layers, first_divergence, sensitivity
from kdeploy.debug.names import layer_paths
from kdeploy.report.model import Candidate
from kdeploy.run.context import Build, Context
from kdeploy.util import file_sha256

FLOAT_REFERENCE = "float-reference.tflite"  # in ctx.work: the fp32 .tflite when the target builds none


def task_checks(ctx: Context, c: Candidate, b: Build, outputs: dict[str, list[np.ndarray]]) -> None:
    """Task metrics on the deployed runtime's outputs, their budget checks, and top-1 acceptance on the task."""
    prof, m = ctx.profile, ctx.model
    deployed = prof.runtimes[0]
    if deployed not in outputs or not ctx.validation.labels:
        return
    names = [t.name for t in m.outputs]
    labels = taskmetrics.labels_for(ctx.validation.labels, names)
    c.task_metrics = taskmetrics.task_rows(names, m.output_kinds, labels, ctx.reference, outputs[deployed])
    task = taskmetrics.budget_checks(c.task_metrics, prof.budgets.max_accuracy_drop, prof.budgets.max_mae_increase)
    c.checks += task
    tol = b.tolerance or prof.tolerances[b.precision]
    if tol.min_top1 is None:
        return
    loose = tol.model_copy(update={"min_top1": None})
    for k in c.checks:
        if k.passed or not k.name.startswith(f"fidelity {deployed} vs keras ["):
            continue
        i = names.index(k.name.rsplit("[", 1)[-1].rstrip("]"))
        rest = compare([ctx.reference[i]], [outputs[deployed][i]], names=[names[i]], kinds=[m.output_kinds[i]],
                       tol=loose, runtime=deployed, reference="keras", precision=b.precision)[0]
        taskmetrics.accept_on_task(k, rest.passed, task)


def model_layers(ctx: Context) -> list[str]:
    """Keras layer paths of the model (empty for a SavedModel: no layer names to map to)."""
    km = ctx.model.keras_model
    return [p for p, layer in layer_paths(km).items() if type(layer).__name__ != "InputLayer"] if km is not None else []


def layer_tensors(ctx: Context, paths: list[Path], io: dict) -> list[LayerTensors]:
    """Per-layer tensors of `.tflite` files on the validation inputs, measured once per file content.

    Raises:
        ChildFailure: the LiteRT tensor dump failed.
    """
    shas = [file_sha256(p) for p in paths]
    todo = [(p, s) for p, s in zip(paths, shas) if s not in ctx.layer_errors]
    if todo:
        feeds = ctx.work / "layer-feeds.npz"
        if not feeds.is_file():
            np.savez(feeds, **ctx.validation.inputs)
        job_dir = ctx.work / f"layers-{len(ctx.layer_errors)}"
        got = dump_layers([(p, io) for p, _ in todo], feeds, ctx.model.keras_model.name, model_layers(ctx), job_dir,
                          layer_samples(ctx, paths[0]), ctx.profile.timing.timeout_s)
        ctx.layer_errors.update({s: t for (_, s), t in zip(todo, got)})
    return [ctx.layer_errors[s].load() for s in shas]


def layer_samples(ctx: Context, float_path: Path) -> int:
    """Validation samples the per-layer tensors are taken on: the profile's `selective.samples`, fewer where
    one sample's activations are large (`memory.LAYER_TENSOR_BYTES`); fixed for the run by its first call.

    Args:
        float_path: the float `.tflite` of the first dump (every later one is compared with it).
    """
    if ctx.layer_samples is None:
        from kdeploy.artifacts.flatbuffer import read_tflite_file

        graph = read_tflite_file(float_path)
        per_sample = sum(t.elements * 4 for t in graph.tensors if not t.constant)  # kept as float32
        ctx.layer_samples = min(len(ctx.validation), layer_samples_for(per_sample, ctx.profile.selective.samples))
    return ctx.layer_samples


def float_tflite(ctx: Context) -> Path | None:
    """The fp32 `.tflite` of the reference model: the fp32 candidate's, else the one the build made in work."""
    for p in (ctx.staging / "artifacts" / "fp32.tflite", ctx.work / FLOAT_REFERENCE):
        if p.is_file():
            return p
    return None


def diagnose(ctx: Context, candidates: list[Candidate], builds: list[Build]) -> None:
    """Fills `sensitivity` (quantized .tflite candidates) and `first_divergence` (fp32 .tflite ones) of the
    candidates that disagree with Keras (a fidelity, robustness or task check failed).

    A candidate that agrees has nothing to explain, and the tensors of every layer are costly: a
    LiteRT run without its fast kernels, every layer's output kept (four MobileNetV2 candidates
    at 224x224 took 90 s and about 10 GB here when every quantized candidate was diagnosed).
    """
    if ctx.model.keras_model is None:
        return
    ref = float_tflite(ctx)
    for c, b in zip(candidates, builds):
        art = next((a for a in b.artifacts if a.format == "tflite"), None)
        if art is None or _agrees(c):
            continue
        try:
            if art.precision != "fp32" and ref is not None:
                float_t, cand = layer_tensors(ctx, [ref, art.path], art.io)
                c.sensitivity = sensitivity(float_t, cand, model_layers(ctx))
            elif art.precision == "fp32" and not _fidelity_passed(c):
                c.first_divergence = _first_divergence(ctx, b, art)
        except ChildFailure as e:
            ctx.finding("warning", "layer-error-unavailable", f"candidate {c.name}: per-layer tensors not measured ({e})")
    for c in candidates:
        if c.recipe.get("float_layers"):
            c.recipe["cost"] = _cost(ctx, c, {x.name: x for x in candidates})


def _cost(ctx: Context, c: Candidate, by_name: dict[str, Candidate]) -> dict[str, str]:
    """What keeping layers in float cost against full int8 and fp32: size and p50 on the deployed runtime."""
    from kdeploy.report.figures import budget_row, deployed_artifact

    rt = ctx.profile.runtimes[0]

    def figures(x: Candidate):
        a, lat = deployed_artifact(x.artifacts, rt), budget_row(x.latency, rt, "p50")
        return (a.size_bytes if a else None), (lat.p50_ms if lat else None)

    size, p50 = figures(c)
    out = {}
    for other in ("int8", "fp32"):
        if other not in by_name or size is None:
            continue
        s2, l2 = figures(by_name[other])
        text = f"size {size:,} vs {s2:,} bytes ({size - s2:+,})" if s2 else "size not comparable"
        if p50 is not None and l2:
            text += f", p50 {p50:.4f} vs {l2:.4f} ms on {rt} (host)"
        out[other] = text
    return out


def _fidelity_passed(c: Candidate) -> bool:
    return all(k.passed for k in c.checks if k.name.startswith("fidelity ") and " vs keras " in k.name)


def _agrees(c: Candidate) -> bool:
    """No check of agreement with Keras failed (fidelity, robustness, task metrics; budgets do not count)."""
    return all(k.passed for k in c.checks if k.name.startswith(("fidelity ", "robustness ", "task ")))


def _first_divergence(ctx: Context, b: Build, art) -> dict | None:
    import keras

    km = ctx.model.keras_model
    tol = b.tolerance or ctx.profile.tolerances["fp32"]
    top = [layer for layer in km.layers if type(layer).__name__ != "InputLayer"]
    probe = keras.Model(km.inputs, [layer.output for layer in top])
    n = layer_samples(ctx, art.path)
    feeds = [ctx.validation.inputs[t.name][:n] for t in ctx.model.inputs]
    outs = probe.predict(feeds if len(feeds) > 1 else feeds[0], verbose=0)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    (tfl,) = layer_tensors(ctx, [art.path], art.io)
    found = first_divergence({layer.name: np.asarray(o) for layer, o in zip(top, outs)}, tfl,
                             [layer.name for layer in top], tol.atol or 0.0, tol.rtol or 0.0)
    return found
