"""Subclassed Keras models (no symbolic inputs) through the CLI: signature from --data / --input-shape, per-layer
names by attribute path, recipes that need a layer graph skipped with a reason.

The fixture `subclassed_net.keras` (`fixtures/make_subclassed.py`) is `DigitsNet`: conv `stem`, `block1`
(a `ResidualBlock` of `conv_a`, `conv_b`, `add`, `act`), `pool`, dense softmax `head`, trained on digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import FIXTURES, PROFILES, make_profile

MODEL = FIXTURES / "subclassed_net.keras"
CUSTOM = FIXTURES / "subclassed_net.py"
LEAVES = {"stem", "block1/conv_a", "block1/conv_b", "block1/add", "block1/act", "pool", "head"}


def _clean_env() -> dict:
    """The environment without what in-process tests may have set (TFMOT's import sets TF_USE_LEGACY_KERAS)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    return env


def kdeploy(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=_clean_env(), timeout=900)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """One optimize run with --data: int8 held to a tolerance it fails (so its per-layer error is measured,
    without the selective search) and a pruning recipe (which needs a layer graph)."""
    tmp = tmp_path_factory.mktemp("subclassed")
    tols = tomllib.loads((PROFILES / "cpu-edge.toml").read_text())["tolerances"]
    prof = make_profile(tmp, "cpu-edge", precisions=["fp32", "int8"],
                        tolerances={**tols, "int8": {"min_cosine": 0.9999}}, selective={"enabled": False},
                        pruning={"sparsities": [0.5]})
    res = kdeploy("optimize", MODEL, "--profile", prof, "--custom-objects", CUSTOM, "--data", FIXTURES / "digits.npz",
                  "--out", tmp / "out", "--no-cache")
    return res, tmp / "out"


def test_optimize_with_data_reads_the_signature_from_the_data_and_the_call(optimized):
    res, out = optimized
    assert res.returncode in (0, 1), res.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    (inp,) = report["model"]["inputs"]
    assert inp["name"] == "x" and inp["shape"][1:] == [8, 8, 1] and inp["dtype"] == "float32"
    (output,) = report["model"]["outputs"]
    assert output["shape"][1:] == [10] and report["model"]["output_kinds"] == ["multiclass"]
    assert report["model"]["params"] == 1338
    fp32 = next(c for c in report["candidates"] if c["name"] == "fp32")
    assert fp32["passed"]  # the reference outputs, the SavedModel export and the conversion agree
    codes = {f["code"]: f["message"] for f in report["findings"]}
    assert "signature-from-call" in codes and "--data" in codes["signature-from-call"]
    assert "subclassed" in codes["tfmot-skipped"] and "prune50" in codes["tfmot-skipped"]


def test_per_layer_error_names_layers_by_attribute_path(optimized):
    _, out = optimized
    report = json.loads((out / "report.json").read_text())
    int8 = next(c for c in report["candidates"] if c["name"] == "int8")
    assert not int8["passed"]
    layers = {row["layer"] for row in int8["sensitivity"]}
    assert layers and layers <= LEAVES
    assert {"block1/conv_a", "block1/conv_b"} <= layers  # the residual block's own layers, not `residual_block`
    inspected = {row["name"] for row in report["inspection"]["layers"]}
    assert LEAVES <= inspected


def test_no_data_and_no_input_shape_is_exit_2_naming_both_flags(tmp_path):
    res = kdeploy("optimize", MODEL, "--target", "cpu-edge", "--custom-objects", CUSTOM, "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]  # after the progress lines and TensorFlow's start-up chatter
    assert line.startswith("error: ") and "no symbolic inputs" in line, res.stderr[-2000:]
    assert "--data" in line and "--input-shape" in line and "DigitsNet" in line and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_input_shape_that_the_call_refuses_is_exit_2_with_the_model_error(tmp_path):
    res = kdeploy("inspect", MODEL, "--custom-objects", CUSTOM, "--input-shape", "input_0=8,8")
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert "cannot be called on inputs input_0 (8, 8)" in line and "min_ndim=4" in line and "\x1b" not in line


def test_inspect_with_input_shape_lists_attribute_paths(tmp_path):
    res = kdeploy("inspect", MODEL, "--custom-objects", CUSTOM, "--input-shape", "image=8,8,1", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    found = json.loads(res.stdout)
    assert [t["name"] for t in found["summary"]["inputs"]] == ["image"]
    rows = {row["name"]: row for row in found["layers"]}
    assert LEAVES | {"block1"} == set(rows)
    assert rows["block1/conv_b"]["ops"] == ["CONV_2D"] and rows["head"]["ops"] == ["FULLY_CONNECTED", "SOFTMAX"]
    assert any(h["code"] == "custom-class" and h["layer"] == "block1" for h in found["hazards"])


def test_optimize_with_input_shape_and_synthetic_data(tmp_path):
    prof = make_profile(tmp_path, "cpu-edge", precisions=["fp32"])
    res = kdeploy("optimize", MODEL, "--profile", prof, "--custom-objects", CUSTOM, "--input-shape", "input_0=8,8,1",
                  "--out", tmp_path / "o", "--no-cache")
    assert res.returncode in (0, 1), res.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [t["name"] for t in report["model"]["inputs"]] == ["input_0"]
    assert report["candidates"][0]["passed"]


@pytest.mark.parametrize("built_before", [0, 3])
def test_check_locates_a_perturbed_layer_of_the_residual_block(tmp_path, built_before):
    # The perturbed artifact is made in another process, as by a user's own export script. With layers built
    # before the model in that process (`built_before`), its tensors carry other generated names (conv2d_4_1 for
    # the fresh load's conv2d_1): those layers are then unmapped, never another layer's (it named `stem`).
    script = f"""
import sys
sys.path.insert(0, {str(FIXTURES)!r})
import keras, tensorflow as tf
junk = [keras.layers.Conv2D(3, 3) for _ in range({built_before})] + [keras.layers.Dense(3) for _ in range({built_before})]
import subclassed_net  # registers DigitsNet and ResidualBlock
m = keras.saving.load_model({str(MODEL)!r})
w = m.block1.conv_b.get_weights()
m.block1.conv_b.set_weights([w[0] * 1.5, w[1]])
m.export({str(tmp_path / "sm")!r}, format="tf_saved_model", verbose=False,
         input_signature=[tf.TensorSpec((None, 8, 8, 1), tf.float32, name="x")])
open({str(tmp_path / "perturbed.tflite")!r}, "wb").write(
    tf.lite.TFLiteConverter.from_saved_model({str(tmp_path / "sm")!r}).convert())
"""
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_clean_env(),
                          timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    art = tmp_path / "perturbed.tflite"
    res = kdeploy("check", MODEL, art, "--target", "cpu-edge", "--custom-objects", CUSTOM,
                  "--data", FIXTURES / "digits.npz", "--precision", "fp32", "--out", tmp_path / "o")
    assert res.returncode == 1, res.stderr[-2000:]
    (c,) = json.loads((tmp_path / "o" / "report.json").read_text())["candidates"]
    if built_before:  # the convolutions' names do not line up: the first mapped layer after conv_b diverges
        assert c["first_divergence"]["layer"] == "block1/act", c["first_divergence"]
    else:
        assert c["first_divergence"]["layer"] == "block1/conv_b"
    assert c["first_divergence"]["max_abs_err"] > c["first_divergence"]["tolerance"]


def test_data_signature_reads_headers_skips_labels_and_narrows_float64(tmp_path):
    from kdeploy.data import data_signature

    path = tmp_path / "d.npz"
    np.savez(path, img=np.zeros((5, 4, 3), np.float64), ids=np.zeros((5, 7), np.int32), y=np.zeros(5), y_aux=np.zeros(5))
    got = [(t.name, t.shape, t.dtype) for t in data_signature(path)]
    assert got == [("img", (None, 4, 3), "float32"), ("ids", (None, 7), "int32")]


def test_input_signature_from_flags_and_data():
    from kdeploy.errors import UsageError
    from kdeploy.loading import TensorInfo
    from kdeploy.subclassed import input_signature

    data = [TensorInfo("img", (None, 4, 3), "float32"), TensorInfo("ids", (None, 7), "int32")]
    assert input_signature({}, data, "m") == [("img", (None, 4, 3), "float32"), ("ids", (None, 7), "int32")]
    assert input_signature({"ids": (9,)}, data, "m")[1] == ("ids", (None, 9), "int32")
    assert input_signature({"image": (8, 8, 1)}, data[:1], "m") == [("image", (None, 8, 8, 1), "float32")]
    assert input_signature({"a": (2,), "b": (3,)}, None, "m") == [("a", (None, 2), "float32"), ("b", (None, 3), "float32")]
    with pytest.raises(UsageError, match=r"names \['tokens'\], which the data does not hold"):
        input_signature({"tokens": (5,)}, data, "m")
    with pytest.raises(UsageError, match="pass --data FILE .* or --input-shape"):
        input_signature({}, None, "m")
