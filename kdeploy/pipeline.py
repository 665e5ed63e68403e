"""Orchestration: load → data → export/optimize → run on runtimes → compare → measure → select.

Library code: no printing. Progress goes through the `progress(stage, detail)` callback.
`optimize` builds candidates from a model; `check` gates artifacts built elsewhere. Both end in
`evaluate`, so an artifact is judged the same way whichever command produced it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdeploy import __version__
from kdeploy.compare import FidelityResult, compare
from kdeploy.data import Dataset, load_data, split, synthetic_data
from kdeploy.errors import ConversionError, UsageError
from kdeploy.export import Artifact
from kdeploy.loading import LoadedModel, TensorInfo, file_sha256, load_custom_objects, load_model
from kdeploy.profiles import TargetProfile, Tolerance, resolve_profile
from kdeploy.profiling import dominators, is_noisy, near_limit
from kdeploy.report.model import (
    ArtifactOut,
    Candidate,
    Check,
    FidelityOut,
    Finding,
    LatencyOut,
    ModelInfo,
    Report,
    RobustnessOut,
    TensorSpecOut,
    check_out_dir,
    make_staging,
)
from kdeploy.robustness import agreement, make_probes
from kdeploy.runtimes import RUNTIME_FORMATS
from kdeploy.runtimes.worker import RuntimeFailure, run_isolated

Progress = Callable[[str, str], None]
SYNTHETIC_SAMPLES = 128
FIDELITY_BATCH = 64
ORT_DYNAMIC = "ort-dynamic"
# format -> the first runtime registered for it (tflite -> litert; tflm also runs .tflite files).
FORMAT_RUNTIME = {fmt: rt for rt, fmt in reversed(list(RUNTIME_FORMATS.items()))}
LIBRARIES = ("tensorflow", "keras", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnx",
             "onnxruntime", "ai-edge-litert", "numpy")


def _noop(stage: str, detail: str = "") -> None:
    pass


@dataclass
class Build:
    """A candidate before evaluation: its recipe and the artifacts it produced."""

    name: str
    precision: str
    recipe: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tolerance: Tolerance | None = None  # a recipe's own tolerance vs Keras (pruning/clustering); else by precision
    optimization: dict[str, Any] | None = None  # what pruning/clustering did, measured (Candidate.optimization)


@dataclass
class Context:
    """What one run knows: the model, target, data split, reference outputs and where to write."""

    model: LoadedModel
    profile: TargetProfile
    data: Dataset
    calibration: Dataset
    validation: Dataset
    reference: list[np.ndarray]
    staging: Path
    work: Path
    seed: int
    progress: Progress
    findings: list[Finding] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=lambda: _host())  # read once: CPU, cores, library versions

    def finding(self, severity: str, code: str, message: str) -> None:
        self.findings.append(Finding(severity=severity, code=code, message=message))


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def optimize(
    model: str | Path,
    *,
    target: str | None = None,
    profile: str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] = ("json", "md"),
    seed: int = 0,
    trust_custom_code: bool = False,
    custom_objects: str | Path | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
    command: list[str] | None = None,
    trusted_packages: Sequence[str] = (),  # HOOK(issue 11): --trust-package
) -> Report:
    """Builds every candidate the target allows, checks and measures them, selects the best.

    Args:
        model: `.keras` / `.h5` file or SavedModel directory.
        target: built-in target name (or give `profile`).
        profile: path of a user profile file (TOML).
        data: `.npz` / `.npy` / `.csv` inputs; synthetic inputs when None.
        out: folder to write the report and artifacts to (atomically); None keeps them in a
            staging folder until `Report.save(out)`.
        formats: report formats to write besides `report.json`.
        seed: seed for the data split and synthetic inputs.
        trust_custom_code: allow code from the model file (Lambda layers).
        custom_objects: a `.py` file whose classes the user trusts.
        input_shapes: non-batch shapes for inputs with dynamic dimensions.
        progress: callback `(stage, detail)`.
        trusted_packages: installed packages whose registered classes load without
            `custom_objects`, besides `keras_hub` and the profile's `trusted_packages`.

    Returns:
        The Report (saved to `out` when given).

    Raises:
        UsageError: bad model, profile, data or options (exit 2).
        KdeployError: internal or converter failure (exit 3).
    """
    progress = progress or _noop
    started = time.perf_counter()
    ctx, out_path = _prepare(model, target, profile, data, out, formats, seed, trust_custom_code, custom_objects,
                             input_shapes, progress, trusted_packages)  # HOOK(issue 11): trusted_packages
    return _finish(ctx, out_path, build_candidates, formats, command, started)


def check(
    model: str | Path,
    artifacts: Sequence[str | Path],
    *,
    target: str | None = None,
    profile: str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] = ("json", "md"),
    seed: int = 0,
    precision: str | None = None,
    trust_custom_code: bool = False,
    custom_objects: str | Path | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
    command: list[str] | None = None,
    trusted_packages: Sequence[str] = (),  # HOOK(issue 11): --trust-package
) -> Report:
    """Gates artifacts built elsewhere (`.tflite`, `.onnx`) against the reference model; no optimization.

    Each artifact becomes one candidate named after its file; `precision` (else detected from the
    artifact) picks the tolerance.
    """
    progress = progress or _noop
    started = time.perf_counter()
    paths = [Path(a) for a in artifacts]
    for p in paths:
        if not p.is_file() or p.suffix.lower() not in (".tflite", ".onnx"):
            raise UsageError(f"artifact {p}: not found or not a .tflite/.onnx file (allowed: .tflite, .onnx)")
    ctx, out_path = _prepare(model, target, profile, data, out, formats, seed, trust_custom_code, custom_objects,
                             input_shapes, progress, trusted_packages)  # HOOK(issue 11): trusted_packages
    return _finish(ctx, out_path, lambda c: (_external_builds(c, paths, precision), []), formats, command, started)


def _external_builds(ctx: Context, paths: list[Path], precision: str | None) -> list[Build]:
    """One candidate per artifact file, copied into the staging folder."""
    builds: list[Build] = []
    for i, p in enumerate(paths):
        dest = ctx.staging / "artifacts" / f"{i}-{p.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        art = external_artifact(dest, ctx.model, precision)
        if art.precision not in ctx.profile.tolerances:
            raise UsageError(
                f"artifact {p.name} has precision {art.precision}, which target {ctx.profile.name} gives no "
                f"tolerance for (allowed: {', '.join(ctx.profile.tolerances)})"
            )
        name = p.stem if p.stem not in [b.name for b in builds] else f"{p.stem}-{i}"
        builds.append(Build(name, art.precision, {"precision": art.precision, "source": str(p)}, [art]))
    return builds


def _finish(ctx: Context, out_path: Path | None, build: Callable[[Context], tuple[list[Build], list[dict]]],
            formats: Sequence[str], command: list[str] | None, started: float) -> Report:
    """Builds, evaluates and reports; on any failure or interruption the staging folder goes too."""
    try:
        builds, reference_artifacts = build(ctx)
        candidates = evaluate(ctx, builds)
        report = _make_report(ctx, candidates, reference_artifacts, command, started)
        report._staging = ctx.staging
        if out_path is not None:
            ctx.progress("report", str(out_path))
            report.save(out_path, tuple(formats))
        return report
    except BaseException:
        shutil.rmtree(ctx.staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def _prepare(model, target, profile, data, out, formats, seed, trust, custom_objects, input_shapes, progress,
             trusted_packages=()):  # HOOK(issue 11): trusted_packages
    """Validates everything cheap first (profile, --out, formats, data file) before loading the model."""
    from kdeploy.report.render import validate_formats

    prof = resolve_profile(target, profile)
    validate_formats(formats)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_out_dir(out_path)
    if data is not None and not Path(data).is_file():
        raise UsageError(f"data file not found: {data} (allowed: .npz, .npy, .csv)")
    custom = load_custom_objects(custom_objects) if custom_objects else None
    progress("load", str(model))
    m = load_model(model, trust_custom_code=trust, custom_objects=custom, input_shapes=input_shapes, seed=seed,
                   trusted_packages=[*prof.trusted_packages, *trusted_packages])  # HOOK(issue 11)
    if prof.static_batch is not None:
        # Dynamic batch lowers to SHAPE/FILL/REDUCE_PROD ops that TFLite Micro lacks: fix it for conversion.
        m.inputs = [TensorInfo(t.name, (prof.static_batch,) + tuple(t.shape[1:]), t.dtype) for t in m.inputs]
    ds = load_data(data, m.inputs) if data is not None else synthetic_data(m.inputs, SYNTHETIC_SAMPLES, seed)
    cal, val = split(ds, prof.calibration_samples, seed)
    progress("reference", f"Keras outputs on {len(val)} validation samples")
    reference = m.predict(val.inputs)
    staging = make_staging(out_path)
    try:  # from here on the caller cleans up through ctx; until then, this does (Ctrl-C, SIGTERM)
        work = Path(tempfile.mkdtemp(prefix="kdeploy-work-"))
        ctx = Context(m, prof, ds, cal, val, reference, staging, work, seed, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _prepare_findings(ctx, m, ds, prof, reference)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ctx, out_path


def _prepare_findings(ctx: Context, m: LoadedModel, ds: Dataset, prof: TargetProfile, reference: list) -> None:
    for sev, code, msg in m.findings:
        ctx.finding(sev, code, msg)
    if ds.synthetic:
        ctx.finding("warning", "synthetic-data",
                    f"no --data given: {len(ds)} synthetic inputs (uniform [0, 1)) were used, so fidelity figures "
                    "and int8 calibration are not representative of real inputs")
    if not ds.synthetic and {"int8", "int16x8"} & set(prof.precisions):
        _input_spread_findings(ctx)
    bad = [t.name for t, r in zip(m.outputs, reference) if not np.all(np.isfinite(r))]
    if bad:
        ctx.finding("error", "reference-non-finite",
                    f"the Keras model itself produces NaN/Inf on the validation inputs (outputs {bad}); "
                    "no candidate can be judged against it")


def _input_spread_findings(ctx: Context, limit: float = 1e3) -> None:
    """Warns when an input's features have ranges orders of magnitude apart.

    Full-integer quantization gives each input tensor one scale, so a feature with a range of
    0.01 next to one with a range of 4000 is quantized to a handful of levels.
    """
    for t in ctx.model.inputs:
        x = ctx.data.inputs[t.name]
        if x.dtype.kind != "f" or x.ndim < 2:
            continue
        flat = x.reshape(-1, x.shape[-1])
        ranges = flat.max(axis=0) - flat.min(axis=0)
        ranges = ranges[ranges > 0]
        if ranges.size > 1 and ranges.max() / ranges.min() > limit:
            ctx.finding("warning", "input-scale-spread",
                        f"input '{t.name}' has features whose ranges differ {ranges.max() / ranges.min():.1e}x "
                        f"({ranges.min():.3g} to {ranges.max():.3g}); int8/int16x8 quantize the input tensor with "
                        "one scale, so small-range features lose resolution — normalize inputs before the model "
                        "if those candidates fail")


def build_candidates(ctx: Context) -> tuple[list[Build], list[dict]]:
    """Exports the reference SavedModel and every recipe the target allows."""
    from kdeploy.export import onnx as onnx_export
    from kdeploy.export import tflite
    from kdeploy.export.savedmodel import conversion_model, export_savedmodel

    m, prof = ctx.model, ctx.profile
    reference_artifacts: list[dict] = []
    keras_model = None
    if m.keras_model is not None:
        probe = {k: v[:16] for k, v in ctx.validation.inputs.items()}
        keras_model, found = conversion_model(m, probe)
        for sev, code, msg in found:
            ctx.finding(sev, code, msg)
        sm_dir = ctx.staging / "reference" / "savedmodel"
        ctx.progress("export", "SavedModel")
        m.signature_outputs = export_savedmodel(keras_model, m, sm_dir)
        reference_artifacts.append({**_dir_artifact("savedmodel", sm_dir, ctx.staging), "byte_reproducible": False,
                                    "note": SAVEDMODEL_NOT_REPRODUCIBLE})
    else:
        sm_dir = m.path  # the user's SavedModel is the reference artifact; it is not copied
    wanted = set(prof.runtimes) | set(prof.crosscheck_runtimes)
    calibration = ctx.calibration.inputs
    builds: list[Build] = []
    onnx_fp32: Artifact | None = None
    tflite_hashes: dict[str, str] = {}
    art_dir = ctx.staging / "artifacts"
    keep_tflite = any(RUNTIME_FORMATS[r] == "tflite" for r in wanted)  # litert, tflm
    for precision in prof.precisions:
        b = Build(precision, precision, {"precision": precision, "converter": "tflite"})
        if precision in ("int8", "int16x8"):
            b.recipe["calibration_samples"] = len(ctx.calibration)
        builds.append(b)
        # The .tflite is built even for ONNX-only targets: quantized ONNX candidates are converted from it.
        ctx.progress("convert", f"TFLite {precision}")
        try:
            tfl = tflite.convert(sm_dir, precision, art_dir / f"{precision}.tflite", calibration,
                                 [t.name for t in m.inputs], m.signature_outputs)
        except ConversionError as e:
            b.errors.append(str(e))
            continue
        twin = tflite_hashes.get(tfl.sha256)
        if twin is None and precision != "fp32" and _tflite_precision_of(tfl.path) == "fp32" and "fp32" in tflite_hashes.values():
            twin = "fp32"
        if twin is not None:
            # e.g. dynamic range on a model whose weight tensors are all below the converter's
            # size threshold (1024 elements): nothing was quantized. Not a second candidate.
            tfl.path.unlink()
            builds.remove(b)
            ctx.finding("info", "identical-artifact",
                        f"TFLite {precision} quantized nothing (every weight tensor is below the converter's "
                        f"threshold), so it is the {twin} model again; not evaluated as a separate candidate")
            continue
        tflite_hashes[tfl.sha256] = precision
        if keep_tflite:
            b.artifacts.append(tfl)
        if "onnxruntime" in wanted:
            if precision == "int16x8":
                # tf2onnx (opsets <= 18) writes int16 QuantizeLinear, which ONNX allows from opset 21
                # only: ONNX Runtime refuses the graph. Not attempted (it always failed here).
                _onnx_missing(ctx, b, "tf2onnx cannot express int16 activations in the opsets it supports (<= 18)")
            else:
                ctx.progress("convert", f"ONNX {precision}")
                try:
                    if precision == "fp32":
                        onnx_fp32 = onnx_export.from_saved_model(sm_dir, m, art_dir / "fp32.onnx")
                        b.artifacts.append(onnx_fp32)
                    else:
                        b.artifacts.append(onnx_export.from_tflite(tfl, art_dir / f"{precision}.onnx"))
                        b.recipe["onnx"] = "tf2onnx from the same .tflite"
                except ConversionError as e:
                    _onnx_missing(ctx, b, str(e))
        if not keep_tflite:
            tfl.path.unlink()
    if prof.onnx_quantization and "onnxruntime" in wanted:
        b = Build(ORT_DYNAMIC, "dynamic", {"precision": "dynamic", "converter": "onnxruntime.quantization.quantize_dynamic"})
        builds.append(b)
        try:
            if onnx_fp32 is None:
                onnx_fp32 = onnx_export.from_saved_model(sm_dir, m, ctx.work / "fp32.onnx")
            ctx.progress("convert", "ONNX Runtime dynamic quantization")
            b.artifacts.append(onnx_export.quantize_dynamic(onnx_fp32, art_dir / f"{ORT_DYNAMIC}.onnx"))
        except ConversionError as e:
            b.errors.append(str(e))
    if m.keras_model is not None:
        from kdeploy.compress.tfmot import tfmot_builds

        builds += tfmot_builds(ctx)  # pruning / clustering recipes the profile enables (child process)
    if not any(b.artifacts for b in builds):
        errors = "; ".join(e for b in builds for e in b.errors)
        raise ConversionError(f"no candidate could be converted for target {prof.name}: {errors}")
    return builds, reference_artifacts


def _onnx_missing(ctx: Context, b: Build, error: str) -> None:
    error = error.replace(str(ctx.staging) + os.sep, "")
    if "onnxruntime" in ctx.profile.runtimes:
        b.errors.append(error)
    else:
        ctx.finding("warning", "crosscheck-unavailable",
                    f"candidate {b.name}: no ONNX artifact, so it is not cross-checked on onnxruntime ({error})")


def _dir_artifact(fmt: str, path: Path, base: Path) -> dict:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"format": fmt, "path": str(path.relative_to(base)), "size_bytes": size, "sha256": file_sha256(path)}


def evaluate(ctx: Context, builds: list[Build]) -> list[Candidate]:
    """Runs every artifact on its runtime(s), compares, measures and applies the budgets.

    1. Each artifact runs in a child process per runtime (two at a time on a multi-core host):
       fidelity against Keras, memory, and the robustness probes on the target's first runtime.
    2. Latency is measured afterwards, alone: one child process per deployed runtime loads every
       artifact that ran and times them round-robin (cold load and first inference, then warm
       runs per thread count and batch size), so changes in host load hit all candidates alike.
    3. Runtimes that ran the same artifact are compared with each other; every budget becomes a
       check, and a candidate passes when all its checks pass.
    """
    m, prof = ctx.model, ctx.profile
    feeds_path = ctx.work / "validation.npz"
    np.savez(feeds_path, **ctx.validation.inputs)
    fixed_batch = m.inputs[0].shape[0]
    batches = [b for b in prof.batch_sizes if fixed_batch is None or b == fixed_batch]
    if fixed_batch is not None and batches != list(prof.batch_sizes):
        ctx.finding("warning", "fixed-batch",
                    f"the model has a fixed batch size of {fixed_batch}; batch sizes {prof.batch_sizes} of the "
                    f"profile were reduced to {batches or [fixed_batch]}")
        batches = batches or [fixed_batch]
    names = [t.name for t in m.outputs]
    measured_on = f"host: {ctx.host['cpu']}, {ctx.host['cores']} cores"
    probes, probes_path = _probe_inputs(ctx, fixed_batch)
    counted = _count_compute(builds)
    candidates: list[Candidate] = []
    runs = []  # (candidate, build, artifact, runtime, job, job dir)
    for b in builds:
        c = Candidate(name=b.name, recipe=b.recipe, passed=False, errors=list(b.errors), optimization=b.optimization)
        candidates.append(c)
        for art in b.artifacts:
            c.artifacts.append(ArtifactOut(format=art.format, path=str(art.path.relative_to(ctx.staging)),
                                           precision=art.precision, source=art.source, size_bytes=art.size_bytes,
                                           gzip_bytes=art.gzip_bytes, sha256=art.sha256))
            for runtime in _runtimes_for(art.format, prof):
                job = {
                    "runtime": runtime,
                    "artifact_path": str(art.path),
                    "io": art.io,
                    "feeds_path": str(feeds_path),
                    "fidelity_threads": 1,
                    "fidelity_batch": fixed_batch or FIDELITY_BATCH,
                    "probes_path": str(probes_path) if runtime == prof.runtimes[0] and probes_path else None,
                    "threads": [],
                    "batch_sizes": [],
                }
                runs.append((c, b, art, runtime, job, ctx.work / f"{b.name}-{runtime}"))
    labels = [f"{c.name} on {rt}" + (" (fidelity)" if rt in prof.runtimes else " (cross-check)")
              for c, _, _, rt, _, _ in runs]
    results = _run_parallel(ctx, [(label, job, d) for label, (_, _, _, _, job, d) in zip(labels, runs)])
    outputs: dict[str, dict[str, list[np.ndarray]]] = {c.name: {} for c in candidates}
    ran: dict[str, list[tuple[Candidate, Artifact]]] = {rt: [] for rt in prof.runtimes}
    peak_not_reset = False
    for (c, b, art, runtime, _, _), res in zip(runs, results):
        if isinstance(res, RuntimeFailure) and runtime not in prof.runtimes:  # HOOK(issue 11): cross-check only
            ctx.finding("warning", "crosscheck-failed",
                        f"candidate {b.name}: not cross-checked on {runtime}, which failed to run it "
                        f"({str(res).replace(str(ctx.staging) + os.sep, '')}); judged on {', '.join(prof.runtimes)}")
            continue
        if isinstance(res, RuntimeFailure):
            c.checks.append(Check(name=f"runs on {runtime}", value="failed", limit="runs", passed=False, detail=str(res)))
            ctx.finding("error", "runtime-failure", f"candidate {b.name}: {res}")
            if runtime == "tflm":
                _tflm_finding(ctx, b.name, str(res))
            continue
        outs, result = res
        outputs[c.name][runtime] = outs
        c.memory[runtime] = result["memory"]
        peak_not_reset |= not result.get("peak_reset", True)
        if runtime in ran:
            ran[runtime].append((c, art))
        tol = b.tolerance or prof.tolerances[art.precision]
        for f in compare(ctx.reference, outs, names=names, kinds=m.output_kinds, tol=tol, runtime=runtime,
                         reference="keras", precision=art.precision):
            _add_fidelity(c, f, tol)
        for probe, got in result.get("probes", {}).items():
            desc, _, ref = probes[probe]
            c.robustness += [RobustnessOut(**row) for row in
                             agreement(probe, desc, runtime, ref, got, names, m.output_kinds, prof.robustness)]
    for runtime, entries in ran.items():
        _time_candidates(ctx, runtime, entries, batches, feeds_path, measured_on)
    for c, b in zip(candidates, builds):
        _cross_compare(ctx, c, b, outputs[c.name], names)
        c.compute = counted.get(b.name, {})
        _budget_checks(ctx, c, b)
        c.estimate = _estimate(c, b, prof, measured_on)
        c.passed = bool(c.checks) and all(k.passed for k in c.checks) and not c.errors
    if peak_not_reset:
        ctx.finding("warning", "memory-peak-not-reset",
                    "the kernel refused to reset the peak-RSS counter (/proc/self/clear_refs): memory figures may "
                    "include the runtime's import-time peak")
    _latency_findings(ctx, candidates, measured_on)
    _select(ctx, candidates)
    return candidates


# Fidelity/probe child processes run at most this many at a time (never more than the host's
# cores). Latency is never timed while anything else runs.
PARALLEL_RUNS = 2


def _run_parallel(ctx: Context, jobs: list[tuple[str, dict, Path]]) -> list:
    """Runs worker jobs, up to PARALLEL_RUNS at a time; returns (outputs, result) or the RuntimeFailure, in order.

    Progress is reported from the calling thread, as each job starts.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    timeout = ctx.profile.timing.timeout_s

    def one(job, job_dir):
        try:
            return run_isolated(job, job_dir, timeout_s=timeout)
        except RuntimeFailure as e:
            return e

    width = max(1, min(PARALLEL_RUNS, os.cpu_count() or 1))
    results: list = [None] * len(jobs)
    pending = list(enumerate(jobs))
    with ThreadPoolExecutor(width) as pool:
        running: dict = {}
        while pending or running:
            while pending and len(running) < width:
                i, (label, job, job_dir) = pending.pop(0)
                ctx.progress("run", label)
                running[pool.submit(one, job, job_dir)] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                results[running.pop(f)] = f.result()
    return results


