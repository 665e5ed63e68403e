"""Pre-load scan: hostile model files are refused before anything deserializes them.

Every malicious sample is built here, in tmp_path, from a benign fixture or a tiny Keras model.
"""

import base64
import marshal
import os
import stat
import subprocess
import sys
import warnings
import zipfile

import pytest

from kdeploy.errors import ModelLoadError, UnsafeModelError
from kdeploy.scan import ScanLimits, scan_model

from conftest import FIXTURES
from malicious import (
    BENIGN,
    benign_entries,
    first_dense,
    h5_with_config,
    lambda_writer_keras,
    rewrite_keras,
    savedmodel_writer,
    tf_keras_lambda_config,
    zip_with,
)


def kdeploy(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def codes(findings) -> set[str]:
    return {code for _, code, _ in findings}


def _set_activation(value):
    def edit(cfg):
        first_dense(cfg)["config"]["activation"] = value
        return cfg

    return edit


@pytest.mark.parametrize("name", ["digits_cnn.keras", "cancer_mlp.keras", "diabetes_reg.keras", "digits_gru.keras",
                                  "multi_io.keras", "iris_legacy.h5"])
def test_scan_accepts_benign_fixtures_without_hazards(name):
    path = FIXTURES / name
    findings = scan_model(path, "h5" if name.endswith(".h5") else "keras").findings
    summary = [m for _, c, m in findings if c == "model-scan"]
    assert summary and "no code or custom classes found" in summary[0]
    assert not codes(findings) & {"trusted-code", "custom-object", "archive-extra-entries"}


# ---- acceptance: a Lambda that would write a file is refused and the file never appears ------
def test_cli_refuses_lambda_that_writes_a_file_and_the_file_never_appears(tmp_path):
    marker = tmp_path / "pwned.txt"
    model = lambda_writer_keras(tmp_path / "evil.keras", marker)
    assert not marker.exists()
    res = kdeploy("optimize", model, "--target", "cpu-edge", "--out", tmp_path / "out", "-q")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'pwn' (Lambda)" in lines[0] and "--trust-custom-code" in lines[0]
    assert "Traceback" not in res.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_lambda_payload_is_live_when_trusted(tmp_path):
    """Control for the test above: the same file does write the marker once the user trusts it."""
    from kdeploy.loading import load_model

    marker = tmp_path / "pwned.txt"
    model = lambda_writer_keras(tmp_path / "evil.keras", marker)
    loaded = load_model(model, trust_custom_code=True)
    assert marker.exists()
    assert "trusted-code" in codes(loaded.findings)


def test_scan_refuses_lambda_hidden_in_a_nested_model(tmp_path):
    marker = tmp_path / "pwned.txt"
    model = lambda_writer_keras(tmp_path / "nested.keras", marker, nested=True)
    with pytest.raises(UnsafeModelError, match=r"layer 'pwn' \(Lambda\)"):
        scan_model(model, "keras")


# ---- classes and functions that are not Keras ------------------------------------------------
def test_scan_refuses_custom_class_unless_custom_objects_provide_it(tmp_path):
    def edit(cfg):
        d = first_dense(cfg)
        d.update(module=None, class_name="MyDense", registered_name="my>MyDense")
        return cfg

    path = rewrite_keras(tmp_path / "custom.keras", config=edit)
    with pytest.raises(UnsafeModelError, match=r"\(MyDense\) uses custom class 'my>MyDense'.*--custom-objects"):
        scan_model(path, "keras")
    findings = scan_model(path, "keras", custom_names={"my>MyDense"}).findings
    assert "custom-object" in codes(findings)


def test_custom_objects_module_lets_a_custom_class_load(tmp_path):
    import numpy as np

    from kdeploy.loading import load_custom_objects, load_model

    mod = tmp_path / "my_layers.py"
    mod.write_text("import keras\n\n\n@keras.saving.register_keras_serializable(package='my')\n"
                   "class Plus1(keras.layers.Layer):\n    def call(self, x):\n        return x + 1.0\n")
    custom = load_custom_objects(mod)
    import keras

    i = keras.Input((4,), name="x")
    keras.Model(i, custom["Plus1"](name="plus")(i)).save(tmp_path / "c.keras")
    # Refused without the module, even though this process has the class registered globally.
    with pytest.raises(UnsafeModelError, match=r"layer 'plus' \(Plus1\) uses class 'Plus1' from module 'kdeploy_custom_my_layers'"):
        load_model(tmp_path / "c.keras")
    loaded = load_model(tmp_path / "c.keras", custom_objects=custom)
    assert "custom-object" in codes(loaded.findings)
    np.testing.assert_array_equal(loaded.predict({"x": np.zeros((2, 4), np.float32)})[0], np.ones((2, 4)))


def test_scan_refuses_class_from_a_foreign_module(tmp_path):
    def edit(cfg):
        first_dense(cfg).update(module="os", class_name="system")
        return cfg

    path = rewrite_keras(tmp_path / "os.keras", config=edit)
    with pytest.raises(UnsafeModelError, match=r"class 'system' from module 'os'"):
        scan_model(path, "keras")


@pytest.mark.parametrize("activation, pattern", [
    ({"module": "builtins", "class_name": "function", "config": "evil>act", "registered_name": "function"},
     r"custom function 'evil>act'"),
    ({"module": "keras.utils", "class_name": "function", "config": "get_file", "registered_name": "get_file"},
     r"non-modeling API keras.utils.get_file"),
    ({"class_name": "__lambda__", "config": {"value": base64.b64encode(marshal.dumps((lambda t: t).__code__)).decode()}},
     r"Python lambda serialized as bytecode"),
])
def test_scan_refuses_code_in_a_builtin_layer_argument(tmp_path, activation, pattern):
    path = rewrite_keras(tmp_path / "act.keras", config=_set_activation(activation))
    with pytest.raises(UnsafeModelError, match=pattern) as info:
        scan_model(path, "keras", custom_names={"unrelated"})
    assert "(Dense)" in str(info.value)  # names the layer that carries it


def test_scan_trust_turns_refusals_into_warnings(tmp_path):
    path = rewrite_keras(tmp_path / "act.keras", config=_set_activation(
        {"class_name": "__lambda__", "config": {"value": base64.b64encode(marshal.dumps((lambda t: t).__code__)).decode()}}))
    findings = scan_model(path, "keras", trust_custom_code=True).findings
    assert [sev for sev, code, _ in findings if code == "trusted-code"] == ["warning"]


# ---- legacy .h5: model_config read as data, never through tf_keras ---------------------------
def test_scan_refuses_tf_keras_lambda_in_h5(tmp_path):
    path = h5_with_config(tmp_path / "legacy.h5", tf_keras_lambda_config())
    with pytest.raises(UnsafeModelError, match=r"layer 'double' \(Lambda\)"):
        scan_model(path, "h5")


def test_scan_refuses_unknown_class_in_h5(tmp_path):
    cfg = tf_keras_lambda_config()
    cfg["config"]["layers"][1] = {"class_name": "Custom>Backdoor", "config": {"name": "bd"}}
    path = h5_with_config(tmp_path / "custom.h5", cfg)
    with pytest.raises(UnsafeModelError, match=r"layer 'bd' \(Custom>Backdoor\)"):
        scan_model(path, "h5")


def test_scan_refuses_h5_external_link(tmp_path):
    cfg = tf_keras_lambda_config()
    del cfg["config"]["layers"][1]
    path = h5_with_config(tmp_path / "link.h5", cfg, external_link=tmp_path / "elsewhere.h5")
    with pytest.raises(UnsafeModelError, match="link to another file"):
        scan_model(path, "h5")


@pytest.mark.parametrize("where", ["first", "last"])  # the member's offset in the archive must not matter
def test_scan_refuses_keras_weights_with_external_link(tmp_path, where):
    """model.weights.h5 inside a .keras archive is walked in place (`scan._StoredMember`), links and all."""
    import h5py

    entries = dict(benign_entries())
    order = sorted(entries, key=lambda n: (n != "model.weights.h5") == (where == "first"))
    benign = zip_with(tmp_path / "ok.keras", [(n, entries[n]) for n in order])
    assert codes(scan_model(benign, "keras").findings) >= {"model-scan"}  # the same layout, unchanged weights: read
    weights = tmp_path / "w.h5"
    weights.write_bytes(entries["model.weights.h5"])
    with h5py.File(weights, "a") as f:
        f["stolen"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/")
    entries["model.weights.h5"] = weights.read_bytes()
    path = zip_with(tmp_path / "link.keras", [(n, entries[n]) for n in order])
    with pytest.raises(UnsafeModelError, match="link to another file"):
        scan_model(path, "keras")


def test_scan_rejects_weights_only_h5(tmp_path):
    import h5py

    with h5py.File(tmp_path / "w.h5", "w") as f:
        f["layer/kernel"] = [1.0, 2.0]
    with pytest.raises(ModelLoadError, match="no model_config"):
        scan_model(tmp_path / "w.h5", "h5")


# ---- hostile archives: refused whatever the user trusts --------------------------------------
@pytest.mark.parametrize("name", ["../../evil.py", "/etc/cron.d/evil", "assets/../../x", "C:/Windows/evil.dll"])
def test_scan_refuses_entries_outside_the_archive(tmp_path, name):
    path = zip_with(tmp_path / "trav.keras", benign_entries() + [(name, b"print('owned')")])
    with pytest.raises(UnsafeModelError, match="points outside the archive"):
        scan_model(path, "keras", trust_custom_code=True)


def test_scan_refuses_zip_bomb_before_reading_it(tmp_path):
    entries = [(n, d) for n, d in benign_entries() if n != "model.weights.h5"]
    entries.append(("model.weights.h5", bytes(32 << 20)))  # 32 MiB of zeros deflate to ~32 KB (ratio ~1000)
    path = zip_with(tmp_path / "bomb.keras", entries, zipfile.ZIP_DEFLATED)
    with pytest.raises(UnsafeModelError, match="decompression bomb"):
        scan_model(path, "keras", trust_custom_code=True)


def test_scan_enforces_total_and_entry_size_limits():
    with pytest.raises(UnsafeModelError, match="allowed: at most 1,000"):
        scan_model(BENIGN, "keras", limits=ScanLimits(max_entry_bytes=1000))
    with pytest.raises(UnsafeModelError, match="in all"):
        scan_model(BENIGN, "keras", limits=ScanLimits(max_total_bytes=2000))


def test_scan_refuses_duplicate_entries_and_symlinks(tmp_path):
    entries = benign_entries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we are writing on purpose
        dup = zip_with(tmp_path / "dup.keras", entries + [("config.json", b'{"class_name": "Lambda"}')])
    with pytest.raises(UnsafeModelError, match="appears twice"):
        scan_model(dup, "keras")
    link = zipfile.ZipInfo("assets/passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    sym = zip_with(tmp_path / "sym.keras", entries + [(link, b"/etc/passwd")])
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        scan_model(sym, "keras")


def test_scan_requires_config_and_weights_and_flags_extras(tmp_path):
    with pytest.raises(ModelLoadError, match="missing model.weights.h5"):
        scan_model(rewrite_keras(tmp_path / "now.keras", drop=("model.weights.h5",)), "keras")
    with pytest.raises(ModelLoadError, match="missing config.json"):
        scan_model(rewrite_keras(tmp_path / "noc.keras", drop=("config.json",)), "keras")
    findings = scan_model(rewrite_keras(tmp_path / "x.keras", drop=("metadata.json",), extra={"run.sh": b"rm -rf /"}),
                          "keras").findings
    assert {"archive-extra-entries", "archive-metadata-missing"} <= codes(findings)


@pytest.mark.parametrize("raw, error, pattern", [
    (b'{"class_name": "Dense", "class_name": "Lambda", "config": {}}', UnsafeModelError, "appears twice"),
    (b"[" * 100_000 + b"]" * 100_000, ModelLoadError, "nested too deeply|not a Keras object"),
    (b"\xff\xfe not json", ModelLoadError, "not UTF-8"),
    (b"{'class_name': 1}", ModelLoadError, "not valid JSON"),
    (b'{"config": {}}', ModelLoadError, "no class_name"),
])
def test_scan_rejects_malformed_config(tmp_path, raw, error, pattern):
    entries = [(n, raw if n == "config.json" else d) for n, d in benign_entries()]
    with pytest.raises(error, match=pattern):
        scan_model(zip_with(tmp_path / "bad.keras", entries), "keras")


# ---- SavedModel: op types read from the protobuf ----------------------------------------------
def test_scan_refuses_savedmodel_that_writes_files(tmp_path):
    from kdeploy.loading import load_model

    marker = tmp_path / "pwned.txt"
    sm = savedmodel_writer(tmp_path / "sm", marker)
    with pytest.raises(UnsafeModelError, match=r"\(WriteFile\)"):
        load_model(sm)
    assert not marker.exists()
    # Control: trusted, the model loads and its serving signature writes the file.
    loaded = load_model(sm, trust_custom_code=True)
    import numpy as np

    loaded.predict({"x": np.ones((2, 4), np.float32)})
    assert marker.exists() and "trusted-code" in codes(loaded.findings)


# ---- comparison with modelscan ---------------------------------------------------------------
def test_scan_verdicts_compared_with_modelscan(tmp_path):
    """kdeploy's scan and ProtectAI's modelscan on the same samples.

    Differences, by design of each tool (modelscan 0.8.8):
    - modelscan looks for `Lambda` in the *top-level* `layers` list of config.json/model_config
      only, so a Lambda inside a nested model passes it; kdeploy walks the whole config.
    - modelscan does not look at `module` / `registered_name`, so custom classes, classes from
      foreign modules (`os.system`) and non-modeling Keras APIs (`get_file`) pass it; Keras'
      safe_mode blocks some of these at load time, kdeploy refuses them before loading.
    - modelscan reads config.json only, so archive attacks (path traversal entries) pass it.
    - Both flag a top-level Lambda (.keras and .h5) and a SavedModel that writes files.
    """
    pytest.importorskip("modelscan")
    from modelscan.modelscan import ModelScan
    from modelscan.settings import DEFAULT_SETTINGS

    marker = tmp_path / "m.txt"
    samples = {  # name -> (path, format, modelscan should flag it, kdeploy refuses it)
        "benign": (BENIGN, "keras", False, False),
        "benign-h5": (FIXTURES / "iris_legacy.h5", "h5", False, False),
        "lambda": (lambda_writer_keras(tmp_path / "l.keras", marker), "keras", True, True),
        "lambda-nested": (lambda_writer_keras(tmp_path / "n.keras", marker, nested=True), "keras", False, True),
        "lambda-h5": (h5_with_config(tmp_path / "l.h5", tf_keras_lambda_config()), "h5", True, True),
        "custom-class": (rewrite_keras(tmp_path / "c.keras", config=lambda c: (
            first_dense(c).update(module=None, class_name="X", registered_name="p>X"), c)[1]), "keras", False, True),
        "os-module": (rewrite_keras(tmp_path / "o.keras", config=lambda c: (
            first_dense(c).update(module="os", class_name="system"), c)[1]), "keras", False, True),
        "get_file": (rewrite_keras(tmp_path / "g.keras", config=_set_activation(
            {"module": "keras.utils", "class_name": "function", "config": "get_file",
             "registered_name": "get_file"})), "keras", False, True),
        "traversal": (zip_with(tmp_path / "t.keras", benign_entries() + [("../x.py", b"")]), "keras", False, True),
        "savedmodel-writefile": (savedmodel_writer(tmp_path / "sm", marker), "savedmodel", True, True),
    }
    seen = {}
    for name, (path, fmt, ms_expected, kd_expected) in samples.items():
        report = ModelScan(settings=DEFAULT_SETTINGS).scan(str(path))
        ms_flagged = report["summary"]["total_issues"] > 0
        try:
            scan_model(path, fmt)
            kd_refused = False
        except UnsafeModelError:
            kd_refused = True
        seen[name] = (ms_flagged, kd_refused)
    assert seen == {name: (s[2], s[3]) for name, s in samples.items()}
