"""Report renderings: JSON and Markdown (HTML and JUnit are registered the same way)."""

from __future__ import annotations

from pathlib import Path


def _writers() -> dict:
    # format -> (file name, renderer). One line per format.
    return {
        "json": ("report.json", lambda r: r.to_json() + "\n"),
        "md": ("report.md", markdown),
    }


def validate_formats(formats) -> None:
    """Raises UsageError naming unknown report formats and the allowed ones."""
    bad = [f for f in formats if f not in _writers()]
    if bad:
        from kdeploy.errors import UsageError

        raise UsageError(f"unknown report format(s) {bad}; allowed: {', '.join(_writers())}")


def write_formats(report, folder: Path, formats) -> list[Path]:
    validate_formats(formats)
    writers = _writers()
    written = []
    for f in dict.fromkeys(["json", *formats]):  # report.json is always written: it is the contract
        name, render = writers[f]
        (folder / name).write_text(render(report), encoding="utf-8")
        written.append(folder / name)
    return written


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def primary_latency(c, runtime: str, batch: int = 1):
    rows = [l for l in c.latency if l.runtime == runtime and l.batch == batch]
    return min(rows, key=lambda l: l.p50_ms) if rows else None


def candidate_rows(report) -> list[dict]:
    """One summary row per candidate, shared by the console table and Markdown."""
    rt = report.target["runtimes"][0]
    rows = []
    for c in report.candidates:
        art = next((a for a in c.artifacts if a.format == {"litert": "tflite", "onnxruntime": "onnx"}[rt]), None)
        top1 = [f.top1_agreement for f in c.fidelity if f.reference == "keras" and f.top1_agreement is not None]
        cos = [f.cosine_min for f in c.fidelity if f.reference == "keras" and f.cosine_min is not None]
        errs = [f.max_abs_err for f in c.fidelity if f.reference == "keras" and f.max_abs_err is not None]
        lat = primary_latency(c, rt)
        failed = [k.name for k in c.checks if not k.passed]
        rows.append({
            "name": c.name,
            "selected": c.name == report.selected,
            "size": _size(art.size_bytes) if art else "-",
            "gzip": _size(art.gzip_bytes) if art else "-",
            "top1": f"{min(top1):.4f}" if top1 else "-",
            "cosine": f"{min(cos):.6f}" if cos else "-",
            "max_abs": f"{max(errs):.2e}" if errs else "-",
            "p50": f"{lat.p50_ms:.3f} ms ({lat.threads}t)" if lat else "-",
            "passed": c.passed,
            "why": "; ".join(failed[:3]) + (" …" if len(failed) > 3 else "") if failed else (c.errors[0] if c.errors else ""),
        })
    return rows


def markdown(report) -> str:
    verdict = "READY" if report.ready else "NOT READY"
    m = report.model
    lines = [
        f"# kdeploy: {verdict} for `{report.target['name']}`",
        "",
        f"- Model: `{Path(m.path).name}` ({m.format}, {m.params:,} params, sha256 `{m.sha256[:12]}`)" if m.params else f"- Model: `{Path(m.path).name}` ({m.format})",
        f"- Selected: **{report.selected}**" if report.selected else "- Selected: none (no candidate passed every check)",
        f"- Data: {report.data['source']} ({report.data['calibration_samples']} calibration / {report.data['validation_samples']} validation samples)",
        f"- Host: {report.host.get('cpu', '?')}, {report.host.get('cores', '?')} cores",
        "",
        "| candidate | size | gzip | top-1 vs Keras | cosine min | max abs err | p50 | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in candidate_rows(report):
        name = f"**{r['name']}** (selected)" if r["selected"] else r["name"]
        verdict_cell = "pass" if r["passed"] else f"FAIL: {r['why']}"
        lines.append(f"| {name} | {r['size']} | {r['gzip']} | {r['top1']} | {r['cosine']} | {r['max_abs']} | {r['p50']} | {verdict_cell} |")
    if report.selection.get("reasons"):
        lines += ["", "## Selection", "", f"Objective: {report.selection.get('objective')}.", ""]
        lines += [f"- `{k}`: {v}" for k, v in report.selection["reasons"].items()]
    failed = [(c.name, k) for c in report.candidates for k in c.checks if not k.passed]
    if failed:
        lines += ["", "## Failed checks", ""]
        lines += [f"- `{n}` {k.name}: {k.detail or f'{k.value} (limit {k.limit})'}" for n, k in failed[:40]]
    if report.findings:
        lines += ["", "## Findings", ""]
        lines += [f"- **{f.severity}** `{f.code}`: {f.message}" for f in report.findings]
    return "\n".join(lines) + "\n"