def _time_candidates(ctx: Context, runtime: str, entries: list[tuple[Candidate, Artifact]], batches: list[int],
                     feeds_path: Path, measured_on: str) -> None:
    """Times every artifact that ran on `runtime`, round-robin in one child process; records cold and warm figures.

    Falls back to one timing process per artifact when the shared one fails (a runtime that
    crashes on one artifact must not cost the others their figures).
    """
    if not entries:
        return
    prof = ctx.profile
    n = len(ctx.validation)
    from kdeploy.runtimes import runner_for

    max_threads = getattr(runner_for(runtime, None), "max_threads", None)  # not loaded: just the class's limits
    threads = [t for t in prof.threads if max_threads is None or t <= max_threads] or [1]
    plan = [{"key": f"{c.name}@{t}@{bs}", "name": c.name, "artifact_path": str(art.path), "io": art.io,
             "threads": t, "batch": bs}
            for c, art in entries for t in threads for bs in batches if bs <= n]
    by_name = {c.name: c for c, _ in entries}
    ctx.progress("latency", f"timing {len(entries)} candidate(s) on {runtime}, round-robin in one process")
    job = {"mode": "interleave", "runtime": runtime, "feeds_path": str(feeds_path), "entries": plan,
           "rounds": INTERLEAVE_ROUNDS, "timing": _timing(prof)}
    try:
        _, result = run_isolated(job, ctx.work / f"latency-{runtime}", timeout_s=prof.timing.timeout_s)
    except RuntimeFailure as e:
        ctx.finding("warning", "latency-interleave-failed",
                    f"timing all candidates on {runtime} in one process failed ({e}); timed one by one instead")
        for c, art in entries:
            ctx.progress("latency", f"{c.name} on {runtime}")
            one = {"runtime": runtime, "artifact_path": str(art.path), "io": art.io, "feeds_path": str(feeds_path),
                   "fidelity": False, "fidelity_threads": 1, "threads": list(prof.threads), "batch_sizes": batches,
                   "timing": _timing(prof)}
            try:
                _, res = run_isolated(one, ctx.work / f"latency-{runtime}-{c.name}", timeout_s=prof.timing.timeout_s)
            except RuntimeFailure as e2:
                c.checks.append(Check(name=f"latency on {runtime}", value="failed", limit="runs", passed=False,
                                      detail=str(e2)))
                continue
            c.cold[runtime] = res["cold"]
            c.latency += [_latency_out(row, prof, measured_on) for row in res["latency"]]
        return
    timed_with = [c.name for c, _ in entries]
    for name, cold in result["cold"].items():
        by_name[name].cold[runtime] = {k: float(v) for k, v in cold.items()}
    for row in result["latency"]:
        name = row.pop("key").rsplit("@", 2)[0]
        out = _latency_out(row, prof, measured_on)
        out.interleaved_with = [x for x in timed_with if x != name]
        by_name[name].latency.append(out)


