"""Every candidate recipe, declared once: what it is, how it is converted, how its ONNX twin is made.

A recipe is data: the build stage (`kdeploy.run.build`) reads it and calls the converters, the
evaluation reads its precision and tolerance, the report shows `Recipe.describe`. Families:

- post-training quantization of the reference SavedModel with the TFLite converter, one per
  precision the profile allows (`precisions`);
- ONNX Runtime dynamic quantization of the fp32 ONNX model (`onnx_quantization = true`);
- pruning and weight clustering through TFMOT (`[pruning]`, `[clustering]`): a child process
  fine-tunes one model per plan row, each converted to the section's precisions (and, for
  pruning with `sparse_encoding`, a sparse-encoded twin kept when smaller);
- calibration (`[calibration]`, `int8-calibrated`): a repair, full int8 calibrated again (more
  samples, or ai-edge-quantizer's range estimators) only when full int8 fails;
- quantization-aware training (`[qat]`, `qat-int8`): a repair, trained by the same child only
  when full int8 fails, converted with the int8 settings.

The three repairs are the steps of the int8 repair ladder (`REPAIR_LADDER`, run by
`kdeploy.run.ladder` in that order, stopping at the first that passes).

Adding a recipe: one row (or one family function) here + one test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdeploy.profiles import TargetProfile


@dataclass(frozen=True)
class PrecisionSpec:
    calibration: bool  # needs representative data (integer activations)
    integer: bool  # integer activations (full-integer graph)


# One line per precision the converters know.
PRECISIONS: dict[str, PrecisionSpec] = {
    "fp32": PrecisionSpec(calibration=False, integer=False),
    "dynamic": PrecisionSpec(calibration=False, integer=False),  # int8 weights, float activations
    "fp16": PrecisionSpec(calibration=False, integer=False),
    "int8": PrecisionSpec(calibration=True, integer=True),
    "int16x8": PrecisionSpec(calibration=True, integer=True),
}

# ONNX routes: "savedmodel" (tf2onnx from the reference SavedModel; fp32 where ONNX Runtime is deployed, see
# `fp32_onnx_route`), "tflite" (tf2onnx from the
# recipe's own .tflite, so the same quantized graph runs on ONNX Runtime), "ort" (the recipe IS an
# ONNX model), None (no ONNX twin; `no_onnx` says why).
NO_INT16_ONNX = "tf2onnx cannot express int16 activations in the opsets it supports (<= 18)"
# Precisions whose sparse-encoded .tflite LiteRT runs: sparse int8 (prune75-int8 on the digits CNN)
# failed with "failed to delegate FULLY_CONNECTED ... TfLiteXNNPackDelegate failed to prepare".
SPARSE_RUNNABLE = ("fp32", "fp16")
ORT_DYNAMIC = "ort-dynamic"
# Selective int8: full int8 except the Keras layers a search keeps in float (`kdeploy.run.selective`).
SELECTIVE_INT8 = "int8-mixed"
# Quantization-aware training: the repair when full int8 fails (`kdeploy.run.qat`), converted like int8.
QAT_INT8 = "qat-int8"
# Calibration repair: full int8 calibrated again, by the first method of `[calibration] methods` that passes
# (`kdeploy.run.calibrate`): more samples through the TFLite converter, or ai-edge-quantizer's range estimators.
CALIBRATED_INT8 = "int8-calibrated"
# method -> (converter, how it estimates each activation tensor's range); the profile's `CalibrationMethod`.
CALIBRATION_METHODS: dict[str, tuple[str, str]] = {
    "more-samples": ("tflite", "min-max over the calibration and extra samples"),
    "moving-average": ("ai-edge-quantizer", "moving average (smoothing 0.95) of each sample's min/max"),
    "mean-min-max": ("ai-edge-quantizer", "mean of each sample's min/max"),
    "octav": ("ai-edge-quantizer", "moving average of each sample's min/max; weights clipped by OCTAV"),
}


@dataclass(frozen=True)
class TfmotPlan:
    """One model the TFMOT child fine-tunes (pruned or clustered); converted by its recipes."""

    name: str  # e.g. "prune50", "prune2x4", "cluster16", "qat-int8"
    technique: str  # "pruning" | "clustering" | "qat"
    params: dict[str, Any] = field(default_factory=dict)

    def job(self) -> dict[str, Any]:
        """The row the child process reads (`kdeploy.compress.tfmot_worker`)."""
        kind = {"pruning": "prune", "clustering": "cluster"}.get(self.technique, self.technique)
        return {"name": self.name, "kind": kind, **self.params}


@dataclass(frozen=True)
class Recipe:
    """One candidate: its name, precision, converter, ONNX route and where its model comes from."""

    name: str
    precision: str
    technique: str = "ptq"  # "ptq" | "selective" | "calibration" | "ort-quantization" | "pruning" | "clustering" | "qat"
    converter: str = "tflite"  # "tflite" | "ai-edge-quantizer" | "onnxruntime.quantization.quantize_dynamic"
    onnx: str | None = "tflite"
    no_onnx: str | None = None
    plan: TfmotPlan | None = None  # the TFMOT model this recipe converts (None: the reference model)
    sparse: bool = False  # also Optimize.EXPERIMENTAL_SPARSITY; a twin of `twin_of`, kept when smaller
    twin_of: str | None = None

    @property
    def calibration(self) -> bool:
        return self.converter == "tflite" and PRECISIONS[self.precision].calibration

    @property
    def compressed(self) -> bool:
        """Pruned or clustered: computes a slightly different function, held to its section's tolerance."""
        return self.plan is not None

    def describe(self, calibration_samples: int) -> dict[str, Any]:
        """The recipe as the report states it (`candidates[].recipe`)."""
        if self.converter != "tflite":
            return {"precision": self.precision, "converter": self.converter}
        if self.plan is None:
            d: dict[str, Any] = {"precision": self.precision, "converter": "tflite"}
        else:
            d = {"converter": "tflite", "optimization": self.technique, "precision": self.precision}
        if self.calibration:
            d["calibration_samples"] = calibration_samples
        if self.sparse:
            d["tflite_optimizations"] = "EXPERIMENTAL_SPARSITY"
        return d


