"""Data loading: formats, checks against the model signature, disjoint splits."""

import numpy as np
import pytest

from kdeploy.data import load_data, split, synthetic_data
from kdeploy.errors import DataError
from kdeploy.loading import TensorInfo

from conftest import FIXTURES

IMG = [TensorInfo("image", (None, 8, 8, 1), "float32")]
TAB = [TensorInfo("features", (None, 30), "float32")]


def test_load_npz_by_x_key_with_labels():
    ds = load_data(FIXTURES / "digits.npz", IMG)
    assert ds.inputs["image"].shape == (300, 8, 8, 1) and ds.labels is not None and "y" in ds.labels
    assert not ds.synthetic


def test_load_npz_multi_input_by_name():
    inputs = [TensorInfo("image", (None, 8, 8, 1), "float32"), TensorInfo("row_means", (None, 8), "float32")]
    ds = load_data(FIXTURES / "multi_io.npz", inputs)
    assert set(ds.inputs) == {"image", "row_means"} and len(ds) == 300


def test_load_csv_with_header_matches_npz():
    csv = load_data(FIXTURES / "cancer.csv", TAB)
    npz = load_data(FIXTURES / "cancer.npz", TAB)
    assert csv.inputs["features"].shape == npz.inputs["features"].shape
    np.testing.assert_allclose(csv.inputs["features"], npz.inputs["features"], rtol=1e-6)


def test_load_npy(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((5, 30), np.float32))
    assert load_data(p, TAB).inputs["features"].shape == (5, 30)


def test_wrong_feature_count_names_shapes(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((5, 29), np.float32))
    with pytest.raises(DataError, match=r"shape \(5, 29\).*expects \(N, 30\)"):
        load_data(p, TAB)


def test_nan_in_data_refused(tmp_path):
    a = np.zeros((5, 30), np.float32)
    a[2, 3] = np.nan
    p = tmp_path / "x.npy"
    np.save(p, a)
    with pytest.raises(DataError, match="1 NaN/Inf"):
        load_data(p, TAB)


def test_missing_input_array_names_keys(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, features=np.zeros((4, 30), np.float32))
    with pytest.raises(DataError, match=r"no array for model input 'image'.*features"):
        load_data(p, IMG)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"x")
    with pytest.raises(DataError, match=r"allowed: \.npz, \.npy, \.csv"):
        load_data(p, TAB)


def test_split_is_disjoint_and_seeded():
    ds = load_data(FIXTURES / "digits.npz", IMG)
    cal, val = split(ds, 64, seed=3)
    assert len(cal) == 64 and len(val) == 236
    rows = {a.tobytes() for a in cal.inputs["image"]}
    assert not rows & {a.tobytes() for a in val.inputs["image"]}
    cal2, _ = split(ds, 64, seed=3)
    np.testing.assert_array_equal(cal.inputs["image"], cal2.inputs["image"])


def test_synthetic_data_follows_signature():
    ds = synthetic_data(IMG + [TensorInfo("ids", (None, 4), "int32")], 10, seed=0)
    assert ds.synthetic and ds.inputs["image"].shape == (10, 8, 8, 1) and ds.inputs["ids"].dtype == np.int32
