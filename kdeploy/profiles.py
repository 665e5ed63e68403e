"""Target profiles: which runtimes and precisions a target allows, its budgets and tolerances.

Profiles are TOML files validated with pydantic; unknown keys are errors that name the file
and the key. Built-in profiles live in the repository's `profiles/` folder (shipped inside the
wheel as `kdeploy/_builtin_profiles`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdeploy.errors import ProfileError
from kdeploy.runtimes import RUNTIMES
from kdeploy.util import one_line, read_toml

Runtime = Literal[tuple(RUNTIMES)]  # the runtime registry decides which names exist
Precision = Literal["fp32", "dynamic", "fp16", "int8", "int16x8"]
PRECISIONS: tuple[str, ...] = ("fp32", "dynamic", "fp16", "int8", "int16x8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(_Strict):
    """How close a candidate's outputs must be to the reference. Unset criteria are not checked.

    The policy that applies them, by output kind and precision, is `kdeploy.acceptance`.
    """

    atol: float | None = Field(None, ge=0, description="Absolute tolerance, as in numpy.allclose.")
    rtol: float | None = Field(None, ge=0, description="Relative tolerance (with atol), as in numpy.allclose.")
    max_norm_err: float | None = Field(
        None, ge=0, description="Max abs error divided by the reference output's range (max - min)."
    )
    max_mean_norm_err: float | None = Field(
        None, ge=0, description="Mean abs error divided by the reference output's range."
    )
    min_cosine: float | None = Field(None, ge=-1, le=1, description="Minimum per-sample cosine similarity (cosine_min).")
    min_cosine_mean: float | None = Field(None, ge=-1, le=1, description="Minimum mean per-sample cosine similarity.")
    min_top1: float | None = Field(
        None, ge=0, le=1,
        description="Minimum decision agreement: the top-1 class of softmax outputs, the decision at "
                    "decision_threshold of sigmoid outputs and score maps. Agreement below it fails only when the "
                    "flips show it at 95% confidence for the sample count (one-sided binomial test).")
    near_tie_margin: float | None = Field(
        None, ge=0, le=1,
        description="Stricter min_top1: below min_top1, only flips whose Keras margin (top-1 minus top-2 "
                    "probability; |value - threshold|) is under this may pass on the binomial bound; unset: any flip.")
    max_peak_err: float | None = Field(
        None, ge=0, description="Max abs error divided by the output's magnitude (the larger of its peak |value| and "
                                "its range): the fp32 drift criterion; never blows up on a near-constant output.")
    max_rel_rmse: float | None = Field(
        None, ge=0, description="Regression and box outputs (not softmax/sigmoid): RMS error divided by the RMS of "
                                "the reference output.")
    decision_threshold: float | None = Field(
        None, description="Threshold of the decisions of sigmoid outputs and score maps (min_top1); unset: 0.5.")


class Budgets(_Strict):
    """Resource budgets; unset budgets are not checked."""

    max_size_bytes: int | None = Field(None, gt=0, description="Deployable artifact size in bytes.")
    max_gzip_bytes: int | None = Field(None, gt=0, description="Artifact size after gzip, in bytes.")
    max_latency_ms: float | None = Field(None, gt=0, description="Latency limit at `latency_percentile`.")
    latency_percentile: Literal["p50", "p90", "p99"] = Field("p90", description="Percentile the latency budget applies to.")
    max_memory_mb: float | None = Field(None, gt=0, description="Peak resident memory of load + inference, MiB.")
    max_arena_bytes: int | None = Field(
        None, gt=0, description="TFLite Micro tensor arena (RAM on a microcontroller), bytes; measured by the tflm runtime."
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="With labels in --data: accuracy lost against Keras, absolute (e.g. 0.01); a "
                                      "check. A candidate below min_top1 agreement passes its fidelity check when "
                                      "its accuracy drop is within this budget (the report says so).")
    max_relative_accuracy_drop: float | None = Field(
        0.01, ge=0, le=1,
        description="With labels in --data: accuracy lost against Keras, as a fraction of Keras' accuracy (default "
                    "0.01: MLPerf Inference accepts a quantized model at 99% of the fp32 accuracy); with "
                    "max_accuracy_drop, the tighter one applies. A drop above it passes when the samples lost are "
                    "consistent with it at 95% confidence for the sample count (binomial). 1.0 switches it off.")
    max_mae_increase: float | None = Field(
        None, ge=0, description="With labels in --data: mean absolute error gained against Keras (regression "
                                "outputs, label units); a check.")


class Timing(_Strict):
    """How latency is measured (in a child process per runtime)."""

    warmup: int = Field(5, ge=0, le=10000, description="Untimed runs before timing starts.")
    min_iters: int = Field(50, ge=1, le=100000, description="Timed runs at least.")
    min_seconds: float = Field(0.5, ge=0, le=600, description="Time spent timing at least, seconds.")
    max_iters: int = Field(2000, ge=1, le=1000000, description="Timed runs at most.")
    max_seconds: float = Field(
        3.0, gt=0, le=3600,
        description="Timing stops after this many seconds even below min_iters (a slow candidate; at least 5 runs).",
    )
    timeout_s: float = Field(600, gt=0, description="A runtime child process taking longer is killed and fails.")
    noisy_cv: float = Field(
        0.15, gt=0, description="A latency row whose coefficient of variation (std / mean) exceeds this is flagged noisy."
    )
    remeasure_margin: float = Field(
        0.1, ge=0, le=1,
        description="A latency budget verdict within this fraction of its limit, or on a noisy row, is re-measured "
                    "once with twice the iterations and time before it is given.",
    )


class Robustness(_Strict):
    """Agreement with Keras off the validation distribution: noise, a shifted/scaled input, edge inputs."""

    enabled: bool = Field(True, description="Run the probes on every candidate (on the target's first runtime).")
    probes: list[Literal["noise", "shift_scale", "edge"]] = Field(
        ["noise", "shift_scale", "edge"], description="Probes to run; the minimums below apply to each of them."
    )
    samples: int = Field(16, ge=1, le=10000, description="Validation samples perturbed by the noise and shift probes.")
    noise_std: float = Field(0.1, ge=0, description="Gaussian noise std, as a fraction of each input's std over the data.")
    shift: float = Field(0.25, description="Shift probe: add this many standard deviations of the input...")
    scale: float = Field(1.25, gt=0, description="...after multiplying the input by this factor.")
    min_top1: float | None = Field(
        None, ge=0, le=1, description="Required top-1 agreement with Keras on each probe (classifier outputs); a check."
    )
    min_cosine_mean: float | None = Field(
        None, ge=-1, le=1, description="Required mean cosine similarity with Keras on each probe; a check."
    )


class Consistency(_Strict):
    """Agreement between the runtimes that ran one artifact (the deployed one against each cross-check)."""

    gate_quantized: bool = Field(
        False, description="A quantized artifact's disagreement between runtimes (LiteRT vs ONNX Runtime integer "
                           "kernels round differently) fails the candidate; false: reported with figures only. An fp32 "
                           "disagreement always fails (a converter bug).")


class Selective(_Strict):
    """Selective int8 (`int8-mixed`): when full int8 fails, keep the layers that break it in float."""

    enabled: bool = Field(True, description="Search for layers to keep in float when full int8 fails (int8 allowed).")
    max_tries: int = Field(
        6, ge=1, le=100, description="Conversions the search may try at most (each one converts and runs the model).")
    max_seconds: float = Field(
        120, gt=0, le=86400,
        description="Seconds the search may take (per-layer error, conversions and judging): no try starts that would "
                    "end past it at the mean try's duration so far; the smallest passing set found by then is kept.")
    samples: int = Field(64, ge=1, le=10000, description="Validation samples the per-layer error is measured on.")


CalibrationMethod = Literal["more-samples", "moving-average", "mean-min-max", "octav"]


class Calibration(_Strict):
    """Calibration repair (`int8-calibrated`): when full int8 fails, calibrate again, cheapest method first."""

    enabled: bool = Field(True, description="Recalibrate full int8 when it fails (int8 allowed); the first method "
                                            "that passes becomes candidate int8-calibrated.")
    methods: list[CalibrationMethod] = Field(
        ["more-samples", "moving-average", "mean-min-max", "octav"], min_length=1,
        description="Methods in the order tried. more-samples: the TFLite converter's min-max on the calibration "
                    "samples plus extra_samples held back from validation; moving-average: ai-edge-quantizer's "
                    "static int8 with its default ranges (a moving average, smoothing 0.95, of each sample's "
                    "min/max); mean-min-max: the mean of each sample's min/max; octav: moving-average ranges and "
                    "OCTAV-clipped weights. The last three need the `quantizer` extra.")
    extra_samples: int = Field(
        256, ge=0, le=100000,
        description="Samples held back from validation at the split for more-samples (and the quantizer methods), "
                    "only where validation keeps min_validation_samples; never validation samples.")
    min_validation_samples: int = Field(
        1000, ge=1, le=1000000, description="Validation keeps at least this many samples: extra samples are held back "
                                            "only from data beyond calibration_samples + this.")


class Qat(_Strict):
    """Quantization-aware training (`qat-int8`): TFMOT through the Keras 3 -> tf_keras bridge, a repair run only
    when full int8 fails (and selective int8 found no passing candidate)."""

    enabled: bool = Field(True, description="Try quantization-aware training when full int8 fails (int8 allowed, a "
                                            ".keras/.h5 functional or Sequential model).")
    epochs: int = Field(8, ge=1, le=1000, description="Fine-tuning epochs over the calibration samples and the "
                                                      "samples [calibration] holds back from validation (if any).")
    max_seconds: float = Field(
        300, gt=0, le=86400, description="Training stops after this many seconds even before `epochs` (checked "
                                         "after every batch); the model as trained so far is converted.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Adam learning rate.")
    batch_size: int = Field(16, ge=1, le=65536, description="Fine-tuning batch size.")


class Device(_Strict):
    """Nominal peak figures of the real target device, for an analytic (roofline) latency lower bound."""

    name: str = Field(description="What the figures describe, e.g. 'Cortex-M7 @ 480 MHz'.")
    peak_gops: dict[Literal["fp32", "fp16", "int8", "int16"], float] = Field(
        description="Peak arithmetic rate per compute precision, 1e9 operations/s (one MAC = 2 operations)."
    )
    memory_bandwidth_gb_s: float | None = Field(None, gt=0, description="Sustained memory bandwidth, 1e9 bytes/s.")

    @model_validator(mode="after")
    def _positive(self) -> "Device":
        bad = {k: v for k, v in self.peak_gops.items() if not v > 0}
        if bad or not self.peak_gops:
            raise ValueError(f"peak_gops needs at least one entry and every value > 0 (received {dict(self.peak_gops)})")
        return self


# Pruned/clustered models compute a (slightly) different function, so they are held to a tolerance
# of their own: agreement with the original model on the validation inputs, not fp32 kernel noise.
_TFMOT_TOLERANCE = {"max_mean_norm_err": 0.05, "min_cosine_mean": 0.98, "min_top1": 0.97}
TfmotPrecision = Literal["fp32", "dynamic", "fp16", "int8"]


class FineTune(_Strict):
    """How pruned/clustered models are fine-tuned (TFMOT needs training steps to apply its masks)."""

    targets: Literal["auto", "labels", "distill"] = Field(
        "auto", description="Train on the labels in --data ('y' / 'y_<output>'), or distill from the original "
                            "model's outputs; auto: labels when every output has them, else distill.")
    loss: Literal["auto", "sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy",
                  "mse", "mae", "kl_divergence"] = Field(
        "auto", description="Loss for every output; auto: from the output kind and the targets.")
    batch_size: int = Field(16, ge=1, le=65536, description="Fine-tuning batch size.")
    timeout_s: float = Field(1800, gt=0, description="The TFMOT child process taking longer is killed (recipes skipped).")


class Pruning(_Strict):
    """Magnitude pruning (TFMOT prune_low_magnitude, PolynomialDecay) after a verified Keras 3 → tf_keras bridge."""

    sparsities: list[float] = Field(
        default_factory=list, description="Target sparsities, each in (0, 1); one candidate each. Empty: off.")
    structured_2x4: bool = Field(False, description="Also prune with 2:4 structured sparsity (2 zeros in every 4).")
    epochs: int = Field(16, ge=1, le=1000, description="Fine-tuning epochs (the sparsity ramps up over the first half).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam learning rate for fine-tuning.")
    min_layer_weights: int = Field(
        256, ge=0, description="Layers with fewer kernel weights are left dense (pruning them saves nothing).")
    sparse_encoding: bool = Field(
        True, description="Also convert with Optimize.EXPERIMENTAL_SPARSITY; kept as an extra candidate when smaller.")
    precisions: list[TfmotPrecision] | None = Field(
        None, description="Precisions each pruned model is converted to (allowed by `precisions`); "
                          "unset: fp32 and int8 where allowed.")
    tolerance: Tolerance = Field(
        default_factory=lambda: Tolerance(**_TFMOT_TOLERANCE),
        description="Fidelity tolerance of pruned candidates against the original model.")


class Clustering(_Strict):
    """Weight clustering (TFMOT cluster_weights, k-means++) after a verified Keras 3 → tf_keras bridge."""

    clusters: list[int] = Field(default_factory=list, description="Numbers of clusters, each >= 2; one candidate each. Empty: off.")
    epochs: int = Field(4, ge=0, le=1000, description="Fine-tuning epochs (0: cluster without training).")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Adam learning rate for fine-tuning.")
    min_layer_weights: int = Field(256, ge=0, description="Layers with fewer kernel weights are not clustered.")
    precisions: list[TfmotPrecision] | None = Field(
        None, description="Precisions each clustered model is converted to (allowed by `precisions`); "
                          "unset: fp32 and int8 where allowed.")
    tolerance: Tolerance = Field(
        default_factory=lambda: Tolerance(**_TFMOT_TOLERANCE),
        description="Fidelity tolerance of clustered candidates against the original model.")


class TargetProfile(_Strict):
    """A deployment target. See profiles/*.toml for the built-in ones."""

    name: str = Field(description="Profile name, used with --target.")
    description: str = Field("", description="One line for `kdeploy targets`.")
    runtimes: list[Runtime] = Field(
        min_length=1, description="Runtimes the artifact is deployed on; a candidate must run on each, and its "
                                 "fidelity verdicts against Keras come from them."
    )
    crosscheck_runtimes: list[Runtime] = Field(
        default_factory=list,
        description="Extra runtimes run where an artifact for them exists: their figures against Keras are "
                    "reported, and their agreement with the deployed runtime gates as [consistency] says.",
    )
    precisions: list[Precision] = Field(min_length=1, description="Post-training precisions this target allows.")
    onnx_quantization: bool = Field(False, description="Also try onnxruntime dynamic int8 quantization of the ONNX model.")
    threads: list[int] = Field([1], min_length=1, description="Thread counts to measure latency with.")
    batch_sizes: list[int] = Field([1], min_length=1, description="Batch sizes to measure latency with.")
    static_batch: int | None = Field(
        None, ge=1, le=4096,
        description="Convert with this fixed batch size (static shapes everywhere); TFLite Micro needs it.",
    )
    objective: Literal["size", "gzip_size", "latency"] = Field(
        "size", description="What selection minimizes among passing candidates (then the other of size/latency)."
    )
    tie_tolerance: float = Field(
        0.05, ge=0, le=1, description="Candidates within this fraction of the best figure are treated as equal."
    )
    latency_tie_ms: float = Field(
        0.05, ge=0, description="Latency differences below this many ms are treated as equal (host timer noise)."
    )
    prefer: list[Precision] = Field(
        ["fp32", "fp16", "int16x8", "dynamic", "int8"],
        description="Precision order that decides between candidates whose measured figures are equal.",
    )
    calibration_samples: int = Field(64, ge=1, le=10000, description="Samples used to calibrate int8/int16x8.")
    full_integer: bool = Field(
        False, description="The target runs integer kernels only (TFLite Micro on a microcontroller, an NPU): no "
                           "selective int8; the layers that break full int8 are named with the fix instead.")
    selective: Selective = Field(default_factory=Selective, description="Selective int8 search (int8-mixed).")
    calibration: Calibration = Field(default_factory=Calibration,
                                     description="Calibration repair when full int8 fails (int8-calibrated).")
    consistency: Consistency = Field(default_factory=Consistency, description="Agreement between runtimes.")
    trusted_packages: list[str] = Field(
        [], description="Installed packages (top-level import names) whose registered Keras classes load without "
                        "--custom-objects, besides keras_hub (always trusted).")
    budgets: Budgets = Field(default_factory=Budgets)
    timing: Timing = Field(default_factory=Timing)
    robustness: Robustness = Field(default_factory=Robustness)
    device: Device | None = Field(None, description="The real target's peak figures, for an analytic latency estimate.")
    pruning: Pruning = Field(default_factory=Pruning, description="TFMOT pruning recipes (off unless sparsities or structured_2x4).")
    clustering: Clustering = Field(default_factory=Clustering, description="TFMOT weight clustering recipes (off unless clusters).")
    finetune: FineTune = Field(default_factory=FineTune, description="Fine-tuning shared by pruning and clustering.")
    qat: Qat = Field(default_factory=Qat, description="Quantization-aware training, the repair when full int8 fails.")
    tolerances: dict[Precision, Tolerance] = Field(description="Fidelity tolerance per precision.")

    @model_validator(mode="after")
    def _check(self) -> "TargetProfile":
        missing = [p for p in self.precisions if p not in self.tolerances]
        if missing:
            raise ValueError(f"tolerances missing for allowed precision(s) {missing}")
        if any(t < 1 for t in self.threads) or any(b < 1 for b in self.batch_sizes):
            raise ValueError("threads and batch_sizes must be >= 1")
        bad = [x for x in self.pruning.sparsities if not 0 < x < 1] + [k for k in self.clustering.clusters if k < 2]
        if bad:
            raise ValueError(f"pruning.sparsities must be in (0, 1) and clustering.clusters >= 2 (received {bad})")
        for section in ("pruning", "clustering"):
            extra = [p for p in getattr(self, section).precisions or [] if p not in self.precisions]
            if extra:
                raise ValueError(f"{section}.precisions {extra} are not in precisions {list(self.precisions)}")
        from kdeploy.errors import UsageError
        from kdeploy.scan import check_package_names

        try:
            check_package_names(self.trusted_packages)
        except UsageError as e:
            raise ValueError(str(e)) from None
        return self


def builtin_dirs() -> list[Path]:
    pkg = Path(__file__).resolve().parent
    return [d for d in (pkg / "_builtin_profiles", pkg.parent / "profiles") if d.is_dir()]


def builtin_names() -> list[str]:
    names: set[str] = set()
    for d in builtin_dirs():
        names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_profile_file(path: str | Path) -> TargetProfile:
    """Reads and validates one profile file.

    Raises:
        ProfileError: unreadable file, bad TOML, unknown key or invalid value (names file and key).
    """
    path = Path(path)
    raw = read_toml(path, "profile", ProfileError,
                    f"profile file not found: {path} (allowed: a TOML file, see `kdeploy targets show NAME`)")
    try:
        return TargetProfile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        text = one_line(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"])
            msg = f"unknown key '{key}' (allowed: {', '.join(allowed)})"
        elif not key:  # a whole-profile check: the message names the keys, the input is the whole file
            msg = text
        else:
            received = repr(err.get("input"))
            received = received if len(received) <= 80 else received[:77] + "..."
            msg = f"key '{key}': {text} (received {received})"
        more = f" [+{e.error_count() - 1} more problem(s)]" if e.error_count() > 1 else ""
        raise ProfileError(f"invalid profile {path}: {msg}{more}") from None
    except (TypeError, ValueError, KeyError) as e:  # a validator that failed outside pydantic's wrapping
        raise ProfileError(f"invalid profile {path}: {type(e).__name__}: {one_line(e)}") from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = TargetProfile
    for part in loc[:-1]:
        if part == "budgets":
            model = Budgets
        elif part == "timing":
            model = Timing
        elif part == "robustness":
            model = Robustness
        elif part == "device":
            model = Device
        elif part == "pruning":
            model = Pruning
        elif part == "clustering":
            model = Clustering
        elif part == "finetune":
            model = FineTune
        elif part == "selective":
            model = Selective
        elif part == "qat":
            model = Qat
        elif part == "calibration":
            model = Calibration
        elif part == "consistency":
            model = Consistency
        elif part in ("tolerances", "tolerance") or part in PRECISIONS:
            model = Tolerance
    return sorted(model.model_fields)


def resolve_profile(target: str | None = None, profile_file: str | Path | None = None) -> TargetProfile:
    """Returns the profile for `--target NAME` or `--profile FILE` (exactly one of them).

    Raises:
        ProfileError: both or neither given, unknown target name, or an invalid file.
    """
    if (target is None) == (profile_file is None):
        raise ProfileError(
            "give exactly one of --target NAME or --profile FILE "
            f"(received target={target!r}, profile={profile_file!r}); built-in targets: {', '.join(builtin_names())}"
        )
    if profile_file is not None:
        return load_profile_file(profile_file)
    for d in builtin_dirs():
        p = d / f"{target}.toml"
        if p.is_file():
            return load_profile_file(p)
    raise ProfileError(f"unknown target '{target}'; allowed: {', '.join(builtin_names())} (or --profile FILE)")
