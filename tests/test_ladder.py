"""The int8 repair ladder (`run.ladder`) and the selective group search (`run.selective._group_search`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from conftest import FIXTURES, make_profile
from kdeploy.profiles import load_profile_file, resolve_profile
from kdeploy.recipes import CALIBRATED_INT8, QAT_INT8, SELECTIVE_INT8, repair_steps


# ------------------------------------------------------------------------------------------------
# The group search's conversions, against one-layer-per-try greedy
# ------------------------------------------------------------------------------------------------
def _search(monkeypatch, needed: set[str], n_layers: int = 40, max_tries: int = 12, seconds_per_try: float = 0.0,
            max_seconds: float = 120.0, width: int = 1, rounds: list | None = None):
    """Runs `_group_search` over a ranking of `n_layers` where a set passes iff it holds every layer of `needed`.

    The conversion is replaced by that oracle (each call is one conversion): what is counted is the search's
    strategy, the number of conversions it spends. `width` tries run side by side (threads, as on a host with a
    free core); `rounds` collects the sizes of each side-by-side round (its wall time is one try's).
    """
    from kdeploy.run import selective

    monkeypatch.setattr(selective, "_width", lambda ctx: width)
    monkeypatch.setattr(selective, "_calibrated", lambda ctx, ref: None)
    side_by_side = selective._side_by_side

    def counted(ctx, ref, float_t, plan, tries, nodes):
        if rounds is not None:
            rounds.append([len(layers) for layers, _ in plan])
        return side_by_side(ctx, ref, float_t, plan, tries, nodes)

    monkeypatch.setattr(selective, "_side_by_side", counted)

    ranking = [f"l{i}" for i in range(n_layers)]
    calls: list[list[str]] = []
    clock = [1000.0]  # each conversion takes `seconds_per_try` on this clock
    monkeypatch.setattr(selective, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def fake_try(ctx, ref, float_t, layers, n, tries, extra_nodes=(), phase="crash"):
        calls.append(list(layers))
        clock[0] += seconds_per_try
        ok = needed <= set(layers)
        tries.append({"phase": phase, "float_layers": list(layers), "passed": ok, "detail": "", "seconds":
                      seconds_per_try})
        return (object() if ok else None), ok, ""

    monkeypatch.setattr(selective, "_try", fake_try)
    prof = SimpleNamespace(selective=SimpleNamespace(max_tries=max_tries, max_seconds=max_seconds))
    ctx = SimpleNamespace(profile=prof)
    tries: list[dict] = []
    capped = ranking[: n_layers - 1]  # every layer but one, as `selective_builds` caps it (all float is fp32)
    best, chosen, record = selective._group_search(ctx, None, None, capped, [], [], tries, clock[0])
    return best, chosen, record, calls


def _greedy_to_find(needed: set[str], ranking: list[str]) -> int:
    """Conversions one-layer-per-try greedy spends before its first passing set (the oracle's ranking is exact)."""
    kept: list[str] = []
    for layer in ranking:
        kept.append(layer)
        if needed <= set(kept):
            return len(kept)
    return len(ranking)


def test_group_search_passes_where_greedy_runs_out_of_tries(monkeypatch):
    needed = {f"l{i}" for i in range(8)}  # the eight worst-ranked layers all need float
    ranking = [f"l{i}" for i in range(40)]
    best, chosen, _, calls = _search(monkeypatch, needed, max_tries=6)  # the profiles' default budget

    assert _greedy_to_find(needed, ranking) == 8 > 6  # greedy: one layer per try, never passes within 6
    assert best is not None and set(chosen) == needed
    # 1, 2 fail; the worst half (19) passes; 4 fails; 8 passes; 6 fails (bisecting): 6 conversions
    assert [len(c) for c in calls] == [1, 2, 19, 4, 8, 6]


def test_group_search_conversions_for_four_broken_layers(monkeypatch):
    needed = {"l0", "l1", "l2", "l3"}
    best, chosen, _, calls = _search(monkeypatch, needed)

    assert best is not None and set(chosen) == needed
    sizes = [len(c) for c in calls]
    # first passing set after 3 conversions (greedy: 4); the smallest after 5 (4 passes, 3 fails); then thinning
    # tries dropping each of l2, l1, l0 (all needed): 8 in all, no per-layer tensors measured after any of them
    assert sizes == [1, 2, 19, 4, 3, 3, 3, 3]
    assert sizes.index(19) + 1 == 3 < _greedy_to_find(needed, [f"l{i}" for i in range(40)]) == 4


def test_group_search_thins_a_layer_the_ranking_put_first_wrongly(monkeypatch):
    needed = {"l1", "l2"}  # the worst-ranked layer l0 does not need float
    best, chosen, _, calls = _search(monkeypatch, needed)

    assert best is not None and chosen == ["l1", "l2"]  # l0 dropped again by thinning
    # 3 passes (2 failed: bisection ends); thinning tries without l1 (fails), then without l0 (passes)
    assert [len(c) for c in calls] == [1, 2, 19, 4, 3, 2, 2]


def test_group_search_goes_past_the_worst_half_when_the_repair_needs_more(monkeypatch):
    needed = {"l0", "l35"}  # l35 is outside the worst half: only a larger prefix passes
    best, chosen, record, calls = _search(monkeypatch, needed, max_tries=20)

    # bisected to the prefix of 36 that holds l35, then thinned as far as max_tries allows
    assert best is not None and needed <= set(chosen) and len(chosen) <= 36 and len(calls) == 20
    assert [len(c) for c in calls][:4] == [1, 2, 19, 39]
    assert record["half"] == {"layers": 19, "passed": False} and record["all"] == {"layers": 39, "passed": True}


def test_group_search_stops_when_every_layer_but_one_in_float_fails(monkeypatch):
    needed = {"l0", "l39"}  # l39 is the one layer left int8: no prefix of the ranking passes
    best, chosen, record, calls = _search(monkeypatch, needed)

    assert best is None and chosen == []
    assert [len(c) for c in calls] == [1, 2, 19, 39]  # four conversions, not max_tries
    assert record["all"] == {"layers": 39, "passed": False} and "every ranked layer but one" in record["stopped"]


@pytest.mark.parametrize("needed", [{f"l{i}" for i in range(8)}, {"l0", "l1", "l2", "l3"}, {"l1", "l2"}, {"l0", "l35"},
                                    {"l0", "l39"}, {"l5"}, {"l0"}, {"l3", "l9", "l20"}])
def test_group_search_two_at_a_time_finds_what_one_at_a_time_finds_in_fewer_rounds(monkeypatch, needed):
    max_tries = 60  # room for every try: the two searches differ only in how they spend a budget
    one_rounds: list = []
    two_rounds: list = []
    best1, chosen1, record1, calls1 = _search(monkeypatch, needed, max_tries=max_tries, rounds=one_rounds)
    best2, chosen2, record2, calls2 = _search(monkeypatch, needed, max_tries=max_tries, width=2, rounds=two_rounds)

    assert (best1 is None) == (best2 is None) and chosen1 == chosen2  # the same set, read as the sequential search
    assert record1.get("stopped") == record2.get("stopped")
    assert all(len(r) <= 2 for r in two_rounds) and any(len(r) == 2 for r in two_rounds)
    assert len(two_rounds) < len(one_rounds)  # wall time: one try per round
    if best2 is not None:
        assert needed <= set(chosen2)


def test_group_search_two_at_a_time_pairs(monkeypatch):
    rounds: list = []
    best, chosen, _, calls = _search(monkeypatch, {f"l{i}" for i in range(8)}, max_tries=6, width=2, rounds=rounds)

    # 1 and 2 fail; half (19) and all (39) pass; doubling 4 fails, 8 passes: six conversions in three rounds
    assert rounds == [[1, 2], [19, 39], [4, 8]] and set(chosen) == {f"l{i}" for i in range(8)}


def test_group_search_respects_max_seconds(monkeypatch):
    # each try takes 30 s: after two (60 s, 30 s each) a third would end at 90 s, past 70 s
    best, _, record, calls = _search(monkeypatch, {"l0", "l1", "l2"}, seconds_per_try=30.0, max_seconds=70.0)

    assert len(calls) == 2 and best is None and "budget ran out" in record["stopped"]
    assert "max_seconds = 70" in record["stopped"]


# ------------------------------------------------------------------------------------------------
# The ladder's steps per profile
# ------------------------------------------------------------------------------------------------
def test_ladder_steps_in_order_and_only_integer_steps_on_mcu(tmp_path):
    edge = [(s.step, s.recipe, why) for s, why in repair_steps(resolve_profile("cpu-edge"))]
    assert edge == [("calibration", CALIBRATED_INT8, None), ("selective", SELECTIVE_INT8, None), ("qat", QAT_INT8, None)]
    mcu = {s.step: why for s, why in repair_steps(resolve_profile("mcu"))}
    assert mcu["calibration"] is None and mcu["qat"] is None and "full_integer" in mcu["selective"]
    off = load_profile_file(make_profile(tmp_path, "cpu-edge", selective={"enabled": False}, qat={"enabled": False}))
    assert {s.step: why for s, why in repair_steps(off)} == {
        "calibration": None, "selective": "[selective] enabled = false", "qat": "[qat] enabled = false"}


def test_profile_selective_max_seconds_is_validated(tmp_path):
    from kdeploy.errors import ProfileError

    assert load_profile_file(make_profile(tmp_path, "cpu-edge", selective={"max_seconds": 30})).selective.max_seconds == 30
    with pytest.raises(ProfileError, match="max_seconds"):
        load_profile_file(make_profile(tmp_path, "cpu-edge", selective={"max_seconds": 0}))


# ------------------------------------------------------------------------------------------------
# End to end, on the real runtimes
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cancer_ladder(tmp_path_factory):
    from kdeploy.run import optimize

    tmp = tmp_path_factory.mktemp("ladder")
    profile = make_profile(tmp, "cpu-edge")
    started = time.perf_counter()
    report = optimize(FIXTURES / "cancer_mlp.keras", profile=profile, data=FIXTURES / "cancer.npz", out=tmp / "out")
    return report, tmp / "out", time.perf_counter() - started


def test_ladder_stops_at_the_first_passing_step_and_reports_every_step(cancer_ladder):
    report, out, _ = cancer_ladder
    rec = report.repair
    steps = {s["step"]: s for s in rec["steps"]}

    assert not rec["int8"]["passed"] and not report.candidate("int8").passed  # full int8 fails, judged once
    assert [s["step"] for s in rec["steps"]] == ["calibration", "selective", "qat"]
    assert steps["calibration"]["tried"] and not steps["calibration"]["passed"] and steps["calibration"]["seconds"] > 0
    assert steps["selective"]["tried"] and steps["selective"]["passed"] and steps["selective"]["seconds"] > 0
    assert steps["selective"]["conversions"] >= 1 and steps["selective"]["size_bytes"] > 0
    assert not steps["qat"]["tried"] and steps["qat"]["detail"] == f"not needed: {SELECTIVE_INT8} passed"
    assert rec["repaired_by"] == SELECTIVE_INT8 and rec["seconds"] >= steps["selective"]["seconds"]
    assert QAT_INT8 not in {c.name for c in report.candidates}  # the ladder stopped: nothing trained
    assert steps["selective"]["latency"]["p50_ms"] > 0 and steps["selective"]["latency"]["int8_p50_ms"] > 0
    md = (out / "report.md").read_text()
    assert "<details><summary>int8 repair ladder: full int8 fails on litert; repaired by `int8-mixed`" in md
    assert "| selective | `int8-mixed` | passes |" in md and "| qat | `qat-int8` | not needed: int8-mixed passed |" in md


def test_search_verdict_is_evaluations_verdict(cancer_ladder):
    """A set the search accepted passes evaluation (the judge applies evaluation's gates)."""
    report, _, _ = cancer_ladder
    mixed = report.candidate(SELECTIVE_INT8)
    step = next(s for s in report.repair["steps"] if s["step"] == "selective")

    assert step["passed"] and step["evaluation_passed"] is True and mixed.passed
    last = mixed.recipe["search"]["tries"][-1]
    assert last["passed"] and mixed.recipe["search"]["conversions"] == len(mixed.recipe["search"]["tries"])
    # the checks evaluation gated on (fidelity on litert, task budget, robustness) all ran and passed
    names = {k.name.split(" [")[0] for k in mixed.checks}
    assert "fidelity litert vs keras" in names and any(n.startswith("task ") for n in names)
    assert all(k.passed for k in mixed.checks)


def test_ladder_does_not_run_where_full_int8_passes(tmp_path):
    from kdeploy.run import optimize

    report = optimize(FIXTURES / "digits_cnn.keras", profile=make_profile(tmp_path, "cpu-edge"),
                      data=FIXTURES / "digits.npz", out=tmp_path / "out")

    assert report.candidate("int8").passed
    assert report.repair["int8"]["passed"] and report.repair["steps"] == [] and report.repair["repaired_by"] is None
    names = {c.name for c in report.candidates}
    assert not names & {CALIBRATED_INT8, SELECTIVE_INT8, QAT_INT8}
    assert not any(f.code in ("repair-ladder", "calibration-failed", "selective-int8-failed") for f in report.findings)


def test_ladder_stops_at_calibration_when_recalibrating_repairs_int8(tmp_path):
    """digits with 6 calibration samples scaled by 10: min-max int8 fails, moving-average ranges repair it."""
    from kdeploy.artifacts.aeq import missing
    from kdeploy.run import optimize
    from test_qat import _outlier_data

    if missing() is not None:
        pytest.skip(missing())
    profile = make_profile(tmp_path, "cpu-edge")
    data = _outlier_data(tmp_path, load_profile_file(profile).calibration_samples)
    report = optimize(FIXTURES / "digits_cnn.keras", profile=profile, data=data, out=tmp_path / "out")
    steps = {s["step"]: s for s in report.repair["steps"]}

    assert not report.repair["int8"]["passed"] and not report.candidate("int8").passed
    assert steps["calibration"]["passed"] and steps["calibration"]["evaluation_passed"] is True
    assert steps["calibration"]["seconds"] > 0 and steps["calibration"]["conversions"] >= 1
    assert not steps["selective"]["tried"] and not steps["qat"]["tried"]
    assert report.repair["repaired_by"] == CALIBRATED_INT8 and report.candidate(CALIBRATED_INT8).passed
    assert not {SELECTIVE_INT8, QAT_INT8} & {c.name for c in report.candidates}


# ------------------------------------------------------------------------------------------------
# Steps that cannot help are not tried
# ------------------------------------------------------------------------------------------------
def _flat_ctx(profile: str, margin: float, n: int = 64, classes: int = 1000, labels: bool = False):
    """A ladder context whose one softmax output has top-1 margin `margin` on every sample (findings recorded);
    with `labels`, its validation data has them."""
    import numpy as np

    ref = np.full((n, classes), (1.0 - margin) / classes, np.float32)
    ref[:, 3] += margin  # class 3 leads every other class by `margin`
    findings = []
    return SimpleNamespace(
        profile=resolve_profile(profile), findings=findings, repair=None, progress=lambda *a: None,
        finding=lambda sev, code, msg: findings.append(SimpleNamespace(severity=sev, code=code, message=msg)),
        model=SimpleNamespace(outputs=[SimpleNamespace(name="predictions")], output_kinds=["multiclass"]),
        reference=[ref], data=SimpleNamespace(synthetic=False),
        validation=SimpleNamespace(labels={"y": np.full(n, 3)} if labels else None))


def test_integer_steps_are_not_tried_where_decisions_are_below_int8_softmax_resolution(monkeypatch):
    """A flat 1000-way softmax (margins 1e-4 < 1/256): recalibrating or training a full int8 graph cannot keep its
    classes apart (the MobileNetV2-224 of issue 19: 338 s of both, failing); float layers (selective) still run."""
    from kdeploy.artifacts import Artifact
    from kdeploy.run import ladder
    from kdeploy.run.context import Build

    int8 = Build("int8", "int8", {}, artifacts=[Artifact(format="tflite", path=FIXTURES / "absent.tflite",
                                                          precision="int8", source="tflite-converter")])
    ran = []
    monkeypatch.setattr(ladder, "judge", lambda c, art: (False, "top1=0"))
    monkeypatch.setattr(ladder, "_run", lambda c, r, b, step, verdict, row: ran.append(step.step) or
                        row.update(tried=True, seconds=1.0) or [])
    flat = _flat_ctx("cpu-edge", 1e-4)
    assert "64 of 64 decisions of output predictions" in ladder.below_int8_resolution(flat)
    ladder.repair_ladder(flat, None, [int8], before_steps=lambda: ran.append("lane finished"))
    steps = {s["step"]: s for s in flat.repair["steps"]}
    assert ran == ["lane finished", "selective"]  # its per-layer tensors and ONNX twin after the lane's conversions
    for name in ("calibration", "qat"):
        assert not steps[name]["tried"] and steps[name]["detail"].startswith("not tried: cannot help: 64 of 64")
    assert "calibration not tried; selective fails (1.0 s); qat not tried" in ladder.summary(flat.repair)

    onnx_judged = _flat_ctx("cpu-server", 1e-4)  # ONNX Runtime deployed: each try converts to ONNX, after the lane
    ran.clear()
    ladder.repair_ladder(onnx_judged, None, [int8], before_steps=lambda: ran.append("lane finished"))
    assert ran == ["lane finished", "selective"]

    labelled = _flat_ctx("cpu-edge", 1e-4, labels=True)  # labels judge the task: QAT may make its own margins
    ran.clear()
    ladder.repair_ladder(labelled, None, [int8], before_steps=lambda: ran.append("lane finished"))
    assert ran == ["lane finished", "selective", "qat"]
    assert {s["step"]: s["tried"] for s in labelled.repair["steps"]} == {"calibration": False, "selective": True,
                                                                        "qat": True}

    confident = _flat_ctx("cpu-edge", 0.02)  # margins 5x the step: every step may help
    assert ladder.below_int8_resolution(confident) is None
    ran.clear()
    ladder.repair_ladder(confident, None, [int8], before_steps=lambda: ran.append("lane finished"))
    assert ran == ["lane finished", "calibration", "selective", "qat"]


def test_mcu_finding_says_why_qat_was_not_tried_below_int8_resolution(monkeypatch):
    from kdeploy.artifacts import Artifact
    from kdeploy.run import ladder
    from kdeploy.run.context import Build

    int8 = Build("int8", "int8", {}, artifacts=[Artifact(format="tflite", path=FIXTURES / "absent.tflite",
                                                          precision="int8", source="tflite-converter")])
    ctx = _flat_ctx("mcu", 1e-4)
    monkeypatch.setattr(ladder, "judge", lambda c, art: (False, "top1=0"))

    def breaking(c, r, b, verdict, row):
        c.finding("warning", "int8-breaking-layers", "int8 breaks at layers dense.")
        row["detail"] = "not tried: target runs integer kernels only"

    monkeypatch.setattr(ladder, "_name_breaking_layers", breaking)
    monkeypatch.setattr(ladder, "_run", lambda *a: pytest.fail("no integer step may run"))
    ladder.repair_ladder(ctx, None, [int8])
    msg = next(f.message for f in ctx.findings if f.code == "int8-breaking-layers")
    assert "Quantization-aware training (candidate qat-int8): not tried (cannot help: 64 of 64 decisions" in msg
