"""Per-location softmax maps (a detector's (N, H, W, 2) face/not-face map, mtcnn's PNet): judged cell by cell.

One top-1 over the whole flattened map is arbitrary where many cells are near 1.0: a real int8
conversion of such a map had top-1 0 of 16 samples with every per-cell decision but a few
agreeing. The decision is the argmax along the last axis at every location; the confidence
bound counts samples (a sample's cells are correlated), for sigmoid score maps too. Rank-2
(N, C) outputs keep one decision per sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdeploy.compare import compare, output_kind
from kdeploy.profiles import resolve_profile

from conftest import ROOT, make_profile

SAMPLES = 48


def pixel_softmax_model(swap: bool = False):
    """Input `img` (8, 8, 3) -> `cls` (8, 8, 2), a softmax per pixel, saturated (many cells near 1.0) as
    a trained detector's; `swap`: the last conv's two output channels swapped (a broken artifact)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="img")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="body")(inp)
    m = keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax", name="cls")(h))
    w, b = m.get_layer("cls").get_weights()
    w, b = w * 8, b
    if swap:
        w, b = w[..., ::-1], b[::-1]
    m.get_layer("cls").set_weights([w, b])
    return m


def _litert(path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    run = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    (name,) = run.get_input_details()
    return np.concatenate([next(iter(run(**{name: x[i:i + 1]}).values())) for i in range(len(x))])


def _judge(ref, got, kind="multiclass", precision="int8"):
    tol = resolve_profile("cpu-edge").tolerances[precision]
    (r,) = compare([ref], [got], names=["cls"], kinds=[kind], tol=tol, runtime="litert", reference="keras",
                   precision=precision)
    return r


def _flip_cells(p: np.ndarray, samples) -> np.ndarray:
    out = p.copy()
    out[list(samples)] = out[list(samples)][..., ::-1]
    return out


def test_map_decisions_are_per_cell_and_bounded_by_the_sample_count():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([0.3, 0.3], size=(40, 6, 6)).astype(np.float32)  # (40, 6, 6, 2), a softmax per cell
    assert output_kind("unknown", p) == "multiclass"  # a SavedModel's map: softmax along the last axis
    r = _judge(p, p.copy())
    assert r.passed and r.decisions == 40 * 36 and r.decision_agreement == 1.0 and r.top1_agreement == 1.0
    # One sample's whole map flipped: 36 of 1440 cells (97.5% < 99%). As 1440 independent trials that is
    # proof (p ~ 1e-6); as one sample of 40 it is not (p = 1 - 0.99^40 = 0.33): cells of a sample move together.
    r = _judge(p, _flip_cells(p, [5]))
    assert r.passed and r.decision_agreement == pytest.approx(1 - 36 / 1440), r.detail
    assert "top1/cell=0.975" in r.detail and "36 flipped cell(s)" in r.detail and "in 40 samples" in r.detail
    assert "1 net sample(s) lost" in r.detail and "p=0.33" in r.detail
    r = _judge(p, _flip_cells(p, range(5)))  # five samples' maps: the data show agreement below 99%
    assert not r.passed and "180 of 1440 cells (of 40 samples) change class on litert" in r.summary, r.summary
    # Margins are the cells' own top-1 minus top-2 (never 0 from ties across the flattened map).
    margins = np.abs(p[:5, ..., 1] - p[:5, ..., 0]).ravel()
    assert f"Keras margins {np.sort(margins)[0]:.3f}" in r.detail

    # A sigmoid score map: per element at 0.5, the same sample-count bound.
    s = rng.uniform(0, 1, (40, 6, 6, 1))
    one = s.copy()
    one[7] = 1 - one[7]
    r = _judge(s, one, kind="binary")
    assert r.passed and r.decisions == s.size and "decisions@0.5=0.975" in r.detail, r.detail
    five = s.copy()
    five[:5] = 1 - five[:5]
    r = _judge(s, five, kind="binary")
    assert not r.passed and "180 of 1440 output elements change side of the 0.5 threshold" in r.summary


def test_rank2_softmax_keeps_one_decision_per_sample():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5) * 0.3, size=60)
    got = p.copy()
    got[3] = got[3][::-1] if got[3].argmax() != 2 else np.roll(got[3], 1)
    r = _judge(p, got)
    assert r.decisions == 60 and r.decision_agreement == pytest.approx(59 / 60)
    assert r.top1_agreement == r.decision_agreement
    assert "top1=0.98333" in r.detail and "1 flipped sample(s) of 60" in r.detail and "net sample" not in r.detail


