"""Real models from the Keras ecosystem: a KerasHub backbone and a MultiHeadAttention + GELU block.

Both are built here, in tmp_path, from tiny configs (no downloads): the KerasHub BERT backbone
loads without --custom-objects (keras_hub is a trusted package), returns a dict of outputs, and
its ONNX (tf2onnx emits Erfc / TFL_GELU for GELU, which `kdeploy.artifacts.onnx_ops` rewrites)
runs on ONNX Runtime; artifacts are byte-identical whatever --out is.
"""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import make_profile

keras_hub = pytest.importorskip("keras_hub")

from kdeploy.errors import ModelLoadError, UnsafeModelError, UsageError  # noqa: E402
from kdeploy.loading import load_model  # noqa: E402
from kdeploy.scan import scan_model  # noqa: E402

SEQ = 8


def kdeploy(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def tiny_bert(folder: Path, n: int = 48) -> tuple[Path, Path]:
    """A 1-layer BERT backbone (vocabulary 100, hidden 16) and token-id data for it."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=16,
                                          intermediate_dim=32, max_sequence_length=SEQ)
    path = folder / "bert.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    data = folder / "bert.npz"
    np.savez(data, token_ids=rng.integers(0, 100, (n, SEQ)).astype("int32"),
             segment_ids=np.zeros((n, SEQ), "int32"), padding_mask=np.ones((n, SEQ), "int32"))
    return path, data


def rewrite_config(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            raw = zin.read(item)
            if item.filename == "config.json":
                raw = json.dumps(edit(json.loads(raw))).encode()
            zout.writestr(item, raw)
    return dst


def shapes() -> list[str]:
    return [a for name in ("token_ids", "segment_ids", "padding_mask") for a in ("--input-shape", f"{name}={SEQ}")]


# ---- trusted packages -------------------------------------------------------------------------
def test_scan_accepts_keras_hub_classes_only_while_the_package_is_trusted(tmp_path):
    path, _ = tiny_bert(tmp_path)
    verdict = scan_model(path, "keras")
    assert [(t.package, t.registered_name) for t in verdict.trusted] == [("keras_hub", "keras_hub>BertBackbone")]
    assert "trusted-package-class" in {code for _, code, _ in verdict.findings}
    with pytest.raises(UnsafeModelError, match="keras_hub>BertBackbone.*--custom-objects"):
        scan_model(path, "keras", trusted_packages=())


def test_trusted_package_does_not_vouch_for_names_it_does_not_register_or_for_stdlib(tmp_path):
    path, _ = tiny_bert(tmp_path)

    def rename(cfg):
        cfg["registered_name"] = "keras_hub>NotARealBackbone"
        return cfg

    forged = rewrite_config(path, tmp_path / "forged.keras", rename)
    with pytest.raises(UnsafeModelError, match="keras_hub>NotARealBackbone.*does not register"):
        load_model(forged)

    def foreign(cfg):  # a config that claims a package other than its module's
        cfg["registered_name"] = "os>BertBackbone"
        return cfg

    with pytest.raises(UnsafeModelError, match="os>BertBackbone"):
        scan_model(rewrite_config(path, tmp_path / "foreign.keras", foreign), "keras")
    with pytest.raises(UsageError, match="standard library"):
        scan_model(path, "keras", trusted_packages=["os"])


def test_missing_trusted_package_says_what_to_install(tmp_path, monkeypatch):
    path, _ = tiny_bert(tmp_path)
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub now fails, as if not installed
    with pytest.raises(ModelLoadError, match=r"package 'keras_hub'.*pip install 'kdeploy\[keras-hub\]'"):
        load_model(path)


# ---- end to end -------------------------------------------------------------------------------
@pytest.mark.slow  # two full runs (~15 s each on an idle 2-core host)
def test_bert_backbone_dict_outputs_pass_on_litert_and_onnxruntime_and_artifacts_do_not_depend_on_out(tmp_path):
    path, data = tiny_bert(tmp_path)
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], threads=[1],
                           robustness={"enabled": False})
    outs = [tmp_path / "a", tmp_path / "other dir" / "b"]
    outs[1].parent.mkdir()
    reports = []
    for out in outs:
        res = kdeploy("optimize", path, "--profile", profile, "--data", data, "--out", out, "-q", *shapes())
        assert res.returncode in (0, 1), res.stderr
        reports.append(json.loads((out / "report.json").read_text()))
    rep = reports[0]
    assert [o["name"] for o in rep["model"]["outputs"]] == ["pooled_output", "sequence_output"]
    assert [c["registered_name"] for c in rep["model"]["trusted_package_classes"]] == ["keras_hub>BertBackbone"]
    fp32 = next(c for c in rep["candidates"] if c["name"] == "fp32")
    vs_keras = {(f["runtime"], f["output"]): f for f in fp32["fidelity"] if f["reference"] == "keras"}
    assert set(vs_keras) == {(rt, o) for rt in ("litert", "onnxruntime") for o in ("pooled_output", "sequence_output")}
    assert all(f["passed"] and f["max_abs_err"] <= 1e-5 for f in vs_keras.values()), vs_keras
    assert fp32["passed"], fp32["checks"]

    def hashes(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "artifacts").iterdir())}

    first, second = hashes(outs[0]), hashes(outs[1])
    assert {Path(n).suffix for n in first} == {".tflite", ".onnx"} and first == second
    for out in outs:  # no local path in any artifact
        for p in (out / "artifacts").iterdir():
            assert str(tmp_path).encode() not in p.read_bytes() and b"partial" not in p.read_bytes()


@pytest.mark.parametrize("base, precisions, fp32_source", [
    # ONNX Runtime only cross-checks: the fp32 twin is converted from the fp32 .tflite, as the int8 one
    ("cpu-edge", ["fp32", "int8"], "tf2onnx(tflite)+rewrite(TFL_GELU)"),
    # ONNX Runtime is deployed: the fp32 model comes from the SavedModel (exact GELU as Erfc, rewritten)
    ("cpu-server", ["fp32"], "tf2onnx(saved_model)+rewrite(Erfc)"),
])
def test_attention_block_with_gelu_has_a_valid_onnx_equal_to_keras(tmp_path, base, precisions, fp32_source):
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((SEQ, 16), name="x")
    a = keras.layers.MultiHeadAttention(2, 8)(x, x)
    h = keras.layers.LayerNormalization()(x + a)
    d = keras.layers.Dense(32, activation="gelu")(h)
    y = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling1D()(d))
    path = tmp_path / "mha.keras"
    keras.Model(x, y, name="mha_block").save(path)
    data = tmp_path / "mha.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(48, SEQ, 16)).astype("float32"))
    profile = make_profile(tmp_path, base, precisions=precisions, threads=[1], robustness={"enabled": False})
    res = kdeploy("optimize", path, "--profile", profile, "--data", data, "--out", tmp_path / "out", "-q")
    assert res.returncode in (0, 1), res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {c["name"]: c for c in rep["candidates"]}
    onnx = {name: next(a for a in c["artifacts"] if a["format"] == "onnx") for name, c in by_name.items()}
    assert onnx["fp32"]["source"] == fp32_source
    ort_fp32 = [f for f in by_name["fp32"]["fidelity"] if f["runtime"] == "onnxruntime" and f["reference"] == "keras"]
    assert ort_fp32 and all(f["passed"] and f["max_abs_err"] <= 1e-5 for f in ort_fp32)
    assert not [f for f in rep["findings"] if f["code"] in ("crosscheck-unavailable", "crosscheck-failed")]
    if "int8" not in precisions:
        return
    assert onnx["int8"]["source"] == "tf2onnx(tflite)+rewrite(TFL_GELU)"
    # The quantized twin runs on ONNX Runtime and agrees with LiteRT on the same int8 graph.
    twin = [f for f in by_name["int8"]["consistency"] if f["runtime_b"] == "onnxruntime" and f["runtime_a"] == "litert"]
    assert twin and all(f["passed"] for f in twin)


def test_profile_trusted_packages_refuse_the_standard_library(tmp_path):
    from kdeploy.errors import ProfileError
    from kdeploy.profiles import resolve_profile

    assert resolve_profile(profile_file=make_profile(tmp_path, trusted_packages=["keras_hub"])).trusted_packages == ["keras_hub"]
    with pytest.raises(ProfileError, match="'builtins' is part of the Python standard library"):
        resolve_profile(profile_file=make_profile(tmp_path, trusted_packages=["builtins"]))
