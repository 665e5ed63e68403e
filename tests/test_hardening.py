"""Hardening: interrupted runs leave nothing behind, crashing or hanging runtimes are survived,
and the same inputs give byte-identical artifacts. Every case runs `kdeploy` as a real process."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, make_profile

CNN = FIXTURES / "digits_cnn.keras"
DIGITS = FIXTURES / "digits.npz"


def _env(tmp_path: Path, **extra) -> dict:
    tmp = tmp_path / "tmp"  # kdeploy's own temporary folders land here, so the test can see them all
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(tmp), **extra)


def kdeploy(tmp_path: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=_env(tmp_path, **env), timeout=900)


# ---- atomic results under SIGTERM / SIGINT ----------------------------------------------------------
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_midway_leaves_out_unchanged_and_no_partial_folders(tmp_path, sig, code, word):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "dynamic", "fp16", "int8"])
    out = tmp_path / "out"
    out.mkdir()  # an earlier kdeploy output must survive an interrupted re-run untouched
    (out / "report.json").write_text('{"earlier": true}')
    proc = subprocess.Popen([sys.executable, "-m", "kdeploy", "optimize", str(CNN), "--profile", str(profile),
                             "--data", str(DIGITS), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.partial-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no staging folder appeared"
        time.sleep(0.05)
    time.sleep(1.0)  # well into the conversions
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert word in stderr and "nothing was written to --out" in stderr and "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == ["report.json"] and json.loads((out / "report.json").read_text()) == {
        "earlier": True}
    assert not list(tmp_path.glob(".out.*")), list(tmp_path.glob(".out.*"))
    # kdeploy-work-* and worker job folders are removed too. `.ses` is onnxruntime's own session-id
    # file (a timestamp and a UUID, written to $TMPDIR by every InferenceSession), not a kdeploy output.
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name != ".ses"] == []


_HALF_BUILT = """
import os, signal, sys
import typer
from kdeploy import cli

class HalfBuilt:  # like TensorFlow's ApiDefMap when a signal lands in its constructor (tf2onnx import)
    def __init__(self, cycle):
        if cycle:
            self.me = self  # freed by the garbage collector only, as late as interpreter exit
        os.kill(os.getpid(), signal.SIG{sig})
        for _ in range(1000):  # the handler runs at the next bytecode boundary: in here
            pass
        self.handle = 1

    def __del__(self):
        self.handle  # AttributeError on the half-built object

def body():
    HalfBuilt({cycle})
    return 0

try:
    cli._guard(body)
except typer.Exit as e:
    sys.exit(e.exit_code)
"""


@pytest.mark.parametrize("cycle", [False, True], ids=["freed-at-once", "freed-by-gc"])
@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_signal_inside_a_constructor_exits_without_a_traceback(tmp_path, sig, code, cycle):
    """The half-built object's failing finalizer (at once, or at exit) must not print a traceback."""
    proc = subprocess.run([sys.executable, "-c", _HALF_BUILT.format(sig=sig, cycle=cycle)], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "nothing was written to --out" in proc.stderr
    assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr


# ---- crash isolation -----------------------------------------------------------------------------
@pytest.mark.slow  # waits out a 10 s runtime timeout on purpose
def test_crashing_and_hanging_runtimes_fail_their_candidate_and_the_run_goes_on(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "fp16", "dynamic"],
                           timing={"timeout_s": 10}, robustness={"enabled": False})
    # Test-only fault hook of kdeploy.runtimes.worker (honoured under pytest only): the LiteRT child
    # of the fp32 candidate kills itself with SIGSEGV; the LiteRT child of fp16 hangs; the ONNX
    # Runtime cross-check of dynamic crashes, which is a finding only (LiteRT is the deployed runtime).
    fault = "segv:litert:fp32.tflite,hang:litert:fp16.tflite,segv:onnxruntime:dynamic.onnx"
    started = time.monotonic()
    res = kdeploy(tmp_path, "optimize", CNN, "--profile", profile, "--data", DIGITS, "--out", tmp_path / "out", "-q",
                  KDEPLOY_TEST_WORKER_FAULT=fault)
    assert res.returncode == 0, res.stdout + res.stderr  # dynamic was unaffected and is selected
    assert time.monotonic() - started < 240
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert report["selected"] == "dynamic" and by_name["dynamic"]["passed"]
    assert not by_name["fp32"]["passed"] and not by_name["fp16"]["passed"]
    failures = [f["message"] for f in report["findings"] if f["code"] == "runtime-failure"]
    assert any("fp32" in m and "signal 11 (SIGSEGV)" in m for m in failures), failures
    assert any("fp16" in m and "did not finish within 10 s" in m for m in failures), failures
    runs = {k["name"]: k for k in by_name["fp32"]["checks"]}
    assert runs["runs on litert"]["passed"] is False
    crosscheck = [f["message"] for f in report["findings"] if f["code"] == "crosscheck-failed"]
    assert len(crosscheck) == 1 and "candidate dynamic" in crosscheck[0] and "SIGSEGV" in crosscheck[0], crosscheck
    assert "runs on onnxruntime" not in {k["name"] for k in by_name["dynamic"]["checks"]}


