"""Latency: every artifact that ran, timed round-robin per runtime in one child process; re-measures near a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdeploy.artifacts import Artifact
from kdeploy.profiles import TargetProfile
from kdeploy.profiling import is_noisy, near_limit
from kdeploy.report.figures import budget_row
from kdeploy.report.model import Candidate, Check, LatencyOut
from kdeploy.run.context import Build, Context
from kdeploy.runtimes import RUNTIME_FORMATS, runner_class
from kdeploy.runtimes.jobs import InterleaveJob, RunJob, TimingEntry
from kdeploy.runtimes.worker import RuntimeFailure, run_isolated

# Findings that come from timing (what `--retime` derives again).
LATENCY_FINDINGS = ("latency-noisy", "quantized-slower", "latency-interleave-failed", "remeasure-failed")
# Rounds of the round-robin timing: each entry's samples are spread over this many visits.
INTERLEAVE_ROUNDS = 4


def time_candidates(ctx: Context, runtime: str, entries: list[tuple[Candidate, Artifact]], batches: list[int],
                     feeds_path: Path, measured_on: str, failed: set[str] = frozenset()) -> None:
    """Times every artifact that ran on `runtime`, round-robin in one child process; records cold and warm figures.

    Falls back to one timing process per artifact when the shared one fails (a runtime that
    crashes on one artifact must not cost the others their figures).

    Args:
        failed: candidates that already failed a check no later one can turn: no selection reads their
            latency, so they are timed in the first round only (a quarter of the iterations), for the report.
    """
    if not entries:
        return
    prof = ctx.profile
    n = len(ctx.validation)
    max_threads = runner_class(runtime).max_threads
    threads = [t for t in prof.threads if max_threads is None or t <= max_threads] or [1]
    plan = [TimingEntry(key=f"{c.name}@{t}@{bs}", name=c.name, artifact_path=str(art.path), io=art.io, threads=t,
                        batch=bs, first_round_only=c.name in failed)
            for c, art in entries for t in threads for bs in batches if bs <= n]
    by_name = {c.name: c for c, _ in entries}
    ctx.progress("latency", f"timing {len(entries)} candidate(s) on {runtime}, round-robin in one process")
    job = InterleaveJob(runtime=runtime, feeds_path=str(feeds_path), entries=plan, rounds=INTERLEAVE_ROUNDS,
                        timing=timing_kwargs(prof))
    try:
        _, result = run_isolated(job, ctx.work / f"latency-{runtime}", timeout_s=prof.timing.timeout_s)
    except RuntimeFailure as e:
        ctx.finding("warning", "latency-interleave-failed",
                    f"timing all candidates on {runtime} in one process failed ({e}); timed one by one instead")
        for c, art in entries:
            ctx.progress("latency", f"{c.name} on {runtime}")
            one = RunJob(runtime=runtime, artifact_path=str(art.path), io=art.io, feeds_path=str(feeds_path),
                         fidelity=False, threads=list(prof.threads), batch_sizes=batches, timing=timing_kwargs(prof))
            try:
                _, res = run_isolated(one, ctx.work / f"latency-{runtime}-{c.name}", timeout_s=prof.timing.timeout_s)
            except RuntimeFailure as e2:
                c.checks.append(Check(name=f"latency on {runtime}", value="failed", limit="runs", passed=False,
                                      detail=str(e2)))
                continue
            c.cold[runtime] = res["cold"]
            c.latency += [latency_out(row, prof, measured_on) for row in res["latency"]]
        return
    timed_with = [c.name for c, _ in entries]
    for name, cold in result["cold"].items():
        by_name[name].cold[runtime] = {k: float(v) for k, v in cold.items()}
    for row in result["latency"]:
        name = row.pop("key").rsplit("@", 2)[0]
        out = latency_out(row, prof, measured_on)
        out.interleaved_with = [x for x in timed_with if x != name]
        by_name[name].latency.append(out)


def timing_kwargs(prof: TargetProfile, factor: float = 1.0) -> dict[str, Any]:
    """Keyword arguments of `profiling.measure` from the profile (scaled by `factor` for a re-measure)."""
    t = prof.timing
    return {"warmup": t.warmup, "min_iters": int(t.min_iters * factor), "min_seconds": t.min_seconds * factor,
            "max_iters": int(t.max_iters * factor), "max_seconds": t.max_seconds * factor}


def latency_out(row: dict, prof: TargetProfile, measured_on: str, remeasured: bool = False) -> LatencyOut:
    return LatencyOut(**row, noisy=is_noisy(row["cv"], prof.timing.noisy_cv), remeasured=remeasured,
                      measured_on=measured_on)


def remeasure(ctx: Context, c: Candidate, b: Build, lat: LatencyOut) -> LatencyOut:
    """Times one latency row again with twice the iterations and time; replaces it in the candidate."""
    art = next((a for a in b.artifacts if a.format == RUNTIME_FORMATS[lat.runtime]), None)
    if art is None:
        return lat
    prof = ctx.profile
    ctx.progress("remeasure", f"{b.name} on {lat.runtime}, {lat.threads} thread(s), batch {lat.batch}: near its budget")
    job = RunJob(runtime=lat.runtime, artifact_path=str(art.path), io=art.io,
                 feeds_path=str(ctx.work / "validation.npz"), fidelity=False, threads=[lat.threads],
                 batch_sizes=[lat.batch], timing=timing_kwargs(prof, 2.0))
    try:
        _, result = run_isolated(job, ctx.work / f"{b.name}-{lat.runtime}-remeasure", timeout_s=prof.timing.timeout_s)
    except RuntimeFailure as e:
        ctx.finding("warning", "remeasure-failed", f"candidate {b.name}: re-measuring latency failed ({e})")
        return lat
    if not result["latency"]:
        return lat
    new = latency_out(result["latency"][0], prof, lat.measured_on or "", remeasured=True)
    c.latency[c.latency.index(lat)] = new
    return new


NOISE_MARGIN_CAP = 0.5  # a noisy row's cv widens the re-measure margin up to half the limit, no further


def settle_budget_latency(ctx: Context, c: Candidate, b: Build) -> str:
    """Re-measures the latency row the budget rests on while it is near its limit; returns a note for the check.

    The margin widens to the row's cv when it is noisy (at most to NOISE_MARGIN_CAP: a 12 µs call's cv
    above 1, timer resolution, made every value below twice the limit "near" it); a re-measured row may
    lose its place to another thread count, which is then re-measured too (each row at most once).
    """
    prof, bud = ctx.profile, ctx.profile.budgets
    pct = bud.latency_percentile
    lat = budget_row(c.latency, prof.runtimes[0], pct)
    if bud.max_latency_ms is None or lat is None:
        return ""
    v = getattr(lat, f"{pct}_ms")
    note = f"; timed round-robin with {', '.join(lat.interleaved_with)}" if lat.interleaved_with else ""
    while near_limit(v, bud.max_latency_ms, max(prof.timing.remeasure_margin, min(lat.cv, NOISE_MARGIN_CAP)
                                                if lat.noisy else 0.0)) and not lat.remeasured:
        first = v
        again = remeasure(ctx, c, b, lat)
        if again is lat:
            break
        lat = budget_row(c.latency, prof.runtimes[0], pct) or again
        v = getattr(lat, f"{pct}_ms")
        note = f"; re-measured (first {first:.4f} ms was near the limit)"
    return note


def latency_findings(ctx: Context, candidates: list[Candidate], measured_on: str) -> None:
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
