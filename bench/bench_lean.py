"""Benchmark: kdeploy's overhead, cache and memory against a bare converter script, all in one run.

Not a test (it takes many minutes). Run from the repository root:

    .venv/bin/python bench/bench_lean.py [--case passes|fails | --model NAME] [--rounds 3] [--work DIR]
                                         [--no-cached] [--no-one-process] [--kdeploy-root PATH]

The two cases of issue 19 are one command each:
    .venv/bin/python bench/bench_lean.py --case passes   # full int8 passes at once: the ladder must not run
    .venv/bin/python bench/bench_lean.py --case fails    # full int8 fails: the repair ladder runs
    .venv/bin/python bench/bench_lean.py --case repairs  # full int8 fails and recalibration repairs it
`passes` is the briefly trained MobileNetV2-224 (`--model mobilenetv2`). `fails` is MobileNetV2-224
with weights=None on 128 uniform [-1, 1] inputs, its BatchNorm statistics randomised as
bench/fp32_drift.py does (`--model mobilenetv2-bnrandom`): a 1000-way softmax whose top classes
differ by less than int8's output step, so full int8 flips most decisions. (The issue's plain random
MobileNetV2-224 outputs one constant 0.001 softmax: Keras makes no decision there, its int8 rounds
every value to 0, and it fails on relative error; before ties counted, it "passed" at once.) `repairs` is `passes`' model with
two of the 64 calibration samples scaled by 100 (a glitching sensor; `--model mobilenetv2-outliers`):
the converter's min-max int8 fails, the ladder's first step (recalibration) repairs it.

Each round runs, one after the other (interleaved, so a change of host load hits both sides):
1. the bare script (`bench_optimize.py --bare`: the same TFLite and ONNX conversions, the usual
   way, nothing else);
2. `kdeploy optimize --target cpu-edge` with an empty cache folder (the first run; it fills the
   cache);
3. the same command again on the same cache (the cached re-run);
4. `kdeploy optimize --no-parallel --no-cache` (everything in one process, for comparison with the
   default, which converts in a second process where that pays off; `--no-one-process` skips it).

Every process tree is sampled (`kdeploy.memory.tree_memory_mb`: the process and all its
descendants, read from /proc) as the sum of VmRSS every 50 ms (a shared library mapped by two
processes counts twice: an upper bound) and as PSS every second (shared pages counted once, but
costly to read, so sampled less often), so peak memory is that of the whole run, not the
largest child.
Printed: per-round figures, then the ratios over the rounds (median, min..max): overhead
(first kdeploy run / bare), cached re-run / first run, peak memory kdeploy / bare; the verdicts
of every run and the candidate each uncached run (first, one-process) selected.

`--kdeploy-root` runs another checkout's kdeploy (e.g. `git archive` of main: the "before").
Goals (issue 13): overhead <= 1.0x, cached <= 0.25x with the same verdicts, peak memory
<= 1.2x bare, ResNet50V2 (32x32) under 3 GB, the same selection in every uncached run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PSS_EVERY = 20  # RSS sums every 50 ms, PSS every second
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from sampling import PeakMemory  # noqa: E402 - this checkout's sampler, whichever kdeploy runs


def run_sampled(cmd: list[str], env: dict, cwd: Path, stderr_lines: list | None = None) -> tuple[float, dict, int]:
    """Runs `cmd` in `cwd`; returns (wall seconds, peak process-tree PSS and RSS-sum in MB, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid, interval=0.05, pss_every=PSS_EVERY) as sampler:  # PSS: 1 in 20 samples
        for line in proc.stderr:
            if stderr_lines is not None:
                stderr_lines.append((time.perf_counter() - start, line.rstrip()))
        proc.wait()
        wall = time.perf_counter() - start
    peak = sampler.peak
    return wall, peak, proc.returncode


def build(model_name: str, work: Path) -> tuple[Path, Path]:
    """The model and its held-out data (built once per work folder)."""
    model, data = work / f"{model_name}.keras", work / f"{model_name}.npz"
    if model.is_file() and data.is_file():
        return model, data
    print(f"building {model_name} (weights=None) and training it briefly ...", flush=True)
    if model_name == "mobilenetv2-outliers":
        import bench_optimize
        from kdeploy.data import Dataset, split

        bench_optimize.build_model(model, data)
        z = np.load(data)
        x, y = z["x"].copy(), z["y"]
        index = Dataset({"i": np.arange(len(x))}, None, False, "index")
        cal = split(index, bench_optimize.CALIBRATION, 0)[0].inputs["i"]  # the samples kdeploy calibrates on (seed 0)
        x[cal[[10, 40]]] *= 100.0
        np.savez(data, x=x, y=y)
        return model, data
    if model_name == "mobilenetv2-bnrandom":
        _bn_random_mobilenetv2(model, data)
        return model, data
    if model_name == "mobilenetv2":
        import bench_optimize

        bench_optimize.build_model(model, data)
        return model, data
    import keras
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(0)
    d = load_digits()
    x = np.repeat(np.repeat(d.images[..., None] / 16.0, 4, axis=1), 4, axis=2)
    x = np.repeat(x, 3, axis=3).astype(np.float32)  # 32x32x3
    m = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3))  # 25.6 M parameters
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    m.fit(x[:1024], d.target[:1024], batch_size=32, epochs=1, verbose=0)
    m.save(model)
    np.savez(data, x=x[1024:1152], y=d.target[1024:1152])
    return model, data


