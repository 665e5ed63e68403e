"""The int8 repair ladder's judge: one quantized `.tflite` held to exactly the gates evaluation applies to it.

Every step of the ladder (`kdeploy.run.ladder`: calibration, selective int8, quantization-aware
training) and full int8 itself are judged here before a candidate is made, so a step never
claims a pass that evaluation then fails. The figures come from the same functions evaluation
uses (`compare.compare`, `run.checks.add_fidelity` / `add_consistency` / `budget_checks`,
`run.diagnose.task_checks`, `robustness.agreement`), on the same runtimes:

- fidelity against Keras on each deployed runtime of the profile (LiteRT, TFLite Micro, or ONNX
  Runtime on the ONNX twin of the `.tflite`, converted here as the build would);
- the robustness probes on the first deployed runtime (a crash on them fails like one on the
  validation inputs; their agreement is gated where the profile sets minimums); for the selective
  search's tries and recalibration attempts in a run of their own after fidelity and the task
  budgets, skipped where those already fail;
- consistency with the cross-check runtimes only where it gates (`acceptance.gates_consistency`:
  a quantized graph with `[consistency] gate_quantized`);
- the task budgets with labels, and the size, gzip, memory and arena budgets.

Latency is not timed here (it needs the quiet, round-robin timing evaluation does); the latency
budget is evaluation's alone. A run that is the one evaluation makes of the same file (full int8's:
validation inputs and probes in one child) is kept in `Context.prefetched` for evaluation to reuse.
"""

from __future__ import annotations

import numpy as np

from kdeploy.acceptance import gates_consistency
from kdeploy.artifacts import Artifact
from kdeploy.compare import compare
from kdeploy.errors import ConversionError
from kdeploy.report.model import ArtifactOut, Candidate, RobustnessOut
from kdeploy.robustness import agreement
from kdeploy.run.checks import add_consistency, add_fidelity, budget_checks, is_latency_check
from kdeploy.run.context import Build, Context, run_key
from kdeploy.run.diagnose import task_checks
from kdeploy.runtimes import RUNTIME_FORMATS

LATENCY_NOTE = "latency budget: judged in evaluation"


def runs_tflite_only(ctx: Context) -> bool:
    """Whether every runtime the judge runs takes the `.tflite` itself: no ONNX twin is converted (tf2onnx, as heavy
    as a conversion and not to be run in two threads at once) for each judged artifact."""
    prof = ctx.profile
    judged = list(prof.runtimes) + (list(ctx.wanted_runtimes) if gates_consistency(
        "int8", prof.consistency.gate_quantized) else [])
    return all(RUNTIME_FORMATS[rt] == "tflite" for rt in judged)


def failed_text(runtime: str) -> str:
    """How the judge words a run that failed on `runtime` (the detail starts with it)."""
    return f"{runtime} failed:"


