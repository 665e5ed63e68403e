"""What the CLI prints: the report table, the inspection tables, the live batch table (rich).

`err` carries progress and diagnostics (stderr), `out` the results (stdout).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdeploy.util import RealStderr

err = Console(stderr=True, highlight=False)
# Progress lines: also from other threads while a converter silences fd 2 (`util.RealStderr`).
progress_err = Console(file=RealStderr(), highlight=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def render_report(report, out_dir: Path) -> None:
    from kdeploy.report.render import candidate_rows

    table = Table(title=f"kdeploy · {report.model.path} → {report.target['name']}", title_justify="left")
    for col in ("candidate", "size", "gzip", "top-1", "cosine min", "max abs err", "p50"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=True)
    table.add_column("verdict", overflow="fold")
    for r in candidate_rows(report):
        name = f"[bold]{r['name']} ★[/]" if r["selected"] else r["name"]
        verdict = "[green]pass[/]" if r["passed"] else f"[red]fail[/] {escape(r['why'])}"
        table.add_row(escape(name) if not r["selected"] else name, r["size"], r["gzip"], r["top1"], r["cosine"],
                      r["max_abs"], r["p50"], verdict)
    out.print(table)
    for f in report.findings:
        color = {"error": "red", "warning": "yellow"}.get(f.severity, "dim")
        out.print(f"[{color}]{f.severity}[/] {f.code}: {escape(f.message)}", soft_wrap=True)
    if report.cache is not None and report.cache.status in ("hit", "retimed", "rebuilt"):
        out.print(f"[dim]cache[/] {report.cache.status}: {escape(report.cache.detail)}", soft_wrap=True)
    tie = report.selection.get("tie")
    if report.ready and tie:
        out.print(f"[dim]tie[/] {report.selected} was chosen among {', '.join(tie['candidates'])} (equal "
                  f"{' and '.join(tie['on'])}{', within measurement noise' if tie['within_noise'] else ''}) by "
                  f"{escape(tie['decided_by'])}", soft_wrap=True)
    if report.ready:
        out.print(f"[bold green]READY[/] selected [bold]{report.selected}[/] · report: {out_dir / 'report.json'}")
    else:
        out.print(f"[bold red]NOT READY[/] no candidate passed every check · report: {out_dir / 'report.json'}")
    from kdeploy.report.render import append_step_summary

    append_step_summary(report)


def render_inspection(res, model: Path) -> None:
    s = res.summary
    sizes = ", ".join(f"{p} {b:,}" for p, b in (s.get("predicted_size_bytes") or {}).items())
    macs = f"{s['macs']:,}" if s.get("macs") is not None else "?"
    out.print(f"[bold]kdeploy inspect · {escape(str(model))} → {res.target}[/]: {s['layers']} layers, "
              f"{s['params'] or 0:,} params, {macs} MACs, fp32 {s.get('fp32_bytes') or 0:,} bytes; predicted "
              f"bytes: {sizes or '?'}", soft_wrap=True)
    for t in s["inputs"] + s["outputs"]:
        dyn = f" dynamic axes {t['dynamic_axes']}" if t["dynamic_axes"] else ""
        out.print(f"  {escape(t['name'])} {t['shape']} {t['dtype']}{dyn}", soft_wrap=True)
    if "mcu" in s:
        mcu = s["mcu"]
        out.print(f"  mcu: predicted flash {mcu['predicted_flash_bytes']:,} / {mcu['max_size_bytes'] or '-'} bytes; "
                  f"largest activation {mcu['arena_lower_bound_bytes']:,} / arena {mcu['max_arena_bytes'] or '-'} "
                  f"bytes (fits: {mcu['arena_fits']})", soft_wrap=True)
    color = {"builtin": "green", "supported": "green", "no-ops": "dim"}
    table = Table("layer", "class", "tflite", "tflm", "onnx", "ops", box=None, title_justify="left")
    for r in res.layers:
        cells = [f"[{color.get(v, 'red')}]{v}[/]" for v in (r.tflite, r.tflm, r.onnx)]
        table.add_row(escape(r.name), r.class_name, *cells, escape(" ".join(r.ops)))
    out.print(table)
    for h in res.hazards:
        c = "red" if h.blocks else {"error": "red", "warning": "yellow"}.get(h.severity, "dim")
        tag = "BLOCKS" if h.blocks else h.severity
        out.print(f"[{c}]{tag}[/] {h.code}{' ' + escape(f'[{h.layer}]') if h.layer else ''}: {escape(h.message)} "
                  f"[dim]fix:[/] {escape(h.fix)}", soft_wrap=True)
    verdict = "[bold green]NOTHING BLOCKS[/]" if res.ready else "[bold red]BLOCKED[/]"
    out.print(f"{verdict} target {res.target} (prediction from one fp32 conversion, {res.duration_s:.1f} s)")


class BatchProgress:
    """The live table of a batch on stderr (a line per finished job without a terminal; nothing with --quiet)."""

    def __init__(self, quiet: bool, checkpoint: Callable[[], None]) -> None:
        import time

        self.checkpoint = checkpoint
        self.silent = quiet or os.environ.get("CI") == "true" and not sys.stderr.isatty()
        self.jobs: dict[str, dict] = {}
        self.clock = time.monotonic
        self.live = None

    def __enter__(self) -> "BatchProgress":
        if not self.silent and err.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=err, refresh_per_second=2, transient=True,
                             get_renderable=self.table)
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def event(self, kind: str, name: str, data: dict) -> None:
        self.checkpoint()
        job = self.jobs.setdefault(name, {"state": "queued", "model": "", "target": ""})
        if kind == "queued":
            job.update(model=data["model"], target=data["target"])
        elif kind == "started":
            job.update(state="running", started=self.clock(), node=data["node"])
        elif kind == "stage":
            job["state"] = f"{data['stage']} {data['detail']}".strip()
        elif kind == "done":
            job.update(state="done", row=data)
            if not self.silent and self.live is None:
                err.print(f"{_EXIT_STYLE.get(data['exit_code'], '[red]')}exit {data['exit_code']}[/] {escape(name)} "
                          f"({data['duration_s']:.1f} s): {escape(data['message'])}", soft_wrap=True)

    def table(self, title: str = "kdeploy batch") -> Table:
        from kdeploy.report.figures import fmt_bytes, fmt_ms

        table = Table(title=escape(title), title_justify="left")
        for col in ("job", "target", "state", "time", "exit", "selected", "size", "latency", "message"):
            table.add_column(col, justify="right" if col in ("time", "exit", "size", "latency") else "left",
                             overflow="fold", no_wrap=col in ("job", "exit", "size"))
        for name, job in self.jobs.items():
            row = job.get("row")
            if row is None:
                since = f"{self.clock() - job['started']:.0f} s" if "started" in job else ""
                table.add_row(escape(name), escape(job["target"]), escape(job["state"][:60]), since, "", "", "", "", "")
                continue
            lat = f"{fmt_ms(row['latency_ms'])} {row['latency_percentile']}" if row["latency_ms"] is not None else "-"
            style = _EXIT_STYLE.get(row["exit_code"], "[red]")
            table.add_row(escape(name), escape(row["target"]), f"{style}done[/]", f"{row['duration_s']:.1f} s",
                          f"{style}{row['exit_code']}[/]", escape(row["selected"] or "-"), fmt_bytes(row["size_bytes"]),
                          lat, escape(row["message"]))
        return table


_EXIT_STYLE = {0: "[green]", 1: "[yellow]"}