# Rounds of the round-robin timing: each entry's samples are spread over this many visits.
INTERLEAVE_ROUNDS = 4


def _runtimes_for(fmt: str, prof: TargetProfile) -> list[str]:
    """Runtimes of the profile (deployed first, then cross-checks) that run artifacts of format `fmt`."""
    return [rt for rt in dict.fromkeys([*prof.runtimes, *prof.crosscheck_runtimes]) if RUNTIME_FORMATS[rt] == fmt]


def _timing(prof: TargetProfile, factor: float = 1.0) -> dict[str, Any]:
    """Keyword arguments of `profiling.measure` from the profile (scaled by `factor` for a re-measure)."""
    t = prof.timing
    return {"warmup": t.warmup, "min_iters": int(t.min_iters * factor), "min_seconds": t.min_seconds * factor,
            "max_iters": int(t.max_iters * factor), "max_seconds": t.max_seconds * factor}


def _latency_out(row: dict, prof: TargetProfile, measured_on: str, remeasured: bool = False) -> LatencyOut:
    return LatencyOut(**row, noisy=is_noisy(row["cv"], prof.timing.noisy_cv), remeasured=remeasured,
                      measured_on=measured_on)


def _probe_inputs(ctx: Context, fixed_batch: int | None) -> tuple[dict[str, tuple[str, dict, list]], Path | None]:
    """Robustness probe inputs and Keras' outputs on them; writes them for the workers."""
    prof = ctx.profile
    if not prof.robustness.enabled:
        return {}, None
    if fixed_batch not in (None, 1):
        ctx.finding("info", "robustness-skipped",
                    f"robustness probes need batch 1 or a dynamic batch; the model's batch is fixed at {fixed_batch}")
        return {}, None
    if any(not np.all(np.isfinite(r)) for r in ctx.reference):
        return {}, None  # the reference itself is broken; a finding already says so
    sets = make_probes(ctx.validation.inputs, ctx.data.inputs, prof.robustness, ctx.seed)
    probes = {}
    flat = {}
    for name, (desc, feeds) in sets.items():
        ctx.progress("probe", f"Keras outputs on robustness probe '{name}'")
        probes[name] = (desc, feeds, ctx.model.predict(feeds))
        flat.update({f"{name}/{k}": v for k, v in feeds.items()})
    if not probes:
        return {}, None
    path = ctx.work / "probes.npz"
    np.savez(path, **flat)
    return probes, path


