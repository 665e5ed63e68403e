"""`kdeploy` command line. Thin commands: parse options, call library code, render.

This is the one place that maps errors to exit codes:
0 ready · 1 ran fine but not ready · 2 bad input or usage · 3 internal or converter failure.
No ML framework is imported at module level, so `--help`, `--version` and `targets` stay fast.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kdeploy import __version__
from kdeploy.console import BatchProgress, err, out, progress_err, render_inspection, render_report
from kdeploy.errors import KdeployError, UsageError
from kdeploy.util import defer, exit_now, in_native_section

EXIT_READY, EXIT_NOT_READY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

app = typer.Typer(
    name="kdeploy",
    help="Is this Keras model ready to deploy on that hardware, and what is the best artifact for it?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
targets_app = typer.Typer(help="List the built-in target profiles, or show one.", invoke_without_command=True)
app.add_typer(targets_app, name="targets")

_state = {"debug": False}
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any TensorFlow import: no C++ log chatter

TargetOpt = Annotated[Optional[str], typer.Option("--target", "-t", help="Built-in target profile name (see `kdeploy targets`).")]
ProfileOpt = Annotated[Optional[Path], typer.Option("--profile", help="A target profile file of your own (TOML).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Inputs: .npz (arrays named after model inputs, or x; labels y), .npy or .csv.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and artifacts (written atomically).")]
FormatOpt = Annotated[str, typer.Option("--format", help="Report formats, comma-separated: json,md,html,junit (json is always written).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the data split and synthetic inputs.")]
TrustOpt = Annotated[bool, typer.Option("--trust-custom-code", help="Allow code from the model file (Lambda layers). Only for files you trust.")]
CustomOpt = Annotated[Optional[Path], typer.Option("--custom-objects", help="A .py file whose classes/functions the model needs (trusted code).")]
TrustPackageOpt = Annotated[Optional[list[str]], typer.Option("--trust-package", help="An installed package (import name) whose registered Keras classes load without --custom-objects (repeatable; keras_hub always is).")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--input-shape", help="NAME=D1,D2,... non-batch shape for an input with dynamic dimensions (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report JSON to stdout instead of the table.")]
MlflowUriOpt = Annotated[Optional[str], typer.Option("--mlflow-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking and registry URI (e.g. sqlite:///mlflow.db) for a models:/ or runs:/ MODEL.")]
MlflowExpOpt = Annotated[Optional[str], typer.Option("--mlflow-experiment", help="MLflow experiment for the gate run (default: the model's source run's).")]


def _version(value: bool) -> None:
    if value:
        out.print(f"kdeploy {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["KDEPLOY_DEBUG"] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so it unwinds (and cleans up) exactly like Ctrl-C."""


_signalled: list[int] = []  # signals received during the current command


def _interrupt(signum: int) -> KeyboardInterrupt:
    return _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum: int, frame) -> None:
    # The first signal starts the unwinding; later ones are ignored so the cleanup of staging
    # folders cannot itself be interrupted halfway (SIGKILL still ends the process at once).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _signalled.append(signum)
    if in_native_section():  # TensorFlow is mid-trace or mid-conversion: raised when that work ends
        defer(_interrupt(signum))
        return
    raise _interrupt(signum)


def _checkpoint() -> None:
    """Raises again for a signal whose exception a library swallowed.

    tf2onnx wraps op conversion and constant folding in bare `except:` clauses, so a Ctrl-C or
    SIGTERM that lands there is logged and dropped; the next stage boundary re-raises it.
    """
    if _signalled:
        raise _interrupt(_signalled[0])


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGINT raise inside the command body (main thread only); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    # A signal the parent chose to ignore (e.g. SIGINT for `kdeploy ... &` in a script) stays ignored.
    return {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) is not signal.SIG_IGN}


