"""Pruning and clustering through TFMOT (child process), for Keras 3 models, measured in the .tflite."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import FIXTURES, make_profile

keras = pytest.importorskip("keras")
from kdeploy.errors import ProfileError  # noqa: E402
from kdeploy.util import file_sha256  # noqa: E402
from kdeploy.compress import finetune  # noqa: E402
from kdeploy.artifacts.flatbuffer import weight_stats  # noqa: E402
from kdeploy.profiles import load_profile_file, resolve_profile  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The .tflite weight-buffer counter
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def known_weights_savedmodel(tmp_path_factory):
    """A Dense model whose 64x32 kernel is half exact zeros and holds 4 distinct values."""
    keras.utils.set_random_seed(0)
    x = keras.Input((64,), name="x")
    model = keras.Model(x, keras.layers.Dense(32, name="fc")(x))
    rng = np.random.default_rng(0)
    kernel = rng.choice(np.array([-0.5, 0.25, 0.75], np.float32), size=(64, 32))
    kernel[rng.random((64, 32)) < 0.5] = 0.0
    model.get_layer("fc").set_weights([kernel, np.zeros(32, np.float32)])
    out = tmp_path_factory.mktemp("known") / "sm"
    model.export(str(out), format="tf_saved_model", verbose=False)
    return out, kernel


@pytest.mark.parametrize("precision,sparse", [("fp32", False), ("fp32", True), ("int8", False)])
def test_weight_stats_counts_zeros_and_unique_values_in_the_flatbuffer(known_weights_savedmodel, tmp_path, precision, sparse):
    from kdeploy.artifacts.tflite import convert

    sm, kernel = known_weights_savedmodel
    cal = {"x": np.random.default_rng(1).random((16, 64), dtype=np.float32)}
    art = convert(sm, precision, tmp_path / "m.tflite", cal, ["x"], ["output_0"], sparse=sparse)

    stats = weight_stats(art.path)

    assert stats["weights"] == kernel.size
    assert stats["zeros"] == int(np.sum(kernel == 0))
    assert stats["sparsity"] == pytest.approx(np.mean(kernel == 0), abs=1e-6)
    if precision == "fp32":
        assert stats["unique_max"] == len(np.unique(kernel))  # 0, -0.5, 0.25, 0.75
    if sparse:
        assert stats["sparse_encoded"] == 1  # stored without its zeros; counted from the dense shape


# ------------------------------------------------------------------------------------------------
# Fine-tuning targets
# ------------------------------------------------------------------------------------------------
def test_choose_targets_uses_labels_per_output_when_all_fit():
    teacher = [np.full((4, 3), 1 / 3, np.float32), np.full((4, 1), 0.5, np.float32)]
    labels = {"y_digit": np.array([0, 2, 1, 2]), "y_big": np.array([0, 1, 1, 0])}

    targets, losses, info = finetune.choose_targets(["multiclass", "binary"], ["digit", "big"], teacher, labels,
                                                    "auto", "auto")

    assert losses == ["sparse_categorical_crossentropy", "binary_crossentropy"]
    assert info["targets"] == "labels"
    assert targets[1].shape == (4, 1)


def test_choose_targets_distills_when_labels_do_not_fit():
    teacher = [np.full((4, 3), 1 / 3, np.float32)]
    labels = {"y": np.array([0, 5, 1, 2])}  # class 5 does not exist

    targets, losses, info = finetune.choose_targets(["multiclass"], ["digit"], teacher, labels, "auto", "auto")

    assert info["targets"] == "distill" and losses == ["categorical_crossentropy"]
    assert "[0, 3)" in info["note"]
    assert np.array_equal(targets[0], teacher[0])  # soft targets: the original model's outputs


def test_choose_targets_refuses_labels_mode_without_labels():
    with pytest.raises(finetune.TargetsError, match="no 'y_value' or 'y' array"):
        finetune.choose_targets(["regression"], ["value"], [np.zeros((4, 1), np.float32)], None, "labels", "auto")


# ------------------------------------------------------------------------------------------------
# Profile sections
# ------------------------------------------------------------------------------------------------
def test_mobile_profile_enables_pruning_and_clustering():
    prof = resolve_profile("mobile")

    assert prof.pruning.sparsities == [0.5, 0.75] and prof.pruning.structured_2x4
    assert prof.clustering.clusters == [16]
    assert resolve_profile("cpu-edge").pruning.sparsities == []  # off by default


def test_profile_pruning_unknown_key_names_allowed_keys(tmp_path):
    path = make_profile(tmp_path, "mobile", pruning={"sparsity": [0.5]})

    with pytest.raises(ProfileError, match=r"unknown key 'pruning.sparsity' \(allowed: .*sparsities"):
        load_profile_file(path)


def test_profile_pruning_sparsity_out_of_range_is_refused(tmp_path):
    path = make_profile(tmp_path, "mobile", pruning={"sparsities": [1.5]})

    with pytest.raises(ProfileError, match=r"pruning.sparsities must be in \(0, 1\).*1.5"):
        load_profile_file(path)


# ------------------------------------------------------------------------------------------------
# End to end through the pipeline (TFMOT runs in a child process)
# ------------------------------------------------------------------------------------------------
def _weights_sha(path):
    from kdeploy.compress.tfmot_worker import weights_sha256

    return weights_sha256(keras.saving.load_model(path, safe_mode=True, compile=False))


@pytest.mark.slow
def test_prune50_by_distillation_keeps_top1_and_leaves_reference_untouched(tmp_path):
    from kdeploy.run import optimize

    model_path = FIXTURES / "digits_cnn.keras"
    with np.load(FIXTURES / "digits.npz") as z:
        np.savez(tmp_path / "unlabeled.npz", x=z["x"])  # no y: fine-tuning must distill
    profile = make_profile(tmp_path, "mobile", precisions=["fp32"], crosscheck_runtimes=[], threads=[1],
                           pruning={"sparsities": [0.5], "structured_2x4": False, "precisions": ["fp32"],
                                    "sparse_encoding": False},
                           clustering={"clusters": []})
    file_before, weights_before = file_sha256(model_path), _weights_sha(model_path)

    report = optimize(model_path, profile=profile, data=tmp_path / "unlabeled.npz")

    names = [c.name for c in report.candidates]
    assert names == ["fp32", "prune50-fp32"]
    pruned = report.candidate("prune50-fp32")
    opt = pruned.optimization
    tol = resolve_profile("mobile").pruning.tolerance
    top1 = [f.top1_agreement for f in pruned.fidelity if f.runtime == "litert" and f.reference == "keras"]
    assert top1 and top1[0] >= tol.min_top1, pruned.checks
    assert pruned.passed
    assert opt["finetune"]["targets"] == "distill" and opt["finetune"]["losses"] == ["categorical_crossentropy"]
    assert opt["bridge"]["max_abs_diff"] <= 1e-5
    # Measured in the .tflite weight buffers: every pruned layer at 50%, the 144-weight first conv
    # (below min_layer_weights) left dense.
    assert set(opt["layers"]) == {"conv2d_1", "dense", "digit"}
    assert all(v["sparsity"] == pytest.approx(0.5, abs=0.01) for v in opt["layers"].values())
    dense_left = sum(t["weights"] for t in opt["tflite"]["tensors"] if t["shape"] == [16, 3, 3, 1])
    expected = 0.5 * (opt["tflite"]["weights"] - dense_left) / opt["tflite"]["weights"]
    assert opt["tflite"]["sparsity"] == pytest.approx(expected, abs=0.01)
    assert opt["tflite"]["sparsity"] > 0.45
    # The reference is untouched: the TFMOT child hashed the original's weights before and after
    # pruning (equal, or the candidates would be discarded), and they equal the file's weights.
    assert opt["bridge"]["reference_weights_sha256"] == weights_before
    assert file_sha256(model_path) == file_before and _weights_sha(model_path) == weights_before
    assert report.candidate("fp32").passed  # reference outputs still match the untouched fp32 export


@pytest.mark.slow
def test_unknown_layer_skips_tfmot_recipes_with_a_finding(tmp_path):
    from kdeploy.run import optimize

    x = keras.Input((8,), name="features")
    h = keras.layers.RMSNormalization(name="rms")(keras.layers.Dense(16, name="proj")(x))
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="cls")(h))
    model.save(tmp_path / "rms.keras")
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[], threads=[1],
                           pruning={"sparsities": [0.5]})

    report = optimize(tmp_path / "rms.keras", profile=profile)

    assert [c.name for c in report.candidates] == ["fp32"]  # the rest of the run continues
    found = [f for f in report.findings if f.code == "tfmot-bridge-unsupported"]
    assert len(found) == 1
    assert "layer 'rms' (RMSNormalization)" in found[0].message and "prune50" in found[0].message
    assert report.ready


def test_profile_tfmot_precisions_must_be_allowed(tmp_path):
    path = make_profile(tmp_path, "mobile", pruning={"precisions": ["int16x8"]})

    with pytest.raises(ProfileError, match="pruning.precisions"):
        load_profile_file(path)


def _constant(interpreter, name):
    detail = next(d for d in interpreter.get_tensor_details() if d["name"] == name)
    return interpreter.get_tensor(detail["index"])


@pytest.mark.slow
def test_structured_2x4_and_clustering_show_in_the_tflite(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from kdeploy.run import optimize

    profile = make_profile(tmp_path, "mobile", precisions=["fp32"], crosscheck_runtimes=[], threads=[1],
                           pruning={"sparsities": [], "structured_2x4": True, "sparse_encoding": False},
                           clustering={"clusters": [16], "epochs": 1})

    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz",
                      out=tmp_path / "out")

    assert [c.name for c in report.candidates] == ["fp32", "prune2x4-fp32", "cluster16-fp32"]
    pruned, clustered = report.candidate("prune2x4-fp32"), report.candidate("cluster16-fp32")
    assert pruned.optimization["finetune"]["targets"] == "labels"  # digits.npz has y
    # 2:4 along the input channels (the last axis in TFLite's layout) of every pruned kernel.
    tfl = next(a for a in pruned.artifacts if a.format == "tflite")
    it = Interpreter(model_path=str(tmp_path / "out" / tfl.path))
    rows = [t for t in pruned.optimization["tflite"]["tensors"] if t["shape"][-1] % 4 == 0 and t["zeros"]]
    assert len(rows) == 3  # conv2d_1, dense, digit (the first conv has 1 input channel)
    for t in rows:
        groups = _constant(it, t["name"]).reshape(-1, 4)
        assert np.all(np.sum(groups == 0, axis=1) >= 2), t["name"]
    # Clustering: at most 16 distinct values in each clustered kernel, counted in the flatbuffer
    # (the 144-weight first conv is below min_layer_weights and keeps its values).
    stats = clustered.optimization["tflite"]
    big = [t for t in stats["tensors"] if t["weights"] >= 256]
    assert len(big) == 3 and all(t["unique"] <= 16 for t in big)
    assert set(clustered.optimization["layers"]) == {"conv2d_1", "dense", "digit"}
    assert clustered.optimization["unoptimized_same_export"]["gzip_bytes"] > \
        next(a for a in clustered.artifacts if a.format == "tflite").gzip_bytes  # clustering is what shrank it
    assert pruned.passed and clustered.passed