def _cross_compare(ctx: Context, c: Candidate, b: Build, outputs: dict[str, list[np.ndarray]], names: list[str]) -> None:
    """Holds every runtime to the first one that ran (the deployed one when it ran), at the candidate's tolerance.

    The runtimes run the same graph (or, for fp32, two conversions of the same model), so they
    must agree with each other as closely as each must agree with Keras.
    """
    order = [rt for rt in dict.fromkeys([*ctx.profile.runtimes, *ctx.profile.crosscheck_runtimes]) if rt in outputs]
    if len(order) < 2:
        return
    tol = ctx.profile.tolerances[b.precision]
    for rt in order[1:]:
        for f in compare(outputs[order[0]], outputs[rt], names=names, kinds=ctx.model.output_kinds, tol=tol,
                         runtime=rt, reference=order[0], precision=b.precision):
            _add_fidelity(c, f, tol)


def _count_compute(builds: list[Build]) -> dict[str, dict[str, Any]]:
    """Candidate name -> compute figures, counted from its own `.tflite` (else the model's, said so)."""
    from kdeploy.compute import tflite_compute

    counted: dict[str, dict[str, Any]] = {}
    for b in builds:
        tfl = next((a for a in b.artifacts if a.format == "tflite"), None)
        if tfl is None:
            continue
        try:
            counted[b.name] = tflite_compute(tfl.path)
        except (ValueError, OSError, AttributeError, IndexError) as e:
            counted[b.name] = {"source": f"tflite op list ({tfl.path.name})", "macs": None, "flops": None,
                               "notes": [f"could not read the op list: {e}"]}
    fallback = next((counted[b.name] for b in sorted(builds, key=lambda b: b.precision != "fp32")
                     if counted.get(b.name, {}).get("macs") is not None), None)
    for b in builds:
        if b.name in counted or not b.artifacts:
            continue
        if fallback is None:
            counted[b.name] = {"source": None, "macs": None, "flops": None,
                               "notes": ["no .tflite artifact to count operations from"]}
        else:
            own = b.artifacts[0]
            counted[b.name] = {**fallback, "source": f"{fallback['source']}: the same model graph; this candidate's "
                                                     f"own artifact is {own.format}",
                               "weight_bytes": own.size_bytes,
                               "notes": [*fallback["notes"], f"weight_bytes is the size of {own.path.name}"]}
    return counted


