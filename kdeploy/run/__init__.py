"""Orchestration: prepare → build → evaluate → select → assemble, one module per stage.

Library code: no printing. Progress goes through the `progress(stage, detail)` callback.
`optimize` builds candidates from a model; `check` gates artifacts built elsewhere. Both end in
`finish` (evaluate, select, report), so an artifact is judged the same way whichever command
produced it. Data flows one way: nothing below `kdeploy.run` imports it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from kdeploy.errors import UsageError
from kdeploy.report.model import Report
from kdeploy.run.assemble import make_report
from kdeploy.run.context import Build, Built, Context, Progress, RunOptions
from kdeploy.run.diagnose import diagnose
from kdeploy.run.evaluate import evaluate
from kdeploy.run.prepare import prepare
from kdeploy.run.select import select


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
    from kdeploy.run.build import build_candidates

    opts = RunOptions(model, target, profile, data, out, formats, seed, trust_custom_code, custom_objects, input_shapes,
                      progress, command, trusted_packages)
    return _run(opts, build_candidates)


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
) -> Report:
    """Gates artifacts built elsewhere (`.tflite`, `.onnx`) against the reference model; no optimization.

    Each artifact becomes one candidate named after its file; `precision` (else detected from the
    artifact) picks the tolerance.
    """
    paths = [Path(a) for a in artifacts]
    for p in paths:
        if not p.is_file() or p.suffix.lower() not in (".tflite", ".onnx"):
            raise UsageError(f"artifact {p}: not found or not a .tflite/.onnx file (allowed: .tflite, .onnx)")
    opts = RunOptions(model, target, profile, data, out, formats, seed, trust_custom_code, custom_objects, input_shapes,
                      progress, command, trusted_packages)
    return _run(opts, lambda c: Built(_external_builds(c, paths, precision), []))


def _external_builds(ctx: Context, paths: list[Path], precision: str | None) -> list[Build]:
    """One candidate per artifact file, copied into the staging folder."""
    from kdeploy.artifacts.external import external_artifact

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


def _run(opts: RunOptions, build: Callable[[Context], Built]) -> Report:
    """Prepares, builds, evaluates, selects and reports; on any failure or interruption the staging folder goes too."""
    started = time.perf_counter()
    ctx, out_path = prepare(opts)
    try:
        built = build(ctx)
        candidates = evaluate(ctx, built.builds)
        diagnose(ctx, candidates, built.builds)
        selection = select(candidates, ctx.profile)
        report = make_report(ctx, candidates, selection, built, opts.command, started)
        report._staging = ctx.staging
        if out_path is not None:
            ctx.progress("report", str(out_path))
            report.save(out_path, tuple(opts.formats))
        return report
    except BaseException:
        shutil.rmtree(ctx.staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
