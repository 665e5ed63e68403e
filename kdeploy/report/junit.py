"""JUnit XML rendering: one test case per check per candidate, so CI shows which budget failed.

Layout (understood by GitHub, GitLab, Jenkins and Azure test-report viewers):
one `<testsuite name="kdeploy.<target>.<candidate>">` per candidate with a `<testcase>` per check
(a failed check carries `<failure message="value ... vs limit ...">`), a `build` case when the
candidate had build errors, and a last suite `kdeploy.<target>` whose `ready` case is the gate's
verdict.
`render_batch` writes a batch summary the same way: one case per job.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from kdeploy.report.figures import as_dict, fmt_value

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _clean(s: Any) -> str:
    return _INVALID_XML.sub("?", str(s))


def failure_message(check: dict) -> str:
    """`name: value V vs limit L`, the line a CI test view shows for a failed check."""
    return f"{check.get('name')}: value {fmt_value(check.get('value'))} vs limit {fmt_value(check.get('limit'))}"


def _case(suite: ET.Element, classname: str, name: str, failure: str | None = None, text: str = "",
          kind: str = "check") -> None:
    case = ET.SubElement(suite, "testcase", classname=_clean(classname), name=_clean(name), time="0")
    if failure is not None:
        f = ET.SubElement(case, "failure", message=_clean(failure), type=kind)
        f.text = _clean(text or failure)


def render(report: Any) -> str:
    """Renders a report (a `Report` or its dict form) as JUnit XML.

    Args:
        report: the `Report`, or the dict read from a `report.json`.

    Returns:
        The XML text, with an XML declaration.
    """
    rd = as_dict(report)
    target = (rd.get("target") or {}).get("name", "target")
    root = ET.Element("testsuites", name=_clean(f"kdeploy {target}"))
    total = failed = 0
    for c in rd.get("candidates") or []:
        cls = f"kdeploy.{target}.{c.get('name')}"
        suite = ET.SubElement(root, "testsuite", name=_clean(cls))
        n = nf = 0
        if c.get("errors"):
            _case(suite, cls, "build", "; ".join(c["errors"])[:500], "\n".join(c["errors"]), kind="build")
            n, nf = n + 1, nf + 1
        for k in c.get("checks") or []:
            passed = bool(k.get("passed"))
            msg = None if passed else failure_message(k)
            text = f"{msg}\n{k.get('detail')}" if msg and k.get("detail") else (msg or "")
            _case(suite, cls, k.get("name", "check"), msg, text)
            n, nf = n + 1, nf + (not passed)
        if n == 0:
            _case(suite, cls, "checks", "nothing could be checked for this candidate")
            n, nf = 1, 1
        suite.set("tests", str(n))
        suite.set("failures", str(nf))
        suite.set("errors", "0")
        suite.set("skipped", "0")
        total, failed = total + n, failed + nf
    gate = ET.SubElement(root, "testsuite", name=_clean(f"kdeploy.{target}"))
    if rd.get("ready"):
        _case(gate, f"kdeploy.{target}", "ready")
    else:
        reasons = (rd.get("selection") or {}).get("reasons") or {}
        text = "\n".join(f"{k}: {v}" for k, v in reasons.items())
        _case(gate, f"kdeploy.{target}", "ready", "not ready: no candidate passed every check", text, kind="gate")
    gate.set("tests", "1")
    gate.set("failures", "0" if rd.get("ready") else "1")
    gate.set("errors", "0")
    gate.set("skipped", "0")
    root.set("tests", str(total + 1))
    root.set("failures", str(failed + (0 if rd.get("ready") else 1)))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def render_batch(summary: dict) -> str:
    """Renders a batch summary as JUnit XML: one test case per job, failed unless the job was ready.

    Args:
        summary: the dict form of `kdeploy.batch.summary.BatchSummary`.

    Returns:
        The XML text, with an XML declaration.
    """
    name = "kdeploy.batch"
    root = ET.Element("testsuites", name=name)
    suite = ET.SubElement(root, "testsuite", name=name)
    failed = 0
    kinds = {1: "not-ready", 2: "bad-input"}
    for row in summary.get("jobs") or []:
        code = row.get("exit_code")
        msg = None if code == 0 else f"exit {code}: {row.get('message')}"
        text = f"{msg}\nlog: {row.get('log')}" if msg else ""
        _case(suite, f"{name}.{row.get('target')}", row.get("name", "job"), msg, text, kind=kinds.get(code, "internal"))
        failed += code != 0
    total = str(len(summary.get("jobs") or []))
    for el in (suite, root):
        el.set("tests", total)
        el.set("failures", str(failed))
        el.set("errors", "0")
    suite.set("skipped", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
