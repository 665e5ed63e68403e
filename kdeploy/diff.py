"""Regressions between two reports of the same target: the release gate `kdeploy diff OLD NEW`.

Compared: the selected candidate of each report (size, gzip size, latency at the profile's
percentile, fidelity against Keras), every candidate present in both (the same figures), checks
that newly fail, and the verdict (ready -> not ready). Each figure has a threshold; a change
beyond it is a regression. Works on the JSON form of reports, so reports written by other
kdeploy versions (extra or missing fields) can be compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kdeploy.errors import UsageError
from kdeploy.report.junit import failure_message
from kdeploy.report.figures import (
    as_dict,
    budget_latency,
    fidelity_summary,
    fmt_bytes,
    fmt_ms,
    latency_percentile,
    primary_artifact,
    primary_runtime,
)

DEFAULT_LATENCY_FLOOR_MS = 0.05


class Thresholds(BaseModel):
    """How much worse a figure may get before it is a regression."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_size_increase: float = Field(0.05, ge=0, description="Relative increase of artifact size (and gzip size).")
    max_latency_increase: float = Field(0.10, ge=0, description="Relative increase of latency at the profile percentile.")
    min_latency_delta_ms: float | None = Field(
        None, ge=0,
        description="Latency increases smaller than this (ms) are timer noise, whatever their ratio; "
                    "None: the new report's profile latency_tie_ms.")
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="Absolute drop of top-1 agreement with Keras.")
    max_cosine_drop: float = Field(0.005, ge=0, le=2, description="Absolute drop of cosine similarity with Keras "
                                                                   "(mean per-sample cosine where recorded, else min).")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Absolute drop of a task accuracy (with labels).")
    max_error_increase: float = Field(0.05, ge=0, description="Relative increase of a task MAE / RMSE (with labels).")


@dataclass
class DiffRow:
    """One compared figure."""

    scope: str  # "report", "selected" or a candidate name
    metric: str
    old: Any
    new: Any
    change: str
    limit: str
    regression: bool
    note: str = ""