def _guard(fn: Callable[[], int]) -> None:
    """Runs a command body; maps domain errors to exit codes with a one-line message.

    Ctrl-C (SIGINT) and SIGTERM take the same path: the exception unwinds through the pipeline,
    which removes its staging folder, so `--out` is left as it was (exit 130, or 143 for SIGTERM).
    """
    _signalled.clear()
    previous = _install_signal_handlers()
    hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(hook)
    try:
        code = _run_guarded(fn)
        if _signalled and code in (EXIT_READY, EXIT_NOT_READY):  # swallowed, and no checkpoint came after it
            err.print("[bold red]interrupted:[/] the signal came too late to stop the run; --out is complete")
            code = 143 if _signalled[0] == signal.SIGTERM else 130
    finally:
        if _signalled:
            _after_signal.append(_signalled[0])
            gc.collect()  # what the signal left half-built is finalized now, under the quiet hook
        else:
            sys.unraisablehook = hook
        for s, h in previous.items():
            signal.signal(s, h)
        _signalled.clear()
    raise typer.Exit(code)


_after_signal: list[int] = []  # set once a signal ended a command: the process is on its way out


def _unraisable(previous):
    """An unraisable-exception hook that stays silent about what our own signal broke.

    A signal can land while a finalizer runs (TensorFlow's `AtomicFunction.__del__`); Python then
    prints the KeyboardInterrupt with a traceback and carries on. The next checkpoint raises it
    again (`_checkpoint`), so printing it would only put a traceback on the user's console.
    A signal can also land inside a constructor (tf2onnx builds TensorFlow's `ApiDefMap` while it
    is imported): the half-built object's finalizer then fails when it is freed, at once or at
    exit. Once a signal ended the command, the hook stays installed and drops those too (shown
    with --debug): the one-line "interrupted" message is the whole story.
    """
    def hook(u) -> None:
        if _signalled and isinstance(u.exc_value, KeyboardInterrupt):
            return
        if (_signalled or _after_signal) and not _state["debug"]:
            return
        previous(u)

    return hook


def _run_guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except KdeployError as e:
        if _state["debug"]:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        err.print(f"[bold red]{what}:[/] nothing was written to --out")
        return 143 if isinstance(e, _Terminated) else 130
    except Exception as e:  # a bug or an environment failure: one line, traceback with --debug
        if _state["debug"]:
            err.print_exception()
        msg = " ".join(str(e).split())[:400]
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(msg)} (run with --debug for the traceback)", soft_wrap=True)
        return EXIT_INTERNAL


def _progress(quiet: bool):
    """Stage lines with elapsed time on stderr; none with --quiet or in CI (CI=true, stderr not a terminal).

    Every stage boundary is also a signal checkpoint (see `_checkpoint`), quiet or not.
    """
    silent = quiet or os.environ.get("CI") == "true" and not sys.stderr.isatty()
    import time

    started = time.perf_counter()

    def show(stage: str, detail: str = "") -> None:
        _checkpoint()
        if not silent:
            progress_err.print(f"[dim]{time.perf_counter() - started:6.1f}s {stage:>9}[/] {escape(detail)}", soft_wrap=True)

    return show


def _shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for v in values or []:
        name, _, dims = v.partition("=")
        try:
            parsed = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            parsed = ()
        if not name or not parsed or any(d < 1 for d in parsed):
            raise UsageError(f"--input-shape {v!r} is not NAME=D1,D2,... with positive integers (e.g. rows=8,8)")
        shapes[name] = parsed
    return shapes


