"""The conversion lane (`run.convert.ConversionLane`): a second process converts the dynamic-range `.tflite`
and every ONNX twin; the run must come out as if one process had done it all."""

import os
from types import SimpleNamespace

import pytest

from kdeploy.errors import UsageError
from kdeploy.memory import LANE_MAX_WEIGHT_BYTES, LANE_MIN_WEIGHT_BYTES, lane_fits
from kdeploy.recipes import ptq_recipes
from kdeploy.profiles import resolve_profile
from kdeploy.run import optimize
from kdeploy.run.convert import ConversionLane

from conftest import FIXTURES, make_profile


def _summary(report) -> dict:
    """Verdicts, artifact bytes and gzip sizes (the parent measures the lane's: `artifacts.gzip_elsewhere`) and
    robustness figures (the lane's run makes the probes while the lane converts)."""
    assert all(a.gzip_bytes > 0 for c in report.candidates for a in c.artifacts)
    return {c.name: (c.passed, sorted((a.format, a.sha256, a.gzip_bytes) for a in c.artifacts),
                     [(r.probe, r.runtime, r.output, r.cosine_mean, r.top1_agreement) for r in c.robustness])
            for c in report.candidates}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the lane runs on a multi-core host only")
def test_lane_gives_the_same_candidates_bytes_and_findings_as_one_process(tmp_path):
    """iris: dynamic range quantizes nothing (every weight below the converter's threshold), so the lane's
    dynamic .tflite is the fp32 model again: dropped, its files removed, and said, as in one process."""
    profile = make_profile(tmp_path, precisions=["fp32", "dynamic", "fp16", "int8"])
    runs = {}
    for parallel in (False, True):
        out = tmp_path / f"out-{parallel}"
        runs[parallel] = optimize(FIXTURES / "iris_legacy.h5", profile=profile, data=FIXTURES / "iris.npz", out=out,
                                  cache=False, parallel=parallel)
        assert sorted(p.name for p in (out / "artifacts").iterdir()) == [
            f"{n}.{ext}" for n in ("fp16", "fp32", "int8") for ext in ("onnx", "tflite")]
    one, lane = runs[False], runs[True]
    assert [c.name for c in lane.candidates] == [c.name for c in one.candidates] == ["fp32", "fp16", "int8"]
    assert _summary(lane) == _summary(one) and all(c.robustness for c in lane.candidates)
    assert all(c.recipe.get("onnx") == "tf2onnx from the same .tflite" for c in lane.candidates)
    same = [f.message for f in lane.findings if f.code == "identical-artifact"]
    assert same == [f.message for f in one.findings if f.code == "identical-artifact"] and "dynamic" in same[0]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the lane runs on a multi-core host only")
def test_evaluation_runs_made_ahead_are_not_made_again(tmp_path):
    """Beside the lane, evaluation's runs of the artifacts built so far are made ahead (`evaluate.RunsAhead`):
    each artifact runs once per runtime, ahead or in evaluation, and the figures are those of one process."""
    profile = make_profile(tmp_path, precisions=["fp32", "dynamic", "fp16", "int8"])
    kw = dict(profile=profile, data=FIXTURES / "digits.npz", cache=False)
    runs = {}
    for parallel in (False, True):
        lines: list[str] = []
        report = optimize(FIXTURES / "digits_cnn.keras", out=tmp_path / f"out-{parallel}", parallel=parallel,
                          progress=lambda stage, detail="": lines.append(detail) if stage == "run" else None, **kw)
        runs[parallel] = report, lines
    (one, _), (lane, lines) = runs[False], runs[True]
    made = [line.replace(", ahead)", ")") for line in lines]
    assert sorted(made) == sorted(set(made)), lines  # no run made twice
    wanted = {f"{c.name} on {rt}" for c in lane.candidates for rt in ("litert", "onnxruntime")}
    ran = [m.split(" (")[0] for m in made]
    assert "int8 on litert" not in ran and set(ran) | {"int8 on litert"} == wanted, lines  # int8: the judge's run
    assert any(line.endswith(", ahead)") for line in lines), lines
    assert _summary(lane) == _summary(one)
    fidelity = lambda r: {(c.name, f.runtime, f.output): (f.max_abs_err, f.top1_agreement) for c in r.candidates
                          for f in c.fidelity}
    assert fidelity(lane) == fidelity(one) and fidelity(one)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the lane runs on a multi-core host only")
