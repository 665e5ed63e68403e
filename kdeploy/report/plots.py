"""Inline SVG plots of a report (dict form): latency, size, latency vs size with the Pareto front,
error per output, and the per-layer error of quantized candidates. No scripts, no external resources.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Iterable

from kdeploy.artifacts import GZIP_LEVEL
from kdeploy.profiling import pareto_front
from kdeploy.report.figures import (budget_latency_ms, fidelity_label, fmt_bytes, fmt_ms, latency_percentile,
                                    primary_artifact, primary_runtime)

PASS, FAIL = "#2e7d32", "#c62828"


# ----------------------------------------------------------------------------------------------
# SVG helpers
# ----------------------------------------------------------------------------------------------
def escape_html(v: Any) -> str:
    return escape(str(v), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _byte_ticks(lo: float, hi: float) -> list[float]:
    """Round ticks in the unit (B, KB, MB, GB) the values are shown in."""
    unit = 1.0
    while hi / unit >= 1024 and unit < 1024 ** 3:
        unit *= 1024
    return [t * unit for t in _nice_ticks(lo / unit, hi / unit)]


class _Scale:
    """Linear or log10 map from data values to pixels."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool = False):
        self.log = log
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            hi = lo + 1
        self.lo, self.hi, self.p0, self.p1 = lo, hi, p0, p1

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 10 ** self.lo))
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


class _Svg:
    def __init__(self, width: int, height: int, label: str):
        self.w, self.h, self.label, self.parts = width, height, label, []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def line(self, x1, y1, x2, y2, stroke="#888", width=1.0, dash: str | None = None) -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                 f'stroke-width="{width}"{d}/>')

    def rect(self, x, y, w, h, fill, opacity=1.0, title: str | None = None, stroke: str | None = None) -> None:
        t = f"<title>{escape_html(title)}</title>" if title else ""
        s = f' stroke="{stroke}"' if stroke else ""
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.5):.1f}" height="{h:.1f}" fill="{fill}" '
                 f'fill-opacity="{opacity}"{s}>{t}</rect>')

    def text(self, x, y, s, anchor="start", size=12, fill="#1d232a", weight="normal", rotate: float | None = None) -> None:
        r = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{fill}" '
                 f'font-weight="{weight}"{r}>{escape_html(s)}</text>')

    def circle(self, x, y, r, fill, stroke="none", width=1.0, title: str | None = None, opacity=1.0) -> None:
        t = f"<title>{escape_html(title)}</title>" if title else ""
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" fill-opacity="{opacity}" '
                 f'stroke="{stroke}" stroke-width="{width}">{t}</circle>')

    def render(self, id_: str) -> str:
        return (f'<svg id="{id_}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.w} {self.h}" '
                f'width="{self.w}" height="{self.h}" role="img" aria-label="{escape_html(self.label)}" '
                f'font-family="system-ui, sans-serif">' + "".join(self.parts) + "</svg>")


def _x_axis(svg: _Svg, scale: _Scale, y: float, ticks: Iterable[float], fmt, label: str, grid_top: float) -> None:
    svg.line(scale.p0, y, scale.p1, y, "#555")
    for t in ticks:
        x = scale(t)
        svg.line(x, grid_top, x, y, "#e3e6ea")
        svg.line(x, y, x, y + 4, "#555")
        svg.text(x, y + 17, fmt(t), anchor="middle", size=11, fill="#44505b")
    svg.text((scale.p0 + scale.p1) / 2, y + 34, label, anchor="middle", size=12, fill="#44505b")


