"""The recipe registry: which candidates each target gets, and how each is converted."""

from __future__ import annotations

import pytest

from kdeploy.errors import ProfileError
from kdeploy.profiles import load_profile_file, resolve_profile
from kdeploy.recipes import (NO_INT16_ONNX, ORT_DYNAMIC, PRECISIONS, ort_recipes, ptq_recipes, tfmot_plans,
                             tfmot_recipes, tolerance_for)
from kdeploy.runtimes import RUNTIME_FORMATS, RUNTIMES


def test_ptq_recipes_follow_the_profile_precisions_with_their_onnx_route():
    prof = resolve_profile("cpu-edge")
    recipes = ptq_recipes(prof)
    assert [r.name for r in recipes] == list(prof.precisions)
    routes = {r.name: r.onnx for r in recipes}
    # ONNX Runtime only cross-checks on cpu-edge: every twin, fp32 too, is converted from its own .tflite
    assert set(routes.values()) == {"tflite"}
    assert all(r.calibration == PRECISIONS[r.precision].calibration for r in recipes)


@pytest.mark.parametrize("target, route", [("cpu-server", "savedmodel"), ("cpu-edge", "tflite"), ("mobile", "tflite")])
def test_fp32_onnx_comes_from_the_savedmodel_only_where_onnxruntime_is_deployed(target, route):
    (fp32,) = [r for r in ptq_recipes(resolve_profile(target)) if r.precision == "fp32"]
    assert fp32.onnx == route


def test_int16x8_recipe_has_no_onnx_twin_and_says_why(quick_profile):
    prof = load_profile_file(quick_profile(precisions=["fp32", "int16x8"],
                                           tolerances={"fp32": {"atol": 1e-5}, "int16x8": {"min_cosine_mean": 0.99}}))
    (int16,) = [r for r in ptq_recipes(prof) if r.precision == "int16x8"]
    assert int16.onnx is None and int16.no_onnx == NO_INT16_ONNX
    assert int16.describe(64) == {"precision": "int16x8", "converter": "tflite", "calibration_samples": 64}


def test_ort_quantization_only_where_the_profile_asks_and_runs_onnxruntime():
    assert [r.name for r in ort_recipes(resolve_profile("cpu-server"))] == [ORT_DYNAMIC]
    assert ort_recipes(resolve_profile("cpu-edge")) == []


def test_mobile_tfmot_recipes_pair_each_plan_with_its_section_precisions_and_sparse_twins():
    prof = resolve_profile("mobile")
    plans = tfmot_plans(prof)
    assert plans, "the mobile profile enables pruning and clustering"
    for plan in plans:
        recipes = tfmot_recipes(prof, plan)
        dense = [r for r in recipes if not r.sparse]
        assert all(r.name.startswith(plan.name + "-") and r.technique == plan.technique for r in recipes)
        assert all(tolerance_for(prof, r) is not None for r in recipes)  # held to the section's own tolerance
        for twin in (r for r in recipes if r.sparse):
            assert plan.technique == "pruning" and twin.twin_of in [d.name for d in dense]
            assert recipes.index(twin) == recipes.index(next(d for d in dense if d.name == twin.twin_of)) + 1
    assert tolerance_for(prof, ptq_recipes(prof)[0]) is None  # post-training: by precision


def test_profile_runtimes_come_from_the_runtime_registry(quick_profile):
    assert set(RUNTIME_FORMATS) == set(RUNTIMES)
    with pytest.raises(ProfileError) as e:
        load_profile_file(quick_profile(runtimes=["tensorrt"]))
    assert all(name in str(e.value) for name in RUNTIMES)