def test_the_diagnosis_made_ahead_is_the_diagnosis(tmp_path, monkeypatch):
    """Without labels, a quantized `.tflite` whose deployed fidelity run (made ahead) fails may get its per-layer
    errors measured ahead (whichever of the ranking, the runs made ahead and the diagnosis comes first measures
    them, once); the report's diagnosis is the one a single process makes."""
    import numpy as np

    from kdeploy.debug import attribution

    dumps: list[list[str]] = []
    real = attribution.run_child

    def counted(module, job, *args, **kw):
        dumps.append([a["path"].rsplit("/", 1)[-1] for a in job["artifacts"]])
        return real(module, job, *args, **kw)

    monkeypatch.setattr(attribution, "run_child", counted)
    data = tmp_path / "cancer-x.npz"  # no labels: no task budget can accept the failing int8 afterwards
    np.savez(data, x=np.load(FIXTURES / "cancer.npz")["x"])
    runs = {}
    for parallel in (False, True):
        lines: list[str] = []
        dumps.clear()
        report = optimize(FIXTURES / "cancer_mlp.keras", target="cpu-edge", data=data, cache=False,
                          out=tmp_path / f"out-{parallel}", parallel=parallel,
                          progress=lambda stage, detail="": lines.append(f"{stage} {detail}"))
        runs[parallel] = report, lines, list(dumps)
    (one, one_lines, one_dumps), (lane, lines, lane_dumps) = runs[False], runs[True]
    assert not any("ahead)" in line for line in one_lines), [x for x in one_lines if "ahead" in x]
    assert lane_dumps.count(["fp32.tflite", "int8.tflite"]) == one_dumps.count(["fp32.tflite", "int8.tflite"]) == 1
    diagnosis = lambda r: {c.name: (c.sensitivity, c.first_divergence, c.first_non_finite) for c in r.candidates}
    assert diagnosis(lane) == diagnosis(one) and diagnosis(one)["int8"][0], diagnosis(one)
    assert [c.name for c in lane.candidates if c.passed] == [c.name for c in one.candidates if c.passed]


