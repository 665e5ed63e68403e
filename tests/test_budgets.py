"""Budgets become checks with values, limits and verdicts; selection never takes a failing candidate."""

import json
import subprocess
import sys

import pytest

from kdeploy.errors import ProfileError
from kdeploy.run import optimize
from kdeploy.run.select import select
from kdeploy.profiles import load_profile_file, resolve_profile
from kdeploy.report.model import Candidate, Check, LatencyOut

from conftest import FIXTURES, ROOT, make_profile


def kdeploy(*args):
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_optimize_exit_1_names_the_latency_check_when_the_budget_is_too_tight(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "int8"], budgets={"max_latency_ms": 1e-6})
    res = kdeploy("optimize", FIXTURES / "digits_cnn.keras", "--profile", profile, "--data", FIXTURES / "digits.npz",
                  "--out", tmp_path / "o", "-q")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "latency_p90_ms" in res.stdout and "NOT READY" in res.stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for c in report["candidates"]:
        check = next(k for k in c["checks"] if k["name"] == "latency_p90_ms")
        assert check["passed"] is False and check["value"] > check["limit"] == 1e-6
        assert "litert" in check["detail"] and "host:" in check["detail"]


@pytest.fixture(scope="module")
def all_budgets_run(tmp_path_factory):
    """digits on cpu-edge with every budget set, generously (nowhere near a limit: no re-measure)."""
    tmp = tmp_path_factory.mktemp("budgets")
    profile = make_profile(
        tmp, "cpu-edge", precisions=["fp32", "int8"],
        budgets={"max_size_bytes": 10_000_000, "max_gzip_bytes": 10_000_000, "max_latency_ms": 50.0,
                 "max_memory_mb": 10_000.0},
    )
    return optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz", out=tmp / "out")


def test_every_budget_becomes_a_check_with_value_limit_and_verdict(all_budgets_run):
    report = all_budgets_run
    assert report.ready
    for c in report.candidates:
        checks = {k.name: k for k in c.checks}
        for name, limit in (("size_bytes", 10_000_000), ("gzip_bytes", 10_000_000), ("latency_p90_ms", 50.0),
                            ("memory_mb", 10_000.0)):
            assert checks[name].limit == limit
            assert isinstance(checks[name].value, (int, float)) and checks[name].value <= limit
            assert checks[name].passed
        tfl = next(a for a in c.artifacts if a.format == "tflite")
        assert checks["size_bytes"].value == tfl.size_bytes and checks["gzip_bytes"].value == tfl.gzip_bytes
        assert checks["memory_mb"].value == pytest.approx(c.memory["litert"]["load_and_infer_mb"], abs=0.01)
        assert any(k.name.startswith("fidelity litert vs keras") for k in c.checks)
        assert c.passed == all(k.passed for k in c.checks)


def test_candidates_are_timed_round_robin_in_one_process(all_budgets_run):
    rows = [(c.name, l) for c in all_budgets_run.candidates for l in c.latency]
    for name, l in rows:
        assert not l.remeasured and l.interleaved_with == [n for n in ("fp32", "int8") if n != name]
        assert l.samples >= 5 and l.measured_on.startswith("host:")
    for c in all_budgets_run.candidates:
        assert {(l.threads, l.batch) for l in c.latency} == {(1, 1), (2, 1)}


def test_report_has_cold_warm_memory_compute_and_a_pareto_table(all_budgets_run):
    report = all_budgets_run
    for c in report.candidates:
        assert c.cold["litert"]["load_ms"] > 0 and c.cold["litert"]["first_inference_ms"] > 0
        assert {l.threads for l in c.latency if l.runtime == "litert"} == {1, 2}
        assert c.compute["macs"] > 0 and c.compute["source"].startswith("tflite op list")
        assert c.estimate["kind"] == "estimate" and c.estimate["host_measurement"]["measured_on"].startswith("host:")
    rows = {r["candidate"]: r for r in report.selection["pareto"]["rows"]}
    assert set(rows) == {c.name for c in report.candidates}
    assert any(r["pareto_optimal"] for r in rows.values())
    assert "Pareto" in report.selection["reasons"][report.selected]


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    """One candidate (nothing to interleave with), an arena budget cpu-edge cannot measure, a latency
    budget whose re-measure margin (100%) always triggers."""
    tmp = tmp_path_factory.mktemp("iris")
    profile = make_profile(tmp, "cpu-edge", precisions=["fp32"], robustness={"enabled": False},
                           budgets={"max_arena_bytes": 1_000_000, "max_latency_ms": 50.0},
                           timing={"remeasure_margin": 1.0})
    return optimize(FIXTURES / "iris_legacy.h5", profile=profile, data=FIXTURES / "iris.npz")


def test_budget_that_cannot_be_measured_fails_as_not_measured(iris_run):
    # cpu-edge runs no TFLite Micro, so an arena budget has no figure: the gate must not pass it.
    check = next(k for k in iris_run.candidate("fp32").checks if k.name == "arena_bytes")
    assert check.value is None and check.passed is False and "not measured" in check.detail
    assert not iris_run.ready


def test_lone_candidate_near_its_latency_budget_is_remeasured_with_twice_the_samples(iris_run):
    c = iris_run.candidate("fp32")
    check = next(k for k in c.checks if k.name == "latency_p90_ms")
    assert "re-measured" in check.detail and check.passed
    row = min((l for l in c.latency if l.batch == 1), key=lambda l: l.p90_ms)
    assert row.remeasured and not row.interleaved_with
    assert row.samples >= 2 * 5  # twice the quick profile's min_iters
    assert not c.robustness  # probes disabled in this profile


