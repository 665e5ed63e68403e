"""Robustness probes: inputs off the validation distribution, agreement with Keras, and its check."""

import numpy as np
import pytest

from kdeploy.run import optimize
from kdeploy.profiles import Robustness
from kdeploy.robustness import agreement, make_probes

from conftest import FIXTURES, make_profile


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(3.0, 2.0, size=(n, 6)).astype(np.float32), "ids": rng.integers(0, 50, size=(n, 4))}


def test_make_probes_noise_has_the_asked_spread_and_keeps_integer_inputs():
    data = _data()
    cfg = Robustness(samples=150, noise_std=0.5)
    probes = make_probes(data, data, cfg, seed=1)
    assert set(probes) == {"noise", "shift_scale", "edge"}
    _, noisy = probes["noise"]
    delta = noisy["x"] - data["x"][:150]
    assert delta.dtype == np.float32
    assert np.std(delta) == pytest.approx(0.5 * data["x"].std(), rel=0.1)  # 900 draws: within 10%
    np.testing.assert_array_equal(noisy["ids"], data["ids"][:150])


def test_make_probes_shift_scale_is_gain_then_offset_in_stds():
    data = _data()
    probes = make_probes(data, data, Robustness(samples=10, scale=2.0, shift=1.0), seed=0)
    _, shifted = probes["shift_scale"]
    expected = data["x"][:10] * 2.0 + 1.0 * data["x"].astype(np.float64).std()
    np.testing.assert_allclose(shifted["x"], expected, rtol=1e-6)  # float32 arithmetic


def test_make_probes_edge_rows_are_zeros_and_data_extremes():
    data = _data()
    _, edge = make_probes(data, data, Robustness(), seed=0)["edge"]
    x = edge["x"]
    assert x.shape == (5, 6)
    np.testing.assert_array_equal(x[0], 0)
    np.testing.assert_array_equal(x[1], data["x"].min(axis=0))
    np.testing.assert_array_equal(x[2], data["x"].max(axis=0))
    assert np.all(x[3] == data["x"].min()) and np.all(x[4] == data["x"].max())
    assert edge["ids"].dtype == data["ids"].dtype


def test_make_probes_respects_the_profile_selection_and_disable():
    data = _data()
    assert set(make_probes(data, data, Robustness(probes=["edge"]), 0)) == {"edge"}
    assert make_probes(data, data, Robustness(enabled=False), 0) == {}


def _probs(labels, n_classes=3, confidence=0.9):
    p = np.full((len(labels), n_classes), (1 - confidence) / (n_classes - 1), dtype=np.float32)
    p[np.arange(len(labels)), labels] = confidence
    return p


def test_agreement_identical_outputs_agree_fully_without_a_verdict():
    ref = _probs([0, 1, 2, 1])
    (row,) = agreement("noise", "d", "litert", [ref], [ref.copy()], ["y"], ["multiclass"], Robustness())
    assert row["top1_agreement"] == 1.0 and row["cosine_mean"] == pytest.approx(1.0)
    assert row["passed"] is None  # no minimum set: reported, not gated


def test_agreement_below_the_minimum_fails_and_says_by_how_much():
    ref = _probs([0, 1, 2, 1])
    got = _probs([0, 1, 2, 0])
    cfg = Robustness(min_top1=0.9)
    (row,) = agreement("noise", "d", "litert", [ref], [got], ["y"], ["multiclass"], cfg)
    assert row["top1_agreement"] == 0.75 and row["passed"] is False
    assert "top1=0.75" in row["detail"] and "FAILED" in row["detail"]


def test_agreement_does_not_blame_the_candidate_when_keras_is_non_finite():
    ref = np.array([[np.nan, 1.0]], dtype=np.float32)
    (row,) = agreement("edge", "d", "litert", [ref], [np.zeros_like(ref)], ["y"], ["regression"],
                       Robustness(min_cosine_mean=0.9))
    assert row["passed"] is None and "Keras itself" in row["detail"]


def test_optimize_gates_on_robustness_minimum_and_reports_every_probe(tmp_path):
    # int8 agrees with Keras on held-out digits (top-1 1.0) but drifts under input noise: on the
    # 32 seeded noise samples its cosine_mean is ~0.998 (one sample drifts); fp32 stays at ~1 - 1e-12.
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"],
                           robustness={"min_cosine_mean": 0.99999, "samples": 32})
    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz")
    for c in report.candidates:
        assert {(r.probe, r.runtime) for r in c.robustness} == {(p, "litert") for p in ("noise", "shift_scale", "edge")}
        assert all(r.samples > 0 and r.cosine_mean is not None for r in c.robustness)
    fp32, int8 = report.candidate("fp32"), report.candidate("int8")
    assert all(k.passed for k in fp32.checks if k.name.startswith("robustness"))
    failed = [k for k in int8.checks if k.name.startswith("robustness") and not k.passed]
    assert failed and failed[0].limit == {"min_cosine_mean": 0.99999}
    assert not int8.passed and report.selected in ("fp32", "int8-mixed", "int8-calibrated", "qat-int8")
    # The repair ladder may fix int8's robustness; whatever is selected passes the same robustness minimum.
    selected = report.candidate(report.selected)
    assert [k for k in selected.checks if k.name.startswith("robustness")]
    assert all(k.passed for k in selected.checks if k.name.startswith("robustness"))


@pytest.mark.parametrize("shape, dtype", [((37, 8, 8, 3), np.float32), ((5,), np.float32), ((11, 6), np.int32)])
def test_probe_scale_std_is_the_float64_std_without_a_float64_copy(shape, dtype):
    from kdeploy.robustness import _std

    v = (np.random.default_rng(0).normal(3.0, 2.0, shape) * 10).astype(dtype)
    # chunks of 1 KB split the rows unevenly: the sum over chunks must still be the whole set's
    assert _std(v, chunk_bytes=1024) == pytest.approx(float(v.astype(np.float64).std()), rel=1e-12)
    assert _std(v[:0]) == 0.0
