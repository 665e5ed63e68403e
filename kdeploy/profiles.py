"""Target profiles: which runtimes and precisions a target allows, its budgets and tolerances.

Profiles are TOML files validated with pydantic; unknown keys are errors that name the file
and the key. Built-in profiles live in the repository's `profiles/` folder (shipped inside the
wheel as `kdeploy/_builtin_profiles`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdeploy.errors import ProfileError

Runtime = Literal["litert", "onnxruntime", "tflm"]
Precision = Literal["fp32", "dynamic", "fp16", "int8", "int16x8"]
PRECISIONS: tuple[str, ...] = ("fp32", "dynamic", "fp16", "int8", "int16x8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(_Strict):
    """How close a candidate's outputs must be to the reference. Unset criteria are not checked."""

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
    min_top1: float | None = Field(None, ge=0, le=1, description="Minimum top-1 agreement, classifier outputs only.")


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


class Timing(_Strict):
    """How latency is measured (in a child process per runtime)."""

    warmup: int = Field(5, ge=0, le=10000, description="Untimed runs before timing starts.")
    min_iters: int = Field(50, ge=1, le=100000, description="Timed runs at least.")
    min_seconds: float = Field(0.5, ge=0, le=600, description="Time spent timing at least, seconds.")
    max_iters: int = Field(2000, ge=1, le=1000000, description="Timed runs at most.")
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
    samples: int = Field(32, ge=1, le=10000, description="Validation samples perturbed by the noise and shift probes.")
    noise_std: float = Field(0.1, ge=0, description="Gaussian noise std, as a fraction of each input's std over the data.")
    shift: float = Field(0.25, description="Shift probe: add this many standard deviations of the input...")
    scale: float = Field(1.25, gt=0, description="...after multiplying the input by this factor.")
    min_top1: float | None = Field(
        None, ge=0, le=1, description="Required top-1 agreement with Keras on each probe (classifier outputs); a check."
    )
    min_cosine_mean: float | None = Field(
        None, ge=-1, le=1, description="Required mean cosine similarity with Keras on each probe; a check."
    )


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


class TargetProfile(_Strict):
    """A deployment target. See profiles/*.toml for the built-in ones."""

    name: str = Field(description="Profile name, used with --target.")
    description: str = Field("", description="One line for `kdeploy targets`.")
    runtimes: list[Runtime] = Field(
        min_length=1, description="Runtimes the artifact is deployed on; a candidate must run and agree on each."
    )
    crosscheck_runtimes: list[Runtime] = Field(
        default_factory=list,
        description="Extra runtimes run where an artifact for them exists; their verdicts gate too.",
    )
    precisions: list[Precision] = Field(min_length=1, description="Post-training precisions this target allows.")
    onnx_quantization: bool = Field(False, description="Also try onnxruntime dynamic int8 quantization of the ONNX model.")
    threads: list[int] = Field([1], min_length=1, description="Thread counts to measure latency with.")
    batch_sizes: list[int] = Field([1], min_length=1, description="Batch sizes to measure latency with.")
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
    budgets: Budgets = Field(default_factory=Budgets)
    timing: Timing = Field(default_factory=Timing)
    robustness: Robustness = Field(default_factory=Robustness)
    device: Device | None = Field(None, description="The real target's peak figures, for an analytic latency estimate.")
    tolerances: dict[Precision, Tolerance] = Field(description="Fidelity tolerance per precision.")

    @model_validator(mode="after")
    def _check(self) -> "TargetProfile":
        missing = [p for p in self.precisions if p not in self.tolerances]
        if missing:
            raise ValueError(f"tolerances missing for allowed precision(s) {missing}")
        if any(t < 1 for t in self.threads) or any(b < 1 for b in self.batch_sizes):
            raise ValueError("threads and batch_sizes must be >= 1")
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
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {path} is not valid TOML: {e}") from None
    try:
        return TargetProfile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"])
            msg = f"unknown key '{key}' (allowed: {', '.join(allowed)})"
        else:
            msg = f"key '{key}': {err['msg']} (received {err.get('input')!r})"
        more = f" [+{e.error_count() - 1} more problem(s)]" if e.error_count() > 1 else ""
        raise ProfileError(f"invalid profile {path}: {msg}{more}") from None


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
        elif part == "tolerances" or part in PRECISIONS:
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