def _empty(svg_id: str, label: str, why: str) -> str:
    svg = _Svg(640, 60, label)
    svg.text(12, 34, why, fill="#5b6670")
    return svg.render(svg_id)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def latency_plot(rd: dict, colors: dict[str, str]) -> str:
    """Horizontal box-like rows: box p50–p90, whisker to p99, diamond at the mean; budget line."""
    rows = [(c["name"], r) for c in rd.get("candidates") or [] for r in c.get("latency") or []
            if r.get("p50_ms") is not None]
    label = "Latency per candidate, runtime, threads and batch"
    if not rows:
        return _empty("plot-latency", label, "No latency was measured (no candidate ran).")
    budget = ((rd.get("target") or {}).get("budgets") or {}).get("max_latency_ms")
    top = max(max(r.get("p99_ms") or r["p50_ms"], r.get("mean_ms") or 0) for _, r in rows)
    hi = top * 1.08
    budget_on_scale = budget is not None and budget <= top * 1.5
    if budget_on_scale:
        hi = max(hi, budget * 1.05)
    left, right, row_h, head = 250, 300, 26, 16
    width = 1100
    height = head + row_h * len(rows) + 48
    svg = _Svg(width, height, label)
    sx = _Scale(0, hi, left, width - right)
    axis_y = head + row_h * len(rows) + 4
    _x_axis(svg, sx, axis_y, _nice_ticks(0, hi), lambda t: f"{t:g}", "milliseconds", head - 6)
    for i, (name, r) in enumerate(rows):
        y = head + i * row_h
        mid = y + row_h / 2
        color = colors.get(name, "#777")
        p50, p90, p99 = r["p50_ms"], r.get("p90_ms") or r["p50_ms"], r.get("p99_ms") or r["p50_ms"]
        noisy = " (noisy)" if r.get("noisy") else ""
        svg.text(left - 8, mid + 4, f"{name} · {r.get('runtime')} · {r.get('threads')}t · b{r.get('batch')}{noisy}",
                 anchor="end", size=12)
        svg.line(sx(p90), mid, sx(p99), mid, color, 1.5)
        svg.line(sx(p99), mid - 5, sx(p99), mid + 5, color, 1.5)
        svg.rect(sx(p50), mid - 7, sx(p90) - sx(p50), 14, color, 0.55, stroke=color,
                 title=f"{name} on {r.get('runtime')}, {r.get('threads')} thread(s), batch {r.get('batch')}: "
                       f"p50 {p50:.4f} ms, p90 {p90:.4f} ms, p99 {p99:.4f} ms, {r.get('samples')} samples")
        svg.line(sx(p50), mid - 8, sx(p50), mid + 8, color, 2.5)
        if r.get("mean_ms") is not None:
            mx = sx(r["mean_ms"])
            svg.add(f'<path d="M{mx:.1f} {mid - 4:.1f} L{mx + 4:.1f} {mid:.1f} L{mx:.1f} {mid + 4:.1f} '
                    f'L{mx - 4:.1f} {mid:.1f} Z" fill="#1d232a"/>')
        svg.text(width - right + 8, mid + 4, f"p50 {fmt_ms(p50)} · p90 {fmt_ms(p90)} · p99 {fmt_ms(p99)}",
                 size=11, fill="#44505b")
    if budget is not None:
        if budget_on_scale:
            bx = sx(budget)
            svg.line(bx, head - 8, bx, axis_y, FAIL, 1.5, dash="5,4")
            svg.text(bx, head - 10 + 8, f"budget {fmt_ms(budget)}", anchor="middle", size=10, fill=FAIL)
        else:
            svg.text(width - right + 8, axis_y + 17, f"budget {fmt_ms(budget)} (off scale)", size=11, fill=FAIL)
    return svg.render("plot-latency")


def size_plot(rd: dict, colors: dict[str, str]) -> str:
    """Raw and gzip size of every artifact of every candidate, with the size budget."""
    rows = [(c["name"], a) for c in rd.get("candidates") or [] for a in c.get("artifacts") or []
            if a.get("size_bytes") is not None]
    label = "Artifact size, raw and gzip, per candidate"
    if not rows:
        return _empty("plot-size", label, "No artifact was built.")
    budgets = (rd.get("target") or {}).get("budgets") or {}
    top = max(a["size_bytes"] for _, a in rows)
    hi = top * 1.08
    marks = [(k, budgets.get(k)) for k in ("max_size_bytes", "max_gzip_bytes") if budgets.get(k)]
    on_scale = [(k, v) for k, v in marks if v <= top * 1.5]
    hi = max([hi] + [v * 1.05 for _, v in on_scale])
    left, right, row_h, head, width = 250, 220, 34, 16, 1100
    height = head + row_h * len(rows) + 48
    svg = _Svg(width, height, label)
    sx = _Scale(0, hi, left, width - right)
    axis_y = head + row_h * len(rows) + 4
    _x_axis(svg, sx, axis_y, _byte_ticks(0, hi), lambda t: fmt_bytes(t), f"bytes (dark: raw file, light: gzip -{GZIP_LEVEL})",
            head - 6)
    for i, (name, a) in enumerate(rows):
        y = head + i * row_h
        color = colors.get(name, "#777")
        svg.text(left - 8, y + row_h / 2 + 4, f"{name} · {a.get('format')}", anchor="end", size=12)
        raw, gz = a["size_bytes"], a.get("gzip_bytes")
        svg.rect(sx(0), y + 5, sx(raw) - sx(0), 11, color, 1.0, title=f"{name} {a.get('format')}: {raw:,} bytes")
        if gz is not None:
            svg.rect(sx(0), y + 17, sx(gz) - sx(0), 11, color, 0.4, title=f"{name} {a.get('format')} gzip: {gz:,} bytes")
        svg.text(width - right + 8, y + row_h / 2 + 4,
                 f"{fmt_bytes(raw)} · gzip {fmt_bytes(gz)}", size=11, fill="#44505b")
    for k, v in marks:
        what = "size" if k == "max_size_bytes" else "gzip"
        if (k, v) in on_scale:
            bx = sx(v)
            svg.line(bx, head - 8, bx, axis_y, FAIL, 1.5, dash="5,4")
            svg.text(bx, head - 2, f"{what} budget {fmt_bytes(v)}", anchor="middle", size=10, fill=FAIL)
        else:
            svg.text(width - right + 8, axis_y + 17 + 13 * marks.index((k, v)),
                     f"{what} budget {fmt_bytes(v)} (off scale)", size=11, fill=FAIL)
    return svg.render("plot-size")


