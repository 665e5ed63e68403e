"""Report data model. The JSON form is a public contract: extend it, never rename fields."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from kdeploy.memory import LAYER_TENSOR_BYTES

SCHEMA_VERSION = "1.2"  # 1.1: inspection; model.trusted_package_classes; candidates[].sensitivity, task_metrics,
# first_divergence; cache; selection.tie. 1.2: artifacts[].pairing; fidelity[].peak_err, rel_rmse, decisions, gates;
# candidates[].consistency, first_non_finite, crash_sites; first_divergence op/detail/reference; repair (the int8 ladder)


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Finding(_M):
    severity: Literal["info", "warning", "error"]
    code: str
    message: str


class TensorSpecOut(_M):
    name: str
    shape: list[int | None]
    dtype: str


class TrustedClassOut(_M):
    package: str
    package_version: str | None
    registered_name: str
    module: str | None
    used_by: list[str]


class ModelInfo(_M):
    path: str
    sha256: str
    format: str
    keras_version: str | None
    params: int | None
    inputs: list[TensorSpecOut]
    outputs: list[TensorSpecOut]
    output_kinds: list[str]
    trusted_package_classes: list[TrustedClassOut] = Field(
        default_factory=list,
        description="Classes of trusted installed packages (e.g. keras_hub) the model uses, loaded without --custom-objects.")


class PairingOut(_M):
    output: str = Field(description="The model output.")
    tensor: str = Field(description="The artifact's output tensor compared with it.")
    how: Literal["output-map", "name", "shape", "values", "unverified"] = Field(
        description="output-map: given by --output-map; name: the names match; shape: the only artifact output of "
                    "that shape; values: the assignment of equal-shaped outputs that agrees best with Keras, by a "
                    "margin (in detail); unverified: the values could not decide (the candidate fails).")
    detail: str | None = None


class ArtifactOut(_M):
    format: str
    path: str = Field(description="Relative to the report's folder.")
    precision: str
    source: str
    size_bytes: int
    gzip_bytes: int
    sha256: str
    # Added in 1.1 (optional): artifacts given to `check` state how each model output was paired with theirs.
    pairing: list[PairingOut] | None = Field(
        default=None, description="Artifacts given to `check`: which artifact tensor each model output is compared "
                                  "with, and how that pairing was decided.")


class FidelityOut(_M):
    runtime: str
    reference: str
    output: str
    precision: str
    samples: int
    max_abs_err: float | None
    mean_abs_err: float | None
    max_rel_err: float | None
    norm_err: float | None
    mean_norm_err: float | None = None
    cosine_min: float | None
    cosine_mean: float | None = None
    top1_agreement: float | None
    passed: bool
    detail: str
    # Added by the acceptance policy (kdeploy.acceptance); absent in older reports.
    peak_err: float | None = Field(None, description="Max abs error / the output's magnitude (larger of max |ref| "
                                                     "and its range).")
    rel_rmse: float | None = Field(None, description="RMS error / RMS of the reference output.")
    decision_agreement: float | None = Field(
        None, description="Softmax: top-1 class agreement (along the last axis: per sample, or per cell of a map "
                          "(N, ..., C)); sigmoid outputs and score maps: agreement of the decisions at the "
                          "tolerance's threshold (per element).")
    decisions: int | None = Field(None, description="Decisions compared (samples, cells of a softmax map, or "
                                                    "elements of sigmoid outputs).")
    summary: str = Field("", description="The failed criteria in user terms (empty when passed).")
    gates: bool = Field(True, description="False: a cross-check runtime's figures against Keras, reported but not "
                                          "a verdict (verdicts come from the target's deployed runtimes).")


class ConsistencyOut(_M):
    """Agreement of two runtimes that ran one artifact, per output: runtime_b against runtime_a (the deployed one)."""

    runtime_a: str
    runtime_b: str
    output: str
    precision: str
    samples: int
    figures: dict[str, float | int | None] = Field(
        default_factory=dict, description="max_abs_err, peak_err, rel_rmse, cosine_min, cosine_mean, "
                                          "decision_agreement of runtime_b against runtime_a")
    gates: bool = Field(description="The verdict is a check: always for fp32, for quantized precisions where the "
                                    "profile's [consistency] gate_quantized is true")
    passed: bool
    detail: str = ""
    summary: str = ""


class LatencyOut(_M):
    runtime: str
    threads: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    samples: int
    warmup: int
    throughput_items_s: float | None = None
    p25_ms: float | None = Field(None, description="First quartile of the timed samples (noise band: p25..p75).")
    p75_ms: float | None = Field(None, description="Third quartile of the timed samples.")
    min_ms: float | None = None
    max_ms: float | None = None
    noisy: bool = Field(False, description="cv above the profile's timing.noisy_cv: the host was busy or the timer coarse.")
    remeasured: bool = Field(False, description="Measured again, with twice the iterations, before a budget verdict.")
    measured_on: str | None = Field(None, description="The host the figure was measured on (not the target device).")
    interleaved_with: list[str] | None = Field(
        None, description="Candidates timed round-robin with this one in one process, so host load hit them alike."
    )


class RobustnessOut(_M):
    """Agreement with Keras on one probe input set (noise, shifted/scaled, edge inputs)."""

    probe: str
    description: str
    runtime: str
    output: str
    samples: int
    top1_agreement: float | None
    cosine_mean: float | None
    cosine_min: float | None
    mean_norm_err: float | None
    max_abs_err: float | None
    passed: bool | None = Field(None, description="Verdict against the profile's robustness minimums; None when none set.")
    detail: str = ""


class Check(_M):
    name: str
    value: Any
    limit: Any
    passed: bool
    detail: str = ""
    summary: str = Field("", description="Why it failed, in user terms (fidelity, consistency, task checks).")


class Candidate(_M):
    name: str
    recipe: dict[str, Any]
    passed: bool
    artifacts: list[ArtifactOut] = []
    fidelity: list[FidelityOut] = []
    latency: list[LatencyOut] = []
    cold: dict[str, dict[str, float]] = Field(default_factory=dict, description="runtime -> load_ms, first_inference_ms")
    memory: dict[str, dict[str, float]] = Field(default_factory=dict, description="runtime -> memory figures (MiB)")
    checks: list[Check] = []
    errors: list[str] = []
    compute: dict[str, Any] = Field(default_factory=dict, description="params, MACs, FLOPs per inference and their source")
    estimate: dict[str, Any] | None = Field(
        None, description="Analytic lower-bound latency on the profile's device (an estimate, not a measurement)"
    )
    robustness: list[RobustnessOut] = []
    optimization: dict[str, Any] | None = Field(
        None, description="Pruning/clustering candidates: technique, bridge check (max_abs_diff vs atol), fine-tuning "
                          "(targets, loss, epochs, loss_first/last), per-layer figures, and `tflite`: sparsity and unique "
                          "weight values counted in the exported .tflite weight buffers",
    )
    sensitivity: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Quantized .tflite candidates: per Keras layer, error against the float .tflite on the first validation "
                    "inputs (the profile's selective.samples, fewer where a dump's tensors would pass "
                    f"{LAYER_TENSOR_BYTES >> 20} MiB: 4 for MobileNetV2 at 224x224) "
                    "as {layer, op, metric, value} (added_cosine_loss: what the layer adds to its inputs' "
                    "1 - cosine, the ranking; rel_rmse: RMSE / float range; cosine_mean), layers worst first")
    task_metrics: list[dict[str, Any]] = Field(
        default_factory=list,
        description="With labels: {name, output, keras, value, drop} on the validation samples (accuracy for "
                    "classifiers, mae/rmse for regression); drop: how much worse than Keras")
    consistency: list[ConsistencyOut] = Field(
        default_factory=list,
        description="Agreement between the runtimes that ran this candidate's artifacts (deployed vs cross-check)")
    first_divergence: dict[str, Any] | None = Field(
        None, description="A .tflite failing its tolerance: the first Keras layer whose output exceeds it, "
                          "{layer, max_abs_err, tolerance}; fp32 against Keras, other precisions (issue 18, optional "
                          "keys op, detail, reference) against the fp32 .tflite's layer outputs with the precision's "
                          "tolerance (tolerance: null when it has no atol/rtol; detail says which criterion failed). "
                          "For a SavedModel, layer is a name scope.")
    # issue 18 (additive, optional): where NaN/Inf start and where a runtime crashed.
    first_non_finite: dict[str, Any] | None = Field(
        None, description="A .tflite whose ops output NaN/Inf: the first such op in execution order, {layer (Keras "
                          "layer, a name scope for a SavedModel, or null), op, node (index), node_name (its output "
                          "tensor), count (NaN/Inf values over the samples), elements, reference_count (the fp32 "
                          ".tflite's count at the same node; null when not compared), inputs ('validation', or "
                          "\"robustness probe 'edge'\" when only a probe's inputs gave NaN/Inf)}")
    crash_sites: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Runtime failures located in the artifact: {runtime, op, node (LiteRT: execution-plan index; "
                    "ONNX: graph.node index), node_name (output tensor / ONNX node: the SavedModel node), layer "
                    "(Keras layer or null), inputs_from (layers or nodes feeding it), reason (the kernel's text)}")


class LayerCompat(_M):
    """Where one Keras layer can go, predicted from one fp32 conversion of the model."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: str = Field(description="Keras layer path, nested models joined with '/'.")
    class_name: str = Field(alias="class", description="Keras class name.")
    tflite: Literal["builtin", "select-tf-ops", "no-ops", "not-converted"] = Field(
        description="builtin: TFLite builtin ops only; select-tf-ops: needs Flex ops (the LiteRT wheel cannot run "
                    "them); no-ops: nothing at inference (e.g. Dropout, InputLayer, or folded away); not-converted: "
                    "the conversion failed")
    tflm: Literal["supported", "unsupported", "no-ops", "not-converted"] = Field(
        description="Whether every TFLite op of the layer is registered in the installed TFLite Micro")
    onnx: Literal["supported", "no-route", "no-ops", "not-converted"] = Field(
        description="Whether tf2onnx (at kdeploy's opset) has a handler for every TensorFlow op of the layer")
    ops: list[str] = Field([], description="TFLite ops attributed to the layer (from tensor names)")
    missing: dict[str, list[str]] = Field(default_factory=dict, description="tflite/tflm/onnx -> ops that block it")
    repair: str | None = Field(None, description="A repair kdeploy applies before conversion (e.g. RNN unroll)")


