"""Checks: every budget, fidelity comparison and robustness minimum becomes a Check with its verdict.

Pure functions over measured results (no child processes, no run context).
"""

from __future__ import annotations

import numpy as np

from kdeploy.artifacts import GZIP_LEVEL
from kdeploy.compare import FidelityResult
from kdeploy.profiles import TargetProfile, Tolerance
from kdeploy.report.figures import budget_row, deployed_artifact
from kdeploy.report.model import Candidate, Check, ConsistencyOut, FidelityOut
from kdeploy.run.context import Build
from kdeploy.runtimes import RUNTIME_FORMATS


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}  # NaN: null


def add_fidelity(c: Candidate, f: FidelityResult, tol: Tolerance, gates: bool = True) -> None:
    """A fidelity row; with `gates` (a deployed runtime) also its check. A cross-check's row is figures only."""
    out = FidelityOut(**_finite(f.to_dict()), gates=gates)
    c.fidelity.append(out)
    if not gates:
        return
    value = {"max_abs_err": out.max_abs_err, "peak_err": out.peak_err, "cosine_min": out.cosine_min}
    if out.top1_agreement is not None:
        value["top1_agreement"] = out.top1_agreement
    if out.decision_agreement is not None and out.top1_agreement is None:
        value["decision_agreement"] = out.decision_agreement
    c.checks.append(Check(name=f"fidelity {f.runtime} vs {f.reference} [{f.output}]", value=value,
                          limit=tol.model_dump(exclude_none=True), passed=f.passed, detail=f.detail,
                          summary=f.summary))


def add_consistency(c: Candidate, f: FidelityResult, tol: Tolerance, gates: bool) -> ConsistencyOut:
    """One output's agreement of runtime `f.runtime` with `f.reference` (the deployed one); a check where it gates."""
    figures = _finite({k: getattr(f, k) for k in ("max_abs_err", "peak_err", "rel_rmse", "cosine_min", "cosine_mean",
                                                  "decision_agreement", "decisions")})
    row = ConsistencyOut(runtime_a=f.reference, runtime_b=f.runtime, output=f.output, precision=f.precision,
                         samples=f.samples, figures=figures, gates=gates, passed=f.passed, detail=f.detail,
                         summary=f.summary)
    c.consistency.append(row)
    if gates:
        c.checks.append(Check(name=f"consistency {f.runtime} vs {f.reference} [{f.output}]", value=figures,
                              limit=tol.model_dump(exclude_none=True), passed=f.passed, detail=f.detail,
                              summary=f.summary))
    return row


def is_latency_check(name: str) -> bool:
    """The checks that rest on timing (the latency budget, a failed timing run): what `--retime` measures again."""
    return name.startswith("latency_") or name.startswith("latency on ")


def latency_check(c: Candidate, prof: TargetProfile, latency_note: str = "") -> None:
    """The latency budget as a check, on the deployed runtime's budget row (none without a budget)."""
    bud = prof.budgets
    if bud.max_latency_ms is None:
        return
    deployed, pct = prof.runtimes[0], bud.latency_percentile
    lat = budget_row(c.latency, deployed, pct)
    if lat is None:
        c.checks.append(Check(name=f"latency_{pct}_ms", value=None, limit=bud.max_latency_ms, passed=False,
                              detail=f"not measured: no latency on {deployed}"))
        return
    v = getattr(lat, f"{pct}_ms")
    c.checks.append(Check(
        name=f"latency_{pct}_ms", value=round(v, 4), limit=bud.max_latency_ms, passed=v <= bud.max_latency_ms,
        detail=f"{lat.runtime}, batch {lat.batch}, {lat.threads} thread(s), {lat.samples} samples, "
               f"cv {lat.cv:.2f}{' (noisy)' if lat.noisy else ''}{latency_note}; {lat.measured_on}"))


def budget_checks(c: Candidate, b: Build, prof: TargetProfile, latency_note: str = "") -> None:
    """Turns every budget of the profile into a check with its value, limit and verdict.

    A budget that applies but could not be measured fails ("not measured"): a gate must not pass
    on a figure it does not have. `latency_note` says how the budget row was timed (round-robin,
    re-measured; from `timing.settle_budget_latency`).
    """
    bud = prof.budgets
    for rt in prof.runtimes:
        if not any(a.format == RUNTIME_FORMATS[rt] for a in c.artifacts):
            c.checks.append(Check(name=f"artifact for {rt}", value=None, limit=RUNTIME_FORMATS[rt], passed=False,
                                  detail="; ".join(b.errors) or f"no {RUNTIME_FORMATS[rt]} artifact was built"))
    art = deployed_artifact(c.artifacts, prof.runtimes[0])
    if art is not None:
        if bud.max_size_bytes is not None:
            c.checks.append(Check(name="size_bytes", value=art.size_bytes, limit=bud.max_size_bytes,
                                  passed=art.size_bytes <= bud.max_size_bytes, detail=f"{art.path} (flash / download)"))
        if bud.max_gzip_bytes is not None:
            c.checks.append(Check(name="gzip_bytes", value=art.gzip_bytes, limit=bud.max_gzip_bytes,
                                  passed=art.gzip_bytes <= bud.max_gzip_bytes, detail=f"{art.path}, gzip -{GZIP_LEVEL}"))
    deployed = prof.runtimes[0]
    latency_check(c, prof, latency_note)
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