def _estimate(c: Candidate, b: Build, prof: TargetProfile, measured_on: str) -> dict[str, Any] | None:
    """The profile device's analytic lower bound, next to the host measurement it is not."""
    from kdeploy.compute import estimate_latency

    est = estimate_latency(c.compute, b.precision, prof.device)
    if est is None:
        return None
    lat = budget_latency(c, prof)
    est["host_measurement"] = None if lat is None else {
        "p50_ms": round(lat.p50_ms, 6), "runtime": lat.runtime, "threads": lat.threads, "batch": lat.batch,
        "measured_on": measured_on}
    return est


def _tflm_finding(ctx: Context, name: str, message: str) -> None:
    from kdeploy.runtimes.tflm import unsupported_ops

    ops = unsupported_ops(message)
    if ops:
        ctx.finding("error", "tflm-unsupported-ops",
                    f"candidate {name}: TensorFlow Lite Micro cannot run op(s) {', '.join(ops)} of this artifact "
                    "(as built here); a microcontroller build would fail the same way")


def _latency_findings(ctx: Context, candidates: list[Candidate], measured_on: str) -> None:
    """Says what measuring found: noisy figures, and quantized candidates slower than fp32 on this host."""
    prof = ctx.profile
    rows = [l for c in candidates for l in c.latency]
    noisy = [l for l in rows if l.noisy]
    if noisy:
        ctx.finding("info", "latency-noisy",
                    f"{len(noisy)} of {len(rows)} latency rows have cv > {prof.timing.noisy_cv:g} (a busy host, or "
                    f"calls too short for the timer; worst cv {max(l.cv for l in noisy):.2f}); percentiles are the "
                    "robust figures and budget verdicts near their limit were re-measured")
    fp32 = next((c for c in candidates if c.recipe.get("precision") == "fp32" and c.latency), None)
    if fp32 is None:
        return
    for c in candidates:
        if c is fp32 or c.recipe.get("precision") == "fp32":
            continue
        for mine in c.latency:
            ref = next((l for l in fp32.latency if (l.runtime, l.threads, l.batch) == (mine.runtime, mine.threads,
                                                                                     mine.batch)), None)
            if ref is None or mine.runtime != prof.runtimes[0]:
                continue
            slack = max(ref.p50_ms * prof.tie_tolerance, prof.latency_tie_ms)
            if mine.p50_ms > ref.p50_ms + slack:
                ctx.finding("info", "quantized-slower",
                            f"{c.name} is slower than fp32 on {mine.runtime} at {mine.threads} thread(s), batch "
                            f"{mine.batch}: p50 {mine.p50_ms:.3f} vs {ref.p50_ms:.3f} ms ({measured_on}); smaller "
                            "is not faster here")
                break