def _candidate(name, precision, p99, size, fidelity_ok):
    lat = LatencyOut(runtime="onnxruntime", threads=1, batch=1, p50_ms=p99, p90_ms=p99, p99_ms=p99, mean_ms=p99,
                     std_ms=0.0, cv=0.0, samples=10, warmup=1)
    checks = [Check(name="fidelity onnxruntime vs keras [y]", value=0.5 if not fidelity_ok else 0.0,
                    limit={"atol": 1e-5}, passed=fidelity_ok)]
    from kdeploy.report.model import ArtifactOut

    art = ArtifactOut(format="onnx", path=f"{name}.onnx", precision=precision, source="test", size_bytes=size,
                      gzip_bytes=size, sha256="0")
    return Candidate(name=name, recipe={"precision": precision}, passed=fidelity_ok, artifacts=[art], latency=[lat],
                     checks=checks)


def test_select_never_takes_a_candidate_that_failed_fidelity_even_if_fastest():
    fast = _candidate("int8", "int8", p99=1.0, size=100, fidelity_ok=False)
    slow = _candidate("fp32", "fp32", p99=9.0, size=400, fidelity_ok=True)
    selection = select([fast, slow], resolve_profile("cpu-server"))  # objective: latency
    assert selection["selected"] == "fp32"
    assert selection["reasons"]["int8"].startswith("failed: fidelity onnxruntime vs keras")
    rows = {r["candidate"]: r for r in selection["pareto"]["rows"]}
    assert rows["int8"]["pareto_optimal"] is None and rows["fp32"]["pareto_optimal"] is True


def test_select_says_when_no_candidate_passes():
    selection = select([_candidate("int8", "int8", p99=1.0, size=100, fidelity_ok=False)], resolve_profile("cpu-server"))
    assert selection["selected"] is None


@pytest.mark.parametrize("section,values,expected", [
    ("robustness", {"min_top1": 2}, "robustness.min_top1"),
    ("robustness", {"probes": ["noise", "blur"]}, "robustness.probes.1"),
    ("timing", {"noisy_cvv": 0.1}, "noisy_cv"),
    ("budgets", {"max_arena_bytes": 0}, "budgets.max_arena_bytes"),
    ("device", {"name": "x", "peak_gops": {"int8": 0.0}}, "device"),
    ("device", {"name": "x", "peak_gops": {"int8": 1.0}, "bandwidth": 3}, "memory_bandwidth_gb_s"),
])
def test_profile_errors_in_new_sections_name_file_and_key(tmp_path, section, values, expected):
    path = make_profile(tmp_path, "cpu-edge", **{section: values})
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def _timed(name, precision, p25, p50, p75):
    c = _candidate(name, precision, p99=p50, size=100, fidelity_ok=True)
    c.latency[0].p25_ms, c.latency[0].p75_ms = p25, p75
    return c


def test_select_ties_latencies_within_each_others_noise_and_lets_the_preference_decide():
    prof = resolve_profile("cpu-server")  # objective latency; the default preference puts fp32 first
    int8 = _timed("int8", "int8", p25=8.0, p50=10.0, p75=13.0)
    fp32 = _timed("fp32", "fp32", p25=11.0, p50=12.0, p75=15.0)  # 20% slower median, spreads overlap
    selection = select([int8, fp32], prof)
    assert selection["selected"] == "fp32"
    assert selection["tie"]["candidates"] == ["int8", "fp32"] and selection["tie"]["within_noise"] == ["fp32"]
    assert "measurement noise" in selection["reasons"]["fp32"]


def test_select_picks_the_faster_when_spreads_do_not_overlap_and_reports_no_tie():
    prof = resolve_profile("cpu-server")
    int8 = _timed("int8", "int8", p25=9.5, p50=10.0, p75=10.5)
    fp32 = _timed("fp32", "fp32", p25=11.5, p50=12.0, p75=12.5)
    selection = select([int8, fp32], prof)
    assert selection["selected"] == "int8" and selection["tie"] is None


def test_a_failed_candidate_is_timed_in_the_first_round_only(tmp_path):
    """`first_round_only` (evaluate marks candidates that already failed, without labels): a quarter of the
    iterations, the same artifact beside it timed in full."""
    import keras
    import numpy as np

    from kdeploy.artifacts import tflite
    from kdeploy.profiles import resolve_profile
    from kdeploy.run.timing import timing_kwargs
    from kdeploy.runtimes.jobs import InterleaveJob, TimingEntry
    from kdeploy.runtimes.worker import run_isolated

    model = keras.saving.load_model(FIXTURES / "cancer_mlp.keras")
    sm = tmp_path / "sm"
    model.export(str(sm), format="tf_saved_model", verbose=False)
    name = model.inputs[0].name
    art = tflite.convert(sm, "fp32", tmp_path / "m.tflite", None, [name], ["output_0"])
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **{name: np.random.default_rng(0).normal(size=(4, *model.inputs[0].shape[1:])).astype("float32")})
    timing = {**timing_kwargs(resolve_profile("cpu-edge")), "min_iters": 400, "min_seconds": 0.0}
    entries = [TimingEntry(key=f"{n}@1@1", name=n, artifact_path=str(art.path), io=art.io, threads=1, batch=1,
                           first_round_only=n == "failed") for n in ("failed", "contender")]
    _, result = run_isolated(InterleaveJob(runtime="litert", feeds_path=str(feeds), entries=entries, rounds=4,
                                           timing=timing), tmp_path / "job")
    samples = {r["key"].split("@")[0]: r["samples"] for r in result["latency"]}
    assert samples == {"failed": 100, "contender": 400}
