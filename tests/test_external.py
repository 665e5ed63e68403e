"""`check` on artifacts built elsewhere: no SignatureDef, a fixed batch, outputs renamed and reordered.

The model has three outputs like the audio model of issue 18: `wide` (6) and two of equal shape,
`onset` and `frames` (3). Its artifacts are made here as other tools make them: a `.tflite` whose
SignatureDefs are stripped (tensor order, `StatefulPartitionedCall_1:N` names), a batch-1
`.tflite`, ONNX files whose outputs are renamed `StatefulPartitionedCall:0..2` in another order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kdeploy.artifacts.external import Edge, OutputPlan, normalized_name, parse_output_map, plan_outputs
from kdeploy.errors import UsageError

from conftest import make_profile

ONNX_ORDER = (2, 0, 1)  # StatefulPartitionedCall:k is model output ONNX_ORDER[k]: frames, wide, onset
OUTS = ["wide", "onset", "frames"]


def heads_model(seed: int = 0, twins: bool = False, perturb: str | None = None):
    """Input `feat` (8,) -> `wide` (6), `onset` (3), `frames` (3); `twins`: frames computes exactly onset."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((8,), name="feat")
    h = keras.layers.Dense(16, activation="tanh", name="body")(inp)
    outs = [keras.layers.Dense(6, name="wide")(h), keras.layers.Dense(3, activation="sigmoid", name="onset")(h),
            keras.layers.Dense(3, activation="sigmoid", name="frames")(h)]
    m = keras.Model(inp, outs)
    if twins:
        m.get_layer("frames").set_weights(m.get_layer("onset").get_weights())
    if perturb:
        rng = np.random.default_rng(1)
        layer = m.get_layer(perturb)
        layer.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return m


