"""Worker jobs: what the parent asks a runtime child process to do, with the keys defined once.

The parent builds these, `run_isolated` writes them as JSON, the worker reads them back with
`job_from_dict`. Paths are strings (JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunJob:
    """Run one artifact: fidelity outputs on the validation inputs, memory, probes, optional timing."""

    runtime: str
    artifact_path: str
    io: dict
    feeds_path: str
    fidelity: bool = True  # False: timing only (a re-measure, or the one-by-one timing fallback)
    fidelity_threads: int = 1
    fidelity_batch: int = 64
    probes_path: str | None = None  # npz keyed `probe/input`
    threads: list[int] = field(default_factory=list)  # timing: thread counts
    batch_sizes: list[int] = field(default_factory=list)  # timing: batch sizes
    timing: dict[str, Any] = field(default_factory=dict)  # kwargs of `profiling.measure`
    outputs_path: str = ""  # set by run_isolated
    mode: str = "run"


@dataclass
class TimingEntry:
    """One (artifact, thread count, batch size) of a round-robin timing job."""

    key: str
    name: str
    artifact_path: str
    io: dict
    threads: int
    batch: int
    first_round_only: bool = False  # a candidate already failed: timed for the report, not for a selection


@dataclass
class InterleaveJob:
    """Time several artifacts of one runtime round-robin in one process."""

    runtime: str
    feeds_path: str
    entries: list[TimingEntry]
    rounds: int
    timing: dict[str, Any]
    outputs_path: str = ""
    mode: str = "interleave"


Job = RunJob | InterleaveJob


def job_to_dict(job: Job) -> dict:
    return asdict(job)


def job_from_dict(d: dict) -> Job:
    if d.get("mode") == "interleave":
        return InterleaveJob(**{**d, "entries": [TimingEntry(**e) for e in d["entries"]]})
    return RunJob(**d)
