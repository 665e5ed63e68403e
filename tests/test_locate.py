"""Failures located by layer (issue 18): where NaN/Inf start, where a runtime crashed, and the crash repaired.

Tiny models built here, with the two real mechanisms seen on a pretrained audio model:
- fp16: the converter stores float constants as float16, so a log front end's `+ 1e-10` becomes
  `+ 0` and `log(0)` is -inf on silent (all-zero) inputs. (An activation above 65504 does not
  overflow here: LiteRT computes an fp16 `.tflite` in float32 on CPU; only constants are float16.)
- int8: LiteRT's int8 DIV refuses a divisor equal to its zero point (`tflite/kernels/div.cc
  data[i] != zero_point`); a per-sample gain normalization `x / (max|x| + eps)` hits it on quiet
  inputs, whose max quantizes to zero.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import make_profile

LAYERS = '''
import keras


@keras.saving.register_keras_serializable(package="locate_test")
class LogPower(keras.layers.Layer):
    """log(x^2 + 1e-10): a log-power front end."""

    def call(self, x):
        return keras.ops.log(keras.ops.square(x) + 1e-10)


@keras.saving.register_keras_serializable(package="locate_test")
class MaxAbsNormalize(keras.layers.Layer):
    """x / (max |x| over the features + eps): per-sample gain normalization."""

    def call(self, x):
        return x / (keras.ops.max(keras.ops.abs(x), axis=-1, keepdims=True) + 1e-6)
'''


def _layers(folder):
    path = folder / "locate_layers.py"
    path.write_text(LAYERS)
    spec = importlib.util.spec_from_file_location("locate_layers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    return _fp16_optimize(tmp_path_factory.mktemp("nan"), silent=True)


def _fp16_optimize(d, silent: bool):
    import keras

    from kdeploy.run import optimize

    mod, module_path = _layers(d)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(8, name="pre")(inp)
    logp = mod.LogPower(name="log_power")(h)
    cat = keras.layers.Concatenate(name="cat")([logp, inp])
    out = keras.layers.Dense(3, name="score")(keras.layers.Dense(16, activation="relu", name="hidden")(cat))
    keras.Model(inp, out, name="lognet").save(d / "lognet.keras")
    x = np.random.default_rng(0).normal(size=(96, 8)).astype(np.float32)
    if silent:
        x[::5] = 0  # silent frames
    np.savez(d / "log.npz", x=x)
    prof = make_profile(d, "cpu-edge", precisions=["fp32", "fp16"], crosscheck_runtimes=[])
    report = optimize(d / "lognet.keras", profile=prof, data=d / "log.npz", out=d / "out",
                      custom_objects=module_path)
    return report, d / "out"


def test_fp16_first_non_finite_names_the_log_layer(fp16_run):
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    report, out = fp16_run
    fp16 = report.candidate("fp16")
    assert not fp16.passed
    assert any("non-finite" in f.detail for f in fp16.fidelity)
    nf = fp16.first_non_finite
    assert (nf["layer"], nf["op"]) == ("log_power", "LOG")
    assert nf["count"] > 0 and nf["reference_count"] == 0  # the fp32 .tflite is finite there
    graph = read_tflite_file(out / next(a.path for a in fp16.artifacts if a.format == "tflite"))
    assert graph.ops[nf["node"]].name == "LOG"
    assert graph.tensors[graph.ops[nf["node"]].outputs[0]].name.split(";")[0] == nf["node_name"]
    # the cause, read from the artifact: the epsilon constant is 0 in float16
    eps = next(t for t in graph.tensors if t.constant and "log_power" in t.name and t.dtype == "float16")
    assert float(eps.values()[0]) == 0.0
    assert fp16.first_divergence["layer"] == "log_power"
    assert fp16.first_divergence["reference"] == "fp32 .tflite"
    assert report.candidate("fp32").first_non_finite is None  # it passed: nothing to locate


def test_fp16_non_finite_only_on_a_probe_is_located_on_its_inputs(tmp_path):
    """No silent sample in the data: only the robustness probe's all-zero input makes NaN/Inf (the audio model's case)."""
    report, _ = _fp16_optimize(tmp_path, silent=False)
    fp16 = report.candidate("fp16")
    assert not any("non-finite" in f.detail for f in fp16.fidelity)
    assert any("NaN/Inf" in r.detail for r in fp16.robustness if r.probe == "edge")
    nf = fp16.first_non_finite
    assert (nf["layer"], nf["op"], nf["inputs"]) == ("log_power", "LOG", "robustness probe 'edge'")
    assert nf["reference_count"] == 0


def test_fp16_non_finite_start_is_in_markdown_and_json(fp16_run):
    _, out = fp16_run
    md = (out / "report.md").read_text()
    assert "NaN/Inf start** at node" in md and "`log_power`" in md
    data = json.loads((out / "report.json").read_text())
    row = next(c for c in data["candidates"] if c["name"] == "fp16")
    assert row["first_non_finite"]["layer"] == "log_power"
    assert row["first_divergence"]["max_abs_err"] is None  # NaN/Inf: no number to give


def _gain_model(d, mod, quiet: bool = True):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    n = mod.MaxAbsNormalize(name="gain")(inp)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(n)
    model = keras.Model(inp, keras.layers.Dense(3, name="score")(h), name="gainnet")
    x = np.random.default_rng(0).normal(size=(96, 8)).astype(np.float32)
    if quiet:  # quiet samples: max |x| is below half an int8 step of the calibrated range
        x[::4] *= 1e-3
    np.savez(d / "gain.npz", x=x)
    return model


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    from kdeploy.run import optimize

    d = tmp_path_factory.mktemp("div")
    mod, module_path = _layers(d)
    _gain_model(d, mod).save(d / "gainnet.keras")
    prof = make_profile(d, "cpu-edge", precisions=["fp32", "int8"], crosscheck_runtimes=[])
    report = optimize(d / "gainnet.keras", profile=prof, data=d / "gain.npz", out=d / "out",
                      custom_objects=module_path)
    return report, d / "out"


def test_int8_div_crash_names_op_node_and_keras_layer(int8_run):
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    report, out = int8_run
    int8 = report.candidate("int8")
    runs = next(k for k in int8.checks if k.name == "runs on litert")
    assert not runs.passed and "div.cc" in runs.detail and "Keras layer 'gain'" in runs.detail
    (site,) = int8.crash_sites
    assert (site["runtime"], site["op"], site["layer"]) == ("litert", "DIV", "gain")
    assert "zero_point" in site["reason"]
    graph = read_tflite_file(out / next(a.path for a in int8.artifacts if a.format == "tflite"))
    assert graph.ops[site["node"]].name == "DIV"  # the runtime's node number is the op's index
    assert graph.tensors[graph.ops[site["node"]].outputs[0]].name.split(";")[0] == site["node_name"]
    assert "fails on litert** at node" in (out / "report.md").read_text()


def test_int8_crash_is_repaired_by_keeping_its_layer_float(int8_run):
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    report, out = int8_run
    mixed = report.candidate("int8-mixed")
    assert mixed.passed, [k.detail for k in mixed.checks if not k.passed]
    assert mixed.recipe["float_layers"] == ["gain"]
    assert mixed.recipe["search"]["crash_sites"][0]["op"] == "DIV"
    assert "crashes LiteRT at node" in mixed.recipe["why"]
    graph = read_tflite_file(out / next(a.path for a in mixed.artifacts if a.format == "tflite"))
    div = next(op for op in graph.ops if op.name == "DIV")
    assert {graph.tensors[t].dtype for t in div.inputs} == {"float32"}
    assert any(op.name == "FULLY_CONNECTED" and graph.tensors[op.inputs[0]].dtype == "int8" for op in graph.ops)


def test_int8_crash_in_savedmodel_on_a_probe_is_kept_float_by_node(tmp_path):
    """No quiet sample in the data: only the robustness probe's all-zero input crashes int8 (as on the audio model)."""
    from kdeploy.run import optimize

    mod, _ = _layers(tmp_path)
    _gain_model(tmp_path, mod, quiet=False).export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    prof = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], crosscheck_runtimes=[])
    report = optimize(tmp_path / "sm", profile=prof, data=tmp_path / "gain.npz", out=tmp_path / "out")
    (site,) = report.candidate("int8").crash_sites
    assert site["op"] == "DIV" and site["layer"] is None  # no Keras layers: the SavedModel node names it
    assert site["node_name"].endswith("gain_1/truediv")
    mixed = report.candidate("int8-mixed")
    assert mixed.passed, [k.detail for k in mixed.checks if not k.passed]
    assert mixed.recipe["float_layers"] == [] and mixed.recipe["float_scopes"] == ["gainnet_1/gain_1"]
    assert any(n.split(";")[0] == site["node_name"] for n in mixed.recipe["float_nodes"])


