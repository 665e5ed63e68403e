"""The driver of `kdeploy batch`: every job of a manifest as a Ray task, results in one folder.

Ray runs locally (`ray.init` with `workers` CPUs) unless a cluster address is given. Each job is
a task declaring its `num_cpus`, with no retries; inside it a `kdeploy optimize` child process
does the work (`kdeploy.batch.task`). A job that crashes, times out or hits bad input ends with
its own exit code and message; the others go on. Results are staged beside `out` and moved into
place when every job has ended, so `out` never holds a half-written batch; an interrupt
(Ctrl-C, SIGTERM) cancels the running tasks (their children are stopped) and leaves `out` as it was.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from kdeploy.batch.manifest import Job, load_manifest
from kdeploy.batch.summary import BatchSummary, JobRow, job_row, outcome, worst_exit, write_summary
from kdeploy.errors import UsageError

Event = Callable[[str, str, dict[str, Any]], None]
INSTALL_HINT = "pip install 'kdeploy[batch]'"
DEFAULT_TIMEOUT_S = 3600.0
# Seconds cancelled tasks get to stop their child processes before Ray is shut down.
CANCEL_GRACE_S = 30.0
TIMING_NOTE = ("serialized: jobs on one host took turns timing their candidates (a host-wide lock held during "
               "the latency phase, recorded as a `timing-serialized` finding in each report); other jobs' "
               "conversions and fidelity runs may have run meanwhile, so the host was not otherwise idle")


def run_batch(
    manifest: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    address: str | None = None,
    formats: Sequence[str] = ("json", "md"),
    mlflow_uri: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_event: Event | None = None,
) -> BatchSummary:
    """Runs every job of a manifest as `kdeploy optimize` on Ray and writes the batch folder.

    Args:
        manifest: the batch manifest (TOML, see `kdeploy.batch.manifest`).
        out: the batch folder: `summary.json`, `summary.md`, `summary.junit.xml`, one report
            folder per job that reached a verdict (`<out>/<job>/`) and `logs/<job>.log`.
        workers: CPUs of the local Ray instance (default: all cores); not with `address`.
        address: a Ray cluster address (`ray://HOST:10001`, `HOST:6379` or `auto`); jobs then run
            wherever the cluster has CPUs. Paths in the manifest must be readable on its nodes.
        formats: report formats of each job (`--format` of `kdeploy optimize`).
        mlflow_uri: MLflow tracking and registry URI for `models:/` and `runs:/` jobs.
        timeout_s: a job running longer is stopped and fails with exit 3 (a manifest entry's
            `timeout_s` overrides it).
        on_event: progress callback `(kind, job name, data)`: kinds `queued`, `started`, `stage`
            (data: stage, detail) and `done` (data: row, the `JobRow` as a dict).

    Returns:
        The `BatchSummary` written to `out/summary.json`.

    Raises:
        UsageError: bad manifest, options or `out`, or Ray not installed (exit 2).
    """
    from kdeploy.report.model import check_out_dir, discard_staging, make_staging, publish
    from kdeploy.report.render import validate_formats

    notify = on_event or (lambda kind, name, data: None)
    jobs = load_manifest(manifest)
    validate_formats(formats)
    if workers is not None and address is not None:
        raise UsageError(f"--workers {workers} sizes a local Ray instance; with --address {address} the cluster's "
                         "CPUs decide; give one of them")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: allowed: a positive number of CPUs")
    if timeout_s <= 0:
        raise UsageError(f"--timeout {timeout_s:g}: allowed: a positive number of seconds")
    registry = [j for j in jobs if j.is_registry]
    if registry and not mlflow_uri:
        raise UsageError(f"job {registry[0].name} gates {registry[0].model}, which needs --mlflow-uri (or "
                         "$MLFLOW_TRACKING_URI)")
    out = Path(out)
    check_out_dir(out, marker="summary.json")
    ray = _import_ray()
    started = time.monotonic()
    staging = make_staging(out)
    try:
        (staging / "logs").mkdir()
        info = _init(ray, workers, address)
        try:
            rows = _run(ray, jobs, staging, list(formats), mlflow_uri, timeout_s, notify)
        finally:
            ray.shutdown()
        summary = BatchSummary(
            manifest=str(manifest), exit_code=worst_exit([r.exit_code for r in rows]),
            counts={k: sum(outcome(r.exit_code) == k for r in rows) for k in ("ready", "not_ready", "bad_input", "internal")},
            ray=info, timing={"mode": "serialized", "note": TIMING_NOTE}, formats=list(formats),
            duration_s=round(time.monotonic() - started, 2), jobs=rows)
        write_summary(summary, staging)
        publish(staging, out)
        return summary
    except BaseException:
        discard_staging(staging)
        raise


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"`kdeploy batch` runs on Ray, which is not installed; install it with {INSTALL_HINT}") from None
    return ray


def _init(ray, workers: int | None, address: str | None) -> dict[str, Any]:
    """Starts (or connects to) Ray without touching the caller's signal handlers; returns what it used."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, **quiet)
        else:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"--address {address}" if address else "a local Ray instance"
        raise UsageError(f"Ray could not start or reach {where}: {' '.join(str(e).split())[:300]}") from None
    finally:
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)
    return {"address": address or "local", "cpus": ray.cluster_resources().get("CPU"),
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]), "ray_version": ray.__version__}


