"""Bad input battery: every case exits 2 (1 where the model ran but fails) with one line on stderr
naming what was wrong, what was received and what is allowed; no traceback; nothing in --out.

The CLI runs in-process through Typer's CliRunner (TensorFlow is imported once for the whole
battery); `test_scan.py` and `test_hardening.py` run it as a real subprocess. Property tests
(hypothesis) at the end feed arbitrary bytes, arrays and TOML to data loading, profile parsing and
the model scan: they must raise nothing but `KdeployError` subclasses.
"""

import json
import math
import shutil
import tempfile
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from kdeploy.cli import app
from kdeploy.data import load_data
from kdeploy.errors import KdeployError
from kdeploy.loading import TensorInfo, detect_format
from kdeploy.profiles import load_profile_file
from kdeploy.scan import scan_model

from conftest import FIXTURES, PROFILES, dump_toml, make_profile
from malicious import benign_entries, zip_with

CNN = FIXTURES / "digits_cnn.keras"
DIGITS = FIXTURES / "digits.npz"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Keras models that load but cannot be deployed as they are, and a 4-feature one."""
    import keras

    d = tmp_path_factory.mktemp("models")
    i = keras.Input((None, 4), name="seq")
    keras.Model(i, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(i))).save(d / "dynamic.keras")
    i = keras.Input((1,), dtype="string", name="word")
    lookup = keras.layers.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")
    keras.Model(i, keras.layers.Dense(2)(lookup(i))).save(d / "strings.keras")
    i = keras.Input((4,), name="x")
    dense = keras.layers.Dense(3, activation="softmax")
    m = keras.Model(i, dense(i))
    m.save(d / "ok.keras")
    dense.set_weights([np.full((4, 3), np.inf, np.float32), np.zeros(3, np.float32)])  # outputs NaN
    m.save(d / "nan.keras")
    return d


def run(args, out: Path | None = None) -> tuple[int, list[str], str]:
    argv = [str(a) for a in args] + (["--out", str(out)] if out is not None else []) + ["-q"]
    res = CliRunner().invoke(app, argv)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.stderr.strip().splitlines(), res.stdout


def assert_usage_error(args, out: Path, *needles: str) -> str:
    """Exit 2, exactly one stderr line containing every needle, no traceback, nothing at --out."""
    code, lines, _ = run(args, out)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in lines[0]
    assert not out.exists() or (out.is_file() and out.read_text() == "mine")
    assert not list(out.parent.glob(f".{out.name}.partial-*")) and not list(out.parent.glob(f".{out.name}.probe-*"))
    return lines[0]


# ---- the model file ----------------------------------------------------------------------------
def test_missing_model(tmp_path):
    assert_usage_error(["optimize", tmp_path / "nope.keras", "--target", "cpu-edge"], tmp_path / "o",
                       "not found", "nope.keras", ".keras")


def test_empty_model_file(tmp_path):
    (tmp_path / "e.keras").touch()
    assert_usage_error(["optimize", tmp_path / "e.keras", "--target", "cpu-edge"], tmp_path / "o", "empty (0 bytes)")


def test_wrong_extension(tmp_path):
    shutil.copy(CNN, tmp_path / "model.pt")
    assert_usage_error(["optimize", tmp_path / "model.pt", "--target", "cpu-edge"], tmp_path / "o",
                       "'.pt'", "allowed: .keras, .h5")


def test_truncated_archive(tmp_path):
    raw = CNN.read_bytes()
    (tmp_path / "t.keras").write_bytes(raw[: len(raw) // 2])
    assert_usage_error(["optimize", tmp_path / "t.keras", "--target", "cpu-edge"], tmp_path / "o", "truncated")


def test_corrupt_archive_bad_crc(tmp_path):
    raw = bytearray(CNN.read_bytes())
    with zipfile.ZipFile(CNN) as z:
        info = z.getinfo("model.weights.h5")
    raw[info.header_offset + 30 + len(info.filename) + 500] ^= 0xFF  # a byte inside the stored weights
    (tmp_path / "c.keras").write_bytes(bytes(raw))
    assert_usage_error(["optimize", tmp_path / "c.keras", "--target", "cpu-edge"], tmp_path / "o",
                       "corrupt", "bad CRC", "model.weights.h5")


def test_text_file_named_keras(tmp_path):
    (tmp_path / "t.keras").write_text("I am a README, not a model\n")
    assert_usage_error(["optimize", tmp_path / "t.keras", "--target", "cpu-edge"], tmp_path / "o",
                       "not a zip archive", "b'I am a R'")


def test_hdf5_named_keras_and_zip_named_h5(tmp_path):
    shutil.copy(FIXTURES / "iris_legacy.h5", tmp_path / "i.keras")
    assert_usage_error(["optimize", tmp_path / "i.keras", "--target", "cpu-edge"], tmp_path / "o", "HDF5", ".h5")
    shutil.copy(CNN, tmp_path / "z.h5")
    assert_usage_error(["optimize", tmp_path / "z.h5", "--target", "cpu-edge"], tmp_path / "o", "zip archive")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    (tmp_path / "d").mkdir()
    assert_usage_error(["optimize", tmp_path / "d", "--target", "cpu-edge"], tmp_path / "o", "saved_model.pb")


def test_dynamic_non_batch_dimensions_need_input_shape(tmp_path, models):
    assert_usage_error(["optimize", models / "dynamic.keras", "--target", "cpu-edge"], tmp_path / "o",
                       "(None, None, 4)", "--input-shape seq=")
    # With --input-shape the model loads; the data then fails on its own merits (shape named).
    np.savez(tmp_path / "d.npz", seq=np.zeros((8, 6, 4), np.float32))
    assert_usage_error(["optimize", models / "dynamic.keras", "--target", "cpu-edge", "--input-shape", "seq=5,4",
                        "--data", tmp_path / "d.npz"], tmp_path / "o", "(8, 6, 4)", "(N, 5, 4)")
    assert_usage_error(["optimize", models / "dynamic.keras", "--target", "cpu-edge", "--input-shape", "seq=five"],
                       tmp_path / "o", "'seq=five'", "NAME=D1,D2")


def test_string_inputs(tmp_path, models):
    assert_usage_error(["optimize", models / "strings.keras", "--target", "cpu-edge"], tmp_path / "o",
                       "'word'", "dtype string", "supported:")


# ---- the data --------------------------------------------------------------------------------
@pytest.mark.parametrize("make, needles", [
    (lambda p: np.savez(p / "d.npz", x=np.ones((20, 5), np.float32)), ["(20, 5)", "(N, 4)"]),
    (lambda p: np.savez(p / "d.npz", x=np.array([["a"] * 4] * 20)), ["<U1", "allowed: numeric"]),
    (lambda p: np.savez(p / "d.npz", x=np.where(np.eye(20, 4) > 0, np.nan, 1.0).astype(np.float32)),
     ["4 NaN/Inf", "allowed: finite"]),
    (lambda p: np.savez(p / "d.npz", features=np.ones((20, 4), np.float32)), ["no array for model input 'x'", "features"]),
    (lambda p: np.savez(p / "d.npz", x=np.ones((1, 4), np.float32)), ["1 sample", "at least 2"]),
    (lambda p: np.save(p / "d.npy", np.ones(4, np.float32)), ["shape (4,)", "one sample without the batch axis"]),
    (lambda p: (p / "d.csv").write_text("\n".join(",".join(["1"] * 5) for _ in range(10))), ["(10, 5)", "(N, 4)"]),
    (lambda p: (p / "d.csv").write_text("a,b,c,d\n1,2,x,4\n"), ["non-numeric", "'x'"]),
    (lambda p: (p / "d.npz").write_bytes(b"PK\x03\x04 not really a zip"), ["cannot read data file", ".npz"]),
    (lambda p: (p / "d.txt").write_text("1,2,3,4"), ["unsupported data file 'd.txt'", "allowed: .npz"]),
])
def test_bad_data(tmp_path, models, make, needles):
    before = set(tmp_path.iterdir())
    make(tmp_path)
    (data,) = set(tmp_path.iterdir()) - before
    assert_usage_error(["optimize", models / "ok.keras", "--target", "cpu-edge", "--data", data], tmp_path / "o", *needles)


def test_missing_data_file(tmp_path, models):
    assert_usage_error(["optimize", models / "ok.keras", "--target", "cpu-edge", "--data", tmp_path / "none.npz"],
                       tmp_path / "o", "data file not found", "allowed: .npz")


# ---- the target and profile --------------------------------------------------------------------
def test_unknown_target(tmp_path):
    assert_usage_error(["optimize", CNN, "--target", "toaster"], tmp_path / "o", "'toaster'", "allowed: cpu-edge")


def test_target_and_profile_together(tmp_path):
    assert_usage_error(["optimize", CNN, "--target", "cpu-edge", "--profile", make_profile(tmp_path)], tmp_path / "o",
                       "exactly one of --target NAME or --profile FILE")


@pytest.mark.parametrize("overrides, needles", [
    ({"bogus": 1}, ["unknown key 'bogus'", "allowed: batch_sizes"]),
    ({"budgets": {"max_latency": 5}}, ["unknown key 'budgets.max_latency'", "max_latency_ms"]),
    ({"threads": [0]}, ["threads and batch_sizes must be >= 1"]),
    ({"timing": {"warmup": -1}}, ["key 'timing.warmup'", "received -1"]),
    ({"precisions": ["fp64"]}, ["key 'precisions.0'", "'fp32'", "received 'fp64'"]),
    ({"tie_tolerance": 2.0}, ["key 'tie_tolerance'", "received 2.0"]),
    ({"runtimes": []}, ["key 'runtimes'", "at least 1"]),
])
def test_invalid_profile_values(tmp_path, overrides, needles):
    assert_usage_error(["optimize", CNN, "--profile", make_profile(tmp_path, **overrides)], tmp_path / "o", *needles)


def test_profile_not_toml(tmp_path):
    (tmp_path / "p.toml").write_text("name = \n[[[")
    assert_usage_error(["optimize", CNN, "--profile", tmp_path / "p.toml"], tmp_path / "o", "not valid TOML", "line 1")


# ---- --out ---------------------------------------------------------------------------------------
def test_out_is_an_existing_file(tmp_path):
    (tmp_path / "o").write_text("mine")
    assert_usage_error(["optimize", CNN, "--target", "cpu-edge"], tmp_path / "o", "existing file", "allowed: a new folder")
    assert (tmp_path / "o").read_text() == "mine"


def test_out_is_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("precious")
    code, lines, _ = run(["optimize", CNN, "--target", "cpu-edge"], tmp_path / "o")
    assert code == 2 and len(lines) == 1 and "did not write" in lines[0]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["thesis.tex"]


def test_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("mine")
    assert_usage_error(["optimize", CNN, "--target", "cpu-edge"], tmp_path / "runs" / "today" / "o",
                       "existing file, not a folder", str(tmp_path / "runs"))
    assert (tmp_path / "runs").read_text() == "mine"


def test_out_missing_parents_are_made_and_removed_again_when_the_run_fails(tmp_path):
    from kdeploy.report.model import discard_staging, make_staging, publish

    out = tmp_path / "runs" / "today" / "model"
    staging = make_staging(out)
    assert staging.parent == out.parent and (tmp_path / "runs" / "today").is_dir()
    discard_staging(staging)  # a failed or interrupted run
    assert list(tmp_path.iterdir()) == []
    staging = make_staging(out)
    (staging / "report.json").write_text("{}")
    publish(staging, out)
    discard_staging(staging)  # after publishing: nothing of the output goes
    assert (out / "report.json").is_file()


def test_out_missing_parents_are_created(tmp_path):
    out = tmp_path / "runs" / "today" / "iris"
    code, lines, _ = run(["optimize", FIXTURES / "iris_legacy.h5", "--target", "cpu-edge",
                          "--data", FIXTURES / "iris.npz", "--no-cache"], out)
    assert code in (0, 1), lines
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["iris"]  # no staging or probe folder left beside it


def test_out_not_writable(tmp_path):
    # chmod does not stop root (these tests may run as root); sysfs refuses new folders to everyone.
    parent = Path("/sys")
    probe = parent / "kdeploy-write-probe"
    try:
        probe.mkdir()
        probe.rmdir()
        pytest.skip("/sys is writable here")
    except FileNotFoundError:
        pytest.skip("no /sys on this system")
    except OSError:
        pass
    code, lines, _ = run(["optimize", CNN, "--target", "cpu-edge"], parent / "kdeploy-out")
    assert code == 2 and len(lines) == 1 and "not writable" in lines[0] and "allowed:" in lines[0]


def test_unknown_report_format(tmp_path):
    code, lines, _ = run(["optimize", CNN, "--target", "cpu-edge", "--format", "json,pdf"], tmp_path / "o")
    assert code == 2 and len(lines) == 1 and "pdf" in lines[0] and not (tmp_path / "o").exists()


# ---- it ran, but fails: exit 1 -------------------------------------------------------------------
def test_model_with_nan_outputs_runs_and_is_not_ready(tmp_path, models):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[])
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((16, 4), dtype=np.float32))
    code, lines, stdout = run(["optimize", models / "nan.keras", "--profile", profile, "--data", tmp_path / "d.npz"],
                              tmp_path / "o")
    assert code == 1, lines + stdout.splitlines()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ready"] is False and report["selected"] is None
    assert "reference-non-finite" in {f["code"] for f in report["findings"]}
    fid = report["candidates"][0]["fidelity"][0]
    assert fid["passed"] is False and "non-finite" in fid["detail"]


# ---- property tests: anything but a KdeployError is a bug ------------------------------------------
FOUR = [TensorInfo("x", (None, 4), "float32")]
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_kdeploy_errors(fn, *args):
    try:
        fn(*args)
    except KdeployError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(raw=st.binary(max_size=600), suffix=st.sampled_from([".npz", ".npy", ".csv"]))
def test_load_data_arbitrary_bytes(raw, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"data{suffix}"
        p.write_bytes(raw)
        _only_kdeploy_errors(load_data, p, FOUR)


@FUZZ
@given(tail=st.binary(max_size=300), member=st.binary(max_size=300))
def test_load_data_npy_headers_and_npz_members(tail, member):
    with tempfile.TemporaryDirectory() as d:
        npy = Path(d) / "h.npy"
        npy.write_bytes(b"\x93NUMPY\x01\x00" + tail)
        _only_kdeploy_errors(load_data, npy, FOUR)
        npz = Path(d) / "m.npz"
        with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x.npy", member)
        _only_kdeploy_errors(load_data, npz, FOUR)


@FUZZ
@given(arr=hnp.arrays(dtype=st.one_of(hnp.scalar_dtypes(), hnp.unicode_string_dtypes()),
                      shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
       suffix=st.sampled_from([".npy", ".npz"]))
def test_load_data_arbitrary_arrays(arr, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"a{suffix}"
        np.save(p, arr) if suffix == ".npy" else np.savez(p, x=arr)
        try:
            ds = load_data(p, FOUR)
        except KdeployError:
            return
        x = ds.inputs["x"]  # accepted: then it is exactly what the model takes
        assert x.dtype == np.float32 and x.shape[1:] == (4,) and len(x) >= 2 and np.isfinite(x).all()


@FUZZ
@given(text=st.text(max_size=400))
def test_profile_arbitrary_text(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.toml"
        p.write_text(text, encoding="utf-8")
        _only_kdeploy_errors(load_profile_file, p)


_SCALARS = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.booleans(), st.text(max_size=12),
                     st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=6), st.floats(-2, 2)), max_size=4))
_BASE = tomllib.loads((PROFILES / "cpu-edge.toml").read_text())
_PATHS = [(k,) for k in _BASE] + [(k, sub) for k, v in _BASE.items() if isinstance(v, dict) for sub in v] + [
    ("bogus",), ("budgets", "bogus"), ("tolerances", "fp64"), ("timing", "warmup"), ("robustness", "samples")]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), _SCALARS), min_size=1, max_size=4))
def test_profile_mutated_values(edits):
    data = json.loads(json.dumps(_BASE))
    for path, value in edits:
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[path[-1]] = value
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.toml"
        try:
            p.write_text(dump_toml(data))
        except (TypeError, ValueError):
            return
        try:
            prof = load_profile_file(p)
        except KdeployError as e:
            assert str(p) in str(e) and "\n" not in str(e)
            return
        assert prof.precisions and set(prof.precisions) <= set(prof.tolerances)  # accepted: then consistent
        assert all(math.isfinite(t) and t >= 1 for t in prof.threads)


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from(["Lambda", "keras.layers", "__lambda__", "function", "builtins", "os", "4wEAAAAAAAAAAAAAAAIAAAAD"])),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.sampled_from(["class_name", "config", "module", "registered_name", "layers",
                                                            "name", "layer", "function", "function_type", "x"]),
                                           kids, max_size=5)),
    max_leaves=25)


@FUZZ
@given(config=_JSON)
def test_scan_arbitrary_configs(config):
    with tempfile.TemporaryDirectory() as d:
        entries = [(n, json.dumps(config).encode() if n == "config.json" else b) for n, b in benign_entries()]
        p = zip_with(Path(d) / "m.keras", entries)
        _only_kdeploy_errors(scan_model, p, "keras")


@FUZZ
@given(raw=st.binary(max_size=500), suffix=st.sampled_from([".keras", ".h5"]))
def test_scan_arbitrary_model_bytes(raw, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"m{suffix}"
        p.write_bytes(raw)
        _only_kdeploy_errors(lambda: scan_model(p, detect_format(p)))


def test_model_that_refuses_the_synthetic_inputs_is_exit_2_naming_data(tmp_path):
    import keras

    i = keras.Input((3,), dtype="int32", name="ids")
    emb = keras.layers.Embedding(1, 4)  # only id 0 exists: the synthetic ids {0, 1} index out of range
    keras.Model(i, keras.layers.Dense(2)(keras.layers.Flatten()(emb(i)))).save(tmp_path / "emb.keras")
    assert_usage_error(["optimize", tmp_path / "emb.keras", "--target", "cpu-edge", "--no-cache"], tmp_path / "o",
                       "failed on synthetic inputs", "--data")
