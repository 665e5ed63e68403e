"""Orchestration: prepare → build → evaluate → diagnose → select → assemble, one module per stage.

Library code: no printing. Progress goes through the `progress(stage, detail)` callback.
`optimize` builds candidates from a model; `check` gates artifacts built elsewhere. Both end in
`finish` (evaluate, select, report), so an artifact is judged the same way whichever command
produced it. Data flows one way: nothing below `kdeploy.run` imports it.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from kdeploy.errors import UsageError
from kdeploy.profiles import TargetProfile
from kdeploy.report.model import Report, discard_staging
from kdeploy.run.assemble import make_report
from kdeploy.memory import MemoryGuard
from kdeploy.run.context import Build, Built, Context, Progress, RunOptions, no_progress
from kdeploy.run.diagnose import diagnose
from kdeploy.run.evaluate import evaluate, retime
from kdeploy.run.host import describe_host
from kdeploy.run.prepare import check_inputs, prepare
from kdeploy.run.select import select
from kdeploy.util import freeze_heap


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
    trusted_packages: Sequence[str] = (),
    cache: bool = True,
    retime: bool = False,
    max_memory_mb: float | None = None,
    parallel: bool | None = None,
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
        cache: answer from the result cache when an entry for exactly these inputs verifies, and
            store the result (`kdeploy.cache`); False: neither read nor write it.
        retime: on a cache hit, measure latency again (and select again) instead of reusing it.
        max_memory_mb: stop the run (MemoryLimitError, exit 3) when the resident memory of
            kdeploy and its child processes together goes above this many MiB.
        parallel: convert some `.tflite` files and the ONNX twins in a second process beside this
            one (`run.convert.ConversionLane`); None (default): on a multi-core host for models
            with at most `memory.LANE_MAX_WEIGHT_BYTES` of fp32 weights; True: on any multi-core
            host; False: never.

    Returns:
        The Report (saved to `out` when given); `report.cache` says what came from the cache.

    Raises:
        UsageError: bad model, profile, data or options (exit 2).
        MemoryLimitError: `max_memory_mb` exceeded (exit 3).
        KdeployError: internal or converter failure (exit 3).
    """
    opts = RunOptions(model, target=target, profile=profile, data=data, out=out, formats=formats, seed=seed,
                      trust_custom_code=trust_custom_code, custom_objects=custom_objects, input_shapes=input_shapes,
                      progress=progress, command=command, trusted_packages=trusted_packages, cache=cache,
                      retime=retime, max_memory_mb=max_memory_mb, parallel=parallel)
    return _run(opts, None)


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
    trusted_packages: Sequence[str] = (),
    output_map: dict[str, str] | str | None = None,
) -> Report:
    """Gates artifacts built elsewhere (`.tflite`, `.onnx`) against the reference model; no optimization.

    Each artifact becomes one candidate named after its file; `precision` (else detected from the
    artifact) picks the tolerance. A `.tflite` without a SignatureDef is fed through its tensors; a
    fixed-batch artifact sample by sample (or in chunks of its batch). Each model output is paired
    with the artifact output of its shape by `output_map`, by name, by a unique shape, else by
    values (`kdeploy.artifacts.external`); the report states how (`artifacts[].pairing`).

    Args:
        output_map: model output name -> artifact output tensor name (or the CLI's
            `NAME=TENSOR,...` text), for outputs that names and shapes do not pair and values
            cannot settle.

    Raises:
        UsageError: an artifact that does not fit the model (input/output counts or shapes) or that a
            deployed runtime of the target cannot run (an `.onnx` on cpu-edge), an ambiguous output
            pairing (the message names `--output-map`), bad options (exit 2).
    """
    from kdeploy.artifacts.external import parse_output_map
    from kdeploy.run.external import check_formats

    paths = [Path(a) for a in artifacts]
    for p in paths:
        if not p.is_file() or p.suffix.lower() not in (".tflite", ".onnx"):
            raise UsageError(f"artifact {p}: not found or not a .tflite/.onnx file (allowed: .tflite, .onnx)")
    omap = parse_output_map(output_map) if isinstance(output_map, str) or output_map is None else dict(output_map)
    opts = RunOptions(model, target=target, profile=profile, data=data, out=out, formats=formats, seed=seed,
                      trust_custom_code=trust_custom_code, custom_objects=custom_objects, input_shapes=input_shapes,
                      progress=progress, command=command, trusted_packages=trusted_packages)
    return _run(opts, lambda c: Built(_external_builds(c, paths, precision, omap), []),
                validate=lambda prof: check_formats(prof, paths))


