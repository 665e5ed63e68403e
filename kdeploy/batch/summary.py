"""Batch results: one row per job (from its exit code and its report), written as JSON, Markdown, JUnit.

The size and latency of a row are the deployed artifact's of the selected candidate and the
latency at the profile's percentile, read with the same helpers as every other rendering
(`kdeploy.report.figures`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdeploy import __version__

SCHEMA_VERSION = "1.0"
EXIT_READY, EXIT_NOT_READY, EXIT_USAGE = 0, 1, 2
FILES = {"json": "summary.json", "md": "summary.md", "junit": "summary.junit.xml"}


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobRow(_M):
    """What one job of a batch gave."""

    name: str = Field(description="Job name; its report is in <out>/<name>/ when it ran to a verdict.")
    model: str = Field(description="The model as the manifest named it (path, glob match or MLflow URI).")
    target: str = Field(description="The target profile's name.")
    exit_code: int = Field(description="`kdeploy optimize` exit code: 0 ready, 1 not ready, 2 bad input, 3 internal.")
    ready: bool | None = Field(description="The gate's verdict; None when the job ended without a report.")
    selected: str | None = None
    size_bytes: int | None = Field(None, description="The selected candidate's deployed artifact (first runtime's format).")
    latency_ms: float | None = Field(None, description="The selected candidate's latency at `latency_percentile`.")
    latency_percentile: str | None = None
    message: str = Field(description="The verdict, or the job's one-line error.")
    duration_s: float = Field(description="Wall time of the job's `kdeploy optimize` process.")
    report: str | None = Field(None, description="Path of the job's report.json, relative to the batch folder.")
    log: str = Field(description="The job's console output (stdout and stderr), relative to the batch folder.")
    node: str | None = Field(None, description="Host the job ran on.")


class BatchSummary(_M):
    """`<out>/summary.json`."""

    schema_version: str = SCHEMA_VERSION
    tool: dict[str, str] = {"name": "kdeploy", "version": __version__}
    manifest: str
    exit_code: int = Field(description="Worst job exit code: 2 or 3 over 1 over 0.")
    counts: dict[str, int] = Field(description="Jobs per outcome: ready, not_ready, bad_input, internal.")
    ray: dict[str, Any] = Field(description="How the batch ran on Ray: address ('local' or the cluster's), CPUs.")
    timing: dict[str, Any] = Field(description="How latency was measured while jobs ran side by side.")
    formats: list[str]
    duration_s: float
    jobs: list[JobRow]


def worst_exit(codes: list[int]) -> int:
    """The batch exit code: the highest of 2/3 if any, else 1 if any job was not ready, else 0."""
    bad = [c for c in codes if c >= EXIT_USAGE]
    return max(bad) if bad else max(codes, default=EXIT_READY)


def outcome(code: int) -> Literal["ready", "not_ready", "bad_input", "internal"]:
    return {EXIT_READY: "ready", EXIT_NOT_READY: "not_ready", EXIT_USAGE: "bad_input"}.get(code, "internal")


def job_row(job, exit_code: int, message: str, duration_s: float, node: str | None, report: dict | None,
            report_path: str | None, log_path: str) -> JobRow:
    """The summary row of a job; figures come from its report (None when it ended without one).

    Args:
        job: the `kdeploy.batch.manifest.Job`.
        exit_code: the job's exit code (0-3).
        message: the job's error line (used when there is no report).
        duration_s: the job's wall time.
        node: host the job ran on.
        report: the job's `report.json`, read back, or None.
        report_path: where that report is, relative to the batch folder.
        log_path: where the job's console output is, relative to the batch folder.
    """
    from kdeploy.report.figures import budget_latency_ms, latency_percentile, primary_artifact

    row = JobRow(name=job.name, model=job.model_label, target=job.target, exit_code=exit_code, ready=None,
                 message=message, duration_s=round(duration_s, 2), log=log_path, node=node)
    if report is None:
        return row
    row.ready, row.selected, row.report = bool(report.get("ready")), report.get("selected"), report_path
    row.latency_percentile = latency_percentile(report)
    chosen = next((c for c in report.get("candidates") or [] if c.get("name") == row.selected), None)
    if chosen is not None:
        art = primary_artifact(report, chosen)
        row.size_bytes = art.get("size_bytes") if art else None
        lat = budget_latency_ms(report, chosen)
        row.latency_ms = round(lat, 6) if lat is not None else None
    row.message = _verdict(report)
    return row


def _verdict(report: dict) -> str:
    from kdeploy.report.junit import failure_message

    candidates = report.get("candidates") or []
    if report.get("ready"):
        return f"ready: selected {report.get('selected')}"
    passed = sum(bool(c.get("passed")) for c in candidates)
    first = next((k for c in candidates for k in c.get("checks") or [] if not k.get("passed")), None)
    why = f"; first failed check: {failure_message(first)}" if first else ""
    return f"not ready: {passed} of {len(candidates)} candidate(s) passed every check{why}"


def markdown(summary: BatchSummary) -> str:
    """A short Markdown summary: verdict counts, one table row per job, how timing was done."""
    from kdeploy.report.figures import fmt_bytes, fmt_ms
    from kdeploy.report.render import _md_cell

    c = summary.counts
    lines = [f"# kdeploy batch · {_md_cell(summary.manifest)}", "",
             f"**{len(summary.jobs)} job(s)**: {c['ready']} ready, {c['not_ready']} not ready, {c['bad_input']} bad "
             f"input, {c['internal']} internal failure(s) · exit code {summary.exit_code} · {summary.duration_s:.1f} s "
             f"on Ray ({_md_cell(str(summary.ray['address']))})", "",
             "| job | model | target | exit | ready | selected | size | latency | message | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.jobs:
        ready = "-" if r.ready is None else ("yes" if r.ready else "no")
        lat = f"{fmt_ms(r.latency_ms)} {r.latency_percentile}" if r.latency_ms is not None else "-"
        lines.append(f"| {_md_cell(r.name)} | {_md_cell(r.model)} | {_md_cell(r.target)} | {r.exit_code} | {ready} | "
                     f"{r.selected or '-'} | {fmt_bytes(r.size_bytes)} | {lat} | {_md_cell(r.message)} | "
                     f"{r.duration_s:.1f} s |")
    lines += ["", f"Timing: {_md_cell(summary.timing['note'])}", ""]
    return "\n".join(lines)


def write_summary(summary: BatchSummary, folder: Path) -> list[Path]:
    """Writes summary.json, summary.md and summary.junit.xml into `folder`; returns their paths."""
    from kdeploy.report.junit import render_batch

    texts = {"json": summary.model_dump_json(indent=2) + "\n", "md": markdown(summary),
             "junit": render_batch(summary.model_dump(mode="json"))}
    paths = []
    for key, text in texts.items():
        path = folder / FILES[key]
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