def _bn_random_mobilenetv2(model_path: Path, data_path: Path) -> None:
    """MobileNetV2-224 (weights=None), BatchNorm gamma/beta randomised and its moving statistics set from a batch
    of the inputs (bench/fp32_drift.py), saved with 128 uniform [-1, 1] inputs (no labels)."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    m = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    x = rng.uniform(-1, 1, (128, 224, 224, 3)).astype("float32")
    cal = rng.uniform(-1, 1, (64, 224, 224, 3)).astype("float32")
    bns = [layer for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        g, b, mm, mv = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, g.shape).astype("float32"),
                           rng.normal(0, 0.2, b.shape).astype("float32"), mm, mv])
        layer.momentum = 0.0
    m(cal, training=True)  # momentum 0: the moving statistics become this batch's, layer by layer
    for layer in bns:
        layer.momentum = 0.99
    m.save(model_path)
    np.savez(data_path, x=x)


def kdeploy_cmd(model: Path, data: Path, out: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "kdeploy", "optimize", str(model), "--target", target, "--data", str(data),
            "--out", str(out)]


def ladder_line(repair: dict | None) -> str:
    """Full int8's verdict and each ladder step tried (seconds) from report.json's `repair`, in one line."""
    if not repair:
        return "no int8 judged (no repair record)"
    head = f"full int8 {'passes' if repair['int8']['passed'] else 'fails'} ({repair['int8']['seconds']:.1f} s)"
    steps = [f"{s['step']} {'passes' if s['passed'] else 'fails'} {s['seconds']:.1f} s" for s in repair["steps"]
             if s.get("tried")]
    return head + ("; ladder " + ", ".join(steps) + f" = {repair.get('seconds', 0):.1f} s" if steps else
                   "; ladder not run")


CASES = {"passes": "mobilenetv2", "fails": "mobilenetv2-bnrandom", "repairs": "mobilenetv2-outliers"}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mobilenetv2", "mobilenetv2-bnrandom", "mobilenetv2-outliers", "resnet50v2"], default=None)
    ap.add_argument("--case", choices=list(CASES), default=None,
                    help="issue 19's cases: passes (full int8 passes at once), fails (the whole repair ladder runs), "
                         "repairs (recalibration repairs it)")
    ap.add_argument("--cached", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the cached re-run each round")
    ap.add_argument("--target", default="cpu-edge")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="keep files here (default: a temporary folder)")
    ap.add_argument("--one-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also time `kdeploy optimize --no-parallel --no-cache` each round (off for a kdeploy without it)")
    ap.add_argument("--kdeploy-root", type=Path, default=ROOT, help="the kdeploy checkout to run (default: this one)")
    args = ap.parse_args()
    if args.case and args.model and CASES[args.case] != args.model:
        ap.error(f"--case {args.case} is --model {CASES[args.case]}, received --model {args.model}")
    args.model = CASES.get(args.case) or args.model or "mobilenetv2"
    work = args.work or Path(tempfile.mkdtemp(prefix="kdeploy-lean-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(args.model, work)
    kd_root = args.kdeploy_root.resolve()  # `python -m kdeploy` imports from the working folder first
    base_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CI="false", COLUMNS="200",
                    PYTHONPATH=str(kd_root))
    base_env.pop("KDEPLOY_CACHE_DIR", None)
    rows = []
    for r in range(args.rounds):
        bare_out = work / f"bare-{r}"
        bare_out.mkdir(exist_ok=True)
        b_wall, b_peak, code = run_sampled(
            [sys.executable, str(BENCH / "bench_optimize.py"), "--target", args.target, "--bare", str(model),
             str(data), str(bare_out)], base_env, ROOT)
        if code != 0:
            raise SystemExit(f"bare script failed (exit {code})")
        env = dict(base_env, KDEPLOY_CACHE_DIR=str(work / f"cache-{r}"))
        runs = {}
        for kind in ("first", *(["cached"] if args.cached else []), *(["one-process"] if args.one_process else [])):
            out = work / f"kdeploy-{r}-{kind}"
            lines: list = []
            flags = ["--no-parallel", "--no-cache"] if kind == "one-process" else []
            wall, peak, code = run_sampled(kdeploy_cmd(model, data, out, args.target) + flags, env, kd_root, lines)
            if code not in (0, 1):
                raise SystemExit(f"kdeploy failed (exit {code}): {[l for _, l in lines[-3:]]}")
            rep = json.loads((out / "report.json").read_text())
            runs[kind] = {"wall": wall, "peak": peak, "ready": rep["ready"], "selected": rep["selected"],
                          "verdicts": {c["name"]: c["passed"] for c in rep["candidates"]},
                          "cache": rep.get("cache"), "lines": lines, "repair": rep.get("repair")}
        rows.append({"bare": {"wall": b_wall, "peak": b_peak}, **runs})
        f, c = runs["first"], runs.get("cached")
        if "one-process" in runs:
            q = runs["one-process"]
            print(f"round {r + 1}: kdeploy --no-parallel {q['wall']:6.1f} s {q['peak']['rss']:6.0f} MB (PSS "
                  f"{q['peak']['pss']:.0f} MB) selected {q['selected']}", flush=True)
        cached = "" if c is None else (f" | cached {c['wall']:6.1f} s {c['peak']['rss']:6.0f} MB selected "
                                       f"{c['selected']} (PSS {c['peak']['pss']:.0f} MB)")
        print(f"round {r + 1}: bare {b_wall:6.1f} s {b_peak['rss']:6.0f} MB | kdeploy first {f['wall']:6.1f} s "
              f"{f['peak']['rss']:6.0f} MB selected {f['selected']}{cached}  (peak RSS sums of the process trees; PSS: "
              f"bare {b_peak['pss']:.0f}, first {f['peak']['pss']:.0f} MB)", flush=True)
        print(f"round {r + 1}: {ladder_line(f['repair'])}", flush=True)
    print("\nkdeploy first run, by stage (round 1; each progress line owns the time until the next):")
    import bench_optimize

    first = rows[0]["first"]
    for label, s in sorted(bench_optimize.stages(first["lines"], first["wall"]).items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {s:6.1f} s  {label}")
    print(f"\n{args.model}, target {args.target}, {args.rounds} round(s), {os.cpu_count()} cores "
          f"(load average at the end {os.getloadavg()[0]:.1f}):")
    print("OVERHEAD   kdeploy first run / bare script wall:  " + spread([x["first"]["wall"] / x["bare"]["wall"] for x in rows])
          + "  (goal <= 1.0x)")
    if args.cached:
        print("CACHE      cached re-run / first run wall:         "
              + spread([x["cached"]["wall"] / x["first"]["wall"] for x in rows]) + "  (goal <= 0.25x)")
    for m, label in (("rss", "RSS sum"), ("pss", "PSS")):
        print(f"MEMORY     kdeploy first run / bare, peak tree {label:7s}: "
              + spread([x["first"]["peak"][m] / x["bare"]["peak"][m] for x in rows])
              + f"  (goal <= 1.2x; peaks: kdeploy {max(x['first']['peak'][m] for x in rows):.0f} MB, bare "
                f"{max(x['bare']['peak'][m] for x in rows):.0f} MB)")
    if args.one_process:
        print("ONE-PROC   kdeploy --no-parallel / bare wall:          " + spread([x["one-process"]["wall"] / x["bare"]["wall"] for x in rows]))
        print("ONE-PROC   kdeploy --no-parallel / bare peak RSS sum:  " + spread([x["one-process"]["peak"]["rss"] / x["bare"]["peak"]["rss"] for x in rows])
              + f" (peak {max(x['one-process']['peak']['rss'] for x in rows):.0f} MB; PSS "
                f"{max(x['one-process']['peak']['pss'] for x in rows):.0f} MB)")
    if args.cached:
        same = all(x["first"]["verdicts"] == x["cached"]["verdicts"] and x["first"]["ready"] == x["cached"]["ready"]
                   for x in rows)
        print(f"VERDICTS   cached re-runs give the same verdicts as their first run: {'yes' if same else 'NO'}")
    picks = [x[k]["selected"] for x in rows for k in ("first", "one-process") if k in x]
    print(f"SELECTION  uncached runs selected: {picks} -> {'stable' if len(set(picks)) == 1 else 'NOT stable'}")
    ran = [x["first"]["repair"] for x in rows]
    print("LADDER     full int8 and the repair ladder in each first run: "
          + " | ".join(ladder_line(r) for r in ran))
    if args.cached:
        print(f"cache section of the last cached report: {json.dumps(rows[-1]['cached']['cache'])[:400]}")


if __name__ == "__main__":
    main()