def _add_fidelity(c: Candidate, f: FidelityResult, tol: Tolerance) -> None:
    out = FidelityOut(**{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                         for k, v in f.to_dict().items()})  # NaN/Inf are not JSON: reported as null
    c.fidelity.append(out)
    value = {"max_abs_err": out.max_abs_err, "cosine_min": out.cosine_min}
    if out.top1_agreement is not None:
        value["top1_agreement"] = out.top1_agreement
    c.checks.append(Check(name=f"fidelity {f.runtime} vs {f.reference} [{f.output}]", value=value,
                          limit=tol.model_dump(exclude_none=True), passed=f.passed, detail=f.detail))


def primary_artifact(c: Candidate, prof: TargetProfile) -> ArtifactOut | None:
    """The artifact that would be deployed: the one for the target's first runtime."""
    fmt = RUNTIME_FORMATS[prof.runtimes[0]]
    return next((a for a in c.artifacts if a.format == fmt), None)


def budget_latency(c: Candidate, prof: TargetProfile) -> LatencyOut | None:
    """Latency row the budget applies to: batch 1 (else smallest) on the first runtime, fastest thread count."""
    pct = prof.budgets.latency_percentile
    rows = [l for l in c.latency if l.runtime == prof.runtimes[0]]
    if not rows:
        return None
    batch = min(l.batch for l in rows)
    return min((l for l in rows if l.batch == batch), key=lambda l: getattr(l, f"{pct}_ms"))


def _remeasure(ctx: Context, c: Candidate, b: Build, lat: LatencyOut) -> LatencyOut:
    """Times one latency row again with twice the iterations and time; replaces it in the candidate."""
    art = next((a for a in b.artifacts if a.format == RUNTIME_FORMATS[lat.runtime]), None)
    if art is None:
        return lat
    prof = ctx.profile
    ctx.progress("remeasure", f"{b.name} on {lat.runtime}, {lat.threads} thread(s), batch {lat.batch}: near its budget")
    job = {"runtime": lat.runtime, "artifact_path": str(art.path), "io": art.io,
           "feeds_path": str(ctx.work / "validation.npz"), "fidelity": False, "fidelity_threads": 1,
           "threads": [lat.threads], "batch_sizes": [lat.batch], "timing": _timing(prof, 2.0)}
    try:
        _, result = run_isolated(job, ctx.work / f"{b.name}-{lat.runtime}-remeasure", timeout_s=prof.timing.timeout_s)
    except RuntimeFailure as e:
        ctx.finding("warning", "remeasure-failed", f"candidate {b.name}: re-measuring latency failed ({e})")
        return lat
    if not result["latency"]:
        return lat
    new = _latency_out(result["latency"][0], prof, lat.measured_on or "", remeasured=True)
    c.latency[c.latency.index(lat)] = new
    return new


def _budget_checks(ctx: Context, c: Candidate, b: Build) -> None:
    """Turns every budget of the profile into a check with its value, limit and verdict.

    A budget that applies but could not be measured fails ("not measured"): a gate must not pass
    on a figure it does not have.
    """
    prof, bud = ctx.profile, ctx.profile.budgets
    for rt in prof.runtimes:
        if not any(a.format == RUNTIME_FORMATS[rt] for a in c.artifacts):
            c.checks.append(Check(name=f"artifact for {rt}", value=None, limit=RUNTIME_FORMATS[rt], passed=False,
                                  detail="; ".join(b.errors) or f"no {RUNTIME_FORMATS[rt]} artifact was built"))
    art = primary_artifact(c, prof)
    if art is not None:
        if bud.max_size_bytes is not None:
            c.checks.append(Check(name="size_bytes", value=art.size_bytes, limit=bud.max_size_bytes,
                                  passed=art.size_bytes <= bud.max_size_bytes, detail=f"{art.path} (flash / download)"))
        if bud.max_gzip_bytes is not None:
            c.checks.append(Check(name="gzip_bytes", value=art.gzip_bytes, limit=bud.max_gzip_bytes,
                                  passed=art.gzip_bytes <= bud.max_gzip_bytes, detail=f"{art.path}, gzip -9"))
    deployed = prof.runtimes[0]
    if bud.max_latency_ms is not None:
        pct = bud.latency_percentile
        lat = budget_latency(c, prof)
        if lat is None:
            c.checks.append(Check(name=f"latency_{pct}_ms", value=None, limit=bud.max_latency_ms, passed=False,
                                  detail=f"not measured: no latency on {deployed}"))
        else:
            v = getattr(lat, f"{pct}_ms")
            note = f"; timed round-robin with {', '.join(lat.interleaved_with)}" if lat.interleaved_with else ""
            # The row the verdict rests on is measured again while it is near the limit (the margin
            # widens to its cv when it is noisy); a re-measured row may lose its place to another
            # thread count, which is then re-measured too (each row at most once).
            while near_limit(v, bud.max_latency_ms, max(prof.timing.remeasure_margin, lat.cv if lat.noisy else 0.0)) \
                    and not lat.remeasured:
                first = v
                again = _remeasure(ctx, c, b, lat)
                if again is lat:
                    break
                lat = budget_latency(c, prof) or again
                v = getattr(lat, f"{pct}_ms")
                note = f"; re-measured (first {first:.4f} ms was near the limit)"
            c.checks.append(Check(
                name=f"latency_{pct}_ms", value=round(v, 4), limit=bud.max_latency_ms, passed=v <= bud.max_latency_ms,
                detail=f"{lat.runtime}, batch {lat.batch}, {lat.threads} thread(s), {lat.samples} samples, "
                       f"cv {lat.cv:.2f}{' (noisy)' if lat.noisy else ''}{note}; {lat.measured_on}"))
    if bud.max_memory_mb is not None:
        mem = c.memory.get(deployed)
        if mem is None:
            c.checks.append(Check(name="memory_mb", value=None, limit=bud.max_memory_mb, passed=False,
                                  detail=f"not measured: {deployed} did not run"))
        else:
            v = mem["load_and_infer_mb"]
            c.checks.append(Check(name="memory_mb", value=round(v, 2), limit=bud.max_memory_mb,
                                  passed=v <= bud.max_memory_mb,
                                  detail=f"{deployed}: peak RSS growth of load + one batch-1 inference, over the "
                                         "process after the runtime's import"))
    if bud.max_arena_bytes is not None:
        arena = (c.memory.get("tflm") or {}).get("arena_bytes")
        if arena is None:
            why = ("the tflm runtime is not among this profile's runtimes" if "tflm" not in
                   [*prof.runtimes, *prof.crosscheck_runtimes] else "tflm did not run this candidate")
            c.checks.append(Check(name="arena_bytes", value=None, limit=bud.max_arena_bytes, passed=False,
                                  detail=f"not measured: {why}"))
        else:
            c.checks.append(Check(name="arena_bytes", value=int(arena), limit=bud.max_arena_bytes,
                                  passed=arena <= bud.max_arena_bytes,
                                  detail="TFLite Micro tensor arena (RAM), from its recording allocator"))
    rb = prof.robustness
    limit = {k: v for k, v in (("min_top1", rb.min_top1), ("min_cosine_mean", rb.min_cosine_mean)) if v is not None}
    for r in c.robustness:
        if r.passed is None:  # no minimum set, or Keras itself is non-finite on the probe
            continue
        c.checks.append(Check(name=f"robustness {r.probe} {r.runtime} [{r.output}]",
                              value={"top1_agreement": r.top1_agreement, "cosine_mean": r.cosine_mean},
                              limit=limit, passed=bool(r.passed), detail=r.detail))


