"""Quantization-aware training (`qat-int8`): the repair when full int8 fails, on the real runtimes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import FIXTURES, make_profile

keras = pytest.importorskip("keras")
from kdeploy.data import Dataset, split  # noqa: E402
from kdeploy.errors import ProfileError  # noqa: E402
from kdeploy.profiles import load_profile_file  # noqa: E402
from kdeploy.recipes import QAT_INT8, qat_plan, qat_recipe, tolerance_for  # noqa: E402


def _outlier_data(tmp_path, calibration_samples: int, seed: int = 0):
    """digits with 6 of the calibration samples scaled by 10 (a glitching sensor in the calibration set).

    Min-max calibration stretches every activation range to those samples, so the clean validation
    samples are quantized to a few levels; validation itself stays clean.
    """
    z = np.load(FIXTURES / "digits.npz")
    x, y = z["x"].astype(np.float32), z["y"]
    index = Dataset({"i": np.arange(len(x))}, None, False, "index")
    cal = split(index, calibration_samples, seed)[0].inputs["i"]  # the samples the run calibrates on
    x[cal[:6]] *= 10.0
    path = tmp_path / "digits_outliers.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def mcu_qat(tmp_path_factory):
    from kdeploy.run import optimize

    tmp = tmp_path_factory.mktemp("qat")
    # The calibration repair (run.calibrate), the ladder's first step, repairs these outliers by itself
    # (int8-calibrated passes): off here, so this is QAT's own result.
    profile = make_profile(tmp, "mcu", qat={"epochs": 8, "max_seconds": 120}, calibration={"enabled": False})
    data = _outlier_data(tmp, load_profile_file(profile).calibration_samples)
    out = tmp / "out"
    return optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=data, out=out), out, data


@pytest.mark.slow  # one full mcu run with the TFMOT child (~30 s on an idle 2-core host)
def test_qat_passes_where_no_post_training_int8_can_on_mcu(tmp_path):
    """The flat-softmax digits CNN (fixtures/make_qat_demo.py): full int8 loses accuracy at the softmax output's
    1/256 step, every recalibration fails as well, `mcu` keeps nothing in float; QAT on the labels repairs it."""
    import importlib.util

    from kdeploy.run import optimize

    spec = importlib.util.spec_from_file_location("make_qat_demo", FIXTURES / "make_qat_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    model = demo.temperature_model(tmp_path / "flat.keras", 300.0)
    profile = make_profile(tmp_path, "mcu")  # the built-in ladder: calibration enabled at its defaults
    report = optimize(model, profile=profile, data=FIXTURES / "digits.npz", out=tmp_path / "out")

    steps = {s["step"]: s for s in report.repair["steps"]}
    assert not report.repair["int8"]["passed"]
    assert steps["calibration"]["tried"] and not steps["calibration"]["passed"], steps["calibration"]
    for method in ("more-samples", "moving-average", "mean-min-max", "octav"):
        assert f"{method} fails" in steps["calibration"]["detail"] or f"{method} skipped" in steps["calibration"]["detail"]
    assert steps["qat"]["tried"] and steps["qat"]["passed"] and report.repair["repaired_by"] == QAT_INT8
    assert report.selected == QAT_INT8
    ptq, qat = report.candidate("int8"), report.candidate(QAT_INT8)
    acc = {c.name: next(t for t in c.task_metrics if t["output"] == "digit") for c in (ptq, qat)}
    assert acc["int8"]["value"] < acc["int8"]["keras"] - 0.02 and acc[QAT_INT8]["value"] >= 0.99 * acc[QAT_INT8]["keras"]
    breaking = next(f for f in report.findings if f.code == "int8-breaking-layers")
    assert f"candidate {QAT_INT8}" in breaking.message and "passes the int8 checks on tflm" in breaking.message


@pytest.mark.slow  # one full mcu run with the TFMOT child (~50 s on an idle 2-core host)
def test_qat_passes_where_post_training_int8_fails_on_mcu(mcu_qat):
    report, out, _ = mcu_qat
    ptq, qat = report.candidate("int8"), report.candidate(QAT_INT8)

    assert not ptq.passed and qat.passed and report.selected == QAT_INT8
    fid = {c.name: next(k for k in c.checks if k.name.startswith("fidelity tflm")) for c in (ptq, qat)}
    assert fid["int8"].value["top1_agreement"] < 0.97 <= fid[QAT_INT8].value["top1_agreement"]
    q = qat.recipe["qat"]
    assert q["mode"] == "labels" and q["samples"] == 64 and q["epochs"] == 8 and q["seconds"] > 0
    assert q["repairs"].startswith("full int8 fails (") and q["judge"]["passed"]
    # The finding for the full-integer target offers the QAT candidate's result, not "do QAT elsewhere".
    finding = next(f for f in report.findings if f.code == "int8-breaking-layers")
    assert "Quantization-aware training (candidate qat-int8): passes" in finding.message


@pytest.mark.slow
def test_qat_tflite_is_full_int8_and_agrees_with_keras_checked_by_hand(mcu_qat):
    """Outside kdeploy's comparison: every op computes in int8 and LiteRT's decisions match Keras'."""
    from ai_edge_litert.interpreter import Interpreter

    report, out, data = mcu_qat
    art = next(a for a in report.candidate(QAT_INT8).artifacts if a.format == "tflite")
    interp = Interpreter(model_path=str(out / art.path))
    ops = {d["op_name"] for d in interp._get_ops_details()}
    assert {"CONV_2D", "FULLY_CONNECTED"} <= ops and not ops - {"QUANTIZE", "DEQUANTIZE", "CONV_2D", "FULLY_CONNECTED",
                                                                 "MAX_POOL_2D", "RESHAPE", "SOFTMAX", "ADD", "MUL"}
    weights = [t for t in interp.get_tensor_details() if t["name"].endswith("Conv2D") or "MatMul" in t["name"]]
    assert weights and all(t["dtype"] == np.int8 for t in weights)
    # Weights carry one scale per output channel (Dense too: TFMOT's default gives it one per tensor).
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    g = read_tflite_file(out / art.path)
    for op in (o for o in g.ops if o.name in ("CONV_2D", "FULLY_CONNECTED")):
        w = g.tensors[op.inputs[1]]
        assert len(w.scales) == w.shape[0] > 1 and w.quantized_dimension == 0 and len(set(w.scales)) > 1, op.name
    x = np.load(data)["x"]
    keep = np.abs(x).max(axis=(1, 2, 3)) <= 1.0  # the clean samples
    model = keras.saving.load_model(FIXTURES / "digits_cnn.keras")
    run = interp.get_signature_runner()
    name = next(iter(run.get_input_details()))
    got = np.concatenate([next(iter(run(**{name: s[None]}).values())) for s in x[keep][:120]])
    assert np.mean(got.argmax(1) == model.predict(x[keep][:120], verbose=0).argmax(1)) >= 0.97
    saved = json.loads((out / "report.json").read_text())
    assert next(c for c in saved["candidates"] if c["name"] == QAT_INT8)["recipe"]["optimization"] == "qat"


