"""`kdeploy inspect`: real conversions of tiny models, per-layer predictions, hazards, CLI contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FIXTURES

from kdeploy.cli import app
from kdeploy.inspection import inspect


def _hazard(res, code):
    return [h for h in res.hazards if h.code == code]


def _row(res, name):
    return next(r for r in res.layers if r.name == name)


@pytest.fixture(scope="module")
def lstm_models(tmp_path_factory):
    """A tiny LSTM over fixed 6x3 sequences, and the same layers over a dynamic sequence length."""
    import keras

    folder = tmp_path_factory.mktemp("lstm")
    paths = {}
    for name, steps in (("static", 6), ("dynamic", None)):
        inp = keras.Input((steps, 3), name="seq")
        h = keras.layers.LSTM(4, name="encoder")(inp)
        out = keras.layers.Dense(2, activation="softmax", name="head")(h)
        paths[name] = folder / f"{name}.keras"
        keras.Model(inp, out, name=f"lstm_{name}").save(paths[name])
    return paths


def test_inspect_digits_cnn_all_layers_builtin_when_cpu_edge():
    res = inspect(FIXTURES / "digits_cnn.keras", target="cpu-edge")

    assert res.ready
    assert not [h for h in res.hazards if h.blocks]
    convs = [r for r in res.layers if r.class_name == "Conv2D"]
    assert len(convs) == 2 and all(r.tflite == "builtin" and "CONV_2D" in r.ops for r in convs)
    assert _row(res, "dropout").tflite == "no-ops"  # identity at inference
    assert res.summary["params"] == 13770
    assert res.summary["macs"] > 0
    sizes = res.summary["predicted_size_bytes"]
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"] == res.summary["fp32_bytes"]
    assert not res.conversion["unmapped_ops"]


def test_inspect_digits_gru_names_layer_and_unroll_repair():
    res = inspect(FIXTURES / "digits_gru.keras", target="cpu-edge")

    gru = _row(res, "gru")
    assert gru.class_name == "GRU"
    assert gru.tflite == "builtin" and "unrolled copy" in gru.repair
    repair = _hazard(res, "rnn-unrolled")
    assert [h.layer for h in repair] == ["gru"] and not repair[0].blocks
    assert res.conversion["converted_model"].startswith("unrolled copy")
    assert res.ready


def test_inspect_cancer_mlp_input_spread_hazard_when_data_given():
    with_data = inspect(FIXTURES / "cancer_mlp.keras", target="cpu-edge", data=FIXTURES / "cancer.npz")
    without = inspect(FIXTURES / "cancer_mlp.keras", target="cpu-edge")

    spread = _hazard(with_data, "input-scale-spread")
    assert [h.layer for h in spread] == ["features"]
    assert "standardize" in spread[0].message  # the Normalization inside the model does not help int8 inputs
    assert not _hazard(without, "input-scale-spread")


def test_inspect_names_input_and_flag_when_sequence_length_dynamic(lstm_models):
    res = inspect(lstm_models["dynamic"], target="cpu-edge")

    dyn = _hazard(res, "dynamic-dim")
    assert len(dyn) == 1 and dyn[0].blocks and dyn[0].layer == "seq"
    assert "--input-shape seq=N,3" in dyn[0].fix
    assert not res.ready
    assert res.summary["inputs"][0]["dynamic_axes"] == [0, 1]


def test_inspect_unrolls_lstm_when_input_shape_given(lstm_models):
    res = inspect(lstm_models["dynamic"], target="cpu-edge", input_shapes={"seq": (6, 3)})

    assert not _hazard(res, "dynamic-dim")
    assert _row(res, "encoder").tflite == "builtin"
    assert [h.layer for h in _hazard(res, "rnn-unrolled")] == ["encoder"]
    assert res.ready


def test_inspect_lstm_names_layer_and_int8_hostility_when_mcu(lstm_models):
    res = inspect(lstm_models["static"], target="mcu")

    assert [h.layer for h in _hazard(res, "rnn-unrolled")] == ["encoder"]
    assert [h.layer for h in _hazard(res, "int8-hostile")] == ["encoder"]
    mcu = res.summary["mcu"]
    assert mcu["predicted_flash_bytes"] == res.summary["predicted_size_bytes"]["int8"]
    assert 0 < mcu["arena_lower_bound_bytes"] and mcu["arena_fits"] is True
    assert res.summary["inputs"][0]["shape"][0] == 1  # mcu converts with static batch 1


def test_inspect_attributes_graph_output_op_to_its_layer(tmp_path):
    import keras

    inp = keras.Input((4,), name="x")
    out = keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="pre")(inp))
    path = tmp_path / "two_dense.keras"
    keras.Model(inp, out).save(path)

    res = inspect(path, target="cpu-edge")

    assert _row(res, "x").ops == []
    assert _row(res, "pre").ops == ["FULLY_CONNECTED"]
    assert _row(res, "head").ops == ["FULLY_CONNECTED"]  # the graph output tensor has no layer name


def test_inspect_cli_json_shape_and_exit_codes(lstm_models):
    runner = CliRunner()

    ok = runner.invoke(app, ["inspect", str(FIXTURES / "digits_cnn.keras"), "--json", "--quiet"])
    blocked = runner.invoke(app, ["inspect", str(lstm_models["dynamic"]), "--json", "--quiet"])
    bad_target = runner.invoke(app, ["inspect", str(FIXTURES / "digits_cnn.keras"), "--target", "nope"])
    missing = runner.invoke(app, ["inspect", "no-such-model.keras"])

    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["layers"] and all({"name", "class", "tflite", "tflm", "onnx"} <= set(r) for r in data["layers"])
    assert blocked.exit_code == 1
    hazards = json.loads(blocked.stdout)["hazards"]
    assert hazards and all({"code", "layer", "message", "fix"} <= set(h) for h in hazards)
    assert bad_target.exit_code == 2 and "nope" in bad_target.output
    assert missing.exit_code == 2 and "no-such-model.keras" in missing.output
    assert "Traceback" not in bad_target.output + missing.output


def test_layer_of_reads_keras3_suffixed_nested_scopes():
    from kdeploy.inspection.ops import layer_of

    paths = {"pre", "block", "block/dense", "block/dense_1", "head"}

    assert layer_of("mymodel_1/block_1/dense_1_2/MatMul", "mymodel", paths) == "block/dense_1"
    assert layer_of("mymodel_1/block_1/dense_1/Relu", "mymodel", paths) == "block/dense"
    assert layer_of("mymodel_1/head_1/BiasAdd", "mymodel", paths) == "head"
    assert layer_of("StatefulPartitionedCall:0", "mymodel", paths) is None


def test_input_spread_rule_flags_only_wide_ranges():
    from kdeploy.inspection.rules import input_spread
    from kdeploy.loading import TensorInfo

    t = TensorInfo("x", (None, 2), "float32")
    rng = np.random.default_rng(0)
    wide = np.stack([rng.random(50) * 1e-2, rng.random(50) * 1e3], axis=1).astype(np.float32)
    narrow = rng.random((50, 2)).astype(np.float32)

    assert [r[0] for r in input_spread([t], {"x": wide})] == ["x"]
    assert input_spread([t], {"x": narrow}) == []


def test_inspect_counts_gelu_as_onnx_supported_because_kdeploy_rewrites_erfc(tmp_path):
    import keras

    inp = keras.Input(shape=(6,), name="x")
    out = keras.layers.Dense(4, activation="gelu", name="mlp")(inp)  # exact GELU lowers through Erfc
    path = tmp_path / "gelu.keras"
    keras.Model(inp, out).save(path)
    res = inspect(path, target="cpu-server")  # ONNX Runtime is the deployed runtime there
    (row,) = [r for r in res.layers if r.name == "mlp"]
    from tf2onnx import handler, tfonnx  # noqa: F401

    from kdeploy.artifacts.onnx import OPSET

    assert "Erfc" not in handler.tf_op.create_mapping(OPSET, [])  # tf2onnx alone has no route for it
    assert row.onnx == "supported"
    assert not any(h.code == "no-onnx-route" for h in res.hazards)