def _fidelity_error(c: Candidate) -> float:
    """Worst mean normalized error against Keras over outputs and runtimes (inf when not measured)."""
    errs = [f.mean_norm_err for f in c.fidelity if f.reference == "keras"]
    if not errs or any(e is None for e in errs):
        return float("inf")
    return max(errs)


def _select(ctx: Context, candidates: list[Candidate]) -> None:
    """Sets ctx.selection: the passing candidate that is best by the profile's objective.

    Figures within the profile's tie tolerance of the best are equal (a 1% size difference or
    a few microseconds of host latency say nothing about the target); among equals the other
    figure decides, then the profile's precision preference. The selection also carries a
    Pareto table (latency, size, fidelity error) marking the passing candidates no other passing
    candidate beats on all three.
    """
    prof = ctx.profile
    pct = prof.budgets.latency_percentile

    def size(c):
        a = primary_artifact(c, prof)
        return (a.gzip_bytes if prof.objective == "gzip_size" else a.size_bytes) if a else float("inf")

    def latency(c):
        lat = budget_latency(c, prof)
        return getattr(lat, f"{pct}_ms") if lat else float("inf")

    def near(value, best, is_latency):
        slack = best * prof.tie_tolerance
        if is_latency:
            slack = max(slack, prof.latency_tie_ms)
        return value <= best + slack

    size_label = "gzip size" if prof.objective == "gzip_size" else "size"
    first, second = ((latency, True, "latency"), (size, False, size_label)) if prof.objective == "latency" \
        else ((size, False, size_label), (latency, True, "latency"))
    passing = [c for c in candidates if c.passed]
    pool1 = [c for c in passing if near(first[0](c), min(first[0](p) for p in passing), first[1])] if passing else []
    pool2 = [c for c in pool1 if near(second[0](c), min(second[0](p) for p in pool1), second[1])]

    def rank(c):
        p = c.recipe.get("precision")
        # Among equals, a candidate with the original weights beats a pruned/clustered one (which
        # computes a slightly different function) unless it is also ahead outside the tie tolerance.
        return (prof.prefer.index(p) if p in prof.prefer else len(prof.prefer), c.optimization is not None,
                first[0](c), second[0](c))

    best = min(pool2, key=rank) if pool2 else None
    beaten_by = dominators({c.name: (latency(c), size(c), _fidelity_error(c)) for c in passing})
    front = {name for name, by in beaten_by.items() if not by}
    reasons = {}
    for c in candidates:
        fig = _describe(c, size, latency, pct, size_label)
        if c is best:
            why = f"best {first[2]}" if len(pool1) == 1 else (
                f"{first[2]} equal to {len(pool1) - 1} other(s) within tolerance, best {second[2]}" if len(pool2) == 1
                else f"{first[2]} and {second[2]} equal to {len(pool2) - 1} other(s) within tolerance; "
                     f"profile prefers {c.recipe.get('precision')}")
            pareto = "Pareto-optimal" if c.name in front else (
                f"not Pareto-optimal: {', '.join(beaten_by[c.name])} is no worse in latency, size and fidelity; "
                "its size and latency lead is within the tie tolerance, where the profile's precision preference decides")
            reasons[c.name] = f"selected: passes every check; {why}; {pareto} ({fig})"
        elif c.passed:
            lost = (f"{first[2]} not within tolerance of the best" if c not in pool1 else
                    f"{second[2]} not within tolerance of the best" if c not in pool2 else
                    f"equal figures; the original weights are preferred over pruned/clustered ones"
                    if c.optimization is not None and best.optimization is None
                    and c.recipe.get("precision") == best.recipe.get("precision") else
                    f"equal figures; profile prefers {best.recipe.get('precision')}")
            reasons[c.name] = f"passes every check, not selected: {lost} ({fig} vs {_describe(best, size, latency, pct, size_label)})"
        else:
            failed = [k.name for k in c.checks if not k.passed] + c.errors
            reasons[c.name] = "failed: " + ("; ".join(failed) if failed else "nothing could be checked")
    table = []
    for c in candidates:
        lat, sz, err = latency(c), size(c), _fidelity_error(c)
        table.append({"candidate": c.name, "passed": c.passed,
                      f"latency_{pct}_ms": round(lat, 6) if np.isfinite(lat) else None,
                      "size_bytes" if prof.objective != "gzip_size" else "gzip_bytes": sz if np.isfinite(sz) else None,
                      "fidelity_mean_norm_err": err if np.isfinite(err) else None,
                      "pareto_optimal": (c.name in front) if c.passed else None})
    ctx.selection = {"objective": prof.objective, "tie_tolerance": prof.tie_tolerance,
                     "latency_tie_ms": prof.latency_tie_ms, "prefer": list(prof.prefer),
                     "selected": best.name if best else None, "reasons": reasons,
                     "pareto": {"axes": [f"latency_{pct}_ms ({prof.runtimes[0]}, lower is better)",
                                         f"{size_label} in bytes (lower is better)",
                                         "fidelity: worst mean normalized error vs Keras (lower is better)"],
                                "among": "passing candidates (failing ones are not deployable: pareto_optimal null)",
                                "rows": table}}


def _describe(c: Candidate, size, latency, pct: str, size_label: str) -> str:
    lat = latency(c)
    text = f"{size_label} {size(c):,} bytes"
    return text + (f", {pct} {lat:.3f} ms" if np.isfinite(lat) else "")