def test_task_accuracy_of_a_map_is_per_cell_with_label_maps():
    from kdeploy.taskmetrics import metric_values

    rng = np.random.default_rng(2)
    p = rng.dirichlet([0.3, 0.3], size=(10, 4, 4))  # (10, 4, 4, 2)
    ids = p.argmax(-1)
    ids[0, 0, :2] = 1 - ids[0, 0, :2]  # 2 of 160 cells labelled the other way
    assert metric_values("multiclass", ids, p) == {"accuracy": pytest.approx(158 / 160)}
    assert metric_values("multiclass", np.eye(2)[ids], p) == {"accuracy": pytest.approx(158 / 160)}  # one-hot
    s = rng.uniform(0, 1, (10, 4, 4, 1))
    assert metric_values("binary", (s > 0.5).astype(np.float32), s) == {"accuracy": 1.0}
    assert metric_values("multiclass", ids[:, 0, 0], p) == {}  # per-sample labels for a map: no metric


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    import tensorflow as tf

    t = tmp_path_factory.mktemp("maps")
    m = pixel_softmax_model()
    m.save(t / "pixels.keras")
    x = np.random.default_rng(0).normal(size=(SAMPLES, 8, 8, 3)).astype(np.float32)
    np.savez(t / "pixels.npz", img=x)
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[i:i + 1]] for i in range(SAMPLES))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    (t / "pixels-int8.tflite").write_bytes(conv.convert())
    swapped = tf.lite.TFLiteConverter.from_keras_model(pixel_softmax_model(swap=True)).convert()
    (t / "swapped-fp32.tflite").write_bytes(swapped)
    return t, m, x


def test_check_judges_a_real_int8_pixel_softmax_per_cell_and_fails_swapped_class_channels(maps, tmp_path):
    import kdeploy

    t, m, x = maps
    ref = m.predict(x, verbose=0)
    got = _litert(t / "pixels-int8.tflite", x)
    per_cell = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    flattened = float(np.mean(ref.reshape(SAMPLES, -1).argmax(1) == got.reshape(SAMPLES, -1).argmax(1)))
    assert per_cell >= 0.99 and flattened < 0.5  # the map the old flattened top-1 misjudged

    profile = make_profile(tmp_path, "cpu-edge", crosscheck_runtimes=[], threads=[1])
    res = subprocess.run([sys.executable, "-m", "kdeploy", "check", t / "pixels.keras", t / "pixels-int8.tflite",
                          t / "swapped-fp32.tflite", "--profile", profile, "--data", t / "pixels.npz",
                          "--out", tmp_path / "gate", "-q"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr  # the int8 map passes and is selected
    report = json.loads((tmp_path / "gate" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    good, bad = by_name["pixels-int8"], by_name["swapped-fp32"]
    assert good["passed"] and report["selected"] == "pixels-int8"
    (fid,) = [f for f in good["fidelity"] if f["runtime"] == "litert"]
    n = fid["samples"]
    assert fid["passed"] and "top1/cell=" in fid["detail"], fid
    ties = n * 64 - fid["decisions"]  # cells where Keras' two classes tie (margin < 1e-6) are no decision
    assert 0 <= ties <= 8 and (ties == 0 or f"{ties} Keras tie(s)" in fid["detail"]), fid
    # int8 rounds some near-0.5 cells to a 128/128 tie: a tie is a flip (argmax's first index is luck), so
    # agreement sits a little under the argmax agreement above; the binomial bound passes those low-margin flips.
    assert 0.97 <= fid["decision_agreement"] <= per_cell and fid["top1_agreement"] == fid["decision_agreement"]
    assert not bad["passed"]  # fp32 tolerance: the swapped channels are far beyond kernel drift
    (fid,) = [f for f in bad["fidelity"] if f["runtime"] == "litert"]
    assert not fid["passed"] and "FAILED" in fid["detail"]

    # Judged on decisions (the int8 tolerance), the swap flips every decided cell.
    rep = kdeploy.check(t / "pixels.keras", [t / "swapped-fp32.tflite"], profile=profile, data=t / "pixels.npz",
                        precision="int8")
    (c,) = rep.candidates
    (f,) = [f for f in c.fidelity if f.runtime == "litert"]
    assert not rep.ready and not f.passed and f.decision_agreement < 0.05, f.detail
    assert f"cells (of {f.samples} samples) change class on litert vs Keras" in f.summary
