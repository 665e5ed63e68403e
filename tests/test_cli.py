"""The command line as a user runs it: exit codes, one-line errors, the gate failing on a bad artifact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import FIXTURES, make_profile


def kdeploy(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def test_cli_version_and_help_exit_zero():
    res = kdeploy("--version")
    assert res.returncode == 0 and res.stdout.startswith("kdeploy ")
    res = kdeploy("--help")
    assert res.returncode == 0 and "optimize" in res.stdout and "check" in res.stdout


def test_cli_targets_lists_builtins_and_show_prints_json():
    res = kdeploy("targets")
    assert res.returncode == 0
    for name in ("cpu-edge", "cpu-server", "mobile", "mcu"):
        assert name in res.stdout
    res = kdeploy("targets", "show", "mcu")
    assert res.returncode == 0
    assert json.loads(res.stdout)["precisions"] == ["int8"]


def test_cli_unknown_target_is_one_line_exit_2(tmp_path):
    res = kdeploy("optimize", FIXTURES / "digits_cnn.keras", "--target", "toaster", "--out", tmp_path / "o")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "toaster" in lines[0] and "cpu-edge" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_cli_data_shape_mismatch_is_exit_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 8, 8), np.float32))
    res = kdeploy("optimize", FIXTURES / "digits_cnn.keras", "--target", "cpu-edge", "--data", bad, "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert "(10, 8, 8)" in res.stderr and "(N, 8, 8, 1)" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def _perturbed_tflite(tmp_path: Path, scale: float) -> Path:
    """The digits CNN with noise added to its weights, converted to an fp32 .tflite by plain TF calls."""
    import keras
    import tensorflow as tf

    m = keras.saving.load_model(FIXTURES / "digits_cnn.keras")
    rng = np.random.default_rng(0)
    # Kernels only: noise on BatchNorm's moving variance could make it negative (NaN outputs).
    m.set_weights([w + rng.normal(0, scale, w.shape).astype(w.dtype) if w.ndim >= 2 else w for w in m.get_weights()])
    sm = tmp_path / f"sm-{scale}"
    m.export(str(sm), format="tf_saved_model", verbose=False)
    path = tmp_path / f"digits-noise{scale}.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(sm)).convert())
    return path


def test_cli_check_catches_perturbed_weights_and_passes_the_clean_artifact(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", crosscheck_runtimes=[])
    clean = _perturbed_tflite(tmp_path, 0.0)
    bad = _perturbed_tflite(tmp_path, 0.05)
    res = kdeploy("check", FIXTURES / "digits_cnn.keras", clean, bad, "--profile", profile,
                  "--data", FIXTURES / "digits.npz", "--out", tmp_path / "gate")
    assert res.returncode == 0, res.stdout + res.stderr  # the clean artifact passes and is selected
    report = json.loads((tmp_path / "gate" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["digits-noise0.0"]["passed"] and report["selected"] == "digits-noise0.0"
    bad_c = by_name["digits-noise0.05"]
    assert not bad_c["passed"]
    (fid,) = [f for f in bad_c["fidelity"] if f["runtime"] == "litert"]
    assert not fid["passed"] and fid["max_abs_err"] > 1e-3 and "peak_err" in fid["detail"] and "FAILED" in fid["detail"]
    assert "conversion defect" in fid["summary"]  # issue 19: fp32 judged relative to the output's magnitude

    res = kdeploy("check", FIXTURES / "digits_cnn.keras", bad, "--profile", profile,
                  "--data", FIXTURES / "digits.npz", "--out", tmp_path / "gate2")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "NOT READY" in res.stdout


def test_cli_optimize_exit_1_when_a_budget_cannot_be_met(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], budgets={"max_size_bytes": 1000})
    res = kdeploy("optimize", FIXTURES / "iris_legacy.h5", "--profile", profile, "--data", FIXTURES / "iris.npz",
                  "--out", tmp_path / "o", "-q")
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ready"] is False and report["selected"] is None
    failed = {k["name"] for c in report["candidates"] for k in c["checks"] if not k["passed"]}
    assert "size_bytes" in failed
