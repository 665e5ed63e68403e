"""Runs one artifact on one runtime in a child process: outputs, latency, memory.

`python -m kdeploy.runtimes.worker JOB.json` reads the job, writes `outputs.npz` and
`result.json` beside it, and never imports TensorFlow. The parent survives a crash or hang of a
runtime (see `run_isolated`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _status_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_job(job: dict) -> dict:
    from kdeploy.profiling import measure, summarize
    from kdeploy.runtimes import runner_for

    artifact = SimpleNamespace(path=Path(job["artifact_path"]), io=job["io"])
    with np.load(job["feeds_path"]) as z:
        feeds = {k: z[k] for k in z.files}
    result: dict = {"latency": [], "memory": {}}
    rss_base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    with runner_for(job["runtime"], artifact, threads=job["fidelity_threads"]) as runner:
        load_ms = (time.perf_counter() - t0) * 1e3
        one = {k: v[:1] for k, v in feeds.items()}
        t1 = time.perf_counter()
        runner.infer(one)
        first_ms = (time.perf_counter() - t1) * 1e3
        outputs = runner.infer_batched(feeds, batch_size=job.get("fidelity_batch", 64))
    result["memory"] = {
        "baseline_rss_mb": rss_base / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "load_and_infer_mb": max(0, _status_kb("VmHWM") - rss_base) / 1024,
    }
    result["cold"] = {"load_ms": load_ms, "first_inference_ms": first_ms}
    np.savez(job["outputs_path"], *outputs)
    n = len(next(iter(feeds.values())))
    for threads in job.get("threads", []):
        for batch in job.get("batch_sizes", []):
            if batch > n:
                continue
            fb = {k: v[:batch] for k, v in feeds.items()}
            with runner_for(job["runtime"], artifact, threads=threads) as runner:
                times, warmup = measure(runner, fb, **job.get("timing", {}))
            stats = summarize(times)
            result["latency"].append({
                "runtime": job["runtime"], "threads": threads, "batch": batch, **stats,
                "samples": len(times), "warmup": warmup,
                "throughput_items_s": batch * 1e3 / stats["mean_ms"] if stats["mean_ms"] > 0 else None,
            })
    return result


class RuntimeFailure(Exception):
    """The runtime crashed, hung or raised; the message says which and how."""


def run_isolated(job: dict, job_dir: Path, timeout_s: float = 600.0) -> tuple[list[np.ndarray], dict]:
    """Runs `job` in a child process.

    Returns:
        (outputs in model order, result dict with latency/memory/cold figures).

    Raises:
        RuntimeFailure: the child crashed (signal), timed out, or reported an exception.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    job = dict(job, outputs_path=str(job_dir / "outputs.npz"))
    job_file = job_dir / "job.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([sys.executable, "-m", "kdeploy.runtimes.worker", str(job_file)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{job['runtime']} did not finish within {timeout_s:.0f} s (killed)") from None
    result_file = job_dir / "result.json"
    if proc.returncode < 0:
        raise RuntimeFailure(f"{job['runtime']} crashed with signal {-proc.returncode}")
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise RuntimeFailure(f"{job['runtime']} failed (exit {proc.returncode}): {tail[-1] if tail else 'no output'}")
    result = json.loads(result_file.read_text())
    if "error" in result:
        raise RuntimeFailure(f"{job['runtime']} raised {result['error']}")
    with np.load(job["outputs_path"]) as z:
        outputs = [z[f"arr_{i}"] for i in range(len(z.files))]
    return outputs, result


def main(argv: list[str]) -> int:
    job_file = Path(argv[0])
    job = json.loads(job_file.read_text())
    try:
        result = run_job(job)
    except Exception as e:  # reported to the parent as data, not a traceback on its console
        result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
    (job_file.parent / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