def ptq_recipes(prof: "TargetProfile") -> list[Recipe]:
    """Post-training quantization of the reference model, one per allowed precision."""
    out = []
    for p in prof.precisions:
        if p == "fp32":
            out.append(Recipe(p, p, onnx=fp32_onnx_route(prof)))
        elif p == "int16x8":
            out.append(Recipe(p, p, onnx=None, no_onnx=NO_INT16_ONNX))
        else:
            out.append(Recipe(p, p))
    return out


def fp32_onnx_route(prof: "TargetProfile") -> str:
    """Where the fp32 ONNX model comes from: the SavedModel where ONNX Runtime is deployed, else the fp32 `.tflite`.

    A deployed ONNX model is converted from the SavedModel (tf2onnx's TensorFlow route gives the
    cleanest graph). Where ONNX Runtime only cross-checks, the twin is converted from the fp32
    `.tflite` like every quantized twin: it checks the very graph that ships, and it skips
    tf2onnx's freezing and grappler passes (3.5 GB at the peak on ResNet50V2's 100 MB of weights).
    """
    return "savedmodel" if "onnxruntime" in prof.runtimes else "tflite"


def selective_recipe(prof: "TargetProfile") -> Recipe | None:
    """Selective int8, where int8 is allowed, the search is on and the target runs float kernels too."""
    if "int8" not in prof.precisions or not prof.selective.enabled or prof.full_integer:
        return None
    return Recipe(SELECTIVE_INT8, "int8", technique="selective")


def ort_recipes(prof: "TargetProfile") -> list[Recipe]:
    """ONNX Runtime dynamic quantization of the fp32 ONNX model, when the profile asks and runs ORT."""
    wanted = set(prof.runtimes) | set(prof.crosscheck_runtimes)
    if not (prof.onnx_quantization and "onnxruntime" in wanted):
        return []
    return [Recipe(ORT_DYNAMIC, "dynamic", technique="ort-quantization",
                   converter="onnxruntime.quantization.quantize_dynamic", onnx="ort")]


def tfmot_plans(prof: "TargetProfile") -> list[TfmotPlan]:
    """The models the TFMOT child fine-tunes for this profile, in a fixed order (one per name)."""
    pr, cl = prof.pruning, prof.clustering
    common_pr = {"epochs": pr.epochs, "learning_rate": pr.learning_rate, "min_layer_weights": pr.min_layer_weights}
    plans = [TfmotPlan(f"prune{round(s * 100):d}", "pruning", {"sparsity": s, **common_pr}) for s in pr.sparsities]
    if pr.structured_2x4:
        plans.append(TfmotPlan("prune2x4", "pruning", {"m_by_n": [2, 4], **common_pr}))
    plans += [TfmotPlan(f"cluster{k}", "clustering", {"clusters": k, "epochs": cl.epochs,
                                                       "learning_rate": cl.learning_rate,
                                                       "min_layer_weights": cl.min_layer_weights})
              for k in cl.clusters]
    return list({p.name: p for p in plans}.values())  # e.g. sparsities [0.5, 0.5]: one candidate