class Hazard(_M):
    """Something a user can fix before export."""

    code: str
    layer: str | None
    message: str
    fix: str
    severity: Literal["info", "warning", "error"] = "warning"
    blocks: bool = Field(False, description="True when it keeps the model from being ready for the target")


class Inspection(_M):
    """`kdeploy inspect`: readiness before any full conversion (also inside optimize's report)."""

    target: str
    ready: bool = Field(description="No hazard blocks the target (a prediction, not optimize's verdict)")
    summary: dict[str, Any] = Field(description="layers, params, MACs, inputs/outputs, sizes per precision, budgets")
    layers: list[LayerCompat]
    hazards: list[Hazard]
    conversion: dict[str, Any] = Field(description="How the one fp32 conversion was done, its op counts and seconds")
    duration_s: float


class CacheInfo(_M):
    """What this run took from the result cache (`kdeploy.cache`) and what it wrote to it."""

    status: Literal["disabled", "miss", "hit", "retimed", "rebuilt"] = Field(
        description="disabled (--no-cache), miss (no entry: built and stored), hit (everything from the cache), "
                    "retimed (artifacts, fidelity and checks from the cache, latency measured again: --retime), "
                    "rebuilt (an entry failed verification: deleted, built again and stored)")
    key: str | None = Field(None, description="sha256 of the run's inputs (model, data, profile, recipes, options, "
                                              "kdeploy and library versions, host)")
    detail: str = ""
    from_cache: list[str] = Field(default_factory=list, description="Report sections taken from the cache entry.")
    entry_created: str | None = Field(None, description="When the reused entry was written (UTC).")
    stored: bool = Field(False, description="This run wrote (or replaced) the entry.")