def _formats(value: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in value.split(",") if f.strip())


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="Keras 3 .keras, legacy .h5, SavedModel directory, or an MLflow URI models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH.")],
    target: TargetOpt = None,
    profile: ProfileOpt = None,
    data: DataOpt = None,
    out_dir: OutOpt = Path("kdeploy-out"),
    format: FormatOpt = "json,md",
    seed: SeedOpt = 0,
    trust_custom_code: TrustOpt = False,
    custom_objects: CustomOpt = None,
    trust_package: TrustPackageOpt = None,
    input_shape: ShapeOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    mlflow_uri: MlflowUriOpt = None,
    mlflow_experiment: MlflowExpOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither reuse nor store results in the result cache ($KDEPLOY_CACHE_DIR, else the user cache folder).")] = False,
    retime: Annotated[bool, typer.Option("--retime", help="On a cache hit, measure latency again (artifacts and fidelity come from the cache).")] = False,
    parallel: Annotated[Optional[bool], typer.Option("--parallel/--no-parallel", help="Convert the dynamic-range and float16 .tflite files and the ONNX twins in a second process beside the others. Default: on a multi-core host for models with 4-16 MB of fp32 weights.", show_default=False)] = None,
    max_memory: Annotated[Optional[float], typer.Option("--max-memory", min=1, help="Stop (exit 3) when kdeploy and its child processes together hold more than this many MB resident.")] = None,
) -> None:
    """Build every candidate the target allows, check and measure them, select the best, gate.

    With an MLflow URI as MODEL, the verdict is logged to an MLflow run and set as tags (and, when
    ready, the alias deploy-ready-<target>) on the model version.
    Exit codes: 0 ready, 1 not ready, 2 bad input or usage, 3 internal or converter failure.
    """

    def body() -> int:
        from kdeploy.api import optimize as run
        from kdeploy.registry import is_registry_uri

        registry = is_registry_uri(model)
        if retime and no_cache:
            raise UsageError("--retime re-times a cached result; it cannot be combined with --no-cache")
        if not registry and mlflow_experiment is not None:
            raise UsageError(f"--mlflow-experiment needs an MLflow URI as MODEL (models:/NAME/VERSION or runs:/...); "
                             f"received {model!r}")
        report = run(
            model, target=target, profile=profile, data=data, out=out_dir, formats=_formats(format), seed=seed,
            trust_custom_code=trust_custom_code, custom_objects=custom_objects, input_shapes=_shapes(input_shape),
            trusted_packages=trust_package or (), progress=_progress(quiet), command=_command(),
            cache=not no_cache, retime=retime, max_memory_mb=max_memory, parallel=parallel,
            **({"mlflow_uri": mlflow_uri, "mlflow_experiment": mlflow_experiment} if registry else {}))
        if json_out:
            sys.stdout.write(report.to_json() + "\n")
            from kdeploy.report.render import append_step_summary

            append_step_summary(report)
        else:
            render_report(report, out_dir)
        rec = getattr(report, "_mlflow", None)
        if rec is not None:
            alias = (f"alias {rec.alias} set" if rec.alias_set else f"alias {rec.alias} removed" if rec.alias_removed
                     else "no alias change" if rec.alias else "no model version to tag")
            err.print(f"mlflow: run {rec.run_id} logged; {alias}", soft_wrap=True)
        return EXIT_READY if report.ready else EXIT_NOT_READY

    _guard(body)


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="The reference model (.keras, .h5 or SavedModel directory).")],
    artifacts: Annotated[list[Path], typer.Argument(help="Artifacts built elsewhere: .tflite and/or .onnx files.")],
    target: TargetOpt = None,
    profile: ProfileOpt = None,
    data: DataOpt = None,
    out_dir: OutOpt = Path("kdeploy-check"),
    format: FormatOpt = "json,md",
    seed: SeedOpt = 0,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Precision of the artifacts (fp32, dynamic, fp16, int8, int16x8); detected when omitted.")] = None,
    trust_custom_code: TrustOpt = False,
    custom_objects: CustomOpt = None,
    trust_package: TrustPackageOpt = None,
    input_shape: ShapeOpt = None,
    output_map: Annotated[Optional[str], typer.Option("--output-map", help="Pair model outputs with artifact outputs: NAME=ARTIFACT_TENSOR,... (e.g. onset=StatefulPartitionedCall:1). Needed only where names, shapes and values do not settle it.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Gate artifacts that were built elsewhere against the reference model and a target."""

    def body() -> int:
        from kdeploy.api import check as run
        from kdeploy.profiles import PRECISIONS

        if precision is not None and precision not in PRECISIONS:
            raise UsageError(f"--precision {precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
        report = run(model, artifacts, target=target, profile=profile, data=data, out=out_dir,
                     formats=_formats(format), seed=seed, precision=precision, trust_custom_code=trust_custom_code,
                     custom_objects=custom_objects, input_shapes=_shapes(input_shape),
                     trusted_packages=trust_package or (), progress=_progress(quiet),
                     command=_command(), output_map=output_map)
        render_report(report, out_dir)
        return EXIT_READY if report.ready else EXIT_NOT_READY

    _guard(body)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Keras 3 .keras or legacy .h5 model.")],
    target: TargetOpt = None,
    profile: ProfileOpt = None,
    data: DataOpt = None,
    seed: SeedOpt = 0,
    trust_custom_code: TrustOpt = False,
    custom_objects: CustomOpt = None,
    input_shape: ShapeOpt = None,
    quiet: QuietOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the inspection JSON to stdout instead of the tables.")] = False,
) -> None:
    """Readiness before any full conversion: summary, op compatibility per Keras layer, hazards.

    Default target: cpu-edge. Exit codes: 0 nothing blocks the target, 1 a hazard blocks it, 2 bad input.
    """

    def body() -> int:
        import kdeploy

        res = kdeploy.inspect(model, target=target, profile=profile, data=data, seed=seed,
                              trust_custom_code=trust_custom_code, custom_objects=custom_objects,
                              input_shapes=_shapes(input_shape), progress=_progress(quiet))
        if json_out:
            sys.stdout.write(res.model_dump_json(indent=2) + "\n")
        else:
            render_inspection(res, model)
        return EXIT_READY if res.ready else EXIT_NOT_READY

    _guard(body)


@app.command()
def batch(
    manifest: Annotated[Path, typer.Argument(help="Batch manifest (TOML): [[jobs]] tables of model(s) × targets/profiles.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Batch folder: summary.json/.md/.junit.xml, one report folder per job, logs/ (written atomically).")] = Path("kdeploy-batch"),
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="CPUs of the local Ray instance (default: all cores).")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (ray://HOST:10001, HOST:6379 or auto) instead of a local instance.")] = None,
    format: FormatOpt = "json,md",
    mlflow_uri: MlflowUriOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds after which a job is stopped (exit 3 in its row).")] = 3600.0,
    quiet: QuietOpt = False,
) -> None:
    """Run many `kdeploy optimize` jobs from a manifest on Ray (local, or a cluster with --address).

    Every job is exactly `kdeploy optimize`, in its own process; one that fails, hangs or hits bad
    input fails alone. Exit code: the worst job's (2 or 3 over 1 over 0). Needs the batch extra.
    """

    def body() -> int:
        from kdeploy.batch.runner import run_batch

        with BatchProgress(quiet, _checkpoint) as progress:
            summary = run_batch(manifest, out_dir, workers=workers, address=address, formats=_formats(format),
                                mlflow_uri=mlflow_uri, timeout_s=timeout, on_event=progress.event)
        out.print(progress.table(f"kdeploy batch · {manifest} · {summary.duration_s:.1f} s"))
        c = summary.counts
        out.print(f"{c['ready']} ready, {c['not_ready']} not ready, {c['bad_input']} bad input, {c['internal']} "
                  f"internal · exit {summary.exit_code} · summary: {out_dir / 'summary.json'}")
        return summary.exit_code

    _guard(body)


@targets_app.callback()
def targets(ctx: typer.Context) -> None:
    """List the built-in target profiles."""
    if ctx.invoked_subcommand is not None:
        return

    def body() -> int:
        from kdeploy.profiles import builtin_names, resolve_profile

        table = Table("target", "runtimes", "precisions", "objective", "description", box=None)
        for name in builtin_names():
            p = resolve_profile(name)
            table.add_row(name, ", ".join(p.runtimes), ", ".join(p.precisions), p.objective, p.description)
        out.print(table)
        return 0

    _guard(body)


@targets_app.command("show")
def targets_show(name: Annotated[str, typer.Argument(help="Target name.")]) -> None:
    """Print one target profile (resolved, with defaults) as JSON."""

    def body() -> int:
        from kdeploy.profiles import resolve_profile

        out.print_json(resolve_profile(name).model_dump_json())
        return 0

    _guard(body)


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(help="Baseline report.json (or its output folder).")],
    new: Annotated[Path, typer.Argument(help="The report.json to gate (or its output folder).")],
    max_size_increase: Annotated[float, typer.Option("--max-size-increase", help="Allowed relative size (and gzip size) increase.")] = 0.05,
    max_latency_increase: Annotated[float, typer.Option("--max-latency-increase", help="Allowed relative latency increase at the profile percentile.")] = 0.10,
    min_latency_delta_ms: Annotated[Optional[float], typer.Option("--min-latency-delta-ms", help="Latency increases below this are timer noise (default: the profile's latency_tie_ms).")] = None,
    max_top1_drop: Annotated[float, typer.Option("--max-top1-drop", help="Allowed absolute drop of top-1 agreement with Keras.")] = 0.01,
    max_cosine_drop: Annotated[float, typer.Option("--max-cosine-drop", help="Allowed absolute drop of cosine similarity with Keras.")] = 0.005,
    max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="Allowed absolute drop of a task accuracy (reports made with labels).")] = 0.01,
    max_error_increase: Annotated[float, typer.Option("--max-error-increase", help="Allowed relative increase of a task MAE/RMSE (reports made with labels).")] = 0.05,
    show_all: Annotated[bool, typer.Option("--all", help="Show every compared figure, not only the selected candidate and regressions.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Regressions between two reports of the same target (release gate).

    Exit codes: 0 no regression, 1 a regression, 2 bad input.
    """

    def body() -> int:
        from pydantic import ValidationError

        from kdeploy.diff import Thresholds, diff_reports

        try:
            th = Thresholds(max_size_increase=max_size_increase, max_latency_increase=max_latency_increase,
                            min_latency_delta_ms=min_latency_delta_ms, max_top1_drop=max_top1_drop,
                            max_cosine_drop=max_cosine_drop, max_accuracy_drop=max_accuracy_drop,
                            max_error_increase=max_error_increase)
        except ValidationError as e:
            er = e.errors()[0]
            raise UsageError(f"--{er['loc'][0].replace('_', '-')} {er.get('input')!r}: {er['msg']}") from None
        res = diff_reports(old, new, th, old_name=str(old), new_name=str(new))
        if json_out:
            import json

            sys.stdout.write(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
            return EXIT_NOT_READY if res.regressions else EXIT_READY
        table = Table(title=f"kdeploy diff · {res.target}: {old} → {new}", title_justify="left")
        for col in ("scope", "metric", "old", "new", "change", "limit", "verdict"):
            table.add_column(col, justify="right" if col in ("old", "new", "change") else "left")
        shown = [r for r in res.rows if show_all or r.regression or r.scope in ("report", "selected")]
        for r in shown:
            verdict = "[red]REGRESSION[/]" if r.regression else "[green]ok[/]"
            table.add_row(escape(r.scope), escape(r.metric), escape(str(r.old)), escape(str(r.new)), escape(r.change),
                          escape(r.limit), verdict + (f" {escape(r.note)}" if r.note else ""))
        out.print(table)
        if len(shown) < len(res.rows):
            out.print(f"[dim]{len(res.rows) - len(shown)} other compared figures within limits (--all shows them)[/]")
        for note in res.notes:
            out.print(f"[yellow]note[/] {escape(note)}", soft_wrap=True)
        n = len(res.regressions)
        out.print(f"[bold red]{n} REGRESSION(S)[/]" if n else "[bold green]NO REGRESSION[/]")
        return EXIT_NOT_READY if n else EXIT_READY

    _guard(body)


@app.command()
def schema(
    name: Annotated[str, typer.Argument(help="report or profile.")],
) -> None:
    """Print the JSON Schema of report.json (`report`) or of a target profile (`profile`)."""

    def body() -> int:
        import json

        from kdeploy.report.schema import schema as get

        sys.stdout.write(json.dumps(get(name), indent=2) + "\n")
        return 0

    _guard(body)


def _command() -> list[str]:
    return ["kdeploy", *sys.argv[1:]]


def main() -> None:
    """The `kdeploy` entry point. Where TensorFlow was imported, the process ends without the
    interpreter's teardown once the command has written everything (`util.exit_now`: 1.2-1.5 s saved).
    numpy (not imported yet) is set up as the child processes are (`child.PROCESS_ENV`)."""
    from kdeploy.child import PROCESS_ENV

    for k, v in PROCESS_ENV.items():
        os.environ.setdefault(k, v)
    try:
        app()
    except SystemExit as e:
        if "tensorflow" not in sys.modules or not isinstance(e.code, (int, type(None))):
            raise
        exit_now(e.code or 0)


if __name__ == "__main__":
    main()
