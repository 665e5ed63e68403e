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
    a few microseconds of host latency say nothing about the target), and so are latencies
    within each other's measurement noise (`within_noise`); among equals the other figure
    decides, then the profile's precision preference. `tie` says when the selection rested on a
    tie: which candidates, on which figure, which of them only through noise, and what decided. The selection also carries a
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

    by_noise: set[str] = set()  # tied on latency only because their timed samples overlap

    def pool(among, key, is_latency):
        """The candidates of `among` equal to the best by `key`: within the tie tolerance, or (latency) the noise."""
        if not among:
            return []
        lead = min(among, key=key)
        slack = key(lead) * prof.tie_tolerance
        if is_latency:
            slack = max(slack, prof.latency_tie_ms)
        out = []
        for c in among:
            if key(c) <= key(lead) + slack:
                out.append(c)
            elif is_latency and within_noise(budget_row(c.latency, prof.runtimes[0], pct),
                                              budget_row(lead.latency, prof.runtimes[0], pct)):
                out.append(c)
                by_noise.add(c.name)
        return out

    size_label = "gzip size" if prof.objective == "gzip_size" else "size"
    first, second = ((latency, True, "latency"), (size, False, size_label)) if prof.objective == "latency" \
        else ((size, False, size_label), (latency, True, "latency"))
    passing = [c for c in candidates if c.passed]
    pool1 = pool(passing, first[0], first[1])
    pool2 = pool(pool1, second[0], second[1])

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
            noise = " or measurement noise (overlapping p25..p75 of the timed samples)" if by_noise else ""
            why = f"best {first[2]}" if len(pool1) == 1 else (
                f"{first[2]} equal to {len(pool1) - 1} other(s) within tolerance{noise}, best {second[2]}"
                if len(pool2) == 1 else
                f"{first[2]} and {second[2]} equal to {len(pool2) - 1} other(s) within tolerance{noise}; "
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
    tie = None
    if best is not None and len(pool1) > 1:
        tie = {"on": [first[2]] + ([second[2]] if len(pool2) > 1 else []),
               "candidates": [c.name for c in (pool2 if len(pool2) > 1 else pool1)],
               "within_noise": sorted(n for n in by_noise if n in {c.name for c in pool1}),
               "decided_by": f"{second[2]}" if len(pool2) == 1 else "the profile's preference "
                             f"({' > '.join(prof.prefer)}), then original weights over pruned/clustered"}
    return {"objective": prof.objective, "tie_tolerance": prof.tie_tolerance,
                     "latency_tie_ms": prof.latency_tie_ms, "prefer": list(prof.prefer),
                     "selected": best.name if best else None, "tie": tie, "reasons": reasons,
                     "pareto": {"axes": [f"latency_{pct}_ms ({prof.runtimes[0]}, lower is better)",
                                         f"{size_label} in bytes (lower is better)",
                                         "fidelity: worst mean normalized error vs Keras (lower is better)"],
                                "among": "passing candidates (failing ones are not deployable: pareto_optimal null)",
                                "rows": table}}


def within_noise(a: Any, b: Any) -> bool:
    """Two latency rows whose timed samples overlap in their middle halves (p25..p75): neither is reliably faster.

    On a busy host, medians that differ by more than the tie tolerance still swap places
    between re-runs when the sample spreads overlap; such rows are tied. Rows without quartiles
    (reports before 1.1) are never tied this way.
    """
    if a is None or b is None or None in (a.p25_ms, a.p75_ms, b.p25_ms, b.p75_ms):
        return False
    return a.p25_ms <= b.p75_ms and b.p25_ms <= a.p75_ms


def describe(c: Candidate, size, latency, pct: str, size_label: str) -> str:
    lat = latency(c)
    text = f"{size_label} {size(c):,} bytes"
    return text + (f", {pct} {lat:.3f} ms" if np.isfinite(lat) else "")