class Report(_M):
    """What `kdeploy optimize` found. `save()` writes it and publishes the artifacts atomically."""

    schema_version: str = SCHEMA_VERSION
    tool: dict[str, str]
    ready: bool
    selected: str | None
    selection: dict[str, Any]
    model: ModelInfo
    target: dict[str, Any]
    host: dict[str, Any]
    data: dict[str, Any]
    reference_artifacts: list[dict[str, Any]] = []
    candidates: list[Candidate]
    findings: list[Finding]
    command: list[str] = []
    seed: int
    duration_s: float
    inspection: Inspection | None = Field(None, description="Readiness predicted before conversion (kdeploy inspect)")
    reproducibility: dict[str, Any] = Field(
        default_factory=dict,
        description="How to re-run this exactly (shell command, working directory, seed, input hashes) and which "
                    "outputs are byte-identical across runs and which are not (with the reason)",
    )

    cache: CacheInfo | None = Field(None, description="What came from the result cache (None: written before 1.1).")
    # issue 19 (additive, optional): the int8 repair ladder, when the run judged full int8.
    repair: dict[str, Any] | None = Field(
        None, description="The int8 repair ladder (kdeploy.run.ladder): int8 {passed, detail, seconds} (full int8's "
                          "verdict on the deployed runtimes, judged once), runtimes, steps [{step (calibration, "
                          "selective, qat), recipe (its candidate), tried, passed (its judge: evaluation's gates but "
                          "latency), detail, seconds, conversions, size_bytes (deployed artifact), evaluation_passed "
                          "(the candidate's verdict after evaluation), latency {runtime, p50_ms, int8_p50_ms, "
                          "fp32_p50_ms} (host)}] in ladder order, repaired_by (the first passing step's candidate or "
                          "null), seconds. Steps is empty where full int8 passed (the ladder did not run); null: no "
                          "full int8 candidate.")

    _staging: Path | None = PrivateAttr(default=None)
    _mlflow: Any = PrivateAttr(default=None)  # kdeploy.registry.GateRecord when gated from an MLflow URI

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, out: str | Path, formats: tuple[str, ...] = ("json", "md")) -> Path:
        """Writes the report files next to the artifacts and moves the whole folder to `out`.

        The folder appears at `out` complete or not at all: everything is written in a staging
        folder beside `out`, then renamed into place (replacing an earlier kdeploy output there).
        """
        from kdeploy.report.render import write_formats

        out = Path(out)
        staging = self._staging
        if staging is None or not staging.is_dir():
            raise FileNotFoundError("this report's artifacts are gone (staging folder missing)")
        write_formats(self, staging, formats)
        publish(staging, out)
        self._staging = None
        return out