def _external_builds(ctx: Context, paths: list[Path], precision: str | None,
                     output_map: dict[str, str] | None = None) -> list[Build]:
    """One candidate per artifact file, its outputs paired with the model's (`kdeploy.run.external`)."""
    from kdeploy.run.external import external_builds

    return external_builds(ctx, paths, precision, output_map)


def _run(opts: RunOptions, build: Callable[[Context], Built] | None,
         validate: Callable[[TargetProfile], None] | None = None) -> Report:
    """Checks the inputs, then answers from the result cache or prepares, builds, evaluates, selects and reports.

    On any failure or interruption the staging folder goes too. The memory guard watches the
    whole run (`--max-memory`); every progress line is a point where it can stop the run.
    `validate` (of `check`) refuses what the resolved profile cannot take, before any work.
    """
    started = time.perf_counter()
    prof, out_path = check_inputs(opts)
    if validate is not None:
        validate(prof)
    with MemoryGuard(opts.max_memory_mb) as guard:
        user_progress = opts.progress or no_progress

        def progress(stage: str, detail: str = "") -> None:
            guard.check(f"{stage} {detail}".strip())
            user_progress(stage, detail)

        opts = dataclasses.replace(opts, progress=progress)
        report = _cached_or_fresh(opts, prof, build, started)
        guard.check("report")
        if out_path is not None:
            progress("report", str(out_path))
            try:
                report.save(out_path, tuple(opts.formats))
            except BaseException:
                discard_staging(report._staging)
                raise
        return report


def _cached_or_fresh(opts: RunOptions, prof: TargetProfile, build: Callable[[Context], Built] | None,
                     started: float) -> Report:
    """A verified cache hit (unless --retime), else a run: a full one, or the cached artifacts timed again.

    `build` None means `optimize` (the candidates of the profile's recipes: cacheable); `check`
    passes its own build of the given artifacts, which is never cached.
    """
    from kdeploy.cache import Cache
    from kdeploy.report.model import CacheInfo, make_staging
    from kdeploy.run import reuse
    from kdeploy.run.build import build_candidates

    key = entry = None
    info = CacheInfo(status="disabled", detail="--no-cache" if build is None else "`check` results are not cached")
    if opts.cache and build is None:
        key = reuse.key_for(opts, prof, describe_host())
    cache = Cache() if key is not None else None
    if key is not None:
        opts.progress("cache", f"look up {key[:12]} in {cache.root}")
        entry, why = cache.lookup(key)
        info = CacheInfo(status="rebuilt" if entry is None and why != "no entry" else "miss", key=key, detail=why)
        if entry is not None and not opts.retime:
            staging = make_staging(Path(opts.out) if opts.out is not None else None)
            try:
                return reuse.restore_hit(entry, opts, staging, started)
            except BaseException:
                discard_staging(staging)
                raise
    ctx = prepare(opts, prof, Path(opts.out) if opts.out is not None else None, lane=build is None and entry is None)
    frozen = freeze_heap()  # the frameworks and the model (prepare collected last): collections skip them
    try:
        if entry is not None:  # --retime: the cached artifacts and figures, latency measured again
            cached = reuse.cached_report(entry, ctx.staging)
            ctx.findings = list(cached.findings)
            io = reuse.io_maps(entry)
            candidates = retime(ctx, cached.candidates, io)
            built = Built([], cached.reference_artifacts, cached.inspection)
            info = reuse.retimed_info(entry)
        else:
            built = (build or build_candidates)(ctx)
            io = reuse.io_of(built.builds, ctx.staging)
            candidates = evaluate(ctx, built.builds)
            diagnose(ctx, candidates, built.builds)
        selection = select(candidates, ctx.profile)
        report = make_report(ctx, candidates, selection, built, opts.command, started)
        if key is not None:
            info.stored = cache.store(key, ctx.staging, report.to_json(), extra={"io": io}) is not None
        report.cache = info
        report._staging = ctx.staging
        return report
    except BaseException:
        discard_staging(ctx.staging)
        raise
    finally:
        ctx.stop_ahead(kill=True)  # (on a failure or an interruption before evaluation) no run outlives the run
        if ctx.lane is not None:  # started early, never taken by a build
            ctx.lane.close()
        shutil.rmtree(ctx.work, ignore_errors=True)
        if frozen:
            gc.unfreeze()  # what the run held is collectable again once the caller drops it