def _run(ray, jobs: list[Job], staging: Path, formats: list[str], mlflow_uri: str | None, timeout_s: float,
         notify: Event) -> list[JobRow]:
    from ray.util.queue import Empty, Queue

    events = Queue(actor_options={"num_cpus": 0})
    remote = ray.remote(max_retries=0)(_task)
    refs = {}
    for job in jobs:
        spec = {"name": job.name, "args": _args(job, formats, mlflow_uri), "timeout_s": job.timeout_s or timeout_s,
                "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),  # Ray's 1 would differ from a single run
                        "CI": None, "GITHUB_STEP_SUMMARY": None}}  # progress lines on; the batch writes the summary
        refs[remote.options(num_cpus=job.num_cpus, name=f"kdeploy:{job.name}").remote(spec, events)] = job
        notify("queued", job.name, {"model": job.model_label, "target": job.target})
    rows: dict[str, JobRow] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            while True:
                try:
                    kind, name, data = events.get_nowait()
                except Empty:
                    break
                notify(kind, name, data)
            for ref in done:
                job = refs[ref]
                rows[job.name] = _collect(ray, ref, job, staging)
                notify("done", job.name, rows[job.name].model_dump(mode="json"))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in the task: it stops its child process group
        ray.wait(pending, num_returns=len(pending), timeout=CANCEL_GRACE_S)
        raise
    return [rows[j.name] for j in jobs]


def _task(spec: dict[str, Any], events) -> dict[str, Any]:
    """The Ray task: one job, progress forwarded to the driver through the `events` queue."""
    from kdeploy.batch.task import run_job

    def forward(name: str, stage: str, detail: str) -> None:
        events.put_nowait(("stage", name, {"stage": stage, "detail": detail}))

    events.put_nowait(("started", spec["name"], {"node": socket.gethostname(), "pid": os.getpid()}))
    return run_job(spec, forward)


def _args(job: Job, formats: list[str], mlflow_uri: str | None) -> list[str]:
    args = [*job.optimize_args(), "--format", ",".join(formats)]
    return args + ["--mlflow-uri", mlflow_uri] if job.is_registry else args


def _collect(ray, ref, job: Job, staging: Path) -> JobRow:
    """The row of a finished task; its report folder (if any) and log are unpacked into `staging`."""
    log_path = f"logs/{job.name}.log"
    try:
        res = ray.get(ref)
    except ray.exceptions.RayError as e:  # the worker died, the node was lost, the task was cancelled...
        msg = " ".join(str(e).split())[:300]
        (staging / log_path).write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
        return job_row(job, 3, f"the Ray task failed: {type(e).__name__}: {msg}", 0.0, None, None, None, log_path)
    (staging / log_path).write_text(res["log"], encoding="utf-8")
    report = None
    if res["files"] is not None:
        folder = staging / job.name
        folder.mkdir()
        with tarfile.open(fileobj=io.BytesIO(res["files"])) as tar:
            tar.extractall(folder, filter="data")
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return job_row(job, res["exit_code"], res["message"], res["duration_s"], res["node"], report,
                   f"{job.name}/report.json" if report is not None else None, log_path)
