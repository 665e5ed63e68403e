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
    """One summary row per candidate, shared by the console table and Markdown.

    top1/cosine/max_abs are the deployed runtime's figures against Keras (the verdict's); `cross`
    gives each cross-check runtime's decisive figure apart, never in the deployed columns.
    """
    from kdeploy.report.figures import budget_row, deployed_artifact

    rt = report.target["runtimes"][0]
    pct = report.target["budgets"]["latency_percentile"]
    rows = []
    for c in report.candidates:
        art = deployed_artifact(c.artifacts, rt)
        mine = [f for f in c.fidelity if f.reference == "keras" and f.runtime == rt]
        top1 = [f.top1_agreement for f in mine if f.top1_agreement is not None]
        cos = [f.cosine_min for f in mine if f.cosine_min is not None]
        errs = [f.max_abs_err for f in mine if f.max_abs_err is not None]
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
            "cross": _cross_cell(c, rt),
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
    rt = report.target["runtimes"][0]
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
        f"| candidate | size | gzip | top-1 vs Keras ({rt}) | cosine min ({rt}) | max abs err ({rt}) | "
        "cross-checks vs Keras | p50 | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in candidate_rows(report):
        cell = f"**{r['name']}** ★" if r["selected"] else r["name"]
        verdict_cell = "pass" if r["passed"] else f"FAIL: {r['why']}"
        lines.append(f"| {cell} | {r['size']} | {r['gzip']} | {r['top1']} | {r['cosine']} | {r['max_abs']} | "
                     f"{_md_cell(r['cross'])} | {r['p50']} | {_md_cell(verdict_cell)} |")
    failing = [c for c in report.candidates if not c.passed]
    if failing:
        lines += ["", "**Why candidates fail**", ""]
        lines += [f"- `{c.name}`: {_md_cell(failure_line(c, report))}" for c in failing]
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
    lines += _pairings(report)
    lines += _consistency(report)
    lines += _ladder(report)
    why = _why_not(report)
    if why:  # search logs and per-layer diagnosis: long, folded
        lines += ["", "<details><summary>Repair and diagnosis</summary>", *why, "", "</details>"]
    failed = [(c.name, k) for c in report.candidates for k in c.checks if not k.passed]
    if failed:
        lines += ["", f"<details><summary>Failed checks ({len(failed)})</summary>", ""]
        lines += [f"- `{n}` {k.name}: {fmt_value(k.value)} vs limit {fmt_value(k.limit)}"
                  + (f" ({k.detail})" if k.detail else "") for n, k in failed[:12]]
        if len(failed) > 12:
            lines.append(f"- … and {len(failed) - 12} more (see report.json)")
        lines += ["", "</details>"]
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


def _cross_cell(c, deployed: str) -> str:
    """Each cross-check runtime's worst decisive figure against Keras (decisions, else cosine), for the table."""
    parts = []
    for rt in dict.fromkeys(f.runtime for f in c.fidelity if f.reference == "keras" and f.runtime != deployed):
        rows = [f for f in c.fidelity if f.reference == "keras" and f.runtime == rt]
        dec = [f.decision_agreement for f in rows if f.decision_agreement is not None]
        cos = [f.cosine_min for f in rows if f.cosine_min is not None]
        parts.append(f"{rt}: top-1 {min(dec):.4f}" if dec else f"{rt}: cos {min(cos):.6f}" if cos else f"{rt}: -")
    return "; ".join(parts) or "-"


def failure_line(c, report) -> str:
    """Why a candidate fails, in user terms: its first failed checks (their summaries), or its error."""
    from kdeploy.report.figures import fmt_bytes, fmt_value

    pct = report.target["budgets"]["latency_percentile"]
    reasons = []
    for k in c.checks:
        if k.passed:
            continue
        if k.summary:
            reasons.append(k.summary)
        elif k.name in ("size_bytes", "gzip_bytes") and k.value is not None:
            reasons.append(f"{'artifact' if k.name == 'size_bytes' else 'gzipped artifact'} is {fmt_bytes(k.value)}, "
                           f"over the {fmt_bytes(k.limit)} budget")
        elif k.name.startswith("latency_") and k.value is not None:
            reasons.append(f"{pct} latency {k.value:.4g} ms on this host, over the {k.limit:g} ms budget")
        elif k.name == "memory_mb" and k.value is not None:
            reasons.append(f"uses {k.value:.1f} MiB, over the {k.limit:g} MiB budget")
        elif k.name == "arena_bytes" and k.value is not None:
            reasons.append(f"needs a {fmt_bytes(k.value)} tensor arena, over the {fmt_bytes(k.limit)} budget")
        elif k.value is None and k.detail:
            reasons.append(f"{k.name}: {k.detail.split('; ')[0]}")
        else:
            reasons.append(f"{k.name} {fmt_value(k.value)} vs limit {fmt_value(k.limit)}")
    reasons = list(dict.fromkeys(reasons))
    text = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
    return text or (c.errors[0] if c.errors else "failed")


def _consistency(report) -> list[str]:
    """Agreement between runtimes on each candidate's artifact (its own section, folded; gating ones say so)."""
    rows = [(c, r) for c in report.candidates for r in c.consistency]
    if not rows:
        return []
    bad = sum(1 for _, r in rows if not r.passed)
    out = ["", f"<details><summary>Consistency across runtimes ({len(rows)} compared, {bad} disagree)</summary>", ""]
    for c, r in rows:
        f = r.figures
        fig = (f"top-1 {f['decision_agreement']:.4f}, " if f.get("decision_agreement") is not None else "") + \
            (f"peak err {f['peak_err']:.2g}, cos min {f['cosine_min']:.6f}" if f.get("peak_err") is not None and
             f.get("cosine_min") is not None else "no figures")
        verdict = ("agree" if r.passed else "disagree: " + (r.summary or r.detail)) + \
            ("" if r.gates else " (not gating: quantized, [consistency] gate_quantized = false)" if not r.passed else "")
        out.append(f"- `{c.name}` {r.runtime_b} vs {r.runtime_a} [{r.output}]: {fig}; {_md_cell(verdict)}")
    return out + ["", "</details>"]