def external_artifact(path: Path, model: LoadedModel, precision: str | None) -> Artifact:
    """Describes a `.tflite` / `.onnx` built elsewhere: how to feed it and what precision it is."""
    names = [t.name for t in model.inputs]
    out_names = [t.name for t in model.outputs]
    if path.suffix.lower() == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        try:
            it = Interpreter(model_path=str(path))
            sigs = it.get_signature_list()
        except Exception as e:
            raise UsageError(f"artifact {path.name} is not a readable .tflite model: {' '.join(str(e).split())[:200]}") from None
        if "serving_default" not in sigs:
            raise UsageError(f"artifact {path.name} has no 'serving_default' signature (has: {list(sigs)}); "
                             "convert it from a SavedModel or Keras model so it carries one")
        ins, outs = sigs["serving_default"]["inputs"], sigs["serving_default"]["outputs"]
        io = {"inputs": _map_names(names, ins, path), "outputs": _map_outputs(out_names, outs, path)}
        fmt, detected = "tflite", _tflite_precision(it)
    else:
        import onnx

        try:
            proto = onnx.load(str(path))
        except Exception as e:
            raise UsageError(f"artifact {path.name} is not a readable .onnx model: {' '.join(str(e).split())[:200]}") from None
        init = {i.name for i in proto.graph.initializer}
        ins = [i.name for i in proto.graph.input if i.name not in init]
        outs = [o.name for o in proto.graph.output]
        io = {"inputs": _map_names(names, ins, path), "outputs": _map_outputs(out_names, outs, path)}
        ops = {n.op_type for n in proto.graph.node}
        fmt = "onnx"
        detected = ("int8" if ops & {"QLinearConv", "QLinearMatMul"} else
                    "dynamic" if ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DequantizeLinear"} else
                    "fp16" if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer) else "fp32")
    return Artifact(format=fmt, path=path, precision=precision or detected, source="external", io=io).measure()


def _map_names(model_names: list[str], artifact_names: list[str], path: Path) -> dict[str, str]:
    if len(model_names) != len(artifact_names):
        raise UsageError(f"artifact {path.name} has {len(artifact_names)} input(s) {artifact_names}; "
                         f"the model has {len(model_names)} {model_names}")
    by_base = {a.split(":")[0]: a for a in artifact_names}
    if set(model_names) <= set(by_base):
        return {n: by_base[n] for n in model_names}
    if len(model_names) == 1:
        return {model_names[0]: artifact_names[0]}
    raise UsageError(f"cannot match artifact {path.name} inputs {artifact_names} to model inputs {model_names}")


def _map_outputs(model_names: list[str], artifact_names: list[str], path: Path) -> list[str]:
    from kdeploy.loading import _natural_key

    if len(model_names) != len(artifact_names):
        raise UsageError(f"artifact {path.name} has {len(artifact_names)} output(s) {artifact_names}; "
                         f"the model has {len(model_names)} {model_names}")
    if set(model_names) <= set(artifact_names):
        return list(model_names)
    return sorted(artifact_names, key=_natural_key) if all(a.startswith("output_") for a in artifact_names) else artifact_names


def _tflite_precision_of(path: Path) -> str:
    from ai_edge_litert.interpreter import Interpreter

    return _tflite_precision(Interpreter(model_path=str(path)))


def _tflite_precision(it) -> str:
    """Precision of a .tflite from its tensors: full-integer graphs may keep float inputs/outputs
    (with QUANTIZE/DEQUANTIZE at the edges), dynamic-range graphs keep float activations inside."""
    details = it.get_tensor_details()
    types = {np.dtype(d["dtype"]).name for d in details}
    edge = {d["index"] for d in it.get_input_details()} | {d["index"] for d in it.get_output_details()}
    float_inside = any(np.dtype(d["dtype"]) == np.float32 and d["index"] not in edge and len(d["shape"]) > 1
                       for d in details)
    if "int16" in types and "int8" in types:
        return "int16x8"
    if "int8" in types:
        return "dynamic" if float_inside else "int8"
    if "float16" in types:
        return "fp16"
    return "fp32"


def _host() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(), "python": platform.python_version(), "libraries": versions}


def _make_report(ctx: Context, candidates: list[Candidate], reference_artifacts: list[dict],
                 command: list[str] | None, started: float) -> Report:
    m = ctx.model
    selected = ctx.selection["selected"]
    return Report(
        tool={"name": "kdeploy", "version": __version__},
        ready=selected is not None,
        selected=selected,
        selection=ctx.selection,
        model=ModelInfo(
            path=str(m.path), sha256=m.sha256, format=m.format, keras_version=m.keras_version, params=m.params,
            inputs=[TensorSpecOut(**t.to_dict()) for t in m.inputs],
            outputs=[TensorSpecOut(**t.to_dict()) for t in m.outputs], output_kinds=m.output_kinds,
            trusted_package_classes=m.trusted_classes,  # HOOK(issue 11)
        ),
        target=ctx.profile.model_dump(mode="json"),
        host=ctx.host,
        data={"source": ctx.data.source, "synthetic": ctx.data.synthetic, "samples": len(ctx.data),
              "calibration_samples": len(ctx.calibration), "validation_samples": len(ctx.validation),
              "split": "disjoint random split (seeded)"},
        reference_artifacts=reference_artifacts,
        candidates=candidates,
        findings=ctx.findings,
        command=command or [],
        seed=ctx.seed,
        duration_s=round(time.perf_counter() - started, 3),
        reproducibility=_reproducibility(ctx, command, reference_artifacts),
    )


# TensorFlow orders a traced function's captured variables by object identity, so Keras'
# SavedModel export lists the same variables in a different order each run (seen here on the
# digits CNN); the TFLite and ONNX files converted from it are byte-identical all the same.
SAVEDMODEL_NOT_REPRODUCIBLE = ("same values, not the same bytes: TensorFlow orders the variables of Keras' SavedModel "
                               "export differently from run to run; artifacts converted from it are byte-identical")


def _reproducibility(ctx: Context, command: list[str] | None, reference_artifacts: list[dict]) -> dict[str, Any]:
    """What a re-run needs (command, cwd, seed, input hashes) and what it gives back byte for byte."""
    import hashlib
    import shlex

    data_sha = None if ctx.data.synthetic else file_sha256(Path(ctx.data.source))
    profile_json = ctx.profile.model_dump_json().encode()
    return {
        "rerun": shlex.join(command) if command else None,
        "cwd": os.getcwd(),
        "seed": ctx.seed,
        "model_sha256": ctx.model.sha256,
        "data_sha256": data_sha,
        "data": "synthetic, generated from the seed" if ctx.data.synthetic else ctx.data.source,
        "profile_sha256": hashlib.sha256(profile_json).hexdigest(),
        "byte_identical": "candidate artifacts (.tflite, .onnx) for the same model, data, profile, seed and library "
                          "versions (host.libraries)",
        "not_byte_identical": [{"path": a["path"], "why": a["note"]} for a in reference_artifacts
                               if a.get("byte_reproducible") is False],
        "varies_by_run": ["duration_s", "candidates[].latency", "candidates[].cold", "candidates[].memory",
                          "selection when candidates tie within the latency tolerance"],
    }
