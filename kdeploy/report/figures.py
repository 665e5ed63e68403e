"""Figures read from a report's JSON form, shared by the HTML, JUnit and diff renderings.

Everything here works on the plain-dict form of a report (`Report.model_dump(mode="json")` or a
`report.json` read back), and reads fields defensively: a report written by an older or newer
kdeploy may lack a field or carry extra ones.
"""

from __future__ import annotations

from typing import Any


def as_dict(report: Any) -> dict:
    """Returns the JSON-like dict form of a `Report` (or the dict itself)."""
    if isinstance(report, dict):
        return report
    return report.model_dump(mode="json")


def runtime_format(runtime: str) -> str | None:
    """Artifact format a runtime runs (the runtimes registry), or None for an unknown runtime."""
    from kdeploy.runtimes import RUNTIME_FORMATS

    return RUNTIME_FORMATS.get(runtime)


def _get(x: Any, key: str, default: Any = None) -> Any:
    return x.get(key, default) if isinstance(x, dict) else getattr(x, key, default)


# The deployed artifact and the latency row budgets apply to: one rule, used by the checks,
# selection, console, Markdown, HTML, JUnit, diff and registry alike, on report objects or on
# their JSON dicts.
def deployed_artifact(artifacts: list, runtime: str | None) -> Any:
    """The artifact that would be deployed: the first one in the format of the target's first runtime."""
    fmt = runtime_format(runtime) if runtime else None
    return next((a for a in artifacts or [] if _get(a, "format") == fmt), None)


def budget_row(latency: list, runtime: str | None, pct: str) -> Any:
    """The latency row budgets apply to: on `runtime`, the smallest batch, the fastest thread count at `pct`."""
    rows = [r for r in latency or [] if _get(r, "runtime") == runtime and _get(r, f"{pct}_ms") is not None]
    if not rows:
        return None
    batch = min(_get(r, "batch", 1) for r in rows)
    return min((r for r in rows if _get(r, "batch", 1) == batch), key=lambda r: _get(r, f"{pct}_ms"))


def primary_runtime(rd: dict) -> str | None:
    runtimes = (rd.get("target") or {}).get("runtimes") or []
    return runtimes[0] if runtimes else None


def latency_percentile(rd: dict) -> str:
    return ((rd.get("target") or {}).get("budgets") or {}).get("latency_percentile") or "p90"


def primary_artifact(rd: dict, cd: dict) -> dict | None:
    """`deployed_artifact` of a candidate dict in a report dict."""
    return deployed_artifact(cd.get("artifacts"), primary_runtime(rd))


def budget_latency(rd: dict, cd: dict) -> dict | None:
    """`budget_row` of a candidate dict in a report dict."""
    return budget_row(cd.get("latency"), primary_runtime(rd), latency_percentile(rd))


def budget_latency_ms(rd: dict, cd: dict) -> float | None:
    row = budget_latency(rd, cd)
    return row[f"{latency_percentile(rd)}_ms"] if row else None


def vs_keras(cd: dict, runtime: str | None = None) -> list[dict]:
    """Fidelity rows against Keras; with `runtime`, that runtime's only (the deployed one's column)."""
    return [f for f in cd.get("fidelity") or [] if f.get("reference") == "keras"
            and (runtime is None or f.get("runtime") == runtime)]


def fidelity_summary(cd: dict, runtime: str | None = None) -> dict[str, float | None]:
    """Worst-case fidelity figures against Keras over outputs (and runtimes, unless `runtime`; None when absent).

    Pass the deployed runtime (`primary_runtime`) wherever the figure stands for the candidate's
    verdict: a cross-check runtime's figure is never the deployed one's.
    """
    rows = vs_keras(cd, runtime)

    def worst(key, fn):
        vals = [f[key] for f in rows if f.get(key) is not None]
        return fn(vals) if vals else None

    return {
        "top1_agreement": worst("top1_agreement", min),
        "cosine_min": worst("cosine_min", min),
        "cosine_mean": worst("cosine_mean", min),
        "max_abs_err": worst("max_abs_err", max),
        "norm_err": worst("norm_err", max),
        "mean_norm_err": worst("mean_norm_err", max),
    }


def fidelity_label(cd: dict, runtime: str | None = None) -> str:
    s = fidelity_summary(cd, runtime)
    if s["top1_agreement"] is not None:
        return f"top-1 {s['top1_agreement']:.3f}"
    if s["cosine_min"] is not None:
        return f"cos {s['cosine_min']:.4f}"
    if s["norm_err"] is not None:
        return f"err {s['norm_err']:.1e}"
    return "no fidelity"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f} ms"
    if v >= 1:
        return f"{v:.2f} ms"
    return f"{v:.3f} ms"


def fmt_value(v: Any) -> str:
    """Short text for a check's value or limit (numbers, dicts of numbers, None)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    return str(v)
