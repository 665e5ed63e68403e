"""Report renderings, one registry line per format: JSON, Markdown, HTML, JUnit XML."""

from __future__ import annotations

import os
from pathlib import Path


def _html(report) -> str:
    from kdeploy.report.html import render

    return render(report)


def _junit(report) -> str:
    from kdeploy.report.junit import render

    return render(report)


def _writers() -> dict:
    # format -> (file name, renderer). One line per format.
    return {
        "json": ("report.json", lambda r: r.to_json() + "\n"),
        "md": ("report.md", markdown),
        "html": ("report.html", _html),
        "junit": ("report.junit.xml", _junit),
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


def candidate_rows(report) -> list[dict]:
    """One summary row per candidate, shared by the console table and Markdown."""
    from kdeploy.report.figures import budget_row, deployed_artifact

    rt = report.target["runtimes"][0]
    pct = report.target["budgets"]["latency_percentile"]
    rows = []
    for c in report.candidates:
        art = deployed_artifact(c.artifacts, rt)
        top1 = [f.top1_agreement for f in c.fidelity if f.reference == "keras" and f.top1_agreement is not None]
        cos = [f.cosine_min for f in c.fidelity if f.reference == "keras" and f.cosine_min is not None]
        errs = [f.max_abs_err for f in c.fidelity if f.reference == "keras" and f.max_abs_err is not None]
        lat = budget_row(c.latency, rt, pct)
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
    """Concise Markdown for a pull request or a CI job summary: verdict, table, what failed.

    Selection reasons and informational findings are folded into `<details>` blocks.
    """
    from kdeploy.report.figures import fmt_value

    verdict = "READY" if report.ready else "NOT READY"
    m = report.model
    name = Path(m.path).name
    facts = f"`{name}` ({m.format}" + (f", {m.params:,} params" if m.params else "") + f", sha256 `{m.sha256[:12]}`)"
    data = report.data or {}
    lines = [
        f"# kdeploy: {verdict} for `{report.target['name']}`",
        "",
        (f"Selected **{report.selected}** for {facts}." if report.selected else
         f"No candidate passed every check for {facts}."),
        f"Data: {data.get('source', '?')} ({data.get('calibration_samples', '?')} calibration / "
        f"{data.get('validation_samples', '?')} validation samples"
        + (", **synthetic**" if data.get("synthetic") else "") + f"); host: {report.host.get('cpu', '?')}, "
        f"{report.host.get('cores', '?')} cores.",
        "",
        "| candidate | size | gzip | top-1 vs Keras | cosine min | max abs err | p50 | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in candidate_rows(report):
        cell = f"**{r['name']}** ★" if r["selected"] else r["name"]
        verdict_cell = "pass" if r["passed"] else f"FAIL: {r['why']}"
        lines.append(f"| {cell} | {r['size']} | {r['gzip']} | {r['top1']} | {r['cosine']} | {r['max_abs']} | {r['p50']} "
                     f"| {_md_cell(verdict_cell)} |")
    if report.selected:
        lines += _selected_details(report.candidate(report.selected))
    compressed = [c for c in report.candidates if c.optimization and (c.optimization.get("tflite") or {})]
    if compressed:
        lines += ["", "**Pruning / clustering** (counted in the exported .tflite)", "",
                  "| candidate | sparsity | max unique values per tensor | gzip | passed |", "|---|---|---|---|---|"]
        for c in compressed:
            t = c.optimization["tflite"]
            gz = min((a.gzip_bytes for a in c.artifacts if a.format == "tflite"), default=None)
            lines.append(f"| {c.name} | {t.get('sparsity', 0):.3f} | {t.get('unique_max', '-')} | {_size(gz)} | "
                         f"{'yes' if c.passed else 'no'} |")
    lines += _why_not(report)
    failed = [(c.name, k) for c in report.candidates for k in c.checks if not k.passed]
    if failed:
        lines += ["", "**Failed checks**", ""]
        lines += [f"- `{n}` {k.name}: {fmt_value(k.value)} vs limit {fmt_value(k.limit)}"
                  + (f" ({k.detail})" if k.detail else "") for n, k in failed[:12]]
        if len(failed) > 12:
            lines.append(f"- … and {len(failed) - 12} more (see report.json)")
    serious = [f for f in report.findings if f.severity in ("error", "warning")]
    if serious:
        lines += ["", "**Findings**", ""]
        lines += [f"- **{f.severity}** `{f.code}`: {f.message}" for f in serious]
    reasons = report.selection.get("reasons") or {}
    if reasons:
        lines += ["", "<details><summary>Why this candidate</summary>", "",
                  f"Objective: {report.selection.get('objective')}.", ""]
        lines += [f"- `{k}`: {v}" for k, v in reasons.items()]
        lines += ["", "</details>"]
    info = [f for f in report.findings if f.severity not in ("error", "warning")]
    if info:
        lines += ["", "<details><summary>Notes</summary>", ""]
        lines += [f"- `{f.code}`: {f.message}" for f in info]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _why_not(report) -> list[str]:
    """Selective int8 (float layers, cost) and the worst layers of failing quantized candidates."""
    out = []
    for c in report.candidates:
        if c.recipe.get("float_layers"):
            cost = c.recipe.get("cost") or {}
            out += ["", f"**`{c.name}`** keeps {', '.join(f'`{x}`' for x in c.recipe['float_layers'])} in float: "
                    f"{c.recipe.get('why', '')}"]
            out += [f"- vs `{k}`: {v}" for k, v in cost.items()]
        if not c.passed and c.sensitivity:
            worst = [r for r in c.sensitivity if r["metric"] == "cosine_mean"][:3]
            out += ["", f"**`{c.name}` worst layers** (int8 vs float output cosine): "
                    + ", ".join(f"`{r['layer']}` ({r['op']}) {r['value']:.3f}" for r in worst)]
        if c.first_divergence:
            d = c.first_divergence
            out += ["", f"**`{c.name}` first diverging layer**: `{d['layer']}` (max abs err {d['max_abs_err']:.3g}, "
                        f"tolerance {d['tolerance']:.3g})"]
    return out


def _selected_details(c) -> list[str]:
    """Compute, estimate, memory, cold start and robustness of the selected candidate, in a few lines."""
    out = ["", f"**Selected `{c.name}`**", ""]
    comp = c.compute or {}
    if comp.get("macs") is not None:
        out.append(f"- Compute: {comp['macs']:,} MACs per inference ({comp.get('source', '?')})")
    est = c.estimate or {}
    if est.get("latency_ms_lower_bound") is not None:
        host = est.get("host_measurement") or {}
        out.append(f"- Estimate on {est.get('device', 'the device')}: ≥ {est['latency_ms_lower_bound']:.4g} ms "
                   f"({est.get('bound_by', '?')}-bound lower bound, not a measurement)"
                   + (f"; measured on {host.get('measured_on', 'this host')}: p50 {host['p50_ms']:.4g} ms"
                      if host.get("p50_ms") is not None else ""))
    for rt, mem in (c.memory or {}).items():
        peak = mem.get("load_and_infer_mb")
        arena = mem.get("arena_bytes")
        text = f"- Memory on {rt}: " + (f"{peak:.1f} MiB load + inference" if peak is not None else "")
        out.append(text + (f", arena {int(arena):,} bytes" if arena else ""))
    for rt, cold in (c.cold or {}).items():
        if "load_ms" in cold:
            out.append(f"- Cold start on {rt}: load {cold['load_ms']:.1f} ms, first inference "
                       f"{cold.get('first_inference_ms', float('nan')):.2f} ms")
    if c.robustness:
        parts = []
        for r in c.robustness:
            agree = f"top-1 {r.top1_agreement:.3f}" if r.top1_agreement is not None else (
                f"cosine {r.cosine_mean:.4f}" if r.cosine_mean is not None else "-")
            verdict = "" if r.passed is None else (" ok" if r.passed else " FAILED")
            parts.append(f"{r.probe} ({r.runtime}, {r.output}): {agree}{verdict}")
        out.append("- Robustness vs Keras: " + "; ".join(parts))
    return out if len(out) > 3 else []


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def append_step_summary(report, environ=None) -> Path | None:
    """Appends the Markdown report to `$GITHUB_STEP_SUMMARY` when that variable is set.

    Returns:
        The summary file written to, or None when the variable is unset.
    """
    env = os.environ if environ is None else environ
    path = env.get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown(report) + "\n")
    return Path(path)