def _ladder(report) -> list[str]:
    """The int8 repair ladder, folded: full int8's verdict, then each step (tried or why not) with its cost."""
    rec = getattr(report, "repair", None)
    if not rec or not rec.get("steps"):
        return []
    end = f"repaired by `{rec['repaired_by']}`" if rec.get("repaired_by") else "not repaired"
    out = ["", f"<details><summary>int8 repair ladder: full int8 fails on {', '.join(rec.get('runtimes', []))}; "
               f"{end} ({rec.get('seconds', 0):.1f} s)</summary>", "",
           f"Full int8: {_md_cell(rec['int8']['detail'])}", "",
           "| step | candidate | result | seconds | conversions | size | p50 vs int8 / fp32 | evaluation |",
           "|---|---|---|---|---|---|---|---|"]
    for s in rec["steps"]:
        lat = s.get("latency") or {}
        cost = "-" if lat.get("p50_ms") is None else f"{lat['p50_ms']:.4g} ms vs " + " / ".join(
            "-" if lat.get(k) is None else f"{lat[k]:.4g}" for k in ("int8_p50_ms", "fp32_p50_ms"))
        result = ("passes" if s["passed"] else "fails") if s["tried"] else s.get("detail", "not tried")
        ev = {True: "pass", False: "FAIL", None: "-"}[s.get("evaluation_passed")]
        out.append(f"| {s['step']} | `{s['recipe']}` | {_md_cell(result)} | "
                   f"{'-' if s.get('seconds') is None else format(s['seconds'], '.1f')} | "
                   f"{s.get('conversions') if s.get('conversions') is not None else '-'} | {_size(s.get('size_bytes'))} "
                   f"| {cost} | {ev} |")
    out += [""] + [f"- {s['step']}: {_md_cell(s.get('detail', ''))}" for s in rec["steps"] if s["tried"]]
    return out + ["", "</details>"]


def _pairings(report) -> list[str]:
    """How `check` paired each model output with an artifact's (by output-map, name, shape or values)."""
    out = []
    for c in report.candidates:
        for a in c.artifacts:
            if not a.pairing:
                continue
            pairs = "; ".join(f"`{p.output}` = `{p.tensor}` ({p.how}" + (f": {p.detail}" if p.detail else "") + ")"
                              for p in a.pairing)
            out += ["", f"**`{c.name}` outputs paired**: {_md_cell(pairs)}"]
    return out


def _why_not(report) -> list[str]:
    """Selective int8 (float layers, cost) and the worst layers of failing quantized candidates."""
    out = []
    for c in report.candidates:
        if c.recipe.get("float_layers") or c.recipe.get("float_nodes"):
            cost = c.recipe.get("cost") or {}
            kept = [*c.recipe.get("float_layers", []), *c.recipe.get("float_scopes", [])]
            kept += [] if c.recipe.get("float_scopes") else c.recipe.get("float_nodes", [])  # a scope lists its nodes
            out += ["", f"**`{c.name}`** keeps {', '.join(f'`{x}`' for x in kept)} in float: "
                    f"{c.recipe.get('why', '')}"]
            out += [f"- vs `{k}`: {v}" for k, v in cost.items()]
        if not c.passed and c.sensitivity:
            worst = [r for r in c.sensitivity if r["metric"] == "cosine_mean"][:3]
            out += ["", f"**`{c.name}` worst layers** (int8 vs float output cosine): "
                    + ", ".join(f"`{r['layer']}` ({r['op']}) {r['value']:.3f}" for r in worst)]
        if c.first_divergence:
            d = c.first_divergence
            limit = (f"tolerance {d['tolerance']:.3g}" if d.get("tolerance") is not None
                     else f"{d.get('detail', '')}")
            vs = f" vs {d['reference']}" if d.get("reference") else ""
            out += ["", f"**`{c.name}` first diverging layer**{vs}: `{d['layer']}`"
                        + (f" ({d['op']})" if d.get("op") else "")
                        + (f" (max abs err {d['max_abs_err']:.3g}, {limit})" if d.get("max_abs_err") is not None
                           else f" ({limit or 'NaN/Inf'})")]
        if c.first_non_finite:
            n = c.first_non_finite
            ref = "" if n.get("reference_count") is None else f"; the fp32 .tflite has {n['reference_count']:,} there"
            out += ["", f"**`{c.name}` NaN/Inf start** at node {n['node']} ({n['op']}) `{n['node_name']}`"
                        + (f", layer `{n['layer']}`" if n.get("layer") else "")
                        + f": {n['count']:,} of {n['elements']:,} values"
                        + (f" on the {n['inputs']} inputs" if n.get("inputs") else "") + ref]
        for s in c.crash_sites:
            out += ["", f"**`{c.name}` fails on {s['runtime']}** at node {s['node']} ({s['op']}) `{s['node_name']}`"
                        + (f", Keras layer `{s['layer']}`" if s.get("layer") else "")
                        + (f", fed by {', '.join(f'`{x}`' for x in s['inputs_from'])}" if s.get("inputs_from") else "")
                        + (f": {s['reason']}" if s.get("reason") else "")]
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
