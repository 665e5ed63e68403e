"""What one run knows and passes between stages: options, the run context, builds."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdeploy.artifacts import Artifact
from kdeploy.data import Dataset
from kdeploy.loading import LoadedModel
from kdeploy.profiles import TargetProfile, Tolerance
from kdeploy.recipes import Recipe
from kdeploy.report.model import Finding, Inspection

Progress = Callable[[str, str], None]


def no_progress(stage: str, detail: str = "") -> None:
    pass


@dataclass
class RunOptions:
    """What the user asked for: the model, the target, the data and how to run (from the CLI or API)."""

    model: str | Path
    target: str | None = None
    profile: str | Path | None = None
    data: str | Path | None = None
    out: str | Path | None = None
    formats: Sequence[str] = ("json", "md")
    seed: int = 0
    trust_custom_code: bool = False
    custom_objects: str | Path | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    progress: Progress | None = None
    command: list[str] | None = None
    trusted_packages: Sequence[str] = ()  # besides keras_hub and the profile's trusted_packages (--trust-package)
    cache: bool = True  # reuse and store results in the result cache (`kdeploy.cache`)
    retime: bool = False  # on a cache hit, measure latency again (artifacts and fidelity from the cache)
    max_memory_mb: float | None = None  # the whole process tree's resident memory limit (`kdeploy.memory`)
    parallel: bool | None = None  # the conversion lane: None decides by host and model (`run.convert.ConversionLane`)


@dataclass
class Build:
    """A candidate before evaluation: its recipe and the artifacts it produced."""

    name: str
    precision: str
    recipe: dict[str, Any]  # as the report states it
    artifacts: list[Artifact] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tolerance: Tolerance | None = None  # a recipe's own tolerance vs Keras (pruning/clustering); else by precision
    optimization: dict[str, Any] | None = None  # what pruning/clustering did, measured (Candidate.optimization)
    spec: Recipe | None = None  # None for artifacts given to `check`


@dataclass
class Built:
    """What the build stage hands to evaluation."""

    builds: list[Build]
    reference_artifacts: list[dict]
    inspection: Inspection | None = None  # op compatibility and hazards, from the model the recipes convert


@dataclass
class Context:
    """What one run knows: the model, target, data split, reference outputs and where to write.

    `model.inputs` already carry the profile's static batch (set once, in `prepare`).
    """

    model: LoadedModel
    profile: TargetProfile
    data: Dataset
    calibration: Dataset
    validation: Dataset
    take_reference: Callable[[Context], list[np.ndarray]]  # Keras' outputs on `validation` (`reference` calls it once)
    staging: Path
    work: Path
    seed: int
    progress: Progress
    host: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    layer_dumps: dict[str, Any] = field(default_factory=dict)  # .tflite sha256 -> its per-layer tensors' file (run/diagnose)
    layer_errors: dict[tuple, Any] = field(default_factory=dict)  # (float sha256, sha256, precision, tolerance) -> LayerErrors
    layer_jobs: int = 0  # tensor dumps run so far (each in a job folder of its own)
    dump_lock: threading.Lock = field(default_factory=threading.Lock)  # one tensor dump at a time (run/diagnose)
    layer_samples: int | None = None  # samples those tensors are taken on, fixed by the first dump (run/diagnose)
    probes: tuple | None = None  # robustness probe inputs and Keras outputs, made once (run/probes)
    parallel: bool | None = None  # RunOptions.parallel
    spare: Dataset | None = None  # held back from validation for the calibration repair (data.hold_back), or None
    repair: dict[str, Any] | None = None  # the int8 repair ladder's record (run/ladder), the report's `repair`
    lane: Any = None  # the conversion lane started before the model loaded (`ConversionLane.early`; run/build takes it)
    lane_busy: Callable[[], bool] = lambda: False  # whether the conversion lane's child still works (run/build)
    searching: bool = False  # the selective search's tries run (their quantizer in this process, their runtime runs)
    # evaluation's runs made ahead of it: (artifact path, sha256, runtime) -> (outputs, result) or the RuntimeFailure
    # (run/evaluate.RunsAhead, and full int8's judge run)
    prefetched: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    # stops the runs made ahead, `kill=True` ending the one in progress (run/build starts them; evaluate stops them)
    stop_ahead: Callable[..., None] = lambda **_: None
    # hands a build made after them (a repair's candidate) to the runs made ahead, its artifacts run as they come
    run_ahead: Callable[[Build], None] = lambda b: None
    _reference: list[np.ndarray] | None = field(default=None, init=False, repr=False)
    _reference_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def reference(self) -> list[np.ndarray]:
        """Keras' outputs on the validation inputs, taken on first use: `run.build` takes them right after
        exporting the SavedModel, so the conversion lane converts while they are computed.

        Raises:
            UsageError: the Keras model fails on these inputs (exit 2).
        """
        with self._reference_lock:
            if self._reference is None:
                self._reference = self.take_reference(self)
            return self._reference

    def reuse_runs(self, src: Artifact, dst: Artifact) -> None:
        """`dst` holds `src`'s bytes (an `Artifact` copied or moved): the runs made of `src` stand for it."""
        if src.sha256 is None or src.sha256 != dst.sha256:
            return
        for runtime in self.wanted_runtimes:
            got = self.prefetched.get(run_key(src, runtime))
            if got is not None:
                self.prefetched.setdefault(run_key(dst, runtime), got)

    def tolerance(self, b: Build, precision: str) -> Tolerance:
        """The tolerance `b`'s artifacts of `precision` are held to: the recipe's own, else the profile's for it."""
        return b.tolerance or self.profile.tolerances[precision]

    def finding(self, severity: str, code: str, message: str) -> None:
        self.findings.append(Finding(severity=severity, code=code, message=message))

    @property
    def wanted_runtimes(self) -> list[str]:
        """Deployed runtimes first, then cross-checks, each once."""
        return wanted_runtimes(self.profile)


def wanted_runtimes(prof: TargetProfile) -> list[str]:
    """The profile's deployed runtimes first, then its cross-checks, each once (`Context.wanted_runtimes`)."""
    return list(dict.fromkeys([*prof.runtimes, *prof.crosscheck_runtimes]))


def run_key(a: Artifact, runtime: str) -> tuple[str, str | None, str]:
    """`Context.prefetched`'s key: a run of `a` (its path and bytes) on `runtime`."""
    return str(a.path), a.sha256, runtime
