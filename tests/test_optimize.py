"""End-to-end `optimize` on the real fixtures: real converters, real LiteRT and ONNX Runtime."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdeploy.run import optimize

from conftest import FIXTURES, ROOT, make_profile

SHARED_CONTRACT = ROOT.parent / "shared" / "checks" / "report_contract.py"
CONTRACT = SHARED_CONTRACT if SHARED_CONTRACT.is_file() else ROOT / "tests" / "contract" / "report_contract.py"


def contract_problems(out: Path) -> str:
    """Runs the public report-contract check on an output folder; fails the test on any problem."""
    res = subprocess.run([sys.executable, str(CONTRACT), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    return res.stdout


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    profile = make_profile(tmp, "cpu-edge")
    out = tmp / "out"
    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz", out=out)
    return report, out


def test_optimize_digits_cnn_selects_int8_that_agrees_on_both_runtimes(digits_run):
    report, out = digits_run
    assert report.ready and report.selected == "int8"
    int8 = report.candidate("int8")
    vs_keras = {f.runtime: f for f in int8.fidelity if f.reference == "keras"}
    assert set(vs_keras) == {"litert", "onnxruntime"}
    for f in vs_keras.values():
        assert f.passed and f.top1_agreement >= 0.99
    formats = sorted(a.format for a in int8.artifacts)
    assert formats == ["onnx", "tflite"]
    assert all(c.latency for c in report.candidates), "every candidate has latency figures"


def test_verdicts_come_from_the_deployed_runtime_and_runtimes_are_compared_as_consistency(digits_run):
    """cpu-edge deploys LiteRT: only its rows against Keras are checks; ONNX Runtime's are figures, and its agreement
    with LiteRT gates for fp32 (a converter bug) but not for int8 (integer kernels round differently)."""
    report, _ = digits_run
    for c in report.candidates:
        rows = {f.runtime: f for f in c.fidelity if f.reference == "keras"}
        assert rows["litert"].gates and not rows["onnxruntime"].gates
        names = [k.name for k in c.checks]
        assert "fidelity litert vs keras [digit]" in names
        assert not any(n.startswith("fidelity onnxruntime") for n in names)
        (pair,) = c.consistency
        assert (pair.runtime_a, pair.runtime_b) == ("litert", "onnxruntime")
        assert pair.gates == (c.recipe["precision"] == "fp32")
        assert ("consistency onnxruntime vs litert [digit]" in names) == pair.gates
        assert pair.figures["cosine_min"] is not None and pair.figures["peak_err"] is not None


def test_optimize_report_holds_the_public_contract(digits_run):
    _, out = digits_run
    contract_problems(out)
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"].startswith("1.")
    assert (out / "report.md").read_text().startswith("# kdeploy: READY")
    assert (out / data["reference_artifacts"][0]["path"] / "saved_model.pb").is_file()
    assert not list(out.parent.glob(".out.partial-*")), "no staging folder left behind"


def _run_litert(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return np.concatenate([runner(image=x[i:i + 1])["output_0"] for i in range(len(x))])


def _run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_optimize_error_figures_reproduce_when_artifacts_are_run_by_hand(digits_run):
    """Loading the artifacts ourselves on the report's validation split gives the report's figures."""
    from kdeploy.data import load_data, split
    from kdeploy.loading import load_model

    report, out = digits_run
    model = load_model(FIXTURES / "digits_cnn.keras")
    ds = load_data(FIXTURES / "digits.npz", model.inputs)
    _, val = split(ds, report.target["calibration_samples"], report.seed)
    x = val.inputs["image"]
    ref = model.predict(val.inputs)[0]
    for cand in ("fp32", "int8"):
        c = report.candidate(cand)
        for art in c.artifacts:
            got = _run_litert(out / art.path, x) if art.format == "tflite" else _run_ort(out / art.path, x)
            runtime = "litert" if art.format == "tflite" else "onnxruntime"
            f = next(f for f in c.fidelity if f.runtime == runtime and f.reference == "keras")
            assert float(np.max(np.abs(got - ref))) == pytest.approx(f.max_abs_err, rel=1e-5, abs=1e-9)
            assert float(np.mean(got.argmax(1) == ref.argmax(1))) == f.top1_agreement


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,data",
    [
        ("cancer_mlp.keras", "cancer.npz"),
        ("cancer_mlp.keras", "cancer.csv"),
        ("diabetes_reg.keras", "diabetes.npz"),
        ("digits_gru.keras", "digits_seq.npz"),
        ("multi_io.keras", "multi_io.npz"),
        ("iris_legacy.h5", "iris.npz"),
    ],
)
def test_optimize_every_fixture_gets_a_report_with_an_agreeing_fp32(tmp_path, model, data):
    out = tmp_path / "out"
    report = optimize(FIXTURES / model, profile=make_profile(tmp_path, "cpu-edge"), data=FIXTURES / data, out=out)
    contract_problems(out)
    fp32 = report.candidate("fp32")
    assert fp32.passed, [k.detail for k in fp32.checks if not k.passed]
    runtimes = {(f.runtime, f.reference) for f in fp32.fidelity}
    assert {("litert", "keras"), ("onnxruntime", "keras")} <= runtimes
    # issue 19: runtimes are held to each other in `consistency` (fp32: gating), no longer as fidelity rows
    assert {(r.runtime_b, r.runtime_a) for r in fp32.consistency} == {("onnxruntime", "litert")}
    assert all(r.gates for r in fp32.consistency)
    assert len({f.output for f in fp32.fidelity}) == len(report.model.outputs)
    assert report.ready


def test_optimize_without_data_uses_synthetic_inputs_and_says_so(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"])
    report = optimize(FIXTURES / "diabetes_reg.keras", profile=profile, out=tmp_path / "out")
    assert report.data["synthetic"] is True
    assert any(f.code == "synthetic-data" and "not representative" in f.message for f in report.findings)


def test_optimize_savedmodel_directory_input(tmp_path):
    import keras

    m = keras.saving.load_model(FIXTURES / "diabetes_reg.keras")
    sm = tmp_path / "sm"
    m.export(str(sm), format="tf_saved_model", verbose=False)
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"])
    report = optimize(sm, profile=profile, data=FIXTURES / "diabetes.npz", out=tmp_path / "out")
    assert report.model.format == "savedmodel"
    assert report.candidate("fp32").passed
    assert report.ready


def test_optimize_without_out_keeps_artifacts_until_saved(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"])
    report = optimize(FIXTURES / "iris_legacy.h5", profile=profile, data=FIXTURES / "iris.npz")
    out = tmp_path / "later"
    report.save(out)
    contract_problems(out)


def test_optimize_inspection_reads_the_fp32_candidate_instead_of_converting_again(digits_run):
    report, _ = digits_run
    fp32 = next(a for a in report.candidate("fp32").artifacts if a.format == "tflite")
    assert report.inspection.summary["fp32_bytes"] == fp32.size_bytes  # its own conversion differs in metadata
    assert report.inspection.conversion["method"].startswith("the fp32 candidate's .tflite")
    assert {row.tflite for row in report.inspection.layers} <= {"builtin", "no-ops"}
    assert {row.onnx for row in report.inspection.layers} <= {"supported", "no-ops"}  # variable reads are not ops


def test_optimize_diagnoses_only_candidates_that_disagree_with_keras(digits_run):
    report, _ = digits_run
    for c in report.candidates:
        agrees = all(k.passed for k in c.checks if k.name.startswith(("fidelity ", "robustness ", "task ")))
        if agrees:
            assert not c.sensitivity and c.first_divergence is None, c.name