def test_crash_between_layers_names_the_layers_feeding_it(tmp_path):
    """`keras.ops.divide` in a functional model is an op of no Keras layer: the site says which layers feed it."""
    import keras
    import tensorflow as tf

    from kdeploy.debug.locate import crash_site, describe
    from kdeploy.debug.names import LayerNamer

    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    q = keras.ops.divide(keras.layers.Dense(8, name="num")(inp), keras.layers.Dense(8, name="den")(inp))
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(q), name="divnet")
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    c = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ({"x": x[i : i + 1]} for i in range(16))
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    path = tmp_path / "divnet.tflite"
    path.write_bytes(c.convert())
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    with pytest.raises(RuntimeError) as e:
        for i in range(len(x)):
            runner(x=x[i : i + 1])
    site = crash_site(path, "tflite", f"litert raised RuntimeError: {e.value}", LayerNamer("divnet", ["num", "den", "head"]))
    assert site["op"] == "DIV" and site["layer"] is None
    assert site["inputs_from"] == ["num", "den"]
    assert "in no Keras layer (an op between layers, fed by 'num', 'den')" in describe(site)


def test_parse_failure_reads_litert_and_onnxruntime_text():
    from kdeploy.debug.locate import parse_failure

    lite = parse_failure("litert raised RuntimeError: tflite/kernels/div.cc:262 data[i] != zero_point was not "
                         "true.Node number 198 (DIV) failed to invoke.")
    assert lite == {"op": "DIV", "node": 198, "phase": "invoke",
                    "reason": "tflite/kernels/div.cc:262 data[i] != zero_point was not true"}
    ort = parse_failure("onnxruntime raised Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned "
                        "while running Div node. Name:'model_1/normalized_log_1/div' Status Message: bad divisor")
    assert ort == {"op": "Div", "node_name": "model_1/normalized_log_1/div", "reason": "bad divisor"}
    assert parse_failure("litert crashed with signal 11 (SIGSEGV) on int8.tflite") is None


