"""Ops tf2onnx leaves unconverted: rewritten into standard ONNX, the other route for fp32, or named with their layer.

The models are built here from tiny configs (no downloads). A 5-D comparison with a dynamic batch
makes the TFLite converter emit BROADCAST_ARGS (as Gemma's attention mask does), a
Discretization layer BUCKETIZE, `clip(dense(x), -1, 1)` a FULLY_CONNECTED with the fused
activation RELU_N1_TO_1 that tf2onnx's handler drops; `keras.ops.rfft` leaves RFFT2D / REAL /
IMAG, which no row rewrites.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_profile

from kdeploy.artifacts.onnx import UnconvertedOps
from kdeploy.artifacts.onnx_ops import REWRITES, Unconverted, rewrite_graph
from kdeploy.debug.names import LayerNamer


def kdeploy(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def run(tmp_path: Path, model: Path, precisions: list[str], *extra) -> dict:
    profile = make_profile(tmp_path, "cpu-edge", precisions=precisions, threads=[1], robustness={"enabled": False})
    res = kdeploy("optimize", model, "--profile", profile, "--out", tmp_path / "out", "-q", *extra)
    assert res.returncode in (0, 1), res.stderr
    return json.loads((tmp_path / "out" / "report.json").read_text())


def onnx_of(candidate: dict) -> dict | None:
    return next((a for a in candidate["artifacts"] if a["format"] == "onnx"), None)


# ---- the table on a hand-made graph -------------------------------------------------------------
def test_rewrite_table_on_a_hand_made_graph_matches_numpy():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T, helper

    nodes = [
        helper.make_node("TFL_BROADCAST_ARGS", ["s0", "s1"], ["bshape"], name="m/bargs"),
        helper.make_node("TFL_BUCKETIZE", ["x"], ["bucket"], name="m/bucketize", boundaries=[-0.5, 0.0, 0.5]),
        helper.make_node("TFL_GELU", ["x"], ["gelu_tanh"], name="m/gelu_tanh", approximate=1),
        helper.make_node("TFL_GELU", ["x"], ["gelu_erf"], name="m/gelu_erf", approximate=0),
        helper.make_node("Erfc", ["x"], ["erfc"], name="m/erfc"),
        helper.make_node("TFL_RELU_N1_TO_1", ["x"], ["clip11"], name="m/clip11"),
        helper.make_node("TFL_RELU_0_TO_1", ["x"], ["clip01"], name="m/clip01"),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("s0", T.INT64, [None]),
                        helper.make_tensor_value_info("s1", T.INT64, [None]),
                        helper.make_tensor_value_info("x", T.FLOAT, [None, 6])],
        [helper.make_tensor_value_info(n, T.INT64 if n == "bshape" else T.INT32 if n == "bucket" else T.FLOAT,
                                       [None] if n == "bshape" else [None, 6])
         for n in ("bshape", "bucket", "gelu_tanh", "gelu_erf", "erfc", "clip11", "clip01")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = rewrite_graph(model)
    assert sorted(result.rewritten) == sorted(n.op_type for n in nodes) and not result.left
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-2.0, -0.5, -0.1, 0.0, 0.5, 3.0]] * 2, np.float32)
    from math import erf, erfc, pi, sqrt, tanh

    def run(s0, s1):
        return dict(zip([o.name for o in sess.get_outputs()],
                        sess.run(None, {"s0": np.array(s0, np.int64), "s1": np.array(s1, np.int64), "x": x})))

    out = run([7, 1, 1, 16, 16], [])  # Gemma's case: a 5-D shape against a scalar's
    assert out["bshape"].tolist() == [7, 1, 1, 16, 16]
    assert run([2, 1, 3], [5, 1, 4, 1])["bshape"].tolist() == list(np.broadcast_shapes((2, 1, 3), (5, 1, 4, 1)))
    assert run([0, 1], [1, 3])["bshape"].tolist() == [0, 3]  # a size-0 dim wins over 1 (a plain Max would not)
    assert out["bucket"].tolist() == [[0, 1, 1, 2, 3, 3]] * 2  # boundaries <= x, as tf.raw_ops.Bucketize
    v = x[0].astype(np.float64)
    np.testing.assert_allclose(out["gelu_erf"][0], [0.5 * t * (1 + erf(t / sqrt(2))) for t in v], atol=1e-6)
    np.testing.assert_allclose(out["gelu_tanh"][0],
                               [0.5 * t * (1 + tanh(sqrt(2 / pi) * (t + 0.044715 * t ** 3))) for t in v], atol=1e-6)
    np.testing.assert_allclose(out["erfc"][0], [erfc(t) for t in v], atol=1e-6)
    assert out["clip11"][0].tolist() == np.clip(x[0], -1, 1).tolist()
    assert out["clip01"][0].tolist() == np.clip(x[0], 0, 1).tolist()


def test_an_op_without_a_row_is_left_in_place_and_named_with_its_keras_layer():
    from onnx import TensorProto as T, helper

    node = helper.make_node("TFL_NO_SUCH_OP", ["x"], ["y"], name="net_1/block_1/attention_1/NoSuch;net_1/other")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    result = rewrite_graph(model)
    assert result.rewritten == [] and result.left == [Unconverted("TFL_NO_SUCH_OP", node.name)]
    assert model.SerializeToString() == before and "TFL_NO_SUCH_OP" not in REWRITES
    namer = LayerNamer("net", ["dense", "block"])
    msg = str(UnconvertedOps(result.left, "tf2onnx from the int8 .tflite", namer))
    assert msg == ("no ONNX twin (tf2onnx from the int8 .tflite): op TFL_NO_SUCH_OP (layer block, node "
                   "net_1/block_1/attention_1/NoSuch) has no ONNX equivalent (tf2onnx leaves it unconverted "
                   "and kdeploy.artifacts.onnx_ops has no rewrite for it)")
    # The SavedModel route's node names carry the call nodes before the model's scope.
    assert "layer block," in str(UnconvertedOps([Unconverted("Foo", "StatefulPartitionedCall/net_1/block_1/Foo")],
                                                "x", namer))


# ---- real models --------------------------------------------------------------------------------
def unconverted_ops_model(folder: Path) -> Path:
    """x -> Dense -> clip(-1, 1) (fused RELU_N1_TO_1) -> a 5-D `where` with a dynamic batch (BROADCAST_ARGS);
    x -> Discretization (BUCKETIZE); both into the head."""
    import keras
    from keras import layers, ops

    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    h = ops.clip(layers.Dense(8, name="proj")(x), -1.0, 1.0)
    mask = ops.reshape(ops.where(ops.reshape(h, (-1, 1, 2, 2, 2)) > 0.0, 1.0, 0.0), (-1, 8))
    buckets = ops.cast(layers.Discretization(bin_boundaries=[-0.5, 0.0, 0.5], name="bins")(x), "float32")
    y = layers.Dense(3, name="head")(ops.concatenate([h, mask * h, buckets], axis=-1))
    path = folder / "ops.keras"
    keras.Model(x, y, name="opsnet").save(path)
    return path


def test_ops_tf2onnx_leaves_unconverted_are_rewritten_and_onnx_runtime_agrees_with_litert(tmp_path):
    rep = run(tmp_path, unconverted_ops_model(tmp_path), ["fp32", "int8"])
    assert not [f for f in rep["findings"] if f["code"] == "crosscheck-unavailable"], rep["findings"]
    for c in rep["candidates"]:
        art = onnx_of(c)
        assert art is not None and art["source"] == "tf2onnx(tflite)+rewrite(TFL_BROADCAST_ARGS,TFL_BUCKETIZE)", art
        vs_keras = {f["runtime"]: f for f in c["fidelity"] if f["reference"] == "keras"}
        assert set(vs_keras) == {"litert", "onnxruntime"} and all(f["passed"] for f in vs_keras.values()), vs_keras
        # the same graph on both runtimes: as close to Keras as LiteRT is (the clamp and the buckets kept)
        ort, litert = vs_keras["onnxruntime"]["max_abs_err"], vs_keras["litert"]["max_abs_err"]
        assert ort <= (1e-5 if c["name"] == "fp32" else 1.1 * litert + 1e-5), (c["name"], ort, litert)
        consistency = [k for k in c["checks"] if k["name"].startswith("consistency onnxruntime vs litert")]
        assert all(k["passed"] for k in consistency), consistency


SPECTRUM = """
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="rewrite_test")
class Spectrum(keras.layers.Layer):
    def call(self, x):
        real, imag = ops.rfft(x)  # TF: RFFT, then Real / Imag of the complex result
        return ops.concatenate([real, imag], axis=-1)