_DEPTHWISE_QAT = """
import json, sys
import numpy as np
import keras
from kdeploy.compress import bridge
from kdeploy.compress.tfmot_worker import export_savedmodel
src, out = sys.argv[1], sys.argv[2]
x = np.load(src + ".npy")
copy, _ = bridge.to_tf_keras(keras.saving.load_model(src, compile=False))
import tensorflow_model_optimization  # noqa: F401
from kdeploy.compress import qat
annotated, done, floats = qat.annotate(copy)
model = qat.apply(annotated)
qat.init_ranges(model, [x], 16)
export_savedmodel(model, [{"name": "image", "shape": [None, 6, 6, 2], "dtype": "float32"}], ["output_0"], out)
print(json.dumps(done))
"""


@pytest.mark.slow  # TFMOT in a child process and one int8 conversion (~15 s)
def test_qat_gives_dense_and_depthwise_weights_one_scale_per_output_channel_in_the_tflite(tmp_path):
    """The converter keeps the per-channel scales of the QAT model: DEPTHWISE_CONV_2D and FULLY_CONNECTED
    weights have one scale per output channel, each the channel's own max|w| / 127."""
    import subprocess
    import sys

    from kdeploy.artifacts import tflite
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2), name="image")
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(inp)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, activation="softmax", name="fc")(h)
    model = keras.Model(inp, out)
    (k, b) = model.get_layer("dw").get_weights()
    k *= np.array([1.0, 30.0, 0.1, 3.0])[None, None, :].reshape(1, 1, 2, 2)  # channel magnitudes 300x apart
    model.get_layer("dw").set_weights([k, b])
    w, c = model.get_layer("fc").get_weights()
    model.get_layer("fc").set_weights([w * np.array([1.0, 50.0, 0.2]), c])
    path = tmp_path / "dw.keras"
    model.save(path)
    x = np.random.default_rng(0).uniform(0, 1, (32, 6, 6, 2)).astype(np.float32)
    np.save(str(path) + ".npy", x)
    run = subprocess.run([sys.executable, "-c", _DEPTHWISE_QAT, str(path), str(tmp_path / "sm")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {"dw", "fc"} <= set(json.loads(run.stdout.strip().splitlines()[-1]))

    art = tflite.convert(tmp_path / "sm", "int8", tmp_path / "q.tflite", {"image": x}, ["image"], ["output_0"])
    g = read_tflite_file(art.path)
    got = {o.name: g.tensors[o.inputs[1]] for o in g.ops if o.name in ("DEPTHWISE_CONV_2D", "FULLY_CONNECTED")}
    dw, fc = got["DEPTHWISE_CONV_2D"], got["FULLY_CONNECTED"]
    assert dw.shape == (1, 3, 3, 4) and dw.quantized_dimension == 3 and fc.shape == (3, 64)
    np.testing.assert_allclose(dw.scales, np.abs(k).reshape(9, 4).max(0) / 127, rtol=1e-5)
    np.testing.assert_allclose(fc.scales, np.abs(w * np.array([1.0, 50.0, 0.2])).max(0) / 127, rtol=1e-5)


def test_qat_trains_on_the_calibration_split_plus_the_held_back_samples_never_validation():
    from kdeploy.run.qat import training_set

    def ds(lo, hi, labels=True):
        x = np.arange(lo, hi, dtype=np.float32)[:, None]
        return Dataset({"x": x}, {"y": np.arange(lo, hi)} if labels else None, False, "d.npz")

    cal, spare, val = ds(0, 4), ds(4, 7), ds(7, 20)
    merged = training_set(SimpleNamespace(calibration=cal, spare=spare, validation=val))
    assert merged.inputs["x"].ravel().tolist() == list(range(7)) and merged.labels["y"].tolist() == list(range(7))
    assert training_set(SimpleNamespace(calibration=cal, spare=None, validation=val)) is cal
    unlabelled = training_set(SimpleNamespace(calibration=ds(0, 4, False), spare=ds(4, 7, False), validation=val))
    assert len(unlabelled) == 7 and unlabelled.labels is None


# ------------------------------------------------------------------------------------------------
# Where QAT cannot run, and the profile section
# ------------------------------------------------------------------------------------------------
def _ctx(model, fmt):
    from kdeploy.profiles import resolve_profile

    prof = resolve_profile("mcu")
    findings = []

    def finding(sev, code, msg):
        findings.append(SimpleNamespace(severity=sev, code=code, message=msg))

    return SimpleNamespace(model=SimpleNamespace(keras_model=model, format=fmt), profile=prof, findings=findings,
                           finding=finding)


def test_savedmodel_and_subclassed_models_skip_qat_with_a_finding():
    from kdeploy.run.qat import qat_builds, skip_reason

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras.layers.Dense(2)

        def call(self, x):
            return self.fc(x)

    sub = Sub()
    sub(np.zeros((1, 3), np.float32))
    x = keras.Input((3,))
    functional = keras.Model(x, keras.layers.Dense(2)(x))

    assert "subclassed" in skip_reason(_ctx(sub, "keras"))
    assert "received a savedmodel" in skip_reason(_ctx(None, "savedmodel"))
    assert skip_reason(_ctx(functional, "keras")) is None
    assert skip_reason(_ctx(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), "h5")) is None

    ctx = _ctx(None, "savedmodel")
    ctx.findings.append(SimpleNamespace(severity="error", code="int8-breaking-layers", message="full int8 fails (x)."))
    assert qat_builds(ctx, ref=None, why="full int8 fails (x)") == []  # nothing trained, nothing converted
    skipped = next(f for f in ctx.findings if f.code == "qat-skipped")
    assert skipped.severity == "warning" and "savedmodel" in skipped.message
    assert "Quantization-aware training (candidate qat-int8): not tried" in ctx.findings[0].message


def test_qat_recipe_is_held_to_the_int8_tolerance_and_follows_the_profile(tmp_path):
    prof = load_profile_file(make_profile(tmp_path, "mcu", qat={"epochs": 3, "learning_rate": 5e-4}))
    plan = qat_plan(prof)
    recipe = qat_recipe(plan)

    assert plan.job() == {"name": QAT_INT8, "kind": "qat", "epochs": 3, "learning_rate": 5e-4, "batch_size": 16,
                          "max_seconds": 300}
    assert recipe.precision == "int8" and recipe.calibration and tolerance_for(prof, recipe) is None  # by precision
    off = load_profile_file(make_profile(tmp_path, "mcu", qat={"enabled": False}))
    assert qat_plan(off) is None


def test_profile_qat_unknown_key_names_the_allowed_keys(tmp_path):
    with pytest.raises(ProfileError, match=r"unknown key 'qat.epoch' \(allowed: batch_size, enabled, epochs, "
                                           r"learning_rate, max_seconds\)"):
        load_profile_file(make_profile(tmp_path, "mcu", qat={"epoch": 3}))


def test_ladder_hands_full_int8_verdict_to_qat_without_judging_again(monkeypatch):
    """QAT gets full int8's verdict from the ladder (judged once), not from another step's findings."""
    from kdeploy.artifacts import Artifact
    from kdeploy.run import ladder
    from kdeploy.run.context import Build

    ctx = _ctx(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), "keras")
    ctx.progress = lambda *a: None
    ctx.repair = None
    ctx.model.outputs, ctx.model.output_kinds, ctx.reference = [], [], []  # no softmax: every step may help
    int8 = Build("int8", "int8", {}, artifacts=[Artifact(format="tflite", path=FIXTURES / "absent.tflite",
                                                          precision="int8", source="tflite-converter")])
    judged, got = [], []
    monkeypatch.setattr(ladder, "judge", lambda c, art: judged.append(art) or (False, "top1=0.9"))
    monkeypatch.setattr("kdeploy.run.calibrate.calibration_builds", lambda c, r, b, verdict: got.append(verdict) or [])
    monkeypatch.setattr("kdeploy.run.selective.selective_builds", lambda c, r, b, verdict, **kw: got.append(verdict) or [])
    monkeypatch.setattr("kdeploy.run.qat.qat_builds", lambda c, r, why: got.append(why) or [])

    assert ladder.repair_ladder(ctx, None, []) == [] and ctx.repair is None  # no int8 .tflite: nothing to repair
    assert ladder.repair_ladder(ctx, None, [int8]) == []
    assert len(judged) == 1  # full int8 judged once, by the ladder
    # mcu: calibration, then the breaking layers named (selective's finding, no candidate), then QAT
    assert got == [(False, "top1=0.9"), (False, "top1=0.9"), "full int8 fails (top1=0.9)"]
    steps = {s["step"]: s for s in ctx.repair["steps"]}
    assert steps["qat"]["tried"] and not steps["qat"]["passed"] and not steps["selective"]["tried"]
