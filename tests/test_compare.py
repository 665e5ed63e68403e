"""Fidelity metrics on known values, and verdicts that fail when they should."""

import numpy as np
import pytest

from kdeploy.compare import compare, cosines, metrics
from kdeploy.profiles import Tolerance


def test_metrics_known_values():
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=np.float32)
    got = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]], dtype=np.float32)
    m = metrics(ref, got, "multiclass")
    assert m.max_abs_err == pytest.approx(0.1, abs=1e-6)
    assert m.mean_abs_err == pytest.approx(0.2 / 6, abs=1e-6)
    assert m.norm_err == pytest.approx(0.1 / 0.7, abs=1e-6)
    assert m.top1_agreement == 1.0
    # cosine of (0.7,0.2,0.1) and (0.6,0.3,0.1)
    c = (0.42 + 0.06 + 0.01) / (np.sqrt(0.54) * np.sqrt(0.46))
    assert m.cosine_min == pytest.approx(c, abs=1e-6)
    assert m.cosine_mean == pytest.approx((c + 1.0) / 2, abs=1e-6)


def test_metrics_top1_disagreement_counted():
    ref = np.array([[0.6, 0.4], [0.3, 0.7]])
    got = np.array([[0.4, 0.6], [0.3, 0.7]])
    assert metrics(ref, got, "multiclass").top1_agreement == 0.5
    assert metrics(ref[:, :1], got[:, :1], "binary").top1_agreement == 0.5


def test_cosines_single_value_outputs_use_batch_cosine():
    ref = np.array([[1.0], [2.0], [3.0]])
    assert cosines(ref, ref * 2).tolist() == pytest.approx([1.0])
    assert cosines(ref, -ref).tolist() == pytest.approx([-1.0])


def test_compare_fp32_tolerance_fails_on_small_drift_and_says_how_far():
    ref = np.linspace(0, 1, 20, dtype=np.float32).reshape(10, 2)
    got = ref + 3e-4
    (r,) = compare([ref], [got], names=["y"], kinds=["regression"], tol=Tolerance(atol=1e-5, rtol=1e-4),
                   runtime="litert", reference="keras", precision="fp32")
    assert not r and not r.passed
    assert "3.00e-04" in r.detail and "exceeded" in r.detail
    (ok,) = compare([ref], [ref + 1e-7], names=["y"], kinds=["regression"], tol=Tolerance(atol=1e-5, rtol=1e-4),
                    runtime="litert", reference="keras", precision="fp32")
    assert ok.passed


def test_compare_nan_always_fails_even_without_criteria():
    ref = np.ones((4, 3), dtype=np.float32)
    got = ref.copy()
    got[1, 2] = np.nan
    (r,) = compare([ref], [got], names=["y"], kinds=["multiclass"], tol=Tolerance(),
                   runtime="onnxruntime", reference="keras", precision="int8")
    assert not r.passed and "NaN" in r.detail


def test_compare_shape_mismatch_fails():
    (r,) = compare([np.zeros((4, 3))], [np.zeros((4, 2))], names=["y"], kinds=["multiclass"],
                   tol=Tolerance(min_top1=0.9), runtime="litert", reference="keras", precision="fp32")
    assert not r.passed and "shape" in r.detail


def test_quantized_tolerance_top1_criterion():
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(5), size=50)
    got = ref.copy()
    got[:5] = got[:5, ::-1]  # 5 of 50 samples flip class order
    tol = Tolerance(min_top1=0.99)
    (r,) = compare([ref], [got], names=["y"], kinds=["multiclass"], tol=tol, runtime="litert", reference="keras",
                   precision="int8")
    assert not r.passed and r.top1_agreement <= 0.9 + 1e-9 and "top1" in r.detail
