"""Resident memory of a whole process tree, and a guard that stops a run above a limit.

`tree_memory_mb` sums the memory of this process and all its descendants (from /proc, Linux;
proportional set size, so a shared library mapped by two processes counts once): about the
figure a CI runner's memory limit or the kernel's OOM killer sees, not the largest process
alone. `MemoryGuard` samples it in a thread; above the limit it kills the child processes at
once (their jobs fail) and the run stops at its next stage boundary with `MemoryLimitError`
(exit 3, with the figure), instead of the OOM killer ending it without a word.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from kdeploy.errors import MemoryLimitError

SAMPLE_S = 0.1


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every descendant process of `pid` (children first)."""
    found, todo = [], _children(pid)
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo += _children(p)
    return found


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# In the fork server's command line (`python -m kdeploy.forkserver FD`): its children share it and are jobs
FORK_SERVER_ARG = b"\0kdeploy.forkserver\0"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def tree_memory_mb(pid: int | None = None, measure: str = "pss") -> float:
    """Memory of `pid` (default: this process) and all its descendants, in MiB (0 where /proc is missing).

    Args:
        measure: "pss" (proportional set size: a page shared by several processes of the tree,
            e.g. the same shared library, is counted once overall; falls back to RSS where the
            kernel has no smaps_rollup) or "rss" (the sum of every process's VmRSS; shared pages
            counted once per process).

    A child that has not exec'd yet (same command line as its parent: the moment between fork
    and exec, when it still shows the parent's memory) is not counted; a child of the fork server
    (`kdeploy.forkserver`: it runs its job without exec'ing) is.
    """
    pid = os.getpid() if pid is None else pid
    total, todo = 0, [(pid, None)]
    while todo:
        p, parent_cmd = todo.pop()
        cmd = _cmdline(p)
        if parent_cmd is not None and cmd == parent_cmd and FORK_SERVER_ARG not in cmd:
            continue
        kb = _pss_kb(p) if measure == "pss" else None
        total += kb if kb is not None else _status_kb(p, "VmRSS")
        todo += [(c, cmd) for c in _children(p)]
    return total / 1024


# One batch of inputs holds at most this many bytes where kdeploy runs a model on many samples
# (Keras reference outputs, fidelity and probe runs): activations grow with the batch, and at 64
# samples of 224x224x3 the runtimes' activations alone took about 1 GB per process here.
BATCH_INPUT_BYTES = 4 << 20


# Keras predict's batch for small inputs (the reference outputs, the probes'); bounded by memory: `batch_size_for`
REFERENCE_BATCH = 256


def batch_size_for(inputs: dict, cap: int) -> int:
    """Samples per batch so that one batch of `inputs` (name -> (N, ...) arrays) stays within BATCH_INPUT_BYTES.

    Args:
        cap: the most samples per batch (also when the inputs are tiny).
    """
    return _samples_within(sum(a[:1].nbytes for a in inputs.values()), BATCH_INPUT_BYTES, cap)