@dataclass
class DiffResult:
    """All compared figures; `regressions` is what the gate fails on."""

    old: str
    new: str
    target: str
    rows: list[DiffRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[DiffRow]:
        return [r for r in self.rows if r.regression]

    def __bool__(self) -> bool:  # True when there is no regression (like a passing comparison)
        return not self.regressions

    def to_dict(self) -> dict:
        return {"old": self.old, "new": self.new, "target": self.target, "regression": bool(self.regressions),
                "rows": [asdict(r) for r in self.rows], "notes": list(self.notes)}


def load_report(path: str | Path) -> dict:
    """Reads a `report.json` (or a folder holding one) as a dict.

    Raises:
        UsageError: missing file, not JSON, or not a kdeploy report.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"report not found: {path} (allowed: a report.json or a kdeploy output folder)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read report {path}: {e}") from None
    try:
        rd = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"report {path} is not JSON: {e}") from None
    return check_report(rd, str(path))


def check_report(rd: Any, name: str) -> dict:
    """Returns `rd` if it looks like a kdeploy report of schema 1.x; raises UsageError otherwise."""
    missing = [k for k in ("schema_version", "ready", "target", "candidates") if not isinstance(rd, dict) or k not in rd]
    if missing:
        raise UsageError(f"{name} is not a kdeploy report: missing {missing} (expected a report.json written by "
                         "kdeploy optimize or check)")
    if not str(rd["schema_version"]).startswith("1."):
        raise UsageError(f"report {name} has schema_version {rd['schema_version']!r}; this kdeploy reads 1.x")
    return rd


def _rel(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else float("inf")
    return (new - old) / old


def _pct(x: float) -> str:
    return "new" if x == float("inf") else f"{x:+.1%}"


def _figures(rd: dict, cd: dict) -> dict[str, Any]:
    art = primary_artifact(rd, cd)
    lat = budget_latency(rd, cd)
    pct = latency_percentile(rd)
    fid = fidelity_summary(cd, primary_runtime(rd))
    return {
        "size": art.get("size_bytes") if art else None,
        "gzip": art.get("gzip_bytes") if art else None,
        "latency": lat[f"{pct}_ms"] if lat else None,
        "latency_row": lat,
        "top1": fid["top1_agreement"],
        "cosine": fid["cosine_mean"] if fid["cosine_mean"] is not None else fid["cosine_min"],
        "cosine_kind": "cosine mean" if fid["cosine_mean"] is not None else "cosine min",
        "task": {(t.get("name"), t.get("output")): t.get("value") for t in cd.get("task_metrics") or []
                 if t.get("value") is not None},
    }


def _compare_figures(scope: str, old: dict, new: dict, th: Thresholds, floor_ms: float, pct: str) -> list[DiffRow]:
    rows = []
    for key, label in (("size", "size"), ("gzip", "gzip size")):
        if old[key] is not None and new[key] is not None:
            r = _rel(old[key], new[key])
            rows.append(DiffRow(scope, label, old[key], new[key], f"{_pct(r)} ({new[key] - old[key]:+,} B)",
                                f"+{th.max_size_increase:.0%}", r > th.max_size_increase,
                                f"{fmt_bytes(old[key])} -> {fmt_bytes(new[key])}"))
    if old["latency"] is not None and new["latency"] is not None:
        r, delta = _rel(old["latency"], new["latency"]), new["latency"] - old["latency"]
        noisy = any((x.get("latency_row") or {}).get("noisy") for x in (old, new))
        rows.append(DiffRow(scope, f"latency {pct}", round(old["latency"], 5), round(new["latency"], 5),
                            f"{_pct(r)} ({delta:+.4f} ms)", f"+{th.max_latency_increase:.0%} and > {floor_ms:g} ms",
                            r > th.max_latency_increase and delta > floor_ms,
                            f"{fmt_ms(old['latency'])} -> {fmt_ms(new['latency'])}"
                            + ("; a measurement was flagged noisy" if noisy else "")))
    if old["top1"] is not None and new["top1"] is not None:
        d = new["top1"] - old["top1"]
        rows.append(DiffRow(scope, "top-1 vs Keras", round(old["top1"], 6), round(new["top1"], 6), f"{d:+.4f}",
                            f"-{th.max_top1_drop:g}", -d > th.max_top1_drop))
    if old["cosine"] is not None and new["cosine"] is not None:
        d = new["cosine"] - old["cosine"]
        rows.append(DiffRow(scope, f"{new['cosine_kind']} vs Keras", round(old["cosine"], 6), round(new["cosine"], 6),
                            f"{d:+.6f}", f"-{th.max_cosine_drop:g}", -d > th.max_cosine_drop))
    for (metric, output), was in old.get("task", {}).items():
        now = new.get("task", {}).get((metric, output))
        if now is None:
            continue
        label = f"task {metric} [{output}]"
        if metric == "accuracy":  # higher is better; compared in absolute terms, like the profile budget
            d = now - was
            rows.append(DiffRow(scope, label, round(was, 6), round(now, 6), f"{d:+.4f}", f"-{th.max_accuracy_drop:g}",
                                -d > th.max_accuracy_drop))
        else:  # mae / rmse: lower is better; relative, like size
            r = _rel(was, now)
            rows.append(DiffRow(scope, label, round(was, 6), round(now, 6), _pct(r), f"+{th.max_error_increase:.0%}",
                                r > th.max_error_increase))
    return rows


def diff_reports(old: Any, new: Any, thresholds: Thresholds | None = None, *, old_name: str = "old",
                 new_name: str = "new") -> DiffResult:
    """Compares two reports of the same target and lists regressions.

    Args:
        old: the baseline report (`Report`, its dict form, or a path to a report.json / output folder).
        new: the report to gate.
        thresholds: allowed changes; defaults as in `Thresholds`.

    Returns:
        A DiffResult whose `regressions` lists every figure that got worse beyond its threshold.

    Raises:
        UsageError: a report cannot be read, or the two reports are for different targets.
    """
    th = thresholds or Thresholds()
    o = load_report(old) if isinstance(old, (str, Path)) else check_report(as_dict(old), old_name)
    n = load_report(new) if isinstance(new, (str, Path)) else check_report(as_dict(new), new_name)
    ot, nt = (o.get("target") or {}).get("name"), (n.get("target") or {}).get("name")
    if ot != nt:
        raise UsageError(f"reports are for different targets: {old_name} is {ot!r}, {new_name} is {nt!r}; "
                         "diff compares two runs for the same target")
    res = DiffResult(old=old_name, new=new_name, target=str(nt))
    pct = latency_percentile(n)
    if latency_percentile(o) != pct:
        res.notes.append(f"latency percentile changed from {latency_percentile(o)} to {pct}; compared at {pct}")
    floor = th.min_latency_delta_ms
    if floor is None:
        floor = (n.get("target") or {}).get("latency_tie_ms", DEFAULT_LATENCY_FLOOR_MS)
    sig = lambda rd: [(t.get("name"), t.get("shape"), t.get("dtype")) for t in (rd.get("model") or {}).get("inputs") or []]
    if sig(o) != sig(n):
        res.notes.append(f"model inputs differ: {sig(o)} vs {sig(n)}")
    oh, nh = (o.get("host") or {}).get("cpu"), (n.get("host") or {}).get("cpu")
    if oh != nh:
        res.notes.append(f"latency was measured on different hosts ({oh} vs {nh}): compare with care")
    res.rows.append(DiffRow("report", "ready", o.get("ready"), n.get("ready"),
                            "unchanged" if o.get("ready") == n.get("ready") else
                            ("ready -> not ready" if o.get("ready") else "not ready -> ready"),
                            "stays ready", bool(o.get("ready")) and not n.get("ready")))
    oc = {c["name"]: c for c in o.get("candidates") or []}
    nc = {c["name"]: c for c in n.get("candidates") or []}
    os_, ns = o.get("selected"), n.get("selected")
    if os_ in oc and ns in nc:
        note = "" if os_ == ns else f"selected changed: {os_} -> {ns}"
        if note:
            res.notes.append(note)
        res.rows += _compare_figures("selected", _figures(o, oc[os_]), _figures(n, nc[ns]), th, floor, pct)
    for name in [c for c in nc if c in oc]:
        co, cn = oc[name], nc[name]
        res.rows += _compare_figures(name, _figures(o, co), _figures(n, cn), th, floor, pct)
        old_checks = {k.get("name"): k for k in co.get("checks") or []}
        for k in cn.get("checks") or []:
            was = old_checks.get(k.get("name"))
            if not k.get("passed") and (was is None or was.get("passed")):
                res.rows.append(DiffRow(name, f"check {k.get('name')}", "pass" if was else "absent", "FAIL",
                                        "newly failing", "passes", True, failure_message(k)))
        if co.get("passed") and not cn.get("passed"):
            res.rows.append(DiffRow(name, "candidate passes", True, False, "pass -> fail", "passes", True,
                                    "; ".join(cn.get("errors") or [])[:200]))
    gone = [c for c in oc if c not in nc]
    added = [c for c in nc if c not in oc]
    if gone:
        res.notes.append(f"candidates only in {old_name}: {', '.join(gone)}")
    if added:
        res.notes.append(f"candidates only in {new_name}: {', '.join(added)}")
    return res
