"""Benchmark: `kdeploy batch` of the six fixtures × (cpu-edge, mcu) + a corrupt model, against single runs.

Not a test (it takes minutes). Run from the repository root:

    .venv/bin/python bench/bench_batch.py [--workers 2] [--work DIR]

What it does:
1. writes two profiles: the built-in `cpu-edge` and `mcu` with quicker timing settings (a
   `[timing]` table appended: fewer iterations), so the run takes minutes, not a quarter hour;
2. writes a manifest: each fixture model with its data × both profiles (12 jobs), plus a
   truncated copy of `digits_cnn.keras` (1 job, expected to fail alone with exit 2);
3. runs `kdeploy batch MANIFEST --workers N` once, timed (wall clock, including Ray start-up);
4. runs each job again as a single `kdeploy optimize` with the same arguments
   (`Job.optimize_args`), one after the other, timed;
5. compares every job's batch report with its single run: exit code, verdict, selection, and per
   candidate its verdict and every artifact's format, size and sha256; the corrupt row must say
   exit 2 and every other job must have its own verdict.

Prints one line per job, the wall time of the batch against the sum of the single runs, and
exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MODELS = [("digits_cnn.keras", "digits.npz"), ("cancer_mlp.keras", "cancer.npz"), ("diabetes_reg.keras", "diabetes.npz"),
          ("digits_gru.keras", "digits_seq.npz"), ("multi_io.keras", "multi_io.npz"), ("iris_legacy.h5", "iris.npz")]
QUICK_TIMING = "\n[timing]\nwarmup = 2\nmin_iters = 20\nmin_seconds = 0.05\nmax_iters = 200\nmax_seconds = 0.5\n"


def kdeploy(*args: str, cache_dir: Path) -> tuple[int, float, str]:
    # Each side gets an empty result cache of its own: the single runs must compute, not replay the batch's.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CI="true", KDEPLOY_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "kdeploy", *args], capture_output=True, text=True, env=env)
    return res.returncode, time.perf_counter() - started, res.stderr


def write_inputs(work: Path) -> Path:
    profiles = []
    for name in ("cpu-edge", "mcu"):
        p = work / f"{name}-quick.toml"
        p.write_text((ROOT / "profiles" / f"{name}.toml").read_text() + QUICK_TIMING)
        profiles.append(p.name)
    corrupt = work / "corrupt_cnn.keras"
    corrupt.write_bytes((FIXTURES / "digits_cnn.keras").read_bytes()[:3000])
    lines = []
    for model, data in MODELS:
        lines += ["[[jobs]]", f'model = "{FIXTURES / model}"', f'data = "{FIXTURES / data}"', f"profiles = {profiles}", ""]
    lines += ["[[jobs]]", f'model = "{corrupt.name}"', f"profiles = {profiles[:1]}", ""]
    manifest = work / "batch.toml"
    manifest.write_text("\n".join(lines).replace("'", '"'))
    return manifest


def essentials(report: dict) -> dict:
    """What must be equal between a batch job and its single run (latency figures may differ)."""
    return {"ready": report["ready"], "selected": report["selected"],
            "candidates": {c["name"]: {"passed": c["passed"],
                                       "artifacts": sorted((a["format"], a["path"], a["size_bytes"], a["sha256"])
                                                           for a in c["artifacts"])}
                           for c in report["candidates"]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the inputs and outputs (default: a temp folder).")
    ap.add_argument("--reuse-batch", action="store_true",
                    help="Keep the batch folder already in --work (its summary's duration_s is the batch time) and "
                         "only run the single runs.")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdeploy-bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_inputs(work)
    sys.path.insert(0, str(ROOT))
    from kdeploy.batch.manifest import load_manifest

    jobs = load_manifest(manifest)
    print(f"{len(jobs)} jobs, manifest {manifest}, {os.cpu_count()} cores, --workers {args.workers}")
    if args.reuse_batch:
        summary = json.loads((work / "batch" / "summary.json").read_text())
        batch_wall = summary["duration_s"]
        print(f"batch: reused {work / 'batch'}, exit {summary['exit_code']}, {batch_wall:.1f} s (summary duration_s)")
    else:
        code, batch_wall, err = kdeploy("batch", str(manifest), "--out", str(work / "batch"), "--workers",
                                        str(args.workers), cache_dir=work / "cache-batch")
        print(f"batch: exit {code}, {batch_wall:.1f} s wall")
        summary = json.loads((work / "batch" / "summary.json").read_text())
    (work / "single").mkdir(exist_ok=True)
    rows = {r["name"]: r for r in summary["jobs"]}
    problems, singles = [], 0.0
    for job in jobs:
        out = work / "single" / job.name
        scode, wall, serr = kdeploy("optimize", *job.optimize_args(), "--out", str(out), cache_dir=work / "cache-single")
        singles += wall
        row = rows[job.name]
        same = row["exit_code"] == scode
        if scode in (0, 1):
            a = essentials(json.loads((work / "batch" / job.name / "report.json").read_text()))
            b = essentials(json.loads((out / "report.json").read_text()))
            same = same and a == b
        else:
            same = same and not (work / "batch" / job.name).exists()
        if not same:
            problems.append(f"{job.name}: batch exit {row['exit_code']} vs single {scode} ({serr.strip()[-200:]}), "
                            "or reports differ")
        print(f"  {job.name:28s} batch exit {row['exit_code']} ({row['duration_s']:5.1f} s)  single exit {scode} "
              f"({wall:5.1f} s)  {'same' if same else 'DIFFERENT'}  {row['message'][:70]}")
    corrupt = rows["corrupt_cnn-cpu-edge"]
    if corrupt["exit_code"] != 2 or any(r["exit_code"] >= 2 for n, r in rows.items() if n != corrupt["name"]):
        problems.append("the corrupt model did not fail alone with exit 2")
    print(f"wall time: batch {batch_wall:.1f} s with {args.workers} workers vs sum of single runs {singles:.1f} s "
          f"({batch_wall / singles:.2f}x)")
    for p in problems:
        print("MISMATCH", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