def judge(ctx: Context, art: Artifact, skip_probes_on_failure: bool = False) -> tuple[bool, str]:
    """Runs the quantized `.tflite` `art` on the profile's deployed runtimes (and the gating cross-checks) and
    applies evaluation's checks but latency.

    Args:
        skip_probes_on_failure: where fidelity or a task budget already fails, return without running the
            robustness probes (the selective search's tries: a failing try then costs a third as much). Full
            int8's own judge runs them always: a crash on a probe is what the crash repair starts from.

    Returns:
        (passed, detail): the failing checks' details, or on a pass the fidelity and task figures.
        A deployed runtime that fails to run it gives "RUNTIME failed: <its error>".
    """
    from kdeploy.run.evaluate import fidelity_job
    from kdeploy.run.probes import probe_inputs
    from kdeploy.runtimes.worker import RuntimeFailure, run_isolated

    prof, m = ctx.profile, ctx.model
    first = prof.runtimes[0]
    probes, probes_path = probe_inputs(ctx)
    precision = art.precision or "int8"
    gate = gates_consistency(precision, prof.consistency.gate_quantized)
    runtimes = list(prof.runtimes) + ([rt for rt in ctx.wanted_runtimes if rt not in prof.runtimes] if gate else [])
    tol = prof.tolerances[precision]
    names = [t.name for t in m.outputs]
    c = Candidate(name=art.path.stem, recipe={}, passed=False)
    b = Build(c.name, precision, {})
    outputs: dict[str, list[np.ndarray]] = {}
    results: dict[str, dict] = {}
    by_format: dict[str, Artifact | None] = {"tflite": art}
    for rt in runtimes:
        deployed = rt in prof.runtimes
        fmt = RUNTIME_FORMATS[rt]
        if fmt not in by_format:
            by_format[fmt] = _twin(ctx, art, fmt)
        a = by_format[fmt]
        if a is None:
            continue  # no artifact for a deployed runtime: `budget_checks` fails it ("artifact for RT")
        full = fidelity_job(ctx, a, rt)  # evaluation's run of this file (probes in the same child, as it runs them)
        job = fidelity_job(ctx, a, rt, probes=False) if skip_probes_on_failure else full
        same_as_evaluation = job == full  # then evaluation reuses it (`Context.prefetched`)
        try:
            outs, result = run_isolated(job, ctx.work / f"judge-{art.path.stem}-{rt}", timeout_s=prof.timing.timeout_s)
        except RuntimeFailure as e:
            if deployed:
                return False, f"{failed_text(rt)} {e}"
            continue  # as evaluation: a cross-check that cannot run it is no verdict
        outputs[rt], results[rt] = outs, result
        c.memory[rt] = result["memory"]
        if same_as_evaluation:
            ctx.prefetched.setdefault(run_key(a, rt), (outs, result))
        if deployed:
            for f in compare(ctx.reference, outs, names=names, kinds=m.output_kinds, tol=tol, runtime=rt,
                             reference="keras", precision=precision):
                add_fidelity(c, f, tol)
        _robustness(ctx, c, probes, first if rt == first else None, result)
    task_checks(ctx, c, b, outputs)
    off = [k for k in c.checks if not k.passed and k.name.startswith(("fidelity ", "task "))]
    if off and skip_probes_on_failure:  # fails whatever the probes say
        return False, "; ".join(k.detail or k.name for k in off)
    if skip_probes_on_failure and probes_path and by_format.get(RUNTIME_FORMATS[first]) is not None:
        a = by_format[RUNTIME_FORMATS[first]]
        job = fidelity_job(ctx, a, first, fidelity=False)
        try:
            _, result = run_isolated(job, ctx.work / f"judge-{art.path.stem}-{first}-probes",
                                     timeout_s=prof.timing.timeout_s)
        except RuntimeFailure as e:  # a crash on a probe fails like one on the validation inputs
            return False, f"{failed_text(first)} {e}"
        _robustness(ctx, c, probes, first, result)
        if first in results:  # the two runs are evaluation's one run of this file, in two children
            ctx.prefetched.setdefault(run_key(a, first), (outputs[first], {**results[first], "probes": result["probes"]}))
    order = [rt for rt in ctx.wanted_runtimes if rt in outputs]
    for rt in order[1:] if gate else []:
        for f in compare(outputs[order[0]], outputs[rt], names=names, kinds=m.output_kinds, tol=tol, runtime=rt,
                         reference=order[0], precision=precision):
            add_consistency(c, f, tol, True)
    c.artifacts = [ArtifactOut(format=a.format, path=str(a.path), precision=a.precision, source=a.source,
                               size_bytes=a.size_bytes, gzip_bytes=a.gzip_bytes, sha256=a.sha256)
                   for a in by_format.values() if a is not None]
    budget_checks(c, b, prof)
    checks = [k for k in c.checks if not is_latency_check(k.name)]
    failed = [k for k in checks if not k.passed]
    if failed:
        return False, "; ".join(k.detail or k.name for k in failed)
    shown = [k for k in checks if k.name.startswith(("fidelity ", "task ", "consistency "))] or checks
    return True, "; ".join(k.detail or k.name for k in shown)


def _robustness(ctx: Context, c: Candidate, probes: dict, runtime: str | None, result: dict) -> None:
    """The robustness rows of a run's probe outputs on `runtime` (None: not the probed runtime)."""
    if runtime is None:
        return
    names = [t.name for t in ctx.model.outputs]
    for probe, got in result.get("probes", {}).items():
        desc, _, ref = probes[probe]
        c.robustness += [RobustnessOut(**row) for row in
                         agreement(probe, desc, runtime, ref, got, names, ctx.model.output_kinds, ctx.profile.robustness)]


def _twin(ctx: Context, art: Artifact, fmt: str) -> Artifact | None:
    """The artifact a runtime of format `fmt` runs for the `.tflite` `art`: its ONNX twin (tf2onnx from the same
    `.tflite`, as the build makes it), in work; None when it cannot be made."""
    if fmt != "onnx":
        return None
    from kdeploy.artifacts.onnx import from_tflite
    from kdeploy.run.diagnose import layer_namer

    try:
        return from_tflite(art, ctx.work / f"judge-{art.path.stem}.onnx", layer_namer(ctx))
    except ConversionError:
        return None
