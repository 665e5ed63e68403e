"""Selective int8, layer attribution, task metrics and first divergence on real models and runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURES
from kdeploy.debug.names import LayerNamer


def test_layer_namer_maps_keras3_suffixes_and_model_prefix():
    namer = LayerNamer("cancer_mlp", ["standardize", "dense", "dense_1", "benign_prob"])
    assert namer.layer_of("cancer_mlp_1/dense_1_2/MatMul;cancer_mlp_1/dense_1_2/Relu") == "dense_1"
    assert namer.layer_of("cancer_mlp_1/dense_1/MatMul") == "dense"
    assert namer.layer_of("cancer_mlp_1/standardize_1/Sub") == "standardize"
    assert namer.layer_of("serving_default_features:0") is None


def test_layer_namer_maps_nested_models():
    namer = LayerNamer("outer", ["stem", "block/conv", "block/bn", "head"])
    assert namer.layer_of("outer_1/block_1/conv_1/Conv2D") == "block/conv"
    assert namer.layer_of("outer_1/head_1/MatMul") == "head"


@pytest.fixture(scope="module")
def cancer_report(tmp_path_factory):
    from kdeploy.run import optimize

    out = tmp_path_factory.mktemp("sel") / "out"
    return optimize(FIXTURES / "cancer_mlp.keras", target="cpu-edge", data=FIXTURES / "cancer.npz", out=out), out


def test_selective_int8_passes_where_full_int8_fails(cancer_report):
    import keras

    report, out = cancer_report
    full, mixed = report.candidate("int8"), report.candidate("int8-mixed")
    assert not full.passed and mixed.passed
    layers = {layer.name for layer in keras.saving.load_model(FIXTURES / "cancer_mlp.keras").layers}
    assert mixed.recipe["float_layers"] and set(mixed.recipe["float_layers"]) <= layers
    assert full.sensitivity[0]["layer"] in mixed.recipe["float_layers"]  # the worst layer of full int8
    size = {c.name: next(a.size_bytes for a in c.artifacts if a.format == "tflite") for c in report.candidates}
    assert size["int8-mixed"] < size["fp32"]


def test_selective_int8_kept_layers_are_float_in_tflite(cancer_report):
    from kdeploy.artifacts.flatbuffer import read_tflite_file
    from kdeploy.debug.tensors import layer_ops

    report, out = cancer_report
    mixed = report.candidate("int8-mixed")
    art = next(a for a in mixed.artifacts if a.format == "tflite")
    graph = read_tflite_file(out / art.path)
    namer = LayerNamer("cancer_mlp", ["standardize", "dense", "dense_1", "benign_prob"])
    ops, _ = layer_ops(graph, namer)
    for layer, idx in ops.items():
        dtypes = {graph.tensors[t].dtype for i in idx for t in graph.ops[i].inputs
                  if t >= 0 and graph.tensors[t].data is None}
        assert dtypes == ({"float32"} if layer in mixed.recipe["float_layers"] else {"int8"}), (layer, dtypes)


def test_task_metrics_equal_accuracy_by_hand():
    import keras

    from kdeploy.taskmetrics import task_rows

    d = np.load(FIXTURES / "cancer.npz")
    model = keras.saving.load_model(FIXTURES / "cancer_mlp.keras")
    p = model.predict(d["x"].astype(np.float32), verbose=0)
    flipped = p.copy()
    flipped[:10] = 1 - flipped[:10]
    (row,) = task_rows(["benign_prob"], ["binary"], [d["y"]], [p], [flipped])
    by_hand = float(np.mean((p[:, 0] > 0.5) == (d["y"] == 1)))
    assert row["keras"] == pytest.approx(by_hand, abs=1e-6)
    assert row["value"] == pytest.approx(float(np.mean((flipped[:, 0] > 0.5) == (d["y"] == 1))), abs=1e-6)
    assert row["drop"] == pytest.approx(row["keras"] - row["value"], abs=1e-6)


def test_check_reports_perturbed_layer_as_first_divergence(tmp_path):
    import keras
    import tensorflow as tf

    from kdeploy.run import check

    model = keras.saving.load_model(FIXTURES / "cancer_mlp.keras")
    w = model.get_layer("dense_1").get_weights()
    model.get_layer("dense_1").set_weights([w[0] * 1.5, w[1]])
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    (tmp_path / "perturbed.tflite").write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert())
    report = check(FIXTURES / "cancer_mlp.keras", [tmp_path / "perturbed.tflite"], target="cpu-edge",
                   data=FIXTURES / "cancer.npz", precision="fp32")
    c = report.candidates[0]
    assert not c.passed
    assert c.first_divergence["layer"] == "dense_1"
    assert c.first_divergence["max_abs_err"] > c.first_divergence["tolerance"]


def test_layer_errors_compared_in_the_dump_equal_those_of_the_written_tensors(tmp_path):
    """`dump_layers(compare=...)`: the child's per-layer figures (sensitivity, first failing layer, first non-finite
    op) are those computed here from the tensors it writes."""
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from kdeploy.debug.attribution import (Comparison, dump_layers, first_failing_layer, first_non_finite,
                                           sensitivity)
    from kdeploy.debug.names import layer_paths
    from kdeploy.profiles import resolve_profile

    model = keras.saving.load_model(FIXTURES / "digits_cnn.keras")
    x = np.load(FIXTURES / "digits.npz")["x"][:24].astype(np.float32)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    paths = []
    for name in ("fp32", "int8"):
        conv = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
        if name == "int8":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([x[i : i + 1]] for i in range(16))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        paths.append(tmp_path / f"{name}.tflite")
        paths[-1].write_bytes(conv.convert())
    sig = Interpreter(str(paths[0])).get_signature_list()["serving_default"]
    io = {"inputs": {model.inputs[0].name: sig["inputs"][0]}, "outputs": sig["outputs"]}
    np.savez(tmp_path / "feeds.npz", **{model.inputs[0].name: x})
    order = [p for p, layer in layer_paths(model).items() if type(layer).__name__ != "InputLayer"]
    tight = resolve_profile("cpu-edge").tolerances["int8"].model_copy(update={"max_rel_rmse": 1e-6})
    dumps, (errors,) = dump_layers([(p, io) for p in paths], tmp_path / "feeds.npz", model.name, order,
                                   tmp_path / "job", 12, 300,
                                   compare=[Comparison(0, 1, order, tight.model_dump(), "int8")])
    ref, cand = dumps[0].load(), dumps[1].load()
    assert set(ref.outputs) <= set(order) and len(ref.outputs) >= 4  # fused (batch norm) and op-less (dropout) apart
    assert all(v.shape[0] == 12 for v in ref.outputs.values())
    assert errors.sensitivity == sensitivity(ref, cand, order) and errors.sensitivity
    expected = first_failing_layer(ref, cand, order, tight, "fp32 .tflite", "int8")
    assert expected is not None and errors.first_failing == expected  # a tolerance int8 cannot meet: a layer fails
    assert errors.first_non_finite == first_non_finite(cand, ref)
    assert errors.reference.meta == ref.meta and errors.candidate.meta == cand.meta


def test_evaluation_takes_the_search_s_runs_of_the_candidate_it_chose(tmp_path, monkeypatch):
    """The try that passed ran int8-mixed's bytes on LiteRT (validation inputs, then the probes): evaluation takes
    those runs (`Context.reuse_runs`) instead of making them again, with the figures a fresh run gives."""
    from kdeploy.run import optimize
    from kdeploy.run.context import Context

    def run(tag: str):
        lines: list[str] = []
        report = optimize(FIXTURES / "cancer_mlp.keras", target="cpu-edge", data=FIXTURES / "cancer.npz",
                          out=tmp_path / tag, cache=False, parallel=False,
                          progress=lambda stage, detail="": lines.append(detail) if stage == "run" else None)
        mixed = report.candidate("int8-mixed")
        assert mixed.passed, mixed.checks
        figures = ([(f.runtime, f.max_abs_err, f.cosine_mean, f.top1_agreement) for f in mixed.fidelity],
                   [(r.probe, r.runtime, r.cosine_mean, r.top1_agreement) for r in mixed.robustness])
        return figures, lines

    reused, lines = run("reused")
    assert not any(line.startswith("int8-mixed on litert") for line in lines), lines
    assert any(line.startswith("int8-mixed on onnxruntime") for line in lines), lines  # its twin: a run of its own
    monkeypatch.setattr(Context, "reuse_runs", lambda self, src, dst: None)
    fresh, lines = run("fresh")
    assert any(line.startswith("int8-mixed on litert") for line in lines), lines
    assert reused == fresh and reused[1]
