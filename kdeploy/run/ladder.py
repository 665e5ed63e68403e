"""The int8 repair ladder: when full int8 fails, its repairs in order, stopping at the first that passes.

Full int8 is judged once (`run.judge`: evaluation's gates on the target's runtimes). Where it
passes, nothing else runs. Where it fails, the steps of `recipes.REPAIR_LADDER` run in order,
each given that verdict (no step judges full int8 again, none reads another's findings):

1. calibration (`run.calibrate.calibration_builds`): full int8 calibrated again;
2. selective int8 (`run.selective.selective_builds`): the worst layers kept in float;
3. quantization-aware training (`run.qat.qat_builds`).

A step passes when it makes a candidate its judge passed; later steps are then not needed.
The all-integer steps (calibration, QAT) are not tried where the model's decisions lie below the
resolution of an int8 softmax output (`below_int8_resolution`; QAT still is where labels judge the
task, `_labelled`): TFLite quantizes every int8 softmax
to steps of 1/256, so where most samples' top-two classes differ by less, no full int8 graph can
keep them apart, however calibrated or trained (a MobileNetV2-224 with a flat 1000-way softmax:
calibration 19 s and QAT 319 s of a 535 s run, both failing); only float layers can.
`full_integer` targets (`mcu`) run only the all-integer steps; there the selective step instead
names the layers that break int8 (finding `int8-breaking-layers`, which QAT's result completes).

Every step is recorded in `ctx.repair` (the report's `repair`): tried, passed, detail, seconds,
conversions, size; after evaluation `finish` adds each candidate's verdict and its latency
against full int8 and fp32 (`latency` on the deployed runtime, host p50).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from kdeploy.recipes import RepairStep, repair_steps
from kdeploy.report.model import Candidate
from kdeploy.run.context import Build, Context
from kdeploy.run.convert import ReferenceModel
from kdeploy.run.judge import judge
from kdeploy.runtimes import RUNTIME_FORMATS

# TFLite's int8 softmax output has a fixed quantization (scale 1/256, zero point -128, TFLite's
# quantization spec): full int8 cannot tell apart two classes closer than this.
INT8_SOFTMAX_STEP = 1.0 / 256
UNRESOLVED_SHARE = 0.5  # more than this share of samples below one step: the integer steps are not tried


def repair_ladder(ctx: Context, ref: ReferenceModel, builds: list[Build],
                  before_steps: Callable[[], None] | None = None) -> list[Build]:
    """The repair candidates for a failing full int8 (none where it passes); records every step in `ctx.repair`.

    Args:
        builds: the post-training builds (full int8's `.tflite` among them).
        before_steps: called once before the first step tried, its time not the ladder's (build.py
            inspects the model and finishes its conversion lane there): calibration's conversions, the selective search's per-layer tensors (beside the
            lane's last tf2onnx conversions they set the run's peak: MobileNetV2-224 2.45 GB PSS,
            1.23x the bare script's, counting the fork server's children) and its candidate's ONNX
            twin, QAT's training child. Full int8's judge runs beside the lane.
    """
    prof = ctx.profile
    int8 = next((a for b in builds if b.name == "int8" for a in b.artifacts if a.format == "tflite"), None)
    if int8 is None or "int8" not in prof.precisions:
        return []
    started = time.perf_counter()
    ctx.progress("repair", f"judging full int8 on {', '.join(prof.runtimes)}")
    passed, detail = judge(ctx, int8)
    record: dict[str, Any] = {"int8": {"passed": passed, "detail": detail,
                                       "seconds": round(time.perf_counter() - started, 3)},
                              "runtimes": list(prof.runtimes), "steps": [], "repaired_by": None}
    ctx.repair = record
    if passed:
        return []
    out: list[Build] = []
    unresolved = below_int8_resolution(ctx)
    labelled = unresolved is not None and _labelled(ctx)
    for step, skip in repair_steps(prof):
        if skip is None and step.integer and unresolved is not None and not (step.step == "qat" and labelled):
            skip = f"cannot help: {unresolved}"
        row: dict[str, Any] = {"step": step.step, "recipe": step.recipe, "tried": False, "passed": False}
        record["steps"].append(row)
        if record["repaired_by"] is not None:
            row["detail"] = f"not needed: {record['repaired_by']} passed"
            continue
        if step.step == "selective" and prof.full_integer:
            _name_breaking_layers(ctx, ref, builds, (passed, detail), row)
            continue
        if skip is None and before_steps is not None:
            build_started = time.perf_counter()
            before_steps()  # no conversions, per-layer tensors or training child beside the lane's
            before_steps = None
            started += time.perf_counter() - build_started  # the build's work, not the ladder's
        if skip is not None:
            row["detail"] = f"not tried: {skip}"
            if step.step == "qat" and unresolved is not None:
                from kdeploy.run.qat import offer

                offer(ctx, f"not tried ({skip})")
            continue
        made = _run(ctx, ref, builds, step, (passed, detail), row)
        out += made
        if row["passed"]:
            record["repaired_by"] = step.recipe
    record["seconds"] = round(time.perf_counter() - started, 3)
    ctx.finding("info", "repair-ladder", summary(record))
    return out


def _labelled(ctx: Context) -> bool:
    """Whether labels judge the task (`--data` has them for an output): then QAT, which trains on them, may make
    a full int8 whose decisions are its own (confident where Keras' were below int8's step) and keep the accuracy
    budget, so it is tried even below int8's softmax resolution; recalibration changes no decision margin."""
    from kdeploy.taskmetrics import labels_for

    labels = None if ctx.data.synthetic else ctx.validation.labels
    return any(y is not None for y in labels_for(labels, [t.name for t in ctx.model.outputs]))


