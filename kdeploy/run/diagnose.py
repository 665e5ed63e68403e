"""Why a candidate is off, by Keras layer: task metrics with labels, per-layer error, the first diverging layer,
where NaN/Inf start, and where a runtime crashed.

`task_checks` runs inside evaluation (its checks gate); `diagnose` runs after it and only
describes: the per-layer error of every quantized `.tflite` against the float one
(`candidates[].sensitivity`) and, for an fp32 `.tflite` that fails its tolerance, the first
Keras layer whose output is off (`candidates[].first_divergence`). The tensors come from one
LiteRT child process (`kdeploy.debug.tensors`), which compares them itself (`layer_errors`: the
figures, cached per pair of artifact hashes in `Context.layer_errors`, so the selective search's
ranking and the report's sensitivity of full int8 are one run); where the tensors themselves are
needed (an fp32 `.tflite` against Keras' layer outputs), the dump writes them once per artifact
hash (`layer_tensors`, `Context.layer_dumps`: the file, read when needed).

For every precision, a `.tflite` that disagrees also gets `first_divergence` (the first layer
failing the precision's tolerance: against Keras for fp32, against the fp32 `.tflite`'s tensors
otherwise) and `first_non_finite` (the first op whose output holds NaN/Inf; located on a
robustness probe's inputs when only a probe gave them, e.g. an all-zero input, which also
gets a candidate that agrees otherwise diagnosed for that alone). A SavedModel has
no Keras layers: its ops are grouped by name scope (`names.ScopeNamer`). An artifact that
crashed its runtime is located from the runtime's error text (`locate_failure`, called by
evaluation: `candidates[].crash_sites`) and gets no tensors (it does not run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdeploy import taskmetrics
from kdeploy.child import ChildFailure
from kdeploy.compare import compare
from kdeploy.memory import layer_samples_for
from kdeploy.debug.attribution import Comparison, LayerDump, LayerErrors, dump_layers, first_divergence, first_non_finite
from kdeploy.debug.names import LayerNamer, layer_paths, layer_scopes
from kdeploy.loading import keras_args
from kdeploy.subclassed import layer_outputs
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
    task = taskmetrics.budget_checks(c.task_metrics, prof.budgets.max_accuracy_drop, prof.budgets.max_mae_increase,
                                     prof.budgets.max_relative_accuracy_drop)
    c.checks += task
    tol = ctx.tolerance(b, b.precision)
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


def namer_layers(ctx: Context) -> list[str] | dict[str, str] | None:
    """What `LayerNamer` maps tensor names to: Keras layer paths (a subclassed model's attribute paths -> their
    scopes); None for a SavedModel (no Keras layers: ops are grouped by scope)."""
    if ctx.model.keras_model is None:
        return None
    return model_layers(ctx) if ctx.model.symbolic else layer_scopes(ctx.model.keras_model)  # attribute paths


def layer_namer(ctx: Context) -> LayerNamer | None:
    """TFLite tensor names -> Keras layer paths of the model; None for a SavedModel."""
    layers = namer_layers(ctx)
    return None if layers is None else LayerNamer(ctx.model.keras_model.name, layers)


def locate_failure(ctx: Context, path: Path, fmt: str, runtime: str, message: str) -> dict | None:
    """Where a runtime's failure text says the artifact at `path` failed (`debug.locate.crash_site`), with the
    runtime; None when the text names no node of it."""
    from kdeploy.debug.locate import crash_site

    site = crash_site(path, fmt, message, layer_namer(ctx))
    return None if site is None else {"runtime": runtime, **site}


def layer_order(ctx: Context, t: LayerDump) -> list[str]:
    """The layers of per-layer tensors in model order: Keras layers, else (SavedModel) the scopes in op order."""
    return model_layers(ctx) if ctx.model.keras_model is not None else list(t.meta)


def layer_tensors(ctx: Context, paths: list[Path], io: dict) -> list[LayerDump]:
    """Per-layer tensors of `.tflite` files on the validation inputs, measured once per file content (`load` reads
    them).

    Raises:
        ChildFailure: the LiteRT tensor dump failed.
    """
    shas = [file_sha256(p) for p in paths]
    with ctx.dump_lock:
        todo = [(p, s) for p, s in zip(paths, shas) if s not in ctx.layer_dumps]
        if todo:
            got, _ = _dump(ctx, [p for p, _ in todo], io, paths[0])
            ctx.layer_dumps.update({s: t for (_, s), t in zip(todo, got)})
    return [ctx.layer_dumps[s] for s in shas]


def layer_errors(ctx: Context, ref: Path, cand: Path, io: dict, tol, precision: str, nice: int = 0,
                 on_start=None) -> LayerErrors:
    """The per-layer error of `.tflite` `cand` against the float `.tflite` `ref` on the validation inputs (sensitivity,
    first layer failing `tol`, first non-finite op), compared in the dump child: measured once per pair of file
    contents and tolerance (also from the runs made ahead, `evaluate.RunsAhead`, at `nice`).

    Raises:
        ChildFailure: the LiteRT tensor dump failed.
    """
    key = _errors_key(ref, cand, tol, precision)
    with ctx.dump_lock:  # measured by whichever thread asks first; the other waits and takes it
        if key not in ctx.layer_errors:
            order = model_layers(ctx) if ctx.model.keras_model is not None else None
            _, (errors,) = _dump(ctx, [ref, cand], io, ref, [Comparison(0, 1, order, tol.model_dump(), precision)],
                                 nice, on_start)
            ctx.layer_errors[key] = errors
    return ctx.layer_errors[key]


def has_layer_errors(ctx: Context, ref: Path, cand: Path, tol, precision: str) -> bool:
    """Whether `layer_errors` of these arguments are measured already."""
    return _errors_key(ref, cand, tol, precision) in ctx.layer_errors


def _errors_key(ref: Path, cand: Path, tol, precision: str) -> tuple:
    return file_sha256(ref), file_sha256(cand), precision, repr(tol.model_dump())


def _dump(ctx: Context, paths: list[Path], io: dict, float_path: Path, compare: list[Comparison] = (),
          nice: int = 0, on_start=None, feeds: tuple[Path, int] | None = None,
          write: bool | None = None) -> tuple[list[LayerDump], list[LayerErrors]]:
    """The tensor dump child on `paths`, in a job folder of its own: on the validation inputs (`layer_samples` of
    them), or on `feeds` (an inputs file, its sample count); tensors written unless `write` is False (default:
    only where no comparison is asked for).

    The callers hold `Context.dump_lock`: one dump at a time (the runs made ahead dump too, and two dumps side by
    side would double the largest memory of the run's children), each measured once.
    """
    if feeds is None:
        path = ctx.work / "layer-feeds.npz"
        if not path.is_file():
            np.savez(path, **ctx.validation.inputs)
        feeds = path, layer_samples(ctx, float_path)
    ctx.layer_jobs += 1
    km = ctx.model.keras_model
    return dump_layers([(p, io) for p in paths], feeds[0], km.name if km is not None else "", namer_layers(ctx),
                       ctx.work / f"layers-{ctx.layer_jobs}", feeds[1], ctx.profile.timing.timeout_s, compare=compare,
                       write=not compare if write is None else write, nice=nice, on_start=on_start)


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
    """Fills `sensitivity` (quantized .tflite candidates), `first_divergence` and `first_non_finite` of the
    candidates that disagree with Keras (a fidelity, robustness or task check failed) and ran.

    A candidate that agrees has nothing to explain, and the tensors of every layer are costly: a
    LiteRT run without its fast kernels, every layer's output kept (four MobileNetV2 candidates
    at 224x224 took 90 s and about 10 GB here when every quantized candidate was diagnosed).
    """
    ref = float_tflite(ctx)
    for c, b in zip(candidates, builds):
        art = next((a for a in b.artifacts if a.format == "tflite"), None)
        if art is None or any(s["runtime"] in ("litert", "tflm") for s in c.crash_sites):
            continue
        nan_probe = _nan_probe(ctx, c)  # NaN/Inf on a probe is located even where no check gates it
        if _agrees(c) and nan_probe is None:
            continue
        try:
            if not _agrees(c):
                _layers_off(ctx, c, b, art, ref)
            if c.first_non_finite is None and nan_probe is not None:
                c.first_non_finite = _probe_non_finite(ctx, c, art, ref, nan_probe)
        except ChildFailure as e:
            ctx.finding("warning", "layer-error-unavailable", f"candidate {c.name}: per-layer tensors not measured ({e})")
    for c in candidates:
        if c.recipe.get("float_layers") or c.recipe.get("float_nodes"):
            c.recipe["cost"] = _cost(ctx, c, {x.name: x for x in candidates})


def _layers_off(ctx: Context, c: Candidate, b: Build, art, ref: Path | None) -> None:
    """`sensitivity`, `first_divergence` and `first_non_finite` (on the validation inputs) of a disagreeing `.tflite`.

    Raises:
        ChildFailure: the LiteRT tensor dump failed.
    """
    if art.precision != "fp32" and ref is not None:
        errors = layer_errors(ctx, ref, art.path, art.io, ctx.tolerance(b, art.precision), art.precision)
        c.sensitivity = errors.sensitivity
        c.first_divergence = errors.first_failing
        c.first_non_finite = _inputs(errors.first_non_finite, "validation")
    elif art.precision == "fp32" and not _fidelity_passed(c):
        if ctx.model.keras_model is not None:
            c.first_divergence = _first_divergence(ctx, b, art)
        (tfl,) = layer_tensors(ctx, [art.path], art.io)
        c.first_non_finite = _inputs(first_non_finite(tfl), "validation")


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


def _inputs(found: dict | None, inputs: str) -> dict | None:
    return None if found is None else {**found, "inputs": inputs}


def _nan_probe(ctx: Context, c: Candidate) -> str | None:
    """The first robustness probe on which the candidate gave NaN/Inf where Keras did not (e.g. an all-zero input)."""
    rt = ctx.profile.runtimes[0]
    # robustness.agreement's words for an output that is NaN/Inf where Keras' is finite
    return next((r.probe for r in c.robustness if r.runtime == rt and "candidate gives NaN/Inf" in r.detail), None)


def _probe_non_finite(ctx: Context, c: Candidate, art, ref: Path | None, bad: str) -> dict | None:
    """`first_non_finite` on the inputs of robustness probe `bad`, when the validation inputs gave no NaN/Inf: the
    tensors of the candidate (and the fp32 `.tflite`) dumped on them."""
    from kdeploy.run.probes import probe_inputs

    probes, _ = probe_inputs(ctx)
    if bad not in probes:
        return None
    feeds = ctx.work / f"probe-{bad}-feeds.npz"
    np.savez(feeds, **probes[bad][1])
    paths = [art.path] if ref is None or art.path == ref else [ref, art.path]
    with ctx.dump_lock:  # where NaN/Inf start: no tensors needed
        t, _ = _dump(ctx, paths, art.io, paths[0], feeds=(feeds, len(next(iter(probes[bad][1].values())))),
                     write=False)
    return _inputs(first_non_finite(t[-1], t[0] if len(t) == 2 else None), f"robustness probe '{bad}'")


def _agrees(c: Candidate) -> bool:
    """No check of agreement with Keras failed (fidelity, robustness, task metrics; budgets do not count)."""
    return all(k.passed for k in c.checks if k.name.startswith(("fidelity ", "robustness ", "task ")))


def _first_divergence(ctx: Context, b: Build, art) -> dict | None:
    import keras

    km = ctx.model.keras_model
    tol = ctx.tolerance(b, "fp32")
    n = layer_samples(ctx, art.path)
    feeds = [ctx.validation.inputs[t.name][:n] for t in ctx.model.inputs]
    if ctx.model.symbolic:
        top = [layer for layer in km.layers if type(layer).__name__ != "InputLayer"]
        probe = keras.Model(km.inputs, [layer.output for layer in top])
        outs = probe.predict(feeds if len(feeds) > 1 else feeds[0], verbose=0)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        keras_outputs, order = {layer.name: np.asarray(o) for layer, o in zip(top, outs)}, [layer.name for layer in top]
    else:  # a subclassed model: no keras.Model(km.inputs, ...); its layers' calls are recorded
        keras_outputs = layer_outputs(km, layer_paths(km), keras_args(km, feeds, ctx.model))
        order = model_layers(ctx)
    (tfl,) = layer_tensors(ctx, [art.path], art.io)
    found = first_divergence(keras_outputs, tfl.load(), order, tol.atol or 0.0, tol.rtol or 0.0,
                             tol.max_peak_err or 0.0)
    return found
