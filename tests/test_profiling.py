"""Latency statistics, the timing loop, the measuring worker, compute counts, and a fast CLI."""

import subprocess
import sys

import numpy as np
import pytest

from kdeploy.profiling import dominators, is_noisy, measure, near_limit, pareto_front, summarize

from conftest import FIXTURES, ROOT


# ------------------------------------------------------------------------------ statistics
def test_summarize_known_sample_gives_textbook_figures():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["p50_ms"] == 3.0
    assert s["p90_ms"] == pytest.approx(4.6)  # linear interpolation: 4 + 0.6 * (5 - 4)
    assert s["p99_ms"] == pytest.approx(4.96)
    assert s["mean_ms"] == 3.0
    assert s["std_ms"] == pytest.approx(np.sqrt(2.5))  # sample std (ddof=1) of 1..5
    assert s["cv"] == pytest.approx(np.sqrt(2.5) / 3.0)
    assert (s["min_ms"], s["max_ms"]) == (1.0, 5.0)


def test_summarize_single_sample_has_zero_spread():
    s = summarize([7.5])
    assert s["p50_ms"] == s["p99_ms"] == s["mean_ms"] == 7.5
    assert s["std_ms"] == 0.0 and s["cv"] == 0.0


@pytest.mark.parametrize("bad", [[], [1.0, -0.1], [1.0, float("nan")]])
def test_summarize_rejects_empty_negative_or_nan_samples(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_is_noisy_and_near_limit_thresholds():
    assert is_noisy(0.2, 0.15) and not is_noisy(0.15, 0.15)
    assert near_limit(9.5, 10.0, 0.1) and near_limit(10.9, 10.0, 0.1)
    assert not near_limit(8.9, 10.0, 0.1) and not near_limit(11.1, 10.0, 0.1)


def test_pareto_front_marks_only_undominated_points():
    points = {"a": (1.0, 10.0, 0.1), "b": (2.0, 5.0, 0.1), "c": (2.0, 10.0, 0.1), "d": (1.0, 10.0, 0.1)}
    assert pareto_front(points) == {"a", "b", "d"}  # c is beaten by a, b and d; a and d are equal
    assert sorted(dominators(points)["c"]) == ["a", "b", "d"]


# ------------------------------------------------------------------------------ timing loop
class FakeClock:
    """A clock that only moves when the fake runner runs: each call costs `step_s`."""

    def __init__(self, step_s: float):
        self.now = 0.0
        self.step_s = step_s
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def infer(self, feeds):
        self.calls += 1
        self.now += self.step_s


def test_measure_runs_until_both_min_iters_and_min_seconds():
    clock = FakeClock(0.002)
    times, warmup = measure(clock, {}, warmup=3, min_iters=10, min_seconds=0.1, max_iters=1000, clock=clock)
    assert warmup == 3 and clock.calls == 3 + len(times)
    assert len(times) == 50  # 0.1 s at 2 ms per call, more than min_iters
    assert times[0] == pytest.approx(2.0)


def test_measure_min_iters_dominates_for_slow_calls():
    clock = FakeClock(0.5)
    times, _ = measure(clock, {}, warmup=0, min_iters=8, min_seconds=0.1, max_iters=1000, clock=clock)
    assert len(times) == 8


def test_measure_stops_at_max_seconds_after_a_few_samples():
    clock = FakeClock(1.0)
    times, _ = measure(clock, {}, warmup=0, min_iters=50, min_seconds=0.0, max_iters=1000, max_seconds=3.0,
                       clock=clock)
    assert len(times) == 5  # at least MIN_SAMPLES_AT_TIME_LIMIT even though 3 s passed after 3 calls


def test_measure_stops_at_max_iters():
    clock = FakeClock(0.001)
    times, _ = measure(clock, {}, warmup=0, min_iters=50, min_seconds=100.0, max_iters=20, clock=clock)
    assert len(times) == 20


# ------------------------------------------------------------------------------ worker and compute
@pytest.fixture(scope="module")
def digits_fp32_tflite(tmp_path_factory):
    """fp32 `.tflite` of the digits CNN, converted here with TensorFlow's own converter."""
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(FIXTURES / "digits_cnn.keras")
    path = tmp_path_factory.mktemp("tfl") / "digits.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path, model


def _io(path):
    from ai_edge_litert.interpreter import Interpreter

    sig = Interpreter(model_path=str(path)).get_signature_list()["serving_default"]
    return {"inputs": {"image": sig["inputs"][0]}, "outputs": sig["outputs"]}


def test_worker_reports_cold_memory_and_latency_per_thread_and_batch(digits_fp32_tflite, tmp_path):
    from kdeploy.runtimes.worker import run_isolated

    path, model = digits_fp32_tflite
    x = np.load(FIXTURES / "digits.npz")["x"][:20].astype(np.float32)
    np.savez(tmp_path / "feeds.npz", image=x)
    job = {"runtime": "litert", "artifact_path": str(path), "io": _io(path), "feeds_path": str(tmp_path / "feeds.npz"),
           "fidelity_threads": 1, "fidelity_batch": 8, "threads": [1, 2], "batch_sizes": [1, 4],
           "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.0, "max_iters": 10, "max_seconds": 5.0}}
    outs, result = run_isolated(job, tmp_path / "job")
    np.testing.assert_allclose(outs[0], model.predict(x, verbose=0), atol=1e-5)  # fp32 kernels: rounding only
    assert result["cold"]["load_ms"] > 0 and result["cold"]["first_inference_ms"] > 0
    mem = result["memory"]
    assert result["peak_reset"] is True, "this Linux kernel allows resetting the peak-RSS counter"
    assert mem["peak_rss_mb"] >= mem["baseline_rss_mb"] > 0
    assert mem["load_and_infer_mb"] == pytest.approx(mem["peak_rss_mb"] - mem["baseline_rss_mb"])
    assert mem["load_and_infer_mb"] >= mem["load_mb"] >= 0
    rows = {(r["threads"], r["batch"]): r for r in result["latency"]}
    assert set(rows) == {(1, 1), (1, 4), (2, 1), (2, 4)}
    for (threads, batch), r in rows.items():
        assert 5 <= r["samples"] <= 10 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_items_s"] == pytest.approx(batch * 1e3 / r["mean_ms"])


def test_tflite_compute_counts_conv_and_dense_macs_of_digits_cnn(digits_fp32_tflite):
    from kdeploy.compute import tflite_compute

    path, model = digits_fp32_tflite
    expected = 0
    for layer in model.layers:  # MACs from the Keras layers, counted independently of the .tflite
        kind = type(layer).__name__
        if kind == "Conv2D":
            kh, kw, cin, _ = layer.kernel.shape
            expected += int(np.prod(layer.output.shape[1:])) * kh * kw * cin
        elif kind == "Dense":
            expected += int(np.prod(layer.kernel.shape))
    c = tflite_compute(path)
    assert c["macs"] == expected > 0
    assert c["flops"] >= 2 * c["macs"]
    assert set(c["macs_by_op"]) == {"CONV_2D", "FULLY_CONNECTED"}
    assert c["weight_bytes"] == pytest.approx(4 * c["weight_elements"])  # fp32 weights
    assert abs(c["weight_elements"] - model.count_params()) < 0.01 * model.count_params()  # BatchNorm folds


def test_estimate_is_a_labelled_roofline_lower_bound():
    from kdeploy.compute import estimate_latency
    from kdeploy.profiles import Device

    dev = Device(name="toy", peak_gops={"fp32": 1.0, "int8": 4.0}, memory_bandwidth_gb_s=0.001)
    compute = {"flops": 2_000_000, "weight_bytes": 10_000, "io_bytes": 0}
    fp32 = estimate_latency(compute, "fp32", dev)
    assert fp32["kind"] == "estimate" and fp32["device"] == "toy"
    assert fp32["compute_ms"] == pytest.approx(2.0)  # 2e6 ops / 1e9 ops/s
    assert fp32["memory_ms"] == pytest.approx(10.0)  # 1e4 bytes / 1e6 bytes/s
    assert fp32["latency_ms_lower_bound"] == pytest.approx(10.0) and fp32["bound_by"] == "memory"
    int8 = estimate_latency(compute, "int8", dev)
    assert int8["compute_precision"] == "int8" and int8["compute_ms"] == pytest.approx(0.5)
    assert estimate_latency(compute, "fp16", dev)["compute_precision"] == "fp32"  # no fp16 rate: fp32 kernels
    assert estimate_latency(compute, "fp32", None) is None


# ------------------------------------------------------------------------------ fast CLI
def test_cli_targets_imports_no_tensorflow():
    code = ("import sys\nfrom kdeploy.cli import app\n"
            "try:\n    app(['targets'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'tf_keras', 'onnxruntime', 'tflite_micro'))\n"
            "print('HEAVY', heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout[-500:]
    assert "mcu" in res.stdout and "tflm" in res.stdout
