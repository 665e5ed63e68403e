"""Calibration repair (`int8-calibrated`): the first step of the int8 repair ladder, on the real runtimes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import FIXTURES, make_profile

keras = pytest.importorskip("keras")
from kdeploy.data import Dataset, hold_back, split  # noqa: E402
from kdeploy.errors import ProfileError  # noqa: E402
from kdeploy.profiles import load_profile_file  # noqa: E402
from kdeploy.recipes import CALIBRATED_INT8, calibration_recipe  # noqa: E402

# Held back: 64 of the 236 samples validation would get (it keeps >= 150), for more-samples.
SPARE = {"extra_samples": 64, "min_validation_samples": 150}


def _outlier_data(tmp_path, calibration_samples: int, seed: int = 0):
    """digits with 2 of the calibration samples scaled by 100 (a glitching sensor in the calibration set).

    The converter's min-max stretches the input range (and every activation's) to those two
    samples, so the clean validation samples are quantized to a handful of levels; validation
    and the samples held back from it stay clean.
    """
    z = np.load(FIXTURES / "digits.npz")
    x, y = z["x"].astype(np.float32), z["y"]
    index = Dataset({"i": np.arange(len(x))}, None, False, "index")
    cal = split(index, calibration_samples, seed)[0].inputs["i"]  # the samples the run calibrates on
    x[cal[[10, 40]]] *= 100.0
    path = tmp_path / "digits_outliers.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """One optimize run (~10 s on a 2-core host) on digits whose calibration split has two outliers."""
    pytest.importorskip("ai_edge_quantizer")
    from kdeploy.run import optimize

    tmp = tmp_path_factory.mktemp("calibrate")
    profile = make_profile(tmp, "cpu-edge", precisions=["fp32", "int8"], threads=[1], calibration=SPARE)
    data = _outlier_data(tmp, load_profile_file(profile).calibration_samples)
    out = tmp / "out"
    stages = []
    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=data, out=out,
                      progress=lambda stage, detail="": stages.append((stage, detail)))
    return report, out, data, stages


def test_recalibration_repairs_int8_that_min_max_breaks(repaired):
    report, out, _, stages = repaired
    full, cal = report.candidate("int8"), report.candidate(CALIBRATED_INT8)

    assert not full.passed and cal.passed and report.selected == CALIBRATED_INT8
    fid = {c.name: next(k for k in c.checks if k.name.startswith("fidelity litert")) for c in (full, cal)}
    assert fid["int8"].value["top1_agreement"] < 0.5 and fid[CALIBRATED_INT8].value["top1_agreement"] >= 0.99
    c = cal.recipe["calibration"]
    tried = [a["method"] for a in c["attempts"]]
    # more-samples (converter min-max on 64 + 64 samples) still sees the outliers; the quantizer's moving average
    # of each sample's min/max does not let two samples set the range.
    assert tried == ["more-samples", "moving-average"] and c["method"] == "moving-average"
    more, avg = c["attempts"]
    assert more["samples"] == avg["samples"] == 128 and not more["passed"] and "top1=" in more["detail"]
    assert avg["passed"] and avg["seconds"] > 0 and avg["size_bytes"] > 0
    assert cal.recipe["converter"] == "ai-edge-quantizer" and c["repairs"].startswith("full int8 fails (")
    assert any(f.code == "int8-calibrated" for f in report.findings)
    # The ladder stops at the first step that passes: no selective search, no QAT.
    assert {c.name for c in report.candidates} == {"fp32", "int8", CALIBRATED_INT8}
    assert not any(s == "selective" for s, _ in stages)
    # Full int8's judge ran the very job evaluation makes of its file (validation inputs and probes in one LiteRT
    # child): evaluation reused it, with its figures and probe rows, instead of running it again.
    assert ("run", "int8 on litert (fidelity)") not in stages and ("run", "fp32 on litert (fidelity)") in stages
    assert {r.probe for r in full.robustness if r.runtime == "litert"} == {"noise", "shift_scale", "edge"}
    assert next(f for f in full.fidelity if f.runtime == "litert").samples == 172
    # The ONNX twin of the quantizer's graph runs on ONNX Runtime (cross-check) at the validation batch.
    assert any(a.format == "onnx" for a in cal.artifacts)
    onnx = next(f for f in cal.fidelity if f.runtime == "onnxruntime")
    assert onnx.samples == 172 and onnx.top1_agreement >= 0.99 and cal.consistency
    saved = json.loads((out / "report.json").read_text())
    assert next(x for x in saved["candidates"] if x["name"] == CALIBRATED_INT8)["recipe"]["calibration"]["attempts"]


def test_recalibrated_tflite_is_full_int8_and_agrees_with_keras_checked_by_hand(repaired):
    """Outside kdeploy's comparison: float I/O, int8 inside, and LiteRT's decisions match Keras' where int8's do not."""
    from ai_edge_litert.interpreter import Interpreter

    from kdeploy.artifacts.aeq import float_ops
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    report, out, data, _ = repaired
    path = {n: out / next(a for a in report.candidate(n).artifacts if a.format == "tflite").path
            for n in ("int8", CALIBRATED_INT8)}
    graph = read_tflite_file(path[CALIBRATED_INT8])
    assert float_ops(path[CALIBRATED_INT8].read_bytes()) == []
    assert [op.name for op in graph.ops].count("DEQUANTIZE") == 1  # the output's; SHAPE reads int8
    assert {graph.tensors[i].dtype for i in graph.inputs + graph.outputs} == {"float32"}
    weights = [graph.tensors[op.inputs[1]] for op in graph.ops if op.name in ("CONV_2D", "FULLY_CONNECTED")]
    assert weights and all(t.dtype == "int8" for t in weights)
    x = np.load(data)["x"]
    clean = x[np.abs(x).max(axis=(1, 2, 3)) <= 1.0][:120]
    want = keras.saving.load_model(FIXTURES / "digits_cnn.keras").predict(clean, verbose=0).argmax(1)
    agree = {}
    for name, p in path.items():
        run = Interpreter(model_path=str(p)).get_signature_runner()
        got = np.concatenate([next(iter(run(image=s[None]).values())) for s in clean])
        agree[name] = np.mean(got.argmax(1) == want)
    assert agree[CALIBRATED_INT8] >= 0.98 and agree["int8"] < 0.5


def test_int8_that_passes_runs_no_calibration(tmp_path):
    from kdeploy.run import optimize

    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], threads=[1], crosscheck_runtimes=[])
    stages = []
    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz",
                      out=tmp_path / "out", progress=lambda stage, detail="": stages.append((stage, detail)))

    assert report.candidate("int8").passed and {c.name for c in report.candidates} == {"fp32", "int8"}
    assert not any(f.code.startswith(("calibration", "int8-calibrated")) for f in report.findings)
    assert not any(s == "calibrate" and "recalibrated" in d for s, d in stages)


# ------------------------------------------------------------------------------------------------
# The samples, the quantizer extra and the profile section
# ------------------------------------------------------------------------------------------------
def test_held_back_samples_never_come_from_validation_and_validation_keeps_its_floor():
    ds = Dataset({"x": np.arange(300)[:, None].astype(np.float32)}, None, False, "x")
    cal, val = split(ds, 64, seed=0)
    spare, kept = hold_back(val, 64, 150, seed=0)
    c, s, v = (set(d.inputs["x"][:, 0].tolist()) for d in (cal, spare, kept))

    assert len(s) == 64 and len(v) == 172 and not (c & s or c & v or s & v) and c | s | v == set(range(300))
    assert s != set(sorted(val.inputs["x"][:, 0].tolist())[:64])  # a random subset, not the file's first samples
    assert hold_back(val, 64, 150, seed=0)[0].inputs["x"].tolist() == spare.inputs["x"].tolist()  # reproducible
    assert hold_back(val, 500, 200, seed=0)[0].inputs["x"].shape[0] == 36  # only beyond the floor
    none, same = hold_back(val, 64, 1000, seed=0)
    assert none is None and same is val


def test_missing_quantizer_skips_its_methods_with_one_info_finding(monkeypatch, tmp_path):
    from kdeploy.artifacts import aeq
    from kdeploy.run import calibrate

    monkeypatch.setattr(aeq, "missing", lambda: "ai-edge-quantizer is not installed (test)")
    findings = []
    ctx = SimpleNamespace(profile=load_profile_file(make_profile(tmp_path, "cpu-edge")), findings=findings,
                          finding=lambda sev, code, msg: findings.append(SimpleNamespace(severity=sev, code=code,
                                                                                         message=msg)))
    reasons = [calibrate._skip(ctx, m) for m in ("moving-average", "mean-min-max", "octav")]

    assert all(r == "ai-edge-quantizer is not installed (test)" for r in reasons)
    assert [(f.severity, f.code) for f in findings] == [("info", "calibration-quantizer-missing")]
    assert "moving-average, mean-min-max, octav" in findings[0].message


def test_calibration_section_is_validated_and_turns_the_recipe_off(tmp_path):
    prof = load_profile_file(make_profile(tmp_path, "cpu-edge"))
    assert prof.calibration.methods[0] == "more-samples"
    assert calibration_recipe(prof, "octav").technique == "calibration"
    assert calibration_recipe(load_profile_file(make_profile(tmp_path, "cpu-edge", calibration={"enabled": False})),
                              "more-samples") is None
    assert calibration_recipe(load_profile_file(make_profile(tmp_path, "cpu-edge", precisions=["fp32"])),
                              "more-samples") is None
    with pytest.raises(ProfileError, match=r"unknown key 'calibration.samples' \(allowed: enabled, extra_samples, "
                                           r"methods, min_validation_samples\)"):
        load_profile_file(make_profile(tmp_path, "cpu-edge", calibration={"samples": 3}))
    with pytest.raises(ProfileError, match=r"calibration.methods.0.*received 'percentile'"):
        load_profile_file(make_profile(tmp_path, "cpu-edge", calibration={"methods": ["percentile"]}))


def test_quantizer_graph_keeps_the_constants_it_stores_after_the_flatbuffer(tmp_path):
    """Past 256 KiB of constants the quantizer writes them after the flatbuffer (Buffer.offset): `tidy`'s repack
    must carry them (it once dropped them: a MobileNetV2 came out at 0.47 MB instead of 4.0 MB)."""
    pytest.importorskip("ai_edge_quantizer")
    import tensorflow as tf
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.interpreter import Interpreter

    from kdeploy.artifacts import aeq
    from kdeploy.artifacts.flatbuffer import read_tflite_file

    inp = keras.Input((600,), name="x")
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(keras.layers.Dense(512, "relu")(inp)))
    fp32 = tmp_path / "fp32.tflite"
    fp32.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    name = next(iter(read_tflite_file(fp32).signature["inputs"]))
    x = np.random.default_rng(0).random((16, 600), dtype=np.float32)
    stats = aeq.collect(fp32.read_bytes(), {name: x})
    raw = bytes(aeq._quantizer(fp32.read_bytes()).quantize(aeq.ranges(stats, "moving-average"),
                                                            enable_progress_report=False).quantized_model)
    m = fb.Model.GetRootAs(raw, 0)
    assert any(m.Buffers(i).Offset() > 1 for i in range(m.BuffersLength()))  # constants after the flatbuffer

    art = aeq.quantize(fp32, stats, "moving-average", tmp_path / "q.tflite", [name], ["output_0"])
    assert abs(art.size_bytes - len(raw)) < 0.01 * len(raw) and aeq.float_ops(art.path.read_bytes()) == []
    runs = [Interpreter(model_content=b).get_signature_runner() for b in (raw, art.path.read_bytes())]
    got = [np.concatenate([next(iter(r(**{name: s[None]}).values())) for s in x]) for r in runs]
    assert np.array_equal(got[0], got[1]) and got[1].std() > 0


def test_range_estimators_damp_one_outlier_sample_that_min_max_takes_whole():
    pytest.importorskip("ai_edge_quantizer")
    from kdeploy.artifacts.aeq import ranges

    maxs = np.ones((64, 1), np.float32)
    maxs[10] = 100.0  # one sample's activation 100x the others'
    stats = {"t": (-maxs / 10, maxs)}
    avg, mean = ranges(stats, "moving-average")["t"], ranges(stats, "mean-min-max")["t"]

    ema = 1.0 + 99.0 * 0.05 * 0.95 ** 53  # the outlier's weight after 53 later samples (smoothing 0.95)
    assert np.allclose(avg["max"], ema) and np.allclose(avg["min"], -ema / 10)
    assert np.allclose(mean["max"], (63 + 100) / 64) and np.allclose(mean["min"], -(63 + 100) / 640)
    assert ranges(stats, "octav")["t"]["max"] == pytest.approx(avg["max"])  # octav clips weights, not activations