def tfmot_precisions(prof: "TargetProfile", technique: str) -> list[str]:
    """The precisions a pruning/clustering section converts to: its own list, else fp32 and int8 where allowed."""
    section = prof.pruning if technique == "pruning" else prof.clustering
    if section.precisions is not None:
        return list(section.precisions)
    return [p for p in ("fp32", "int8") if p in prof.precisions] or list(prof.precisions[:1])


def tfmot_recipes(prof: "TargetProfile", plan: TfmotPlan) -> list[Recipe]:
    """The candidates made from one TFMOT model: one per section precision (+ sparse twins)."""
    wanted = set(prof.runtimes) | set(prof.crosscheck_runtimes)
    out = []
    for p in tfmot_precisions(prof, plan.technique):
        dense = Recipe(f"{plan.name}-{p}", p, technique=plan.technique, plan=plan)
        out.append(dense)
        if plan.technique == "pruning" and prof.pruning.sparse_encoding and "litert" in wanted:
            out.append(Recipe(f"{dense.name}-sparse", p, technique=plan.technique, plan=plan, sparse=True,
                              twin_of=dense.name))
    return out


def calibration_recipe(prof: "TargetProfile", method: str) -> Recipe | None:
    """The `int8-calibrated` candidate made by `method`, where int8 is allowed and `[calibration]` is on.

    Full-integer targets included: every method makes a full int8 graph (float only at the I/O edges).
    """
    if "int8" not in prof.precisions or not prof.calibration.enabled:
        return None
    return Recipe(CALIBRATED_INT8, "int8", technique="calibration", converter=CALIBRATION_METHODS[method][0])


def qat_plan(prof: "TargetProfile") -> TfmotPlan | None:
    """The model the TFMOT child trains with quantization-aware training, where int8 is allowed and `[qat]` is on.

    Full-integer targets (`mcu`) included: the QAT model converts to full int8 like post-training int8.
    """
    q = prof.qat
    if "int8" not in prof.precisions or not q.enabled:
        return None
    return TfmotPlan(QAT_INT8, "qat", {"epochs": q.epochs, "learning_rate": q.learning_rate,
                                       "batch_size": q.batch_size, "max_seconds": q.max_seconds})


def qat_recipe(plan: TfmotPlan) -> Recipe:
    """The `qat-int8` candidate: the QAT model's SavedModel converted with the int8 recipe's settings."""
    return Recipe(plan.name, "int8", technique="qat", plan=plan)


def tolerance_for(prof: "TargetProfile", recipe: Recipe):
    """The recipe's own tolerance vs Keras (pruning/clustering sections), else None: by precision.

    Quantization-aware training is held to the int8 tolerance: it is an int8 candidate of the same model.
    """
    if recipe.plan is None or recipe.technique == "qat":
        return None
    return (prof.pruning if recipe.technique == "pruning" else prof.clustering).tolerance


@dataclass(frozen=True)
class RepairStep:
    """One step of the int8 repair ladder: the candidate it makes and whether that graph stays all-integer."""

    step: str  # "calibration" | "selective" | "qat"
    recipe: str  # the candidate's name
    integer: bool  # every op int8 (runs on `full_integer` targets)
    what: str


# The int8 repair ladder, in the order tried (`kdeploy.run.ladder`), cheapest first.
REPAIR_LADDER: tuple[RepairStep, ...] = (
    RepairStep("calibration", CALIBRATED_INT8, True, "full int8 calibrated again ([calibration] methods)"),
    RepairStep("selective", SELECTIVE_INT8, False, "the worst int8 layers kept in float ([selective])"),
    RepairStep("qat", QAT_INT8, True, "quantization-aware training, converted to full int8 ([qat])"),
)


def repair_steps(prof: "TargetProfile") -> list[tuple[RepairStep, str | None]]:
    """The ladder's steps for this profile, each with why it is not tried here (None: it is).

    `full_integer` targets (`mcu`) get only the steps whose graph stays all-integer.
    """
    available = {
        "calibration": (calibration_recipe(prof, prof.calibration.methods[0]) is not None, "[calibration] enabled = false"),
        "selective": (selective_recipe(prof) is not None, "target runs integer kernels only (full_integer)"
                      if prof.full_integer else "[selective] enabled = false"),
        "qat": (qat_plan(prof) is not None, "[qat] enabled = false"),
    }
    out = []
    for s in REPAIR_LADDER:
        ok, why = available[s.step]
        out.append((s, None if ok else why))
    return out