def test_a_child_started_nicer_runs_at_a_lower_priority(tmp_path, monkeypatch):
    """`run_child(nice=...)`: the runs made ahead yield the CPU to the build beside them. Every child's numpy
    leaves huge pages alone (`child.PROCESS_ENV`) unless the user set it otherwise."""
    from kdeploy.child import run_child

    (tmp_path / "nice_probe.py").write_text(
        "import os, sys\nfrom kdeploy.child import child_main\nfrom numpy._core import multiarray\n"
        "child_main(sys.argv[1:], lambda job: {'nice': os.getpriority(os.PRIO_PROCESS, 0),"
        " 'huge_pages': multiarray._get_madvise_hugepage()})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    same = run_child("nice_probe", {}, tmp_path / "same", timeout_s=60, what="probe")
    nicer = run_child("nice_probe", {}, tmp_path / "nicer", timeout_s=60, what="probe", nice=5)
    assert same["nice"] == base
    assert nicer["nice"] == min(base + 5, 19)
    assert same["huge_pages"] is False
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert run_child("nice_probe", {}, tmp_path / "user", timeout_s=60, what="probe")["huge_pages"] is True


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the lane runs on a multi-core host only")
def test_a_crashed_lane_costs_no_candidate(tmp_path, monkeypatch):
    """The lane's process dies (SIGSEGV, as the OOM killer would end it) on float16: this process converts
    the lane's share itself, with the same bytes, and a finding says so."""
    profile = make_profile(tmp_path, precisions=["fp32", "dynamic", "fp16"], robustness={"enabled": False})
    kw = dict(profile=profile, data=FIXTURES / "digits.npz", cache=False)
    one = optimize(FIXTURES / "digits_cnn.keras", out=tmp_path / "one", parallel=False, **kw)
    monkeypatch.setenv("KDEPLOY_TEST_LANE_FAULT", "fp16")
    crashed = optimize(FIXTURES / "digits_cnn.keras", out=tmp_path / "crashed", parallel=True, **kw)
    failed = [f.message for f in crashed.findings if f.code == "lane-failed"]
    assert failed and "signal 11" in failed[0], [f.code for f in crashed.findings]
    assert [c.name for c in crashed.candidates] == ["fp32", "dynamic", "fp16"]
    assert _summary(crashed) == _summary(one) and all(c.passed for c in crashed.candidates)


def test_lane_converts_dynamic_range_and_float16_where_it_started_early(tmp_path):
    recipes = ptq_recipes(resolve_profile("cpu-edge"))
    for early, wanted in ((True, ["dynamic", "fp16"]), (False, ["dynamic"])):
        lane = ConversionLane(tmp_path / str(early), early=early)
        try:  # fp32 stays (the inspection reads it, int8 calibrates from it), int8 too
            assert [r.name for r in recipes if lane.converts(r)] == wanted
        finally:
            lane.close()


@pytest.mark.parametrize("params, fits", [(15_000, False), (3_500_000, True), (7_200_000, False), (25_600_000, False),
                                          (None, False)])
def test_lane_by_default_only_where_it_pays_off(params, fits):
    """Too small: its start costs more than it saves; too large: a second converter's copies of the weights."""
    assert LANE_MIN_WEIGHT_BYTES <= 3_500_000 * 4 <= LANE_MAX_WEIGHT_BYTES  # MobileNetV2 is in, as measured
    assert lane_fits(SimpleNamespace(params=params)) is fits


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the lane runs on a multi-core host only")
def test_the_lane_starts_before_the_model_loads_and_ends_with_the_run(tmp_path, monkeypatch):
    """`ConversionLane.early`: the lane's TensorFlow import takes the core the parent's load leaves idle; the build
    gives it its tasks. A run that fails while loading leaves no lane process behind."""
    started: list[ConversionLane] = []
    init = ConversionLane.__init__

    def recorded(self, work, early=False):
        init(self, work, early)
        started.append(self)
        events.append("lane started")

    monkeypatch.setattr(ConversionLane, "__init__", recorded)
    events: list[str] = []
    profile = make_profile(tmp_path, precisions=["fp32", "dynamic"], robustness={"enabled": False})
    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz", cache=False,
                      out=tmp_path / "o", parallel=True,
                      progress=lambda stage, detail="": events.append(stage if stage != "convert" else detail))
    assert events.index("lane started") < events.index("load") and len(started) == 1, events
    assert "TFLite dynamic (lane)" in events and report.candidate("dynamic").passed
    assert started[0].proc.poll() is not None

    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 not a keras archive")
    with pytest.raises(UsageError):
        optimize(broken, profile=profile, data=FIXTURES / "digits.npz", cache=False, out=tmp_path / "b", parallel=True)
    assert len(started) == 2 and not started[1].thread.is_alive()
    assert started[1].proc is None or started[1].proc.poll() is not None


def test_lane_may_start_early_for_model_files_near_its_weight_range(tmp_path):
    from kdeploy.memory import lane_may_fit

    for size, fits in ((1 << 20, False), (8 << 20, True), (40 << 20, False)):
        (tmp_path / "m.keras").write_bytes(b"\0" * size)
        assert lane_may_fit(tmp_path / "m.keras") is fits
    (tmp_path / "saved").mkdir()
    assert not lane_may_fit(tmp_path / "saved")  # a SavedModel folder: the lane starts with the build


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two runs at a time on a multi-core host only")
def test_evaluation_runs_one_at_a_time_while_a_per_layer_dump_runs(monkeypatch):
    """A per-layer dump made ahead takes a core and the run's largest memory: evaluation's runs go one at a time
    beside it (two beside MobileNetV2-224's dump set the run's peak), two at a time otherwise. (The scheduling
    rule alone: the runner is a stand-in that records how many jobs run at once.)"""
    import importlib
    import threading
    import time

    evaluate = importlib.import_module("kdeploy.run.evaluate")  # the module (kdeploy.run's `evaluate` is its function)
    active, seen, lock = [0], [], threading.Lock()

    def run(job, job_dir, timeout_s):
        with lock:
            active[0] += 1
            seen.append(active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return job

    monkeypatch.setattr(evaluate, "run_isolated", run)
    ctx = SimpleNamespace(profile=SimpleNamespace(timing=SimpleNamespace(timeout_s=60)), dump_lock=threading.Lock(),
                          progress=lambda *a: None)
    jobs = [(f"job {i}", i, None) for i in range(4)]
    with ctx.dump_lock:
        assert evaluate._run_parallel(ctx, jobs) == [0, 1, 2, 3] and max(seen) == 1
    seen.clear()
    assert evaluate._run_parallel(ctx, jobs) == [0, 1, 2, 3] and max(seen) == 2