def test_fault_hook_is_inert_outside_pytest(tmp_path):
    """The hook needs PYTEST_CURRENT_TEST as well: a user who sets the variable by accident gets a normal run."""
    from kdeploy.runtimes import worker

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    code = ("import os, kdeploy.runtimes.worker as w; from kdeploy.runtimes.jobs import RunJob;"
            "os.environ['KDEPLOY_TEST_WORKER_FAULT']='segv:litert:fp32.tflite';"
            "w._test_fault(RunJob(runtime='litert', artifact_path='/x/fp32.tflite', io={}, feeds_path=''));"
            "print('alive')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "alive"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, PYTEST_CURRENT_TEST="x"), timeout=60)
    assert res.returncode == -signal.SIGSEGV
    assert worker._test_fault  # the hook exists where the tests above rely on it


# ---- reproducibility --------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # two full runs
def test_same_inputs_and_seed_give_identical_artifacts_and_fidelity(tmp_path):
    profile = make_profile(tmp_path, "cpu-edge", precisions=["fp32", "dynamic", "int8"])
    reports = []
    for i, hash_seed in enumerate(("1", "2")):  # different string hashing: tf2onnx's set order differs
        out = tmp_path / f"run{i}"
        res = kdeploy(tmp_path, "optimize", CNN, "--profile", profile, "--data", DIGITS, "--out", out, "--seed", 7,
                      "-q", PYTHONHASHSEED=hash_seed)
        assert res.returncode in (0, 1), res.stderr
        reports.append((out, json.loads((out / "report.json").read_text())))
    (out_a, a), (out_b, b) = reports

    def artifacts(out, rep):
        arts = {x["path"]: x["sha256"] for c in rep["candidates"] for x in c["artifacts"]}
        assert all(_sha(out / p) == h for p, h in arts.items())  # the report's hashes are the files'
        return arts

    arts_a, arts_b = artifacts(out_a, a), artifacts(out_b, b)
    assert {Path(p).suffix for p in arts_a} == {".tflite", ".onnx"}
    assert arts_a == arts_b

    def fidelity(rep):
        return [(c["name"], f["runtime"], f["reference"], f["output"], f["max_abs_err"], f["mean_abs_err"],
                 f["cosine_min"], f["top1_agreement"], f["passed"]) for c in rep["candidates"] for f in c["fidelity"]]

    assert fidelity(a) == fidelity(b) and fidelity(a)
    assert a["data"] == b["data"] and a["model"] == b["model"] and a["seed"] == b["seed"] == 7

    repro = a["reproducibility"]
    assert repro["seed"] == 7 and repro["model_sha256"] == a["model"]["sha256"] == _sha(CNN)
    assert repro["data_sha256"] == _sha(DIGITS) and repro["cwd"] == os.getcwd()
    assert "--seed 7" in repro["rerun"] and repro["rerun"].startswith("kdeploy optimize")
    # The reference SavedModel is the one output that differs byte-wise; the report says so and why.
    assert [x["path"] for x in repro["not_byte_identical"]] == ["reference/savedmodel"]
    assert all(v for v in a["host"]["libraries"].values())