def check_out_dir(out: Path, marker: str = "report.json") -> None:
    """Refuses an `--out` that is a file, not writable, or a folder kdeploy did not write.

    Args:
        out: the output folder.
        marker: the file an earlier kdeploy output folder holds (`summary.json` for a batch).
    """
    from kdeploy.errors import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; allowed: a new folder or an earlier kdeploy output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise UsageError(f"--out {out} is a non-empty folder that kdeploy did not write (no {marker}); refusing to overwrite it")
    parent = out.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())  # missing folders are made when staging
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is an existing file, not a folder; allowed: a folder path")
    try:  # os.access is not enough: root passes it on read-only or pseudo filesystems (e.g. /sys)
        tempfile.TemporaryDirectory(prefix=f".{out.name}.probe-", dir=existing).cleanup()
    except OSError as e:
        raise UsageError(f"--out {out}: folder {existing} is not writable ({e.strerror or e}); "
                         "allowed: a folder in a writable location") from None


# staging folder -> the top-most parent folder `make_staging` created for it (removed again by `discard_staging`)
_MADE_PARENTS: dict[Path, Path] = {}


def make_staging(out: Path | None) -> Path:
    """A private staging folder beside `out` (same filesystem, so `publish` is a rename), else in the temp folder.

    Missing parent folders of `out` are created (like `mkdir -p`); `discard_staging` removes them again when
    the run fails, so a failed run leaves the filesystem as it was.
    """
    if out is None:
        return Path(tempfile.mkdtemp(prefix=".kdeploy.partial-"))
    parent = out.resolve().parent
    top = _make_parents(parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    if top is not None:
        _MADE_PARENTS[staging] = top
    return staging


def _make_parents(folder: Path) -> Path | None:
    """Creates `folder` and its missing parents; returns the top-most folder created (None: it existed)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    if not missing:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1]


def discard_staging(staging: Path) -> None:
    """Removes a staging folder of a failed or interrupted run, and the empty parent folders made for it."""
    shutil.rmtree(staging, ignore_errors=True)
    top = _MADE_PARENTS.pop(staging, None)
    if top is None:
        return
    folder = staging.parent
    while True:
        try:
            folder.rmdir()  # only when empty: another run's output there stays
        except OSError:
            return
        if folder == top:
            return
        folder = folder.parent


def publish(staging: Path, out: Path) -> None:
    """Moves `staging` to `out` with renames (same filesystem), replacing an earlier output."""
    out = out.resolve()
    _MADE_PARENTS.pop(staging, None)  # published: the folders made for it stay
    if staging.resolve().parent != out.parent:
        # Staged elsewhere (e.g. Python API without `out`): copy beside `out` first, then rename.
        _make_parents(out.parent)
        beside = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        shutil.rmtree(beside)
        shutil.copytree(staging, beside)
        shutil.rmtree(staging, ignore_errors=True)
        staging = beside
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)  # mkdtemp made it private; the output folder is an ordinary one
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