def below_int8_resolution(ctx: Context) -> str | None:
    """Why no all-integer graph can hold the model's decisions (most samples' Keras top-1 margin below an int8
    softmax output's step), or None. Only softmax outputs ("multiclass"), whose int8 step is fixed."""
    import numpy as np

    for name, kind, ref in zip([t.name for t in ctx.model.outputs], ctx.model.output_kinds, ctx.reference):
        if kind != "multiclass" or ref.ndim < 2 or ref.shape[-1] < 2:
            continue
        top2 = np.sort(ref.reshape(-1, ref.shape[-1]).astype(np.float64), axis=-1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        below = int(np.sum(margins < INT8_SOFTMAX_STEP))
        if below > UNRESOLVED_SHARE * len(margins):
            return (f"{below} of {len(margins)} decisions of output {name} have a Keras top-1 margin below an int8 "
                    f"softmax's step 1/256 (median margin {float(np.median(margins)):.2g}): no full int8 graph "
                    "keeps them apart")
    return None


def _run(ctx: Context, ref: ReferenceModel, builds: list[Build], step: RepairStep, verdict: tuple[bool, str],
         row: dict[str, Any]) -> list[Build]:
    """Runs one step with full int8's verdict and fills its row; returns the candidates it made."""
    t0, seen = time.perf_counter(), len(ctx.findings)
    extra: dict[str, Any] = {}
    if step.step == "calibration":
        from kdeploy.run.calibrate import calibration_builds

        made = calibration_builds(ctx, ref, builds, verdict)
    elif step.step == "selective":
        from kdeploy.run.selective import selective_builds

        made = selective_builds(ctx, ref, builds, verdict, log=extra)
    else:
        from kdeploy.run.qat import qat_builds, skip_reason

        reason = skip_reason(ctx)  # a model QAT cannot take (SavedModel, subclassed): the step is not tried
        made = qat_builds(ctx, ref, f"full int8 fails ({verdict[1]})")
        if reason is not None:
            row["detail"] = f"not tried: {reason}"
            return made
    row.update(tried=True, seconds=round(time.perf_counter() - t0, 3))
    b = next((x for x in made if x.name == step.recipe), None)
    row["passed"] = b is not None and _passed(step, b)
    if b is not None:
        row["size_bytes"] = _size(ctx, b)
    row["conversions"] = _conversions(step, b, extra)
    row["detail"] = _detail(step, b) if b is not None and row["passed"] else \
        " ".join(f.message for f in ctx.findings[seen:] if f.severity != "info" or f.code.endswith("failed")) \
        or (_detail(step, b) if b is not None else "no candidate made")
    return made


def _passed(step: RepairStep, b: Build) -> bool:
    """Whether the step's candidate passed its judge (calibration and selective make a candidate only then)."""
    if step.step == "qat":
        return bool((b.recipe.get("qat") or {}).get("judge", {}).get("passed"))
    return True


def _size(ctx: Context, b: Build) -> int | None:
    fmt = RUNTIME_FORMATS[ctx.profile.runtimes[0]]
    art = next((a for a in b.artifacts if a.format == fmt), None) or next(iter(b.artifacts), None)
    return None if art is None else art.size_bytes


def _conversions(step: RepairStep, b: Build | None, extra: dict[str, Any]) -> int | None:
    """Models the step converted (and judged): attempts, search tries, or the one QAT model."""
    if step.step == "selective":
        return len(extra.get("tries", [])) if "tries" in extra else None
    if step.step == "calibration":
        if b is None:
            return None
        return sum(1 for a in b.recipe.get("calibration", {}).get("attempts", []) if "skipped" not in a)
    return 1 if b is not None else 0


def _detail(step: RepairStep, b: Build) -> str:
    """A passing (or judged) candidate's step in a line: what it changed and its judge's figures."""
    r = b.recipe
    if step.step == "calibration":
        cal = r.get("calibration", {})
        last = (cal.get("attempts") or [{}])[-1]
        return f"{cal.get('method')} ({cal.get('ranges')}): {last.get('detail', '')}"
    if step.step == "selective":
        kept = r.get("float_scopes") or r.get("float_layers") or []
        last = next((t for t in reversed(r.get("search", {}).get("tries", [])) if t.get("passed")), {})
        return f"{len(kept)} layer(s) in float ({', '.join(kept)}): {last.get('detail', '')}"
    q = r.get("qat", {})
    return (f"{q.get('epochs')} epoch(s) on {q.get('samples')} samples ({q.get('mode')}), "
            f"{len(q.get('float_layers', []))} layer(s) left float: {q.get('judge', {}).get('detail', '')}")


def _name_breaking_layers(ctx: Context, ref: ReferenceModel, builds: list[Build], verdict: tuple[bool, str],
                          row: dict[str, Any]) -> None:
    """A full-integer target: no float layers, but the layers that break int8 named (a finding, not a candidate)."""
    from kdeploy.run.selective import selective_builds

    t0 = time.perf_counter()
    if ctx.profile.selective.enabled:
        selective_builds(ctx, ref, builds, verdict)
    row["detail"] = ("not tried: target runs integer kernels only (full_integer); the layers that break int8 are "
                     "named in finding int8-breaking-layers")
    row["seconds"] = round(time.perf_counter() - t0, 3)


def summary(record: dict[str, Any]) -> str:
    """The ladder in one line: full int8's verdict, then each step tried with its result and seconds."""
    parts = []
    for s in record["steps"]:
        if s["tried"]:
            conv = f", {s['conversions']} conversion(s)" if s.get("conversions") else ""
            parts.append(f"{s['step']} {'passes' if s['passed'] else 'fails'} ({s['seconds']:.1f} s{conv})")
        else:
            parts.append(f"{s['step']} {s['detail'].split(':')[0]}")
    end = f"; repaired by {record['repaired_by']}" if record["repaired_by"] else "; not repaired"
    return (f"full int8 fails on {', '.join(record['runtimes'])}; repair ladder "
            f"({record.get('seconds', 0):.1f} s): " + "; ".join(parts) + end)


def finish(record: dict[str, Any] | None, candidates: list[Candidate], deployed: str) -> dict[str, Any] | None:
    """The ladder's record with what evaluation found: each step's candidate verdict and its latency cost.

    `evaluation_passed` (the candidate's verdict after evaluation) next to `passed` (its judge's):
    they agree but for the latency budget, which only evaluation times.
    """
    if record is None:
        return None
    from kdeploy.report.figures import budget_row

    by_name = {c.name: c for c in candidates}

    def p50(name: str) -> float | None:
        c = by_name.get(name)
        row = budget_row(c.latency, deployed, "p50") if c is not None else None
        return None if row is None else round(row.p50_ms, 6)

    for s in record["steps"]:
        c = by_name.get(s["recipe"])
        if not s["tried"] or c is None:
            continue
        s["evaluation_passed"] = c.passed
        mine = p50(c.name)
        if mine is not None:
            s["latency"] = {"runtime": deployed, "p50_ms": mine, "int8_p50_ms": p50("int8"),
                            "fp32_p50_ms": p50("fp32")}
    return record