def _samples_within(per_sample_bytes: float, budget: int, cap: int) -> int:
    """Samples of `per_sample_bytes` each that fit in `budget` bytes; at most `cap`, at least 1."""
    return max(1, min(cap, int(budget // max(per_sample_bytes, 1))))


# Per-layer tensors (`kdeploy.debug.tensors`) keep every layer's output for every sample, so one dump
# keeps at most this many bytes of them, over the artifacts it holds: the profile's `selective.samples`
# (64) of MobileNetV2 at 224x224 held about 10 GB across the tensor dump child and the parent here;
# 256 MB per artifact (9 samples, 485 MB for the float reference and the candidate) made the dump child
# the run's largest after the parent (~620 MB), above the bare converter script's peak by itself.
LAYER_TENSOR_BYTES = 256 << 20
# Artifacts whose tensors a dump holds at once: a comparison's float reference and candidate.
DUMP_ARTIFACTS = 2


def layer_samples_for(per_sample_bytes: float, cap: int) -> int:
    """Samples whose per-layer tensors (`per_sample_bytes` per artifact) fit in LAYER_TENSOR_BYTES for the
    DUMP_ARTIFACTS artifacts of a dump; at most `cap`, at least 1."""
    return _samples_within(per_sample_bytes * DUMP_ARTIFACTS, LAYER_TENSOR_BYTES, cap)


def supported() -> bool:
    """True where the process tree can be read (/proc with task children lists)."""
    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


class MemoryGuard:
    """Samples this process tree's memory (`tree_memory_mb`) and enforces `limit_mb` (None: does nothing).

    Use as a context manager around a run and call `check()` at stage boundaries.
    """

    def __init__(self, limit_mb: float | None, interval_s: float = SAMPLE_S):
        self.limit_mb = limit_mb
        self.interval_s = interval_s
        self.exceeded_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryGuard":
        if self.limit_mb is None:
            return self
        if not supported():
            raise MemoryLimitError("--max-memory needs /proc (Linux) to read the memory of the process tree; "
                                   "not available on this system")
        self.sample()
        self._thread = threading.Thread(target=self._watch, name="kdeploy-memory-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self) -> float:
        """The tree's memory now: the RSS sum (cheap, never below PSS), and PSS only when that is above the limit."""
        now = tree_memory_mb(measure="rss")
        if self.limit_mb is not None and now > self.limit_mb:
            now = tree_memory_mb(measure="pss")  # ~0.1 s per GB mapped: only when the cheap figure says it may matter
        if self.limit_mb is not None and now > self.limit_mb and self.exceeded_mb is None:
            self.exceeded_mb = now
            for p in descendants(os.getpid()):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        return now

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def check(self, where: str = "") -> None:
        """Raises MemoryLimitError once the limit was exceeded (the children are already gone).

        Raises:
            MemoryLimitError: the process tree's resident memory went above the limit (exit 3).
        """
        if self.limit_mb is None:
            return
        if self.exceeded_mb is None:
            self.sample()
        if self.exceeded_mb is not None:
            raise MemoryLimitError(
                f"memory of the run (kdeploy and its child processes, PSS) reached {self.exceeded_mb:,.0f} MB, "
                f"above --max-memory {self.limit_mb:,.0f} MB" + (f", during '{where}'" if where else "")
                + "; stopped (child processes killed). Raise --max-memory or use a smaller model/profile")


# The conversion lane (`run.convert.ConversionLane`) runs by default only for models with this many
# bytes of fp32 weights. Below the floor its cost is its start: a second process importing
# TensorFlow took longer than all the conversions of the digits CNN (11.3-13.4 s with it against
# 10.2-10.4 s without, here). Above the ceiling, memory: the second TensorFlow process costs about 700 MB
# resident (430 MB of it shared libraries), and a converter in it beside the parent's doubles the
# converters' working memory, which grows with the graph as much as with the weights. Measured
# (RSS sum of the process tree, with / without the lane): MobileNetV2 (14 MB) 2.45 / 1.79 GB;
# MobileNetV3Large (22 MB) 2.35 GB with it; EfficientNetV2B0 (29 MB) 3.23 / 2.36 GB; DenseNet121
# (32 MB) 3.34 GB with it. The ceiling keeps every model of the zoo sweep under 3 GB.
LANE_MIN_WEIGHT_BYTES = 4 << 20
LANE_MAX_WEIGHT_BYTES = 16 << 20


def lane_fits(model) -> bool:
    """True when `model` (a LoadedModel) has the weights the conversion lane pays off for by default."""
    return model.params is not None and LANE_MIN_WEIGHT_BYTES <= model.params * 4 <= LANE_MAX_WEIGHT_BYTES


def lane_may_fit(path: str | Path) -> bool:
    """Before loading: whether a Keras model file's size (its weights, mostly) is near `lane_fits`' range (a
    quarter either side: the config, or float16 weights); `lane_fits` decides once the model is loaded."""
    from kdeploy.loading import H5_SUFFIXES, KERAS_SUFFIXES

    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (*KERAS_SUFFIXES, *H5_SUFFIXES):
        return False
    return LANE_MIN_WEIGHT_BYTES * 0.75 <= p.stat().st_size <= LANE_MAX_WEIGHT_BYTES * 1.25
