"""`kdeploy` command line. Thin commands: parse options, call library code, render.

This is the one place that maps errors to exit codes:
0 ready · 1 ran fine but not ready · 2 bad input or usage · 3 internal or converter failure.
No ML framework is imported at module level, so `--help`, `--version` and `targets` stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdeploy import __version__
from kdeploy.errors import KdeployError, UsageError

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

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
_state = {"debug": False}
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any TensorFlow import: no C++ log chatter

TargetOpt = Annotated[Optional[str], typer.Option("--target", "-t", help="Built-in target profile name (see `kdeploy targets`).")]
ProfileOpt = Annotated[Optional[Path], typer.Option("--profile", help="A target profile file of your own (TOML).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Inputs: .npz (arrays named after model inputs, or x; labels y), .npy or .csv.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and artifacts (written atomically).")]
FormatOpt = Annotated[str, typer.Option("--format", help="Report formats, comma-separated: json,md (json is always written).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the data split and synthetic inputs.")]
TrustOpt = Annotated[bool, typer.Option("--trust-custom-code", help="Allow code from the model file (Lambda layers). Only for files you trust.")]
CustomOpt = Annotated[Optional[Path], typer.Option("--custom-objects", help="A .py file whose classes/functions the model needs (trusted code).")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--input-shape", help="NAME=D1,D2,... non-batch shape for an input with dynamic dimensions (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]


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


def _guard(fn: Callable[[], int]) -> None:
    """Runs a command body; maps domain errors to exit codes with a one-line message."""
    try:
        code = fn()
    except KdeployError as e:
        if _state["debug"]:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] nothing was written to --out")
        raise typer.Exit(130)
    except Exception as e:  # a bug or an environment failure: one line, traceback with --debug
        if _state["debug"]:
            err.print_exception()
        msg = " ".join(str(e).split())[:400]
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(msg)} (run with --debug for the traceback)", soft_wrap=True)
        raise typer.Exit(EXIT_INTERNAL)
    raise typer.Exit(code)


def _progress(quiet: bool):
    if quiet or os.environ.get("CI") == "true" and not sys.stderr.isatty():
        return None

    def show(stage: str, detail: str = "") -> None:
        err.print(f"[dim]{stage:>9}[/] {detail}")

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
    model: Annotated[Path, typer.Argument(help="Keras 3 .keras, legacy .h5, or SavedModel directory.")],
    target: TargetOpt = None,
    profile: ProfileOpt = None,
    data: DataOpt = None,
    out_dir: OutOpt = Path("kdeploy-out"),
    format: FormatOpt = "json,md",
    seed: SeedOpt = 0,
    trust_custom_code: TrustOpt = False,
    custom_objects: CustomOpt = None,
    input_shape: ShapeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build every candidate the target allows, check and measure them, select the best, gate.

    Exit codes: 0 ready, 1 not ready, 2 bad input or usage, 3 internal or converter failure.
    """

    def body() -> int:
        from kdeploy.pipeline import optimize as run

        report = run(model, target=target, profile=profile, data=data, out=out_dir, formats=_formats(format),
                     seed=seed, trust_custom_code=trust_custom_code, custom_objects=custom_objects,
                     input_shapes=_shapes(input_shape), progress=_progress(quiet), command=_command())
        _render(report, out_dir)
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
    input_shape: ShapeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Gate artifacts that were built elsewhere against the reference model and a target."""

    def body() -> int:
        from kdeploy.pipeline import check as run
        from kdeploy.profiles import PRECISIONS

        if precision is not None and precision not in PRECISIONS:
            raise UsageError(f"--precision {precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
        report = run(model, artifacts, target=target, profile=profile, data=data, out=out_dir,
                     formats=_formats(format), seed=seed, precision=precision, trust_custom_code=trust_custom_code,
                     custom_objects=custom_objects, input_shapes=_shapes(input_shape), progress=_progress(quiet),
                     command=_command())
        _render(report, out_dir)
        return EXIT_READY if report.ready else EXIT_NOT_READY

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


def _command() -> list[str]:
    return ["kdeploy", *sys.argv[1:]]


def _render(report, out_dir: Path) -> None:
    from kdeploy.report.render import candidate_rows

    table = Table(title=f"kdeploy · {report.model.path} → {report.target['name']}", title_justify="left")
    for col in ("candidate", "size", "gzip", "top-1", "cosine min", "max abs err", "p50"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=True)
    table.add_column("verdict", overflow="fold")
    for r in candidate_rows(report):
        name = f"[bold]{r['name']} ★[/]" if r["selected"] else r["name"]
        verdict = "[green]pass[/]" if r["passed"] else f"[red]fail[/] {escape(r['why'])}"
        table.add_row(escape(name) if not r["selected"] else name, r["size"], r["gzip"], r["top1"], r["cosine"],
                      r["max_abs"], r["p50"], verdict)
    out.print(table)
    for f in report.findings:
        color = {"error": "red", "warning": "yellow"}.get(f.severity, "dim")
        out.print(f"[{color}]{f.severity}[/] {f.code}: {escape(f.message)}", soft_wrap=True)
    if report.ready:
        out.print(f"[bold green]READY[/] selected [bold]{report.selected}[/] · report: {out_dir / 'report.json'}")
    else:
        out.print(f"[bold red]NOT READY[/] no candidate passed every check · report: {out_dir / 'report.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
