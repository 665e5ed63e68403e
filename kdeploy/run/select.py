"""Selection: the best passing candidate by the profile's objective, with a reason for every other one.

A pure function of the evaluated candidates and the profile (no run context): `select` returns
the `selection` section of the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdeploy.profiles import TargetProfile
from kdeploy.profiling import dominators
from kdeploy.report.figures import budget_row, deployed_artifact
from kdeploy.report.model import Candidate


def fidelity_error(c: Candidate) -> float:
    """Worst mean normalized error against Keras over outputs and runtimes (inf when not measured)."""
    errs = [f.mean_norm_err for f in c.fidelity if f.reference == "keras"]
    if not errs or any(e is None for e in errs):
        return float("inf")
    return max(errs)


def select(candidates: list[Candidate], prof: TargetProfile) -> dict[str, Any]:
    """The passing candidate that is best by the profile's objective, as the report's `selection`.

    Figures within the profile's tie tolerance of the best are equal (a 1% size difference or
    a few microseconds of host latency say nothing about the target); among equals the other
    figure decides, then the profile's precision preference. The selection also carries a
    Pareto table (latency, size, fidelity error) marking the passing candidates no other passing
    candidate beats on all three.
    """
    pct = prof.budgets.latency_percentile

    def size(c):
        a = deployed_artifact(c.artifacts, prof.runtimes[0])
        return (a.gzip_bytes if prof.objective == "gzip_size" else a.size_bytes) if a else float("inf")

    def latency(c):
        lat = budget_row(c.latency, prof.runtimes[0], pct)
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
    beaten_by = dominators({c.name: (latency(c), size(c), fidelity_error(c)) for c in passing})
    front = {name for name, by in beaten_by.items() if not by}
    reasons = {}
    for c in candidates:
        fig = describe(c, size, latency, pct, size_label)
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
                    "equal figures; the original weights are preferred over pruned/clustered ones"
                    if c.optimization is not None and best.optimization is None
                    and c.recipe.get("precision") == best.recipe.get("precision") else
                    f"equal figures; profile prefers {best.recipe.get('precision')}")
            reasons[c.name] = f"passes every check, not selected: {lost} ({fig} vs {describe(best, size, latency, pct, size_label)})"
        else:
            failed = [k.name for k in c.checks if not k.passed] + c.errors
            reasons[c.name] = "failed: " + ("; ".join(failed) if failed else "nothing could be checked")
    table = []
    for c in candidates:
        lat, sz, err = latency(c), size(c), fidelity_error(c)
        table.append({"candidate": c.name, "passed": c.passed,
                      f"latency_{pct}_ms": round(lat, 6) if np.isfinite(lat) else None,
                      "size_bytes" if prof.objective != "gzip_size" else "gzip_bytes": sz if np.isfinite(sz) else None,
                      "fidelity_mean_norm_err": err if np.isfinite(err) else None,
                      "pareto_optimal": (c.name in front) if c.passed else None})
    return {"objective": prof.objective, "tie_tolerance": prof.tie_tolerance,
                     "latency_tie_ms": prof.latency_tie_ms, "prefer": list(prof.prefer),
                     "selected": best.name if best else None, "reasons": reasons,
                     "pareto": {"axes": [f"latency_{pct}_ms ({prof.runtimes[0]}, lower is better)",
                                         f"{size_label} in bytes (lower is better)",
                                         "fidelity: worst mean normalized error vs Keras (lower is better)"],
                                "among": "passing candidates (failing ones are not deployable: pareto_optimal null)",
                                "rows": table}}


def describe(c: Candidate, size, latency, pct: str, size_label: str) -> str:
    lat = latency(c)
    text = f"{size_label} {size(c):,} bytes"
    return text + (f", {pct} {lat:.3f} ms" if np.isfinite(lat) else "")
