"""The Python API: `import kdeploy` stays light; `kdeploy.optimize` takes paths, in-memory models and arrays."""

import json
import subprocess
import sys

import numpy as np
import pytest

import kdeploy
from kdeploy.errors import DataError, UsageError

from conftest import FIXTURES, make_profile

HEAVY = ("tensorflow", "keras", "tf_keras", "onnxruntime", "ai_edge_litert", "tf2onnx", "mlflow")


def test_import_kdeploy_imports_no_ml_framework():
    code = ("import sys, kdeploy; kdeploy.Report; kdeploy.diff_reports; kdeploy.optimize; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_optimize_accepts_an_in_memory_model_and_arrays(tmp_path):
    import keras

    model = keras.models.load_model(FIXTURES / "digits_cnn.keras")
    x = np.load(FIXTURES / "digits.npz")["x"]
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[], threads=[1])
    report = kdeploy.optimize(model, profile=profile, data={"image": x})
    assert isinstance(report, kdeploy.Report)
    assert report.ready and report.selected == "fp32"
    assert report.model.path == f"<in-memory Keras model {model.name!r}>"
    assert report.data["samples"] == len(x) and not report.data["synthetic"]
    assert report.model.params == model.count_params()
    out = report.save(tmp_path / "out", formats=("json", "html"))
    assert (out / "report.html").is_file() and (out / "artifacts" / "fp32.tflite").is_file()
    again = kdeploy.load_report(out)
    assert again.model_dump() == report.model_dump()
    assert json.loads((out / "report.json").read_text())["model"]["path"].startswith("<in-memory")


def test_optimize_refuses_what_is_not_a_model_or_data_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="received int"):
        kdeploy.optimize(42, target="cpu-edge")
    with pytest.raises(DataError, match="received list"):
        kdeploy.optimize(FIXTURES / "digits_cnn.keras", target="cpu-edge", data=[1, 2, 3])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="did not write"):
        kdeploy.optimize(FIXTURES / "digits_cnn.keras", target="cpu-edge", out=taken)
    assert (taken / "notes.txt").read_text() == "mine"


def test_load_report_refuses_a_file_that_is_not_a_report(tmp_path):
    (tmp_path / "report.json").write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="not a kdeploy report"):
        kdeploy.load_report(tmp_path)
