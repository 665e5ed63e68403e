"""bench/real.py's reading of kdeploy reports: one row's lines (candidates, output pairing, full int8 and the
repair ladder, a deliberately broken artifact's verdict) and the Markdown table. JSON in, text out."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v[:4]) + ("…" if len(v) > 4 else "") + "]"
    return str(v)


def candidate_line(c: dict) -> str:
    """`name: pass [litert+onnxruntime]` or `name: FAIL (check=value>limit; error...) [runtimes]`."""
    runtimes = sorted({f["runtime"] for f in c.get("fidelity", [])})
    routes = [a["source"] for a in c.get("artifacts", []) if a["format"] == "onnx" and a["source"] != "tf2onnx(tflite)"]
    rt = f" [{'+'.join(runtimes) or 'no fidelity'}{'; onnx: ' + routes[0] if routes else ''}]"
    where = []  # where the failure was located (issue 18: first non-finite op, first divergent layer, crash site)
    if c.get("first_non_finite"):
        f = c["first_non_finite"]
        where.append(f"NaN/Inf from {f.get('op')} node {f.get('node')} '{f.get('node_name')}' (layer {f.get('layer')})")
    if c.get("first_divergence"):
        f = c["first_divergence"]
        where.append(f"diverges first at {f.get('layer')} ({f.get('op') or '-'}; {f.get('detail') or f.get('max_abs_err')})")
    for f in c.get("crash_sites") or []:
        where.append(f"{f.get('runtime')} crash at {f.get('op')} node {f.get('node')} '{f.get('node_name')}' "
                     f"(layer {f.get('layer')})")
    loc = f" — {'; '.join(where)}" if where else ""
    if c["passed"]:
        return f"{c['name']}: pass{rt}{loc}"
    why = [f"{k['name']}: {' '.join(k['detail'].split())[:140]}" if k["name"].startswith("fidelity") and k.get("detail")
           else f"{k['name']}={_fmt(k['value'])} (limit {_fmt(k['limit'])})" for k in c.get("checks", []) if not k["passed"]]
    why += [" ".join(e.split())[:160] for e in c.get("errors", [])]
    return f"{c['name']}: FAIL ({'; '.join(why[:3]) or '?'}{' …' if len(why) > 3 else ''}){rt}{loc}"


def pairing_lines(rep: dict) -> list[str]:
    """How the artifact's outputs were paired with the model's, where the report says so (check runs)."""
    out = []
    for c in rep.get("candidates", []):
        for a in c.get("artifacts", []):  # schema 1.1: artifacts given to `check` say how each output was paired
            for p in a.get("pairing") or []:
                out.append(f"{p['output']} ← {p['tensor']} by {p['how']}" + (f" ({p['detail'][:80]})" if p.get("detail") else ""))
        for f in c.get("fidelity", []):
            if f.get("reference") == "keras":
                out.append(f"{c['name']}/{f['runtime']}: {f['output']} {'ok' if f['passed'] else 'FAIL'}"
                           + (f" ({f['detail'][:100]})" if f.get("detail") and not f["passed"] else ""))
    return out


def ladder_lines(rep: dict) -> tuple[str, list[str]]:
    """Full int8's verdict and the repair ladder's steps (report.json `repair`, issue 19) in user terms."""
    rp = rep.get("repair")
    if not rp:
        c = next((c for c in rep.get("candidates", []) if c["name"] == "int8"), None)
        return ("-" if c is None else f"{'pass' if c['passed'] else 'FAIL'} (no repair record)"), []
    i8 = rp["int8"]
    head = f"{'pass' if i8['passed'] else 'FAIL'} ({' '.join((i8.get('detail') or '').split())[:150]}; {i8['seconds']:.1f} s)"
    steps = []
    for s in rp.get("steps", []):
        res = ("pass" if s["passed"] else "FAIL") if s["tried"] else "not tried"
        cost = [f"{s['seconds']:.1f} s"] if s.get("seconds") is not None and s["tried"] else []
        if s.get("conversions"):
            cost.append(f"{s['conversions']} conversion(s)")
        if s.get("size_bytes"):
            cost.append(f"{s['size_bytes'] / 1e3:.0f} kB")
        lat = s.get("latency") or {}
        if lat.get("p50_ms") is not None:
            cost.append(f"p50 {lat['p50_ms']:.3g} ms (int8 {_fmt(lat.get('int8_p50_ms'))}, fp32 {_fmt(lat.get('fp32_p50_ms'))})")
        if "evaluation_passed" in s:
            cost.append(f"evaluation {'pass' if s['evaluation_passed'] else 'FAIL'}")
        detail = " ".join((s.get("detail") or "").split())[:160]
        steps.append(f"{s['step']} ({s['recipe']}): {res}{' — ' + detail if detail else ''}"
                     f"{' [' + ', '.join(cost) + ']' if cost else ''}")
    steps.append(f"repaired by {rp['repaired_by']}" if rp.get("repaired_by") else
                 ("not repaired" if not i8["passed"] else "ladder not run (full int8 passes)"))
    if rp.get("seconds") is not None and not i8["passed"]:
        steps[-1] += f" (ladder {rp['seconds']:.1f} s)"
    return head, steps


def broken_verdict(out: Path, code, outputs: tuple[str, ...]) -> str:
    """A deliberately broken artifact: exit 1 with fidelity failing on `outputs` (on some runtime)."""
    report = out / "report.json"
    rep = json.loads(report.read_text()) if report.is_file() else {}
    failing = sorted({f["output"] for c in rep.get("candidates", []) for f in c.get("fidelity", [])
                      if f["reference"] == "keras" and not f["passed"]})
    ok = code == 1 and set(outputs) <= set(failing)
    return (f"{'as expected' if ok else 'UNEXPECTED'}: exit {code}, fidelity fails on {', '.join(failing) or 'nothing'}"
            f" (must: {', '.join(outputs)})")


def table(rows: list[dict]) -> str:
    out = ["| run | exit | verdict | selected | full int8 (policy verdict) | repair ladder: step (candidate): result "
           "[cost] | candidates: result and why [runtimes compared] | independent check: LiteRT vs Keras/TF, all "
           "samples [kdeploy's LiteRT figure] | wall s | peak MB |", "|" + "---|" * 10]

    def cell(lines) -> str:
        return ("<br>".join(lines) if isinstance(lines, list) else str(lines or "-")).replace("|", "\\|") or "-"

    for r in rows:
        cands = r.get("candidates") or r.get("why") or (r.get("failure") or {}).get("message", "-")
        checked = r.get("verify") or ([r["expected"]] if r.get("expected") else "-")
        out.append(f"| {r['run']} | {r['exit']} | {r.get('verdict', '-')} | {r.get('selected') or '-'} | "
                   f"{cell(r.get('int8'))} | {cell(r.get('ladder'))} | {cell(cands)} | {cell(checked)} | "
                   f"{r.get('wall_s', '-')} | {r.get('peak_mb', '-')} |")
    text = "\n".join(out) + "\n"
    extra = [r for r in rows if r.get("pairing") or r.get("findings")]
    if extra:
        text += "\n## Output pairing (check) and warnings/errors found\n\n"
        for r in extra:
            text += f"- **{r['run']}**: " + "<br>".join(r.get("pairing", []) + r.get("findings", [])) + "\n"
    fails = [r for r in rows if r.get("failure") and r["exit"] not in (0, 1)]
    if fails:
        text += "\n## Errors (no verdict)\n"
        for r in fails:
            f = r["failure"]
            text += f"\n### {r['run']} (exit {r['exit']})\n\n`{r.get('command', '')}`\n\n{f['message']}\n"
            if f.get("traceback"):
                text += f"\n```\n{f['traceback']}\n```\n"
    return text