"""


def test_an_op_with_no_route_is_named_with_its_layer_and_fp32_tries_the_savedmodel_route(tmp_path):
    import importlib.util

    import keras
    from keras import layers

    module = tmp_path / "spectrum_layers.py"
    module.write_text(SPECTRUM)
    spec = importlib.util.spec_from_file_location("spectrum_layers", module)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    s = keras.saving.get_registered_object("rewrite_test>Spectrum")(name="spectrum")(layers.Dense(8, name="proj")(x))
    path = tmp_path / "spec.keras"
    keras.Model(x, layers.Dense(3, name="head")(s), name="spec").save(path)
    rep = run(tmp_path, path, ["fp32", "int8"], "--custom-objects", module)
    why = {f["message"].split(":")[0]: f["message"] for f in rep["findings"] if f["code"] == "crosscheck-unavailable"}
    assert {c["name"] for c in rep["candidates"]} == {"fp32", "int8"}
    for c in rep["candidates"]:
        assert onnx_of(c) is None
        msg = why[f"candidate {c['name']}"]
        assert f"no ONNX twin (tf2onnx from the {c['recipe']['precision']} .tflite): op " in msg, msg
        for op in ("TFL_REAL", "TFL_IMAG"):
            assert f"op {op} (layer spectrum, node spec_1/spectrum_1/" in msg, msg
        assert "have no ONNX equivalent" in msg, msg
        # fp32 alone may swap routes; the SavedModel route cannot convert an RFFT read by Real/Imag either
        assert ("the SavedModel route failed too" in msg) == (c["name"] == "fp32"), msg


@pytest.mark.slow  # a full run of a KerasHub backbone, five candidates (~80 s on a busy 2-core host)
def test_gemma_backbone_gets_an_onnx_twin_for_every_candidate_or_a_named_reason(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    import keras

    keras.utils.set_random_seed(0)
    model = keras_hub.models.GemmaBackbone(vocabulary_size=256, num_layers=1, num_query_heads=2,
                                           num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16)
    path = tmp_path / "gemma.keras"
    model.save(path)
    profile = make_profile(tmp_path, "cpu-edge", threads=[1], robustness={"enabled": False})
    res = kdeploy("optimize", path, "--profile", profile, "--out", tmp_path / "out", "-q",
                  "--input-shape", "token_ids=16", "--input-shape", "padding_mask=16")
    assert res.returncode in (0, 1), res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    missing = [f["message"] for f in rep["findings"] if f["code"] == "crosscheck-unavailable"]
    assert len(rep["candidates"]) >= 4
    for c in rep["candidates"]:
        art = onnx_of(c)
        if art is None:  # only with a reason that names the op and where it comes from
            assert any(f"candidate {c['name']}:" in m and " op " in m and "node " in m for m in missing), missing
            continue
        assert "TFL_BROADCAST_ARGS" in art["source"] and "TFL_GELU" in art["source"], art
        ort = [f for f in c["fidelity"] if f["runtime"] == "onnxruntime"]
        assert ort, c["name"]
    assert not missing, missing  # today every candidate has its twin


def test_fp32_twin_swaps_routes_when_its_route_leaves_an_op_and_says_so(tmp_path, monkeypatch):
    from kdeploy.artifacts import Artifact
    from kdeploy.artifacts import onnx as onnx_export
    from kdeploy.errors import ConversionError

    left = UnconvertedOps([Unconverted("TFL_FOO", "net_1/block_1/Foo")], "tf2onnx from the fp32 .tflite")
    made = []

    def tflite_route(src, out, namer=None):
        made.append("tflite")
        raise left

    def savedmodel_route(sm, model, out, outputs, namer=None):
        made.append("savedmodel")
        return Artifact("onnx", out, "fp32", "tf2onnx(saved_model)")

    monkeypatch.setattr(onnx_export, "from_tflite", tflite_route)
    monkeypatch.setattr(onnx_export, "from_saved_model", savedmodel_route)
    fp32 = Artifact("tflite", tmp_path / "fp32.tflite", "fp32", "tflite-converter")
    art = onnx_export.twin("tflite", tmp_path / "fp32.onnx", lambda: fp32, tmp_path, None, ["y"])
    assert made == ["tflite", "savedmodel"]
    assert art.source == "tf2onnx(saved_model)+fallback(tflite: TFL_FOO unconverted)"
    assert onnx_export.fallback_note(art) == "tf2onnx from the SavedModel (the .tflite route left TFL_FOO unconverted)"
    # a quantized twin must be the quantized graph itself, and a pruned model is not the reference SavedModel
    int8 = Artifact("tflite", tmp_path / "int8.tflite", "int8", "tflite-converter")
    with pytest.raises(UnconvertedOps, match="op TFL_FOO"):
        onnx_export.twin("tflite", tmp_path / "int8.onnx", lambda: int8, tmp_path, None, ["y"])
    with pytest.raises(UnconvertedOps):
        onnx_export.twin("tflite", tmp_path / "p.onnx", lambda: fp32, tmp_path, None, ["y"], fallback=False)
    # both routes failing: both reasons
    monkeypatch.setattr(onnx_export, "from_saved_model", lambda *a, **k: (_ for _ in ()).throw(ConversionError("boom")))
    with pytest.raises(ConversionError, match=r"op TFL_FOO .*; the SavedModel route failed too: boom"):
        onnx_export.twin("tflite", tmp_path / "fp32.onnx", lambda: fp32, tmp_path, None, ["y"])


def test_fp16_twin_stores_the_float16_weights_of_its_tflite_with_the_same_values(tmp_path):
    """tf2onnx folds each float16 weight's DEQUANTIZE into a float32 initializer: the "fp16" ONNX model was the fp32
    one again in size. `onnx.half_weights` stores them in float16 (a Cast before their uses): half the bytes, and
    ONNX Runtime computes the very same outputs as with the folded float32 values."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from conftest import FIXTURES
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    rep = run(tmp_path, FIXTURES / "digits_cnn.keras", ["fp32", "fp16"], "--data", FIXTURES / "digits.npz")
    arts = {c["name"]: {a["format"]: a for a in c["artifacts"]} for c in rep["candidates"]}
    out = tmp_path / "out"
    half = onnx.load(str(out / arts["fp16"]["onnx"]["path"]))
    n_half = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    n_tflite = sum(t.dtype == "float16" and t.constant for t in read_tflite_file(out / arts["fp16"]["tflite"]["path"]).tensors)
    assert n_half == n_tflite > 0 and sum(n.op_type == "Cast" for n in half.graph.node) >= n_half
    assert arts["fp16"]["onnx"]["source"] == "tf2onnx(tflite)+rewrite(float16 weights)"
    assert arts["fp16"]["onnx"]["size_bytes"] < 0.6 * arts["fp32"]["onnx"]["size_bytes"]
    # the folded model tf2onnx wrote: every float16 initializer back in float32 under the name its Cast writes
    casts = {n.input[0]: n.output[0] for n in half.graph.node if n.op_type == "Cast" and n.input[0] in
             {t.name for t in half.graph.initializer}}
    folded = onnx.ModelProto()
    folded.CopyFrom(half)
    inits = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), casts[t.name])
             if t.name in casts else t for t in half.graph.initializer]
    nodes = [n for n in half.graph.node if not (n.op_type == "Cast" and n.input[0] in casts)]
    del folded.graph.initializer[:], folded.graph.node[:]
    folded.graph.initializer.extend(inits)
    folded.graph.node.extend(nodes)
    x = np.load(FIXTURES / "digits.npz")["x"][:32].astype(np.float32)
    got = []
    for m in (half, folded):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        got.append(s.run(None, {s.get_inputs()[0].name: x.reshape(-1, *s.get_inputs()[0].shape[1:])})[0])
    assert np.array_equal(got[0], got[1])
    fp16 = next(c for c in rep["candidates"] if c["name"] == "fp16")
    assert fp16["consistency"] and all(r["passed"] for r in fp16["consistency"]), fp16["consistency"]
