"""Report formats from a real `kdeploy optimize` run: HTML, JUnit XML, Markdown summary, JSON Schema."""

import copy
import json
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET

import jsonschema
import pytest

from kdeploy.report.html import render as render_html
from kdeploy.report.schema import profile_schema, report_schema

from conftest import FIXTURES, PROFILES, make_profile

# fp32 weights of digits_cnn alone take 13,770 params x 4 B = 55 KB, so a 40 KB budget fails fp32;
# int8 stores about one byte per weight and fits.
SIZE_BUDGET = 40_000


def kdeploy(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    full = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    profile = make_profile(tmp, "cpu-edge", precisions=["fp32", "int8"], threads=[1],
                           budgets={"max_size_bytes": SIZE_BUDGET})
    summary = tmp / "summary.md"
    summary.write_text("earlier step\n")
    out = tmp / "out"
    res = kdeploy("optimize", FIXTURES / "digits_cnn.keras", "--profile", profile, "--data", FIXTURES / "digits.npz",
                  "--out", out, "--format", "json,md,html,junit", "--json",
                  env={"GITHUB_STEP_SUMMARY": str(summary), "CI": "true"})
    assert res.returncode in (0, 1), res.stderr
    return res, out, summary


def test_optimize_json_flag_prints_the_report_and_no_table(run):
    res, out, _ = run
    printed = json.loads(res.stdout)
    assert printed == json.loads((out / "report.json").read_text())
    assert "┏" not in res.stdout and res.stderr.strip() == "", "CI mode: no progress, no table"
    assert res.returncode == (0 if printed["ready"] else 1)


def test_html_report_is_self_contained_and_has_every_plot(run):
    _, out, _ = run
    html = (out / "report.html").read_text()
    rd = json.loads((out / "report.json").read_text())
    for plot in ("plot-latency", "plot-size", "plot-pareto", "plot-error"):
        assert f'<svg id="{plot}"' in html
    lowered = html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "src=" not in lowered and "url(" not in lowered
    assert "https://" not in lowered
    assert lowered.count("http://") == lowered.count('xmlns="http://www.w3.org/2000/svg"'), "only SVG namespaces"
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    verdict = html[html.index('id="verdict"'):html.index("</section>")]
    assert ("NOT READY" in verdict) != rd["ready"]
    if rd["selected"]:
        assert rd["selected"] in verdict
        pareto = html[html.index('id="plot-pareto"'):]
        assert f"{rd['selected']} ★ selected" in pareto[:pareto.index("</svg>")]
    table = html[html.index('id="candidates"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr") == len(rd["candidates"]) + 1


def test_html_renders_a_report_with_missing_and_extra_fields(run):
    _, out, _ = run
    rd = json.loads((out / "report.json").read_text())
    rd = copy.deepcopy(rd)
    for c in rd["candidates"]:
        c["latency"] = []
        c.pop("fidelity", None)
        c["future_figure"] = {"x": 1}
    rd.pop("host")
    rd["optimization"] = {"pruned": {"sparsity": 0.8}}
    html = render_html(rd)
    assert "No latency was measured" in html and "No outputs were compared" in html
    assert "Optimization" in html and "sparsity" in html and "future_figure" in html


def test_junit_has_one_case_per_check_and_failures_say_value_vs_limit(run):
    _, out, _ = run
    rd = json.loads((out / "report.json").read_text())
    root = ET.parse(out / "report.junit.xml").getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    target = rd["target"]["name"]
    for c in rd["candidates"]:
        suite = suites[f"kdeploy.{target}.{c['name']}"]
        cases = suite.findall("testcase")
        assert len(cases) == len(c["checks"]) + (1 if c["errors"] else 0)
        for k in c["checks"]:
            case = next(x for x in cases if x.get("name") == k["name"])
            failure = case.find("failure")
            assert (failure is None) == k["passed"]
    fp32 = rd["candidates"][[c["name"] for c in rd["candidates"]].index("fp32")]
    size = next(k for k in fp32["checks"] if k["name"] == "size_bytes")
    assert not size["passed"] and size["value"] > SIZE_BUDGET
    case = next(x for x in suites[f"kdeploy.{target}.fp32"].findall("testcase") if x.get("name") == "size_bytes")
    assert case.find("failure").get("message") == f"size_bytes: value {size['value']} vs limit {SIZE_BUDGET}"
    gate = suites[f"kdeploy.{target}"].find("testcase")
    assert gate.get("name") == "ready" and (gate.find("failure") is None) == rd["ready"]
    assert int(root.get("failures")) == sum(1 for c in rd["candidates"] for k in c["checks"] if not k["passed"]) + \
        sum(1 for c in rd["candidates"] if c["errors"]) + (0 if rd["ready"] else 1)


def test_report_json_validates_against_the_shipped_schema(run):
    _, out, _ = run
    rd = json.loads((out / "report.json").read_text())
    schema = json.loads(kdeploy("schema", "report").stdout)
    assert schema == report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(rd, schema, cls=jsonschema.Draft202012Validator)
    broken = copy.deepcopy(rd)
    broken["candidates"][0]["checks"][0]["passed"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def test_profile_schema_accepts_builtin_profiles_and_rejects_unknown_keys():
    res = kdeploy("schema", "profile")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert schema == profile_schema()
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(PROFILES.glob("*.toml")):
        data = tomllib.loads(path.read_text())
        assert not list(validator.iter_errors(data)), path.name
    data["budgets"] = {**data.get("budgets", {}), "max_sise_bytes": 10}
    assert any("max_sise_bytes" in e.message for e in validator.iter_errors(data))


def test_schema_command_rejects_an_unknown_name_with_exit_2():
    res = kdeploy("schema", "reports")
    assert res.returncode == 2
    assert "unknown schema 'reports'" in res.stderr and "report, profile" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_markdown_is_appended_to_the_github_step_summary(run):
    _, out, summary = run
    text = summary.read_text()
    assert text.startswith("earlier step\n"), "appended, not overwritten"
    md = (out / "report.md").read_text()
    assert md in text
    rd = json.loads((out / "report.json").read_text())
    assert md.startswith(f"# kdeploy: {'READY' if rd['ready'] else 'NOT READY'}")
    assert "size_bytes" in md and f"vs limit {SIZE_BUDGET}" in md, "the failed budget is named with its limit"
    assert len(md.splitlines()) < 60, "concise enough for a pull request"


def test_example_github_workflow_uses_options_that_exist():
    import re

    from conftest import ROOT

    text = (ROOT / "examples" / "github-actions.yml").read_text()
    helps = {cmd: kdeploy(cmd, "--help").stdout for cmd in ("optimize", "diff")}
    joined = text.replace("\\\n", " ")  # shell line continuations
    used = {(cmd, flag) for cmd, rest in re.findall(r"kdeploy (optimize|diff)([^\n]*)", joined)
            for flag in re.findall(r"(--[a-z][a-z0-9-]*)", rest)}
    assert ("optimize", "--format") in used and ("optimize", "--quiet") in used
    for cmd, flag in used:
        assert flag in helps[cmd], f"kdeploy {cmd} has no {flag}"
    assert "report.html" in text and "GITHUB_STEP_SUMMARY" in text and "exit_code != '0'" in text


def test_markdown_puts_the_deployed_runtimes_figures_in_its_columns_and_cross_checks_apart(run):
    """issue 19: a LiteRT-deployed candidate's "top-1 vs Keras" showed ONNX Runtime's 0.875."""
    from kdeploy.api import load_report
    from kdeploy.report.render import markdown

    _, out, _ = run
    report = load_report(out)
    c = next(c for c in report.candidates if any(f.runtime == "onnxruntime" for f in c.fidelity))
    ort = next(f for f in c.fidelity if f.runtime == "onnxruntime" and f.reference == "keras")
    ort.top1_agreement, ort.decision_agreement = 0.875, 0.875  # a cross-check whose integer kernels flip more
    litert = next(f for f in c.fidelity if f.runtime == "litert" and f.reference == "keras")
    md = markdown(report)
    assert "| top-1 vs Keras (litert) |" in md and "cross-checks vs Keras" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {c.name} ") or line.startswith(f"| **{c.name}**"))
    cells = [x.strip() for x in row.split("|")]
    assert cells[4] == f"{litert.top1_agreement:.4f}" and "onnxruntime: top-1 0.8750" in cells[7]
    failing = [k for k in report.candidates if not k.passed]
    if failing:
        assert "**Why candidates fail**" in md
        assert sum(1 for line in md.splitlines() if line.startswith("- `") and ": " in line) >= len(failing)
