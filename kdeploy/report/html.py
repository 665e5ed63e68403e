"""Self-contained HTML report: the verdict, the candidate table and inline SVG plots.

One file, no network: no scripts, no external CSS, fonts or images (a Content-Security-Policy
meta tag makes the browser refuse any load). Plots are SVG drawn here from the report's figures:
latency per candidate and runtime (p50 / p90 / p99), size raw vs gzip, a latency–size chart with
the Pareto front and the selected candidate, and the error of each output against Keras.
"""

from __future__ import annotations

import json
from typing import Any

from kdeploy.artifacts import GZIP_LEVEL
from kdeploy.report.figures import (
    as_dict,
    budget_latency_ms,
    fidelity_label,
    fidelity_summary,
    fmt_bytes,
    fmt_ms,
    fmt_value,
    latency_percentile,
    primary_artifact,
    primary_runtime,
)
from kdeploy.report.plots import (
    error_plot,
    latency_plot,
    pareto_plot,
    sensitivity_plot,
    size_plot,
)
from kdeploy.report.plots import escape_html as _e

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac",
           "#e15759")

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
# Report fields rendered by their own section; any other top-level field is shown generically.
KNOWN = {"schema_version", "tool", "ready", "selected", "selection", "model", "target", "host", "data",
         "reference_artifacts", "candidates", "findings", "command", "seed", "duration_s"}