def strip_signatures(data: bytes) -> bytes:
    """The `.tflite` without its SignatureDefs, as older converters and other tools write them."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT.InitFromPackedBuf(bytearray(data), 0)
    m.signatureDefs = None
    b = flatbuffers.Builder(len(data) + 1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def to_tflite(m, path: Path, batch: int | None = None, signature: bool = True) -> Path:
    import tensorflow as tf

    sm = path.with_suffix(".savedmodel")
    # The SavedModel route: `from_concrete_functions` on a Keras 3 model gave garbage weights here (1e30 outputs).
    m.export(str(sm), format="tf_saved_model", input_signature=[tf.TensorSpec([batch, 8], tf.float32, name="feat")],
             verbose=False)
    data = tf.lite.TFLiteConverter.from_saved_model(str(sm)).convert()
    path.write_bytes(data if signature else strip_signatures(data))
    return path


def to_onnx(m, path: Path, batch: int | None = None, order=ONNX_ORDER) -> Path:
    """ONNX whose graph outputs are Identity nodes `StatefulPartitionedCall:k` = model output `order[k]`."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([batch, 8], tf.float32, name="feat"),)
    proto, _ = tf2onnx.convert.from_function(tf.function(lambda x: m(x, training=False), input_signature=spec),
                                             input_signature=spec, opset=17)
    g = proto.graph
    old = list(g.output)
    renamed = []
    for k, j in enumerate(order):
        name = f"StatefulPartitionedCall:{k}"
        g.node.append(onnx.helper.make_node("Identity", [old[j].name], [name], name=f"rename_{k}"))
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(old[j])
        vi.name = name
        renamed.append(vi)
    del g.output[:]
    g.output.extend(renamed)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """The model, its data and artifacts (built once): SimpleNamespace of paths."""
    t = tmp_path_factory.mktemp("external")
    m = heads_model()
    m.save(t / "heads.keras")
    np.savez(t / "heads.npz", feat=np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    return SimpleNamespace(
        dir=t, model=m, keras=t / "heads.keras", data=t / "heads.npz",
        nosig=to_tflite(m, t / "nosig.tflite", signature=False),
        batch1=to_tflite(m, t / "batch1.tflite", batch=1),
        perturbed=to_tflite(heads_model(perturb="frames"), t / "perturbed.tflite", signature=False),
        other=to_tflite(heads_model(seed=7), t / "other.tflite", signature=False),
        onnx=to_onnx(m, t / "renamed.onnx"),
    )


def kdeploy_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def _truth(path: Path, x: np.ndarray, ref: list[np.ndarray]) -> dict[str, str]:
    """Model output -> the artifact output tensor that equals it, found by running the file directly."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    (d,) = it.get_input_details()
    it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(d["index"], x)
    it.invoke()
    got = {o["name"]: it.get_tensor(o["index"]) for o in it.get_output_details()}
    return {name: next(t for t, y in got.items() if y.shape == r.shape and np.allclose(y, r, atol=1e-5))
            for name, r in zip(OUTS, ref)}


# --- pairing rules, without running anything ------------------------------------------------------


def test_normalized_name_drops_index_suffix_and_serving_prefixes():
    assert normalized_name("serving_default_feat:0") == "feat"
    assert normalized_name("StatefulPartitionedCall:1") == ""
    assert normalized_name("StatefulPartitionedCall_1/model/onset/Sigmoid") == "model/onset/Sigmoid"


def test_plan_outputs_pairs_by_name_then_unique_shape_and_leaves_equal_shapes_to_values():
    shapes = {"wide": (6,), "onset": (3,), "frames": (3,)}
    edges = [Edge("StatefulPartitionedCall:0", (None, 3)), Edge("StatefulPartitionedCall:1", (None, 6)),
             Edge("StatefulPartitionedCall:2", (None, 3))]
    plan = plan_outputs(Path("a.onnx"), OUTS, shapes, edges, {})
    assert plan.paired["wide"].tensor == "StatefulPartitionedCall:1" and plan.paired["wide"].how == "shape"
    assert plan.groups == [(["onset", "frames"], ["StatefulPartitionedCall:0", "StatefulPartitionedCall:2"])]

    named = [Edge("model/frames/Sigmoid", (1, 3)), Edge("serving_default_wide:0", (1, 6)), Edge("onset", (1, 3))]
    plan = plan_outputs(Path("a.tflite"), OUTS, shapes, named, {})
    assert plan.complete and plan.ordered() == ["serving_default_wide:0", "onset", "model/frames/Sigmoid"]
    assert {p.how for p in plan.paired.values()} == {"name"}

    # A matching name on a tensor of another shape is no pairing; too few tensors of a shape: exit 2, shapes named.
    wrong = [Edge("onset", (None, 5)), Edge("x", (None, 6)), Edge("y", (None, 3))]
    with pytest.raises(UsageError, match=r"1 output\(s\) \[y \(batch, 3\)\] for the 2 model outputs.*onset \(batch, 5\)"):
        plan_outputs(Path("b.onnx"), OUTS, shapes, wrong, {})
    wrong = [Edge("onset", (None, 5)), Edge("x", (None, 6)), Edge("y", (None, 7))]
    with pytest.raises(UsageError, match=r"no output of the shape of model output 'onset' \(batch, 3\).*onset \(batch, 5\)"):
        plan_outputs(Path("b.onnx"), OUTS, shapes, wrong, {})


def test_output_map_is_checked_against_names_and_shapes():
    shapes = {"wide": (6,), "onset": (3,), "frames": (3,)}
    edges = [Edge("a", (None, 3)), Edge("b", (None, 6)), Edge("c", (None, 3))]
    plan = plan_outputs(Path("a.onnx"), OUTS, shapes, edges, parse_output_map("onset=c, frames=a"))
    assert plan.complete and plan.ordered() == ["b", "c", "a"]
    assert [plan.paired[o].how for o in OUTS] == ["shape", "output-map", "output-map"]
    for text, message in [("onset=z", "not an output of artifact a.onnx"), ("nope=a", "not an output of the model"),
                          ("wide=a", "the shapes differ"), ("onset=a,frames=a", "two outputs to 'a'")]:
        with pytest.raises(UsageError, match=message):
            plan_outputs(Path("a.onnx"), OUTS, shapes, edges, parse_output_map(text))
    with pytest.raises(UsageError, match="NAME=ARTIFACT_TENSOR"):
        parse_output_map("onset:c")


def _group_plan() -> OutputPlan:
    shapes = {"onset": (3,), "frames": (3,)}
    return plan_outputs(Path("a.onnx"), ["onset", "frames"], shapes, [Edge("t0", (None, 3)), Edge("t1", (None, 3))], {})


def test_settle_by_values_takes_the_clearly_best_assignment_and_says_by_how_much():
    rng = np.random.default_rng(0)
    onset, frames = rng.random((20, 3)), rng.random((20, 3))
    plan = _group_plan()
    noise = rng.normal(0, 0.01, (20, 3))  # an int8-like error: about 2% of the reference's norm
    assert plan.settle_by_values({"t0": frames + noise, "t1": onset - noise}, {"onset": onset, "frames": frames}) == []
    assert plan.ordered() == ["t1", "t0"]
    assert plan.paired["onset"].how == "values" and "worse" in plan.paired["onset"].detail


def test_settle_by_values_refuses_equal_outputs_and_names_the_flag():
    x = np.random.default_rng(0).random((20, 3))
    with pytest.raises(UsageError, match=r"do not settle.*--output-map onset=ARTIFACT_TENSOR,frames=ARTIFACT_TENSOR"):
        _group_plan().settle_by_values({"t0": x, "t1": x.copy()}, {"onset": x, "frames": x.copy()})


def test_settle_by_values_fails_the_candidate_when_no_pairing_passes_and_asks_when_one_might():
    rng = np.random.default_rng(0)
    got = {"t0": rng.random((20, 3)), "t1": rng.random((20, 3))}
    ref = {"onset": rng.random((20, 3)), "frames": rng.random((20, 3))}
    plan = _group_plan()
    problems = plan.settle_by_values(got, ref, passes=lambda output, values: False)
    assert len(problems) == 1 and "fail their fidelity tolerance whichever way" in problems[0]
    assert {p.how for p in plan.paired.values()} == {"unverified"}
    # The same values where some pairing might pass: the verdict depends on it, so the user decides.
    with pytest.raises(UsageError, match="--output-map"):
        _group_plan().settle_by_values(got, ref, passes=lambda output, values: (output == "onset") == (values is got["t0"]))


# --- runners: signature-less and fixed-batch artifacts ---------------------------------------------


def test_runners_feed_signature_less_and_fixed_batch_artifacts(heads):
    from kdeploy.runtimes import runner_for

    x = np.load(heads.data)["feat"][:7]
    ref = heads.model.predict(x, verbose=0)
    onnx4 = to_onnx(heads.model, heads.dir / "batch4.onnx", batch=4)  # 7 samples: chunks of 4, the last one padded
    nosig_out = [_truth(heads.nosig, x, ref)[o] for o in OUTS]
    cases = [
        ("litert", heads.nosig, {"inputs": {"feat": "serving_default_feat:0"}, "outputs": nosig_out, "signature": None}),
        ("tflm", heads.nosig, {"inputs": {"feat": "serving_default_feat:0"}, "outputs": nosig_out, "signature": None}),
        ("litert", heads.batch1, {"inputs": {"feat": "feat"}, "outputs": ["output_0", "output_1", "output_2"]}),
        ("onnxruntime", onnx4, {"inputs": {"feat": "feat"},
                                "outputs": [f"StatefulPartitionedCall:{ONNX_ORDER.index(j)}" for j in range(3)]}),
    ]
    for runtime, path, io in cases:
        if runtime == "tflm":
            pytest.importorskip("tflite_micro")
        with runner_for(runtime, SimpleNamespace(path=path, io=io)) as r:
            got = r.infer({"feat": x})
            assert r.static_batch == {"batch1.tflite": 1, "batch4.onnx": 4}.get(path.name, 1 if runtime == "tflm" else None)
        for g, want in zip(got, ref):
            np.testing.assert_allclose(g, want, atol=1e-5, err_msg=f"{runtime} {path.name}")


# --- check, end to end ------------------------------------------------------------------------------


def test_check_pairs_signature_less_and_batch1_tflite_and_catches_a_perturbed_layer(heads):
    import kdeploy

    x = np.load(heads.data)["feat"]
    truth = _truth(heads.nosig, x, heads.model.predict(x, verbose=0))
    profile = make_profile(heads.dir, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[], threads=[1])
    report = kdeploy.check(heads.keras, [heads.nosig, heads.batch1, heads.perturbed], profile=profile, data=heads.data)
    by = {c.name: c for c in report.candidates}
    pairing = {p.output: p for p in by["nosig"].artifacts[0].pairing}
    assert {o: p.tensor for o, p in pairing.items()} == truth
    assert pairing["wide"].how == "shape" and pairing["onset"].how == pairing["frames"].how == "values"
    assert by["nosig"].passed and by["batch1"].passed, [k for c in report.candidates for k in c.checks if not k.passed]
    assert [p.tensor for p in by["batch1"].artifacts[0].pairing] == ["output_0", "output_1", "output_2"]
    bad = by["perturbed"]
    assert not bad.passed
    failed = {k.name for k in bad.checks if not k.passed}
    assert failed == {"fidelity litert vs keras [frames]"}, failed  # only the perturbed head, paired right
    from kdeploy.report.render import markdown

    assert "**`nosig` outputs paired**: `wide` = `" in markdown(report)


def test_check_cli_onnx_renamed_and_reordered_paired_by_values_and_stated(heads, tmp_path):
    profile = make_profile(tmp_path, "cpu-server", precisions=["fp32"], crosscheck_runtimes=[], threads=[1],
                           batch_sizes=[1])
    res = kdeploy_cli("check", heads.keras, heads.onnx, "--profile", profile, "--data", heads.data,
                      "--out", tmp_path / "ok", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    pairing = {p["output"]: p for p in report["candidates"][0]["artifacts"][0]["pairing"]}
    assert {o: p["tensor"] for o, p in pairing.items()} == {
        OUTS[j]: f"StatefulPartitionedCall:{k}" for k, j in enumerate(ONNX_ORDER)}
    assert [pairing[o]["how"] for o in OUTS] == ["shape", "values", "values"]
    assert "next-best pairing" in pairing["onset"]["detail"]
    md = (tmp_path / "ok" / "report.md").read_text()
    assert "outputs paired" in md and "`onset` = `StatefulPartitionedCall:2` (values" in md

    # Swapped on purpose through --output-map: compared as the user said, and it fails.
    res = kdeploy_cli("check", heads.keras, heads.onnx, "--profile", profile, "--data", heads.data,
                      "--out", tmp_path / "swapped", "-q",
                      "--output-map", "onset=StatefulPartitionedCall:0,frames=StatefulPartitionedCall:2")
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((tmp_path / "swapped" / "report.json").read_text())
    failed = {k["name"] for k in report["candidates"][0]["checks"] if not k["passed"]}
    assert {"fidelity onnxruntime vs keras [onset]", "fidelity onnxruntime vs keras [frames]"} <= failed
    assert {p["output"]: p["how"] for p in report["candidates"][0]["artifacts"][0]["pairing"]}["onset"] == "output-map"


def test_check_cli_ambiguous_pairing_exits_2_naming_output_map(tmp_path):
    twins = heads_model(twins=True)
    twins.save(tmp_path / "twins.keras")
    np.savez(tmp_path / "d.npz", feat=np.random.default_rng(0).normal(size=(24, 8)).astype(np.float32))
    art = to_onnx(twins, tmp_path / "twins.onnx")
    profile = make_profile(tmp_path, "cpu-server", precisions=["fp32"], crosscheck_runtimes=[], threads=[1],
                           batch_sizes=[1])
    res = kdeploy_cli("check", tmp_path / "twins.keras", art, "--profile", profile, "--data", tmp_path / "d.npz",
                      "--out", tmp_path / "o", "-q")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--output-map" in lines[0] and "onset" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()

    import kdeploy  # the flag settles it (through the API: `output_map`)

    report = kdeploy.check(tmp_path / "twins.keras", [art], profile=profile, data=tmp_path / "d.npz",
                           output_map="onset=StatefulPartitionedCall:2,frames=StatefulPartitionedCall:0")
    assert report.ready
    assert [(p.tensor, p.how) for p in report.candidates[0].artifacts[0].pairing] == [
        ("StatefulPartitionedCall:1", "shape"), ("StatefulPartitionedCall:2", "output-map"),
        ("StatefulPartitionedCall:0", "output-map")]


def test_check_tflite_of_another_model(heads, tmp_path):
    import keras

    import kdeploy

    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[], threads=[1])
    inp = keras.Input((5,), name="feat")
    small = keras.Model(inp, [keras.layers.Dense(6)(inp), keras.layers.Dense(3)(inp), keras.layers.Dense(3)(inp)])
    import tensorflow as tf

    small.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec([None, 5], tf.float32, name="feat")])
    (tmp_path / "small.tflite").write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert())
    with pytest.raises(UsageError, match=r"input of the shape of model input 'feat' \(batch, 8\).*\(batch, 5\)"):
        kdeploy.check(heads.keras, [tmp_path / "small.tflite"], profile=profile, data=heads.data)

    # Same shapes, another model's weights: no pairing of the equal-shaped outputs agrees; not ready (exit 1).
    report = kdeploy.check(heads.keras, [heads.other], profile=profile, data=heads.data)
    (c,) = report.candidates
    assert not report.ready and not c.passed
    assert any("fail their fidelity tolerance whichever way" in e for e in c.errors), c.errors
    assert {p.output: p.how for p in c.artifacts[0].pairing} == {"wide": "shape", "onset": "unverified",
                                                                "frames": "unverified"}


def test_check_artifact_the_target_cannot_run_is_exit_2_before_any_work(heads, tmp_path):
    import kdeploy

    # cpu-edge deploys LiteRT only: an .onnx could never pass there ("artifact for litert" was all it said).
    res = kdeploy_cli("check", heads.keras, heads.onnx, "--target", "cpu-edge", "--data", heads.data,
                      "--out", tmp_path / "o", "-q")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert ("renamed.onnx is .onnx, which target cpu-edge cannot run: cpu-edge deploys litert, which runs .tflite; "
            "for .onnx use --target cpu-server or a profile whose runtimes all run .onnx (onnxruntime)") in lines[0]
    assert not (tmp_path / "o").exists()

    stages = []  # nothing loaded or run: the refusal comes from the profile alone
    with pytest.raises(UsageError, match=r"target cpu-server cannot run: cpu-server deploys onnxruntime, which "
                                         r"runs \.onnx; for \.tflite use --target cpu-edge / mcu / mobile or"):
        kdeploy.check(heads.keras, [heads.batch1], target="cpu-server", data=heads.data,
                      progress=lambda stage, detail="": stages.append(stage))
    assert stages == []
    # A profile deploying both formats: one artifact cannot run on each of its runtimes.
    both = make_profile(tmp_path, "cpu-edge", runtimes=["litert", "onnxruntime"], crosscheck_runtimes=[])
    with pytest.raises(UsageError, match=r"deploys litert, which runs \.tflite, and onnxruntime, which runs \.onnx "
                                         r"\(a candidate must run on each\)"):
        kdeploy.check(heads.keras, [heads.batch1], profile=both, data=heads.data)
