"""TensorFlow Lite for Microcontrollers as the `mcu` target's runtime: outputs, arena RAM, missing ops."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kdeploy.runtimes.tflm import unsupported_ops

from conftest import FIXTURES, ROOT, make_profile

pytest.importorskip("tflite_micro")


def test_unsupported_ops_parses_tflm_messages():
    text = ("Didn't find op for builtin opcode 'GELU' Failed to get registration from op code GELU "
            "Node CONV_2D (number 4) failed to prepare with status 1")
    assert unsupported_ops(text) == ["GELU", "CONV_2D"]
    assert unsupported_ops("all good") == []


@pytest.fixture(scope="module")
def mcu_run(tmp_path_factory):
    """digits on the mcu target with an arena budget it cannot meet (1000 bytes), through the CLI."""
    tmp = tmp_path_factory.mktemp("mcu")
    profile = make_profile(tmp, "mcu", budgets={"max_arena_bytes": 1000})
    out = tmp / "out"
    res = subprocess.run([sys.executable, "-m", "kdeploy", "optimize", str(FIXTURES / "digits_cnn.keras"),
                          "--profile", str(profile), "--data", str(FIXTURES / "digits.npz"), "--out", str(out), "-q"],
                         capture_output=True, text=True, cwd=ROOT)
    return res, json.loads((out / "report.json").read_text()), out


def test_mcu_arena_budget_too_tight_exits_1_naming_the_arena_check(mcu_run):
    res, report, _ = mcu_run
    assert res.returncode == 1, res.stdout + res.stderr
    assert "arena_bytes" in res.stdout
    check = next(k for k in report["candidates"][0]["checks"] if k["name"] == "arena_bytes")
    assert check["passed"] is False and check["limit"] == 1000 and check["value"] > 1000


def _tflm_by_hand(path, x, capfd):
    """Runs the artifact on TFLM directly (not through kdeploy): outputs and the printed arena total."""
    import re

    from tflite_micro.python.tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(path.read_bytes())
    outs = []
    for i in range(len(x)):
        it.set_input(x[i:i + 1], 0)
        it.invoke()
        outs.append(it.get_output(0))
    capfd.readouterr()
    it.print_allocations()  # C code prints to a file descriptor (stderr in this build)
    printed = "".join(capfd.readouterr())
    return np.concatenate(outs), int(re.search(r"Arena allocation total (\d+) bytes", printed).group(1))


def test_mcu_report_figures_reproduce_on_tflm_by_hand(mcu_run, capfd):
    from kdeploy.compare import metrics
    from kdeploy.data import load_data, split
    from kdeploy.loading import load_model
    from kdeploy.profiles import load_profile_file

    _, report, out = mcu_run
    c = report["candidates"][0]
    art = next(a for a in c["artifacts"] if a["format"] == "tflite")
    model = load_model(FIXTURES / "digits_cnn.keras")
    ds = load_data(FIXTURES / "digits.npz", model.inputs)
    prof = load_profile_file(make_profile(out.parent, "mcu"))
    _, val = split(ds, prof.calibration_samples, report["seed"])
    got, arena = _tflm_by_hand(out / art["path"], val.inputs["image"], capfd)
    assert c["memory"]["tflm"]["arena_bytes"] == arena
    m = metrics(model.predict(val.inputs)[0], got, "multiclass")
    tflm = next(f for f in c["fidelity"] if f["runtime"] == "tflm" and f["reference"] == "keras")
    assert tflm["max_abs_err"] == pytest.approx(m.max_abs_err, abs=1e-6)
    assert tflm["top1_agreement"] == m.top1_agreement
    cross = {(r["runtime_b"], r["runtime_a"]) for r in c["consistency"]}
    assert {("litert", "tflm"), ("onnxruntime", "tflm")} <= cross  # the other runtimes held to TFLM's outputs
    assert not any(r["gates"] for r in c["consistency"])  # int8: figures, not verdicts (gate_quantized false)
    assert [r["runtime"] for r in c["latency"]] == ["tflm"]  # single-threaded: one row for threads [1]
    assert {r["runtime"] for r in c["robustness"]} == {"tflm"}
    assert c["estimate"]["device"].startswith("Cortex-M4F") and c["estimate"]["kind"] == "estimate"


def test_mcu_op_that_tflm_lacks_is_named_in_a_finding(tmp_path):
    import keras

    inp = keras.Input((16,), name="x")
    hidden = keras.layers.Activation("gelu")(keras.layers.Dense(16)(inp))  # int8 GELU: no TFLM kernel
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(hidden))
    model.save(tmp_path / "gelu.keras")
    from kdeploy.run import optimize

    report = optimize(tmp_path / "gelu.keras", profile=make_profile(tmp_path, "mcu"))
    assert not report.ready
    finding = next(f for f in report.findings if f.code == "tflm-unsupported-ops")
    assert "GELU" in finding.message
    check = next(k for k in report.candidate("int8").checks if k.name == "runs on tflm")
    assert not check.passed and "GELU" in check.detail