KNOWN_CANDIDATE = {"name", "recipe", "passed", "artifacts", "fidelity", "latency", "cold", "memory", "checks",
                   "errors", "sensitivity"}  # sensitivity: its own plot

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.verdict{border-radius:10px;padding:18px 22px;color:#fff;margin-bottom:16px}
.verdict.ready{background:#2e7d32} .verdict.not-ready{background:#c62828}
.verdict p{margin:4px 0 0;font-size:15px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:8px 18px;background:#fff;
 border:1px solid #dde1e6;border-radius:8px;padding:12px 16px}
.facts div span{color:#5b6670;display:block;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e6}
th,td{padding:6px 9px;border-bottom:1px solid #eceff2;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.selected td{background:#eaf5ea;font-weight:600}
.pass{color:#2e7d32;font-weight:600} .fail{color:#c62828;font-weight:600}
figure{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:14px 0;padding:12px}
figcaption{color:#44505b;margin-bottom:6px} svg{display:block;max-width:100%;height:auto}
.sev-error{color:#c62828;font-weight:600} .sev-warning{color:#b26a00;font-weight:600} .sev-info{color:#5b6670}
pre{background:#fff;border:1px solid #dde1e6;padding:10px;overflow:auto;font-size:12px}
details{margin:6px 0} summary{cursor:pointer;color:#34495e}
footer{color:#5b6670;font-size:12px;margin-top:28px}
code{font-size:12.5px}
"""


# ----------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------
def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _value_html(v: Any) -> str:
    if isinstance(v, dict):
        if all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) <= 12:
            return _e(fmt_value(v))
        return f"<pre>{_e(json.dumps(v, indent=2, default=str))}</pre>"
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v):
            return _e(", ".join(fmt_value(x) for x in v))
        if all(isinstance(x, dict) and not any(isinstance(y, (dict, list)) for y in x.values()) for x in v):
            keys = list(dict.fromkeys(k for x in v for k in x))
            head = "".join(f"<th>{_e(k)}</th>" for k in keys)
            body = "".join("<tr>" + "".join(f"<td>{_e(fmt_value(x.get(k)))}</td>" for k in keys) + "</tr>" for x in v)
            return f"<table><tr>{head}</tr>{body}</table>"
        return f"<pre>{_e(json.dumps(v, indent=2, default=str))}</pre>"
    return _e(fmt_value(v))


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _candidate_table(rd: dict) -> str:
    pct = latency_percentile(rd)
    rt = primary_runtime(rd)
    head = ("candidate", "recipe", f"size ({rt})", "gzip", "top-1", "cosine min", "max abs err", f"{pct} latency",
            "checks", "verdict")
    out = ["<table id=\"candidates\"><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for c in rd.get("candidates") or []:
        art = primary_artifact(rd, c)
        s = fidelity_summary(c, rt)
        lat = budget_latency_ms(rd, c)
        checks = c.get("checks") or []
        npass = sum(1 for k in checks if k.get("passed"))
        failed = [k.get("name", "?") for k in checks if not k.get("passed")] + list(c.get("errors") or [])
        sel = c["name"] == rd.get("selected")
        recipe = ", ".join(f"{k}={v}" for k, v in (c.get("recipe") or {}).items() if k != "precision" and
                           not isinstance(v, (dict, list)))
        verdict = ('<span class="pass">pass</span>' if c.get("passed") else
                   '<span class="fail">fail</span> ' + _e("; ".join(failed[:4]) + (" …" if len(failed) > 4 else "")))
        cells = [
            _e(c["name"]) + (" ★ selected" if sel else ""),
            _e(((c.get("recipe") or {}).get("precision") or "") + (f" ({recipe})" if recipe else "")),
            f'<td class="num">{_e(fmt_bytes(art.get("size_bytes")) if art else "-")}',
            f'<td class="num">{_e(fmt_bytes(art.get("gzip_bytes")) if art else "-")}',
            f'<td class="num">{_num(s["top1_agreement"], ".4f")}',
            f'<td class="num">{_num(s["cosine_min"], ".6f")}',
            f'<td class="num">{_num(s["max_abs_err"], ".2e")}',
            f'<td class="num">{_e(fmt_ms(lat))}',
            f'<td class="num">{npass}/{len(checks)}',
            verdict,
        ]
        row = "".join(x + "</td>" if x.startswith("<td") else f"<td>{x}</td>" for x in cells)
        out.append(f'<tr class="{"selected" if sel else ""}">{row}</tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _checks_section(rd: dict) -> str:
    parts = []
    for c in rd.get("candidates") or []:
        checks = c.get("checks") or []
        failed = [k for k in checks if not k.get("passed")]
        rows = "".join(
            f'<tr><td>{_e(k.get("name"))}</td><td class="num">{_e(fmt_value(k.get("value")))}</td>'
            f'<td class="num">{_e(fmt_value(k.get("limit")))}</td>'
            f'<td>{"<span class=pass>pass</span>" if k.get("passed") else "<span class=fail>FAIL</span>"}</td>'
            f'<td>{_e(k.get("detail") or "")}</td></tr>' for k in checks)
        errors = "".join(f"<li>{_e(e)}</li>" for e in c.get("errors") or [])
        extra = {k: v for k, v in c.items() if k not in KNOWN_CANDIDATE and v not in (None, {}, [])}
        body = (f"<table><tr><th>check</th><th>value</th><th>limit</th><th>verdict</th><th>detail</th></tr>{rows}</table>"
                + (f"<p>Errors:</p><ul>{errors}</ul>" if errors else "")
                + (_kv_table(extra) if extra else ""))
        summary = f"{c['name']}: {len(checks) - len(failed)}/{len(checks)} checks pass"
        parts.append(f"<details{' open' if failed else ''}><summary>{_e(summary)}</summary>{body}</details>")
    return "".join(parts)


def render(report: Any) -> str:
    """Renders a report (a `Report` or its dict form) as one self-contained HTML page.

    Args:
        report: the `Report`, or the dict read from a `report.json`.

    Returns:
        The HTML text (UTF-8), with inline CSS and inline SVG plots, no scripts.
    """
    rd = as_dict(report)
    cands = rd.get("candidates") or []
    colors = {c["name"]: PALETTE[i % len(PALETTE)] for i, c in enumerate(cands)}
    target = rd.get("target") or {}
    model = rd.get("model") or {}
    ready = bool(rd.get("ready"))
    selected = rd.get("selected")
    tname = target.get("name", "?")
    mname = str(model.get("path", "?")).replace("\\", "/").rsplit("/", 1)[-1]
    pct = latency_percentile(rd)
    sel = next((c for c in cands if c["name"] == selected), None)
    if sel is not None:
        art = primary_artifact(rd, sel)
        figs = (f"{fmt_bytes(art.get('size_bytes')) if art else '-'} ({fmt_bytes(art.get('gzip_bytes')) if art else '-'}"
                f" gzip) · {pct} {fmt_ms(budget_latency_ms(rd, sel))} · {fidelity_label(sel, primary_runtime(rd))} vs Keras")
        line = f"Selected <strong>{_e(selected)}</strong> — {_e(figs)}"
    else:
        nfail = sum(1 for c in cands if not c.get("passed"))
        line = f"No candidate passed every check ({nfail} of {len(cands)} failed)."
    data = rd.get("data") or {}
    host = rd.get("host") or {}
    facts = {
        "model": f"{mname} ({model.get('format', '?')}, "
                 f"{model['params']:,} params)" if model.get("params") else f"{mname} ({model.get('format', '?')})",
        "model sha256": str(model.get("sha256", "?"))[:16] + "…",
        "target": f"{tname} — runtimes {', '.join(target.get('runtimes') or [])}; objective {target.get('objective', '?')}",
        "budgets": fmt_value({k: v for k, v in (target.get("budgets") or {}).items() if v is not None}) or "none",
        "data": f"{data.get('source', '?')} ({data.get('calibration_samples', '?')} calibration / "
                f"{data.get('validation_samples', '?')} validation)" + (" — SYNTHETIC" if data.get("synthetic") else ""),
        "host": f"{host.get('cpu', '?')}, {host.get('cores', '?')} cores, {host.get('os', '?')}",
        "run": f"kdeploy {(rd.get('tool') or {}).get('version', '?')}, {rd.get('duration_s', '?')} s, seed {rd.get('seed', '?')}",
    }
    reasons = (rd.get("selection") or {}).get("reasons") or {}
    findings = rd.get("findings") or []
    extra = {k: v for k, v in rd.items() if k not in KNOWN and v not in (None, {}, [])}
    title = f"kdeploy: {'READY' if ready else 'NOT READY'} — {mname} → {tname}"
    html = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f'<section id="verdict" class="verdict {"ready" if ready else "not-ready"}">'
        f"<h1>{'READY' if ready else 'NOT READY'} for {_e(tname)}</h1><p>{_e(mname)}: {line}</p></section>",
        '<section class="facts">' + "".join(f"<div><span>{_e(k)}</span>{_e(v)}</div>" for k, v in facts.items())
        + "</section>",
        "<h2>Candidates</h2>",
        _candidate_table(rd),
        "<h2>Latency</h2>",
        f"<figure><figcaption>Per candidate, runtime, thread count and batch: box from p50 to p90, whisker to p99, "
        f"◆ mean. The budget applies to {pct} on {_e(primary_runtime(rd) or '?')}.</figcaption>"
        f"{latency_plot(rd, colors)}</figure>",
        "<h2>Size</h2>",
        f"<figure><figcaption>Every artifact of every candidate: raw file size and gzip -{GZIP_LEVEL} size.</figcaption>"
        f"{size_plot(rd, colors)}</figure>",
        "<h2>Latency, size and fidelity</h2>",
        f"<figure><figcaption>Deployable artifact of each candidate. Down and left is better; the dashed line is the "
        f"Pareto front of passing candidates; the label gives the worst fidelity against Keras."
        f"</figcaption>{pareto_plot(rd, colors)}</figure>",
        "<h2>Error per output</h2>",
        f"<figure><figcaption>Each comparison the gate made (green outline: within tolerance; red: not)."
        f"</figcaption>{error_plot(rd, colors)}</figure>",
        "<h2>Error per layer</h2>",
        f"<figure><figcaption>Where quantization breaks: per Keras layer of failing quantized candidates (and the "
        f"selected one), the error of the layer's output against the float model.</figcaption>"
        f"{sensitivity_plot(rd, colors)}</figure>",
    ]
    if reasons:
        html.append("<h2>Selection</h2><ul>" + "".join(f"<li><code>{_e(k)}</code>: {_e(v)}</li>"
                                                       for k, v in reasons.items()) + "</ul>")
    html.append("<h2>Checks</h2>" + _checks_section(rd))
    if findings:
        html.append("<h2>Findings</h2><ul>" + "".join(
            f'<li><span class="sev-{_e(f.get("severity"))}">{_e(f.get("severity"))}</span> '
            f'<code>{_e(f.get("code"))}</code>: {_e(f.get("message"))}</li>' for f in findings) + "</ul>")
    for k, v in extra.items():
        html.append(f"<h2>{_e(k.replace('_', ' ').capitalize())}</h2>" + _value_html(v if isinstance(v, (dict, list))
                                                                                   else {k: v}))
    html.append(f"<footer>schema {_e(rd.get('schema_version', '?'))} · command: <code>"
                f"{_e(' '.join(rd.get('command') or []))}</code></footer></main></body></html>")
    return "\n".join(html) + "\n"
