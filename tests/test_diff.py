"""`kdeploy diff`: a slowed-down version of a model is flagged; an identical run is not."""

import copy
import json
import os
import subprocess
import sys

import pytest

import kdeploy
from kdeploy.diff import Thresholds, diff_reports
from kdeploy.errors import UsageError

from conftest import FIXTURES, make_profile


def kdeploy_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def slowed_down(model):
    """The same classifier plus a heavy branch whose contribution is exactly zero.

    The branch upsamples the 8x8 image to 64x64 and runs two 32-channel 3x3 convolutions (~40 M
    multiply-adds per image, against ~0.2 M for the original), then a Dense layer with zero weights
    adds 0.0 to the logits: the outputs are unchanged, only compute grows.
    """
    import keras

    inp = keras.Input(shape=(8, 8, 1), name="image")
    h = keras.layers.UpSampling2D(size=8)(inp)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    zero = keras.layers.Dense(10, kernel_initializer="zeros", bias_initializer="zeros")(h)
    out = keras.layers.Add(name="digit")([model(inp), zero])
    return keras.Model(inp, out, name="digits_cnn_slow")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import keras

    tmp = tmp_path_factory.mktemp("diff")
    profile = make_profile(tmp, "cpu-edge", precisions=["fp32"], crosscheck_runtimes=[], threads=[1])
    base = kdeploy.optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=FIXTURES / "digits.npz",
                            out=tmp / "base")
    original = keras.models.load_model(FIXTURES / "digits_cnn.keras")
    slow = kdeploy.optimize(slowed_down(original), profile=profile, data=FIXTURES / "digits.npz", out=tmp / "slow")
    return tmp / "base", tmp / "slow", base, slow


def test_diff_flags_the_latency_of_a_slowed_down_model(runs):
    base, slow, rb, rs = runs
    assert rb.ready and rs.ready, "both versions pass their budgets: only diff can catch the slowdown"
    res = kdeploy_cli("diff", base, slow, "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = json.loads(res.stdout)["rows"]
    lat = next(r for r in rows if r["scope"] == "selected" and r["metric"].startswith("latency"))
    assert lat["regression"] and lat["new"] > lat["old"] * 1.1
    table = kdeploy_cli("diff", base, slow)
    assert table.returncode == 1
    assert "REGRESSION" in table.stdout and "latency p90" in table.stdout


def test_diff_of_a_run_with_itself_is_clean_with_exit_0(runs):
    base, _, _, _ = runs
    res = kdeploy_cli("diff", base, base / "report.json")
    assert res.returncode == 0, res.stdout
    assert "NO REGRESSION" in res.stdout


def test_diff_flags_newly_failing_checks_and_ready_to_not_ready(runs):
    base, _, _, _ = runs
    old = json.loads((base / "report.json").read_text())
    new = copy.deepcopy(old)
    cand = new["candidates"][0]
    check = next(k for k in cand["checks"] if k["passed"])
    check["passed"], cand["passed"], new["ready"], new["selected"] = False, False, False, None
    res = diff_reports(old, new)
    flagged = {(r.scope, r.metric) for r in res.regressions}
    assert ("report", "ready") in flagged
    assert (cand["name"], f"check {check['name']}") in flagged
    assert (cand["name"], "candidate passes") in flagged
    assert not res


def test_diff_thresholds_decide_what_counts_as_a_regression(runs):
    base, slow, _, _ = runs
    strict = diff_reports(base, slow)
    size = next(r for r in strict.rows if r.scope == "selected" and r.metric == "size")
    assert size.new > size.old and size.regression
    growth = (size.new - size.old) / size.old
    loose = diff_reports(base, slow, Thresholds(max_size_increase=growth + 0.01, max_latency_increase=1e6))
    assert not any(r.metric in ("size", "gzip size") or r.metric.startswith("latency") for r in loose.regressions)


def test_diff_refuses_reports_of_different_targets_with_exit_2(runs, tmp_path):
    base, _, _, _ = runs
    other = json.loads((base / "report.json").read_text())
    other["target"]["name"] = "mcu"
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = kdeploy_cli("diff", base, tmp_path / "other.json")
    assert res.returncode == 2
    assert "different targets" in res.stderr and "'mcu'" in res.stderr
    (tmp_path / "bad.json").write_text("{not json")
    assert kdeploy_cli("diff", base, tmp_path / "bad.json").returncode == 2
    with pytest.raises(UsageError, match="not a kdeploy report"):
        diff_reports(base, {"hello": 1})


def test_diff_compares_task_metrics_against_their_own_thresholds(runs):
    base, _, _, _ = runs
    old = json.loads((base / "report.json").read_text())
    cand = next(c for c in old["candidates"] if c["name"] == old["selected"])
    acc = next(t for t in cand["task_metrics"] if t["name"] == "accuracy")  # digits.npz has labels
    new = copy.deepcopy(old)
    worse = next(t for c in new["candidates"] if c["name"] == old["selected"] for t in c["task_metrics"]
                 if t["name"] == "accuracy")
    worse["value"] = acc["value"] - 0.03
    label = f"task accuracy [{acc['output']}]"
    flagged = [r for r in diff_reports(old, new).regressions if r.metric == label]
    assert flagged and flagged[0].old == pytest.approx(acc["value"]) and flagged[0].new == pytest.approx(worse["value"])
    assert not [r for r in diff_reports(old, new, Thresholds(max_accuracy_drop=0.05)).regressions if r.metric == label]
