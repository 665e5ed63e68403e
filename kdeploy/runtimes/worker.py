"""Runs one artifact on one runtime in a child process: outputs, latency, memory.

`python -m kdeploy.runtimes.worker JOB.json` reads the job, writes `outputs.npz` (and
`probes.npz` for robustness probes) and `result.json` beside it, and never imports TensorFlow.
The parent survives a crash or hang of a runtime (see `run_isolated`).

Memory is measured honestly for one process: the runtime's framework and the inputs are loaded
first, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`), and the peak of load +
one batch-1 inference is read before the larger fidelity batches run. Timing runs after that,
one fresh runner per thread count.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kdeploy.child import ChildFailure, child_main, run_child
from kdeploy.runtimes.jobs import InterleaveJob, Job, RunJob, job_from_dict, job_to_dict


def _status_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Resets VmHWM (peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 64


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run_job(job: RunJob) -> dict:
    """Loads the artifact on its runtime, runs the fidelity inputs and probes, times it (see RunJob)."""
    from kdeploy.profiling import measure, summarize
    from kdeploy.runtimes import runner_for

    artifact = SimpleNamespace(path=Path(job.artifact_path), io=job.io)
    feeds = _load_npz(job.feeds_path)
    probes: dict[str, dict[str, np.ndarray]] = {}
    if job.probes_path:
        for key, arr in _load_npz(job.probes_path).items():
            probe, _, name = key.partition("/")
            probes.setdefault(probe, {})[name] = arr
    result: dict = {"latency": [], "memory": {}}
    runner = runner_for(job.runtime, artifact, threads=job.fidelity_threads)
    framework = runner.framework
    for module in [framework] if isinstance(framework, str) else framework:
        importlib.import_module(module)  # the framework's import is not the model's memory
    reset = _reset_peak()
    rss_base = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    t0 = time.perf_counter()
    with runner:
        load_ms = (time.perf_counter() - t0) * 1e3
        rss_loaded = _status_kb("VmRSS")
        one = {k: v[:1] for k, v in feeds.items()}
        t1 = time.perf_counter()
        runner.infer(one)
        first_ms = (time.perf_counter() - t1) * 1e3
        peak = _status_kb("VmHWM")
        arena = runner.arena_bytes()
        if job.fidelity:
            outputs = runner.infer_batched(feeds, batch_size=job.fidelity_batch)
            np.savez(job.outputs_path, *outputs)
        probe_out = {}
        for probe, pfeeds in probes.items():
            for i, y in enumerate(runner.infer_batched(pfeeds, batch_size=job.fidelity_batch)):
                probe_out[f"{probe}/{i}"] = y
        if probe_out:
            np.savez(job.outputs_path.replace("outputs.npz", "probes.npz"), **probe_out)
    memory = {
        "baseline_rss_mb": rss_base / 1024,
        "peak_rss_mb": peak / 1024,
        "load_mb": max(0, rss_loaded - rss_base) / 1024,
        "load_and_infer_mb": max(0, peak - (rss_base if reset else min(rss_base, hwm_before))) / 1024,
    }
    if arena is not None:
        memory["arena_bytes"] = float(arena)
    result["memory"] = memory
    result["peak_reset"] = reset  # False: peak may include import-time memory (kernel refused the reset)
    result["cold"] = {"load_ms": load_ms, "first_inference_ms": first_ms}
    n = len(next(iter(feeds.values())))
    max_threads = runner.max_threads
    for threads in job.threads:
        if max_threads is not None and threads > max_threads:
            continue  # a single-threaded runtime: more threads would time the same thing again
        for batch in job.batch_sizes:
            if batch > n:
                continue
            fb = {k: v[:batch] for k, v in feeds.items()}
            with runner_for(job.runtime, artifact, threads=threads) as timed:
                times, warmup = measure(timed, fb, **job.timing)
            stats = summarize(times)
            result["latency"].append({
                "runtime": job.runtime, "threads": threads, "batch": batch, **stats,
                "samples": len(times), "warmup": warmup,
                "throughput_items_s": batch * 1e3 / stats["mean_ms"] if stats["mean_ms"] > 0 else None,
            })
    return result


def run_interleaved(job: InterleaveJob) -> dict:
    """Times several artifacts of one runtime round-robin in this process.

    Close contenders timed one after the other can swap places when the host's load changes
    between them; timed in alternating rounds, every one sees the same conditions (`timing`: kwargs of
    `measure`, for each entry's total). Each artifact's first load
    and first batch-1 inference are its cold figures (`cold`: name -> load_ms, first_inference_ms).
    An entry more than OUTLIER_FACTOR times slower than the fastest after the first round is timed
    no further (its `samples` show it), nor is one marked `first_round_only` (a candidate that already
    failed: its figures are for the report); a budget verdict near its limit is re-measured anyway.
    """
    import contextlib
    import math

    from kdeploy.profiling import measure, summarize
    from kdeploy.runtimes import runner_for

    feeds = _load_npz(job.feeds_path)
    rounds = max(1, int(job.rounds))
    t = job.timing
    per_round = {"min_iters": max(1, math.ceil(t["min_iters"] / rounds)), "min_seconds": t["min_seconds"] / rounds,
                 "max_iters": max(1, t["max_iters"] // rounds), "max_seconds": t["max_seconds"] / rounds}
    times: dict[str, list[float]] = {e.key: [] for e in job.entries}
    cold: dict[str, dict[str, float]] = {}
    one = {k: v[:1] for k, v in feeds.items()}
    with contextlib.ExitStack() as stack:
        loaded = []
        for e in job.entries:
            art = SimpleNamespace(path=Path(e.artifact_path), io=e.io)
            t0 = time.perf_counter()
            runner = stack.enter_context(runner_for(job.runtime, art, threads=e.threads))
            load_ms = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            runner.infer(one)
            first_ms = (time.perf_counter() - t1) * 1e3
            cold.setdefault(e.name, {"load_ms": load_ms, "first_inference_ms": first_ms})
            loaded.append((e, runner, {k: v[: e.batch] for k, v in feeds.items()}))
        dropped: set[str] = set()
        for r in range(rounds):
            order = loaded if r % 2 == 0 else loaded[::-1]  # alternate so no entry always follows the same one
            for e, runner, fb in order:
                if e.key in dropped:
                    continue
                got, _ = measure(runner, fb, warmup=t["warmup"] if r == 0 else 1, min_samples=2, **per_round)
                times[e.key] += got
            if r == 0:
                dropped = _outliers(loaded, times) | {e.key for e, _, _ in loaded if e.first_round_only}
    rows = []
    for e in job.entries:
        stats = summarize(times[e.key])
        rows.append({"key": e.key, "runtime": job.runtime, "threads": e.threads, "batch": e.batch, **stats,
                     "samples": len(times[e.key]), "warmup": t["warmup"],
                     "throughput_items_s": e.batch * 1e3 / stats["mean_ms"] if stats["mean_ms"] > 0 else None})
    return {"latency": rows, "memory": {}, "cold": cold}


# After the first round, an entry slower than this many times the fastest entry of its batch
# size (and slower by at least OUTLIER_MIN_MS: below that, timing it fully costs nothing and a
# 2-sample median of a microsecond call is noise) is not a contender: it keeps its first-round
# samples and skips the other rounds.
OUTLIER_FACTOR = 5.0
OUTLIER_MIN_MS = 1.0


def _outliers(loaded: list, times: dict[str, list[float]]) -> set[str]:
    best: dict[int, float] = {}
    for e, _, _ in loaded:
        best[e.batch] = min(best.get(e.batch, float("inf")), float(np.median(times[e.key])))
    return {e.key for e, _, _ in loaded
            if np.median(times[e.key]) > max(OUTLIER_FACTOR * best[e.batch], best[e.batch] + OUTLIER_MIN_MS)}


class RuntimeFailure(Exception):
    """The runtime crashed, hung or raised; the message says which and how."""


def run_isolated(job: Job | dict, job_dir: Path, timeout_s: float = 600.0, nice: int = 0,
                 on_start=None) -> tuple[list[np.ndarray], dict]:
    """Runs `job` in a child process (`kdeploy.child.run_child`, whose `nice` and `on_start` these are).

    Returns:
        (outputs in model order ([] when the job skipped fidelity), result dict with latency,
        memory and cold figures, and `probes`: probe -> outputs in model order).

    Raises:
        RuntimeFailure: the child crashed (signal), timed out, or reported an exception.
    """
    job = job_from_dict(job) if isinstance(job, dict) else job
    job_dir.mkdir(parents=True, exist_ok=True)
    job.outputs_path = str(job_dir / "outputs.npz")
    for stale in ("outputs.npz", "probes.npz"):
        (job_dir / stale).unlink(missing_ok=True)
    subject = Path(job.artifact_path).name if isinstance(job, RunJob) else None
    try:
        result = run_child("kdeploy.runtimes.worker", job_to_dict(job), job_dir, timeout_s=timeout_s,
                           what=job.runtime, subject=subject, nice=nice, on_start=on_start)
    except ChildFailure as e:
        raise RuntimeFailure(str(e)) from None
    outputs: list[np.ndarray] = []
    if Path(job.outputs_path).is_file():
        with np.load(job.outputs_path) as z:
            outputs = [z[f"arr_{i}"] for i in range(len(z.files))]
    result["probes"] = {}
    probes_file = job_dir / "probes.npz"
    if probes_file.is_file():
        raw = _load_npz(str(probes_file))
        for key in sorted(raw, key=lambda k: (k.partition("/")[0], int(k.partition("/")[2]))):
            result["probes"].setdefault(key.partition("/")[0], []).append(raw[key])
    return outputs, result


def _test_fault(job: RunJob) -> None:
    """Test-only fault injection, so the tests can prove crash isolation on a real child process.

    Honoured only while pytest runs a test (PYTEST_CURRENT_TEST is set) and
    KDEPLOY_TEST_WORKER_FAULT lists `KIND:RUNTIME:ARTIFACT_FILE_NAME` entries, comma-separated,
    KIND being `segv` (the child kills itself with SIGSEGV) or `hang` (it sleeps past any timeout).
    """
    spec = os.environ.get("KDEPLOY_TEST_WORKER_FAULT")
    if not spec or "PYTEST_CURRENT_TEST" not in os.environ:
        return
    for entry in spec.split(","):
        kind, _, rest = entry.partition(":")
        runtime, _, name = rest.partition(":")
        if runtime == job.runtime and name == Path(job.artifact_path).name:
            if kind == "segv":
                import signal

                os.kill(os.getpid(), signal.SIGSEGV)
            elif kind == "hang":
                time.sleep(3600)


def _run(d: dict) -> dict:
    job = job_from_dict(d)
    if isinstance(job, RunJob):
        _test_fault(job)
        return run_job(job)
    return run_interleaved(job)


if __name__ == "__main__":
    child_main(sys.argv[1:], _run)