def test_onnxruntime_node_error_names_node_index_and_keras_layer(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from kdeploy.debug.locate import crash_site
    from kdeploy.debug.names import LayerNamer

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="net_1/dense_1/MatMul"),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"], name="node__k1"),
             helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"], name="node__k2"),
             helper.make_node("Div", ["x", "hd"], ["y"], name="net_1/ratio_1/truediv")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1, 0, 0, 1]), helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
         helper.make_tensor("z", TensorProto.INT8, [], [0])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    text = ("onnxruntime raised Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running "
            "Div node. Name:'net_1/ratio_1/truediv' Status Message: division by zero")
    site = crash_site(tmp_path / "m.onnx", "onnx", text, LayerNamer("net", ["dense", "ratio"]))
    assert site == {"op": "Div", "node": 3, "node_name": "net_1/ratio_1/truediv", "layer": "ratio",
                    "inputs_from": ["input x", "dense"], "reason": "division by zero"}
    assert crash_site(tmp_path / "m.onnx", "onnx", text.replace("ratio_1", "other_1"), None) is None


def test_int8_crash_on_integer_only_target_is_named_with_a_fix(tmp_path):
    from kdeploy.run import optimize

    mod, module_path = _layers(tmp_path)
    _gain_model(tmp_path, mod).save(tmp_path / "gainnet.keras")
    prof = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], crosscheck_runtimes=[], full_integer=True,
                        qat={"enabled": False})
    report = optimize(tmp_path / "gainnet.keras", profile=prof, data=tmp_path / "gain.npz", out=tmp_path / "out",
                      custom_objects=module_path)
    assert report.candidate("int8").crash_sites[0]["layer"] == "gain"
    assert "int8-mixed" not in [c.name for c in report.candidates]
    (f,) = [f for f in report.findings if f.code == "int8-crash"]
    assert "Keras layer 'gain'" in f.message and "epsilon" in f.message