def _spread(points: list[tuple[float, float]], min_gap: float, near_x: float) -> list[float]:
    """Label y positions: each point's own y, pushed down where labels of nearby points would overlap."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    ys: dict[int, float] = {}
    for i in order:
        y, moved = points[i][1], True
        while moved:  # y only grows, so this ends once the label is clear of every placed one
            moved = False
            for j, yj in ys.items():
                if abs(points[j][0] - points[i][0]) < near_x and abs(yj - y) < min_gap:
                    y, moved = yj + min_gap, True
        ys[i] = y
    return [ys[i] for i in range(len(points))]


def pareto_plot(rd: dict, colors: dict[str, str]) -> str:
    """Latency at the budget percentile vs deployable size; fidelity in the labels; selected ringed."""
    pct = latency_percentile(rd)
    gzip = (rd.get("target") or {}).get("objective") == "gzip_size"
    size_key = "gzip_bytes" if gzip else "size_bytes"
    pts = []
    for c in rd.get("candidates") or []:
        art = primary_artifact(rd, c)
        lat = budget_latency_ms(rd, c)
        if art is None or lat is None or art.get(size_key) is None:
            continue
        pts.append((c, lat, art[size_key]))
    label = f"Latency {pct} vs {'gzip ' if gzip else ''}size, fidelity against Keras in the labels"
    if not pts:
        return _empty("plot-pareto", label, "No candidate has both a measured latency and a deployable artifact.")
    width, height, left, right, top_m, bottom = 1100, 440, 90, 240, 24, 58
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad = (xhi - xlo) * 0.12 or xhi * 0.1 or 1e-3
    ypad = (yhi - ylo) * 0.12 or yhi * 0.1 or 1
    xlo, xhi = max(0.0, xlo - xpad), xhi + xpad
    ylo, yhi = max(0.0, ylo - ypad), yhi + ypad
    sx = _Scale(xlo, xhi, left, width - right)
    sy = _Scale(ylo, yhi, height - bottom, top_m)
    svg = _Svg(width, height, label)
    axis_y = height - bottom
    _x_axis(svg, sx, axis_y, _nice_ticks(xlo, xhi), lambda t: f"{t:g}", f"latency {pct}, ms (first runtime, "
            f"fastest thread count)", top_m)
    svg.line(left, top_m, left, axis_y, "#555")
    for t in _byte_ticks(ylo, yhi):
        y = sy(t)
        svg.line(left, y, width - right, y, "#e3e6ea")
        svg.text(left - 6, y + 4, fmt_bytes(t), anchor="end", size=11, fill="#44505b")
    svg.text(18, (top_m + axis_y) / 2, f"{'gzip ' if gzip else ''}size", anchor="middle", size=12, fill="#44505b",
             rotate=-90)
    passing = [(c["name"], x, y) for c, x, y in pts if c.get("passed")]
    front = pareto_front({n: (x, y) for n, x, y in passing})
    fp = sorted(((x, y) for n, x, y in passing if n in front))
    if len(fp) > 1:
        d = f"M{sx(fp[0][0]):.1f} {sy(fp[0][1]):.1f}"
        for (x0, y0), (x1, y1) in zip(fp, fp[1:]):
            d += f" L{sx(x1):.1f} {sy(y0):.1f} L{sx(x1):.1f} {sy(y1):.1f}"
        svg.add(f'<path d="{d}" fill="none" stroke="#7a8793" stroke-width="1.5" stroke-dasharray="6,4"/>')
    selected = rd.get("selected")
    label_y = _spread([(sx(x), sy(y)) for _, x, y in pts], min_gap=28, near_x=170)
    for (c, x, y), ly in zip(pts, label_y):
        name, px, py = c["name"], sx(x), sy(y)
        color = colors.get(name, "#777")
        tip = (f"{name}: {pct} {x:.4f} ms, {size_key} {y:,}, {fidelity_label(c, primary_runtime(rd))}, "
               f"{'passes every check' if c.get('passed') else 'fails'}" + (", Pareto front" if name in front else ""))
        if name == selected:
            svg.circle(px, py, 14, "none", PASS, 3)
        if c.get("passed"):
            svg.circle(px, py, 7, color, "#1d232a", 1, title=tip)
        else:
            svg.add(f'<g stroke="{FAIL}" stroke-width="3"><title>{escape_html(tip)}</title>'
                    f'<line x1="{px - 6:.1f}" y1="{py - 6:.1f}" x2="{px + 6:.1f}" y2="{py + 6:.1f}"/>'
                    f'<line x1="{px - 6:.1f}" y1="{py + 6:.1f}" x2="{px + 6:.1f}" y2="{py - 6:.1f}"/></g>')
        tag = " ★ selected" if name == selected else ("" if c.get("passed") else " (fails)")
        if abs(ly - py) > 1:
            svg.line(px + 8, py, px + 15, ly, "#9aa5b1", 1)
        svg.text(px + 16, ly - 3, f"{name}{tag}", size=12, weight="bold" if name == selected else "normal")
        svg.text(px + 16, ly + 11, fidelity_label(c, primary_runtime(rd)), size=11, fill="#44505b")
    lx = width - right + 24
    svg.circle(lx, top_m + 8, 7, "#9aa5b1", "#1d232a", 1)
    svg.text(lx + 14, top_m + 12, "passes every check", size=11)
    svg.add(f'<g stroke="{FAIL}" stroke-width="3"><line x1="{lx - 6}" y1="{top_m + 22}" x2="{lx + 6}" '
            f'y2="{top_m + 34}"/><line x1="{lx - 6}" y1="{top_m + 34}" x2="{lx + 6}" y2="{top_m + 22}"/></g>')
    svg.text(lx + 14, top_m + 32, "fails a check", size=11)
    svg.circle(lx, top_m + 52, 11, "none", PASS, 3)
    svg.text(lx + 16, top_m + 56, "selected", size=11)
    svg.line(lx - 10, top_m + 76, lx + 8, top_m + 76, "#7a8793", 1.5, dash="6,4")
    svg.text(lx + 14, top_m + 80, "Pareto front (passing)", size=11)
    return svg.render("plot-pareto")


def error_plot(rd: dict, colors: dict[str, str]) -> str:
    """Error of each output relative to its range (log scale), per candidate and runtime pair."""
    tolerances = (rd.get("target") or {}).get("tolerances") or {}
    rows = []
    for c in rd.get("candidates") or []:
        for f in c.get("fidelity") or []:
            v = f.get("norm_err")
            if v is None:
                v = f.get("max_abs_err")
            if v is None:
                continue
            rows.append((c, f, float(v)))
    label = "Error per output: max abs error / output range (log scale)"
    if not rows:
        return _empty("plot-error", label, "No outputs were compared.")
    floor = 1e-9
    vals = [max(v, floor) for _, _, v in rows]
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(max(vals), 1e-2) * 1.01))
    left, right, row_h, head, width = 330, 190, 22, 16, 1100
    height = head + row_h * len(rows) + 48
    svg = _Svg(width, height, label)
    sx = _Scale(lo, hi, left, width - right, log=True)
    axis_y = head + row_h * len(rows) + 4
    ticks = [10.0 ** e for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1)]
    _x_axis(svg, sx, axis_y, ticks, lambda t: f"{t:.0e}", "max |error| / (max − min) of the reference output", head - 6)
    for i, (c, f, v) in enumerate(rows):
        y = head + i * row_h
        mid = y + row_h / 2
        color = PASS if f.get("passed") else FAIL
        svg.text(left - 8, mid + 4, f"{c['name']} · {f.get('output')} · {f.get('runtime')} vs {f.get('reference')}",
                 anchor="end", size=12)
        svg.rect(sx(lo), mid - 6, sx(max(v, floor)) - sx(lo), 12, colors.get(c["name"], "#777"), 0.8,
                 stroke=color, title=f"{c['name']} [{f.get('output')}] {f.get('runtime')} vs {f.get('reference')}: "
                                     f"{f.get('detail') or v}")
        tol = (tolerances.get(f.get("precision") or "") or {}).get("max_norm_err")
        if tol:
            tx = sx(tol)
            svg.line(tx, mid - 9, tx, mid + 9, FAIL, 2)
        verdict = "pass" if f.get("passed") else "FAIL"
        svg.text(width - right + 8, mid + 4, f"{v:.2e} · {verdict}", size=11, fill=color)
    svg.text(left, height - 4, "red tick: the precision's max_norm_err tolerance, where the profile sets one", size=10,
             fill="#5b6670")
    return svg.render("plot-error")


# Layers shown per candidate in the per-layer error chart (worst first).
SENSITIVITY_TOP = 8


def sensitivity_plot(rd: dict, colors: dict[str, str]) -> str:
    """Per Keras layer, the quantized candidate's error against the float model (worst layers first).

    Drawn for failing quantized candidates and the selected one: bar = RMSE relative to the float
    tensor's range, label = mean cosine; a layer kept in float (int8-mixed) is marked.
    """
    label = "Per-layer error of quantized candidates vs the float model (RMSE / float range)"
    rows = []
    for c in rd.get("candidates") or []:
        sens = c.get("sensitivity") or []
        if not sens or (c.get("passed") and c.get("name") != rd.get("selected")):
            continue
        by_layer: dict[str, dict[str, float]] = {}
        for r in sens:
            by_layer.setdefault(r["layer"], {"op": r.get("op")})[r["metric"]] = r["value"]
        kept = set((c.get("recipe") or {}).get("float_layers") or [])
        for layer, m in list(by_layer.items())[:SENSITIVITY_TOP]:
            if m.get("rel_rmse") is not None:
                rows.append((c, layer, m, layer in kept))
    if not rows:
        return _empty("plot-sensitivity", label, "No failing or selected quantized candidate has per-layer figures.")
    hi = max(max(m["rel_rmse"] for _, _, m, _ in rows) * 1.1, 1e-6)
    left, right, row_h, head, width = 330, 230, 22, 16, 1100
    height = head + row_h * len(rows) + 48
    svg = _Svg(width, height, label)
    sx = _Scale(0.0, hi, left, width - right)
    axis_y = head + row_h * len(rows) + 4
    _x_axis(svg, sx, axis_y, _nice_ticks(0.0, hi), lambda t: f"{t:g}", "RMSE of the layer output / range of the "
            "float output", head - 6)
    for i, (c, layer, m, kept) in enumerate(rows):
        mid = head + i * row_h + row_h / 2
        color = PASS if c.get("passed") else FAIL
        svg.text(left - 8, mid + 4, f"{c['name']} · {layer}" + (" (float)" if kept else ""), anchor="end", size=12)
        svg.rect(sx(0.0), mid - 6, max(sx(m["rel_rmse"]) - sx(0.0), 1.0), 12, colors.get(c["name"], "#777"), 0.8,
                 stroke=color, title=f"{c['name']} {layer} ({m.get('op')}): rel_rmse {m['rel_rmse']:.4g}, "
                                     f"cosine {m.get('cosine_mean', float('nan')):.4f}, "
                                     f"added cosine loss {m.get('added_cosine_loss', float('nan')):.4g}")
        cos = m.get("cosine_mean")
        svg.text(width - right + 8, mid + 4, f"{m['rel_rmse']:.3g} · cos {cos:.4f}" if cos is not None
                 else f"{m['rel_rmse']:.3g}", size=11, fill=color)
    svg.text(left, height - 4, "worst layers first (ranked by the cosine loss each layer adds to its inputs'); "
             "red outline: the candidate failed", size=10, fill="#5b6670")
    return svg.render("plot-sensitivity")
