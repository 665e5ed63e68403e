"""Benchmark: `kdeploy optimize --target cpu-edge` on a MobileNetV2-sized model vs the bare converter calls.

Not a test (it takes minutes). Run from the repository root:

    .venv/bin/python bench/bench_optimize.py [--target cpu-edge] [--work DIR]

What it does, in one run on this machine:
1. builds `keras.applications.MobileNetV2(weights=None)` (3.5 M parameters, 224x224x3, 1000-way
   head) and trains it BRIEFLY (2 epochs of 256 synthetic images, 10 classes of smooth colour
   patterns plus noise; about a minute on 2 cores). Untrained, its ReLU6 activations saturate and
   every output is the same constant, so fp32/dynamic/fp16 agree trivially and int8 fails
   (STACK.md): brief training gives it real activation ranges for calibration and fidelity. It
   also writes 128 held-out images as `--data` (64 calibrate int8, 64 validate);
2. runs a plain script of the same converter calls kdeploy makes for the target (SavedModel
   export, one TFLite conversion per precision with the same 64 calibration samples, tf2onnx for
   the ONNX cross-check artifacts), in a child process, and times it;
3. runs `kdeploy optimize` on the same model in a child process, times it, and timestamps each
   progress line it prints to attribute the time to stages;
4. times the selected artifact and the naive dynamic-range `.tflite` (the bare script's) with the
   same loop here, at 1 thread and at the selected thread count.

Goals: kdeploy wall <= 1.25x the bare converter calls and <= 60 s on 2 cores; the selected
artifact >= 1.4x faster than naive dynamic range where the hardware allows it.
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

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = 64  # what the cpu-edge profile uses (calibration_samples)
SHAPE = (224, 224, 3)


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of 10 classes: a smooth random colour pattern per class (fixed), plus noise."""
    patterns = np.random.default_rng(1234).random((10, 8, 8, 3), dtype=np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = np.repeat(np.repeat(patterns[y], 28, axis=1), 28, axis=2)
    x = np.clip(x + rng.normal(0, 0.15, x.shape).astype(np.float32), 0, 1)
    return x.astype(np.float32), y


def build_model(path: Path, data_path: Path) -> dict:
    """Builds MobileNetV2, trains it briefly, saves it and 128 held-out images; returns train figures."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9  # moving statistics settle within a few dozen steps
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    x, y = images(256, seed=0)
    t = time.perf_counter()
    hist = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    train_s = time.perf_counter() - t
    xv, yv = images(128, seed=1)
    acc = float(np.mean(model.predict(xv, verbose=0).argmax(1) == yv))
    model.save(path)
    np.savez(data_path, x=xv, y=yv)
    return {"train_s": train_s, "train_acc": float(hist.history["accuracy"][-1]), "heldout_acc": acc}


def bare(model_path: Path, data_path: Path, out: Path, precisions: list[str], onnx: bool) -> dict[str, float]:
    """The converter calls kdeploy makes, with nothing else: returns seconds per call."""
    import keras
    import tensorflow as tf
    import tf2onnx
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common

    times: dict[str, float] = {}
    t = time.perf_counter()
    model = keras.saving.load_model(model_path)
    times["load"] = time.perf_counter() - t
    cal = np.load(data_path)["x"][:CALIBRATION]
    sm = out / "savedmodel"
    t = time.perf_counter()
    spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name=model.inputs[0].name)]
    model.export(str(sm), format="tf_saved_model", input_signature=spec, verbose=False)
    times["savedmodel"] = time.perf_counter() - t

    def representative():
        for i in range(len(cal)):
            yield [cal[i : i + 1]]

    for p in precisions:
        t = time.perf_counter()
        c = tf.lite.TFLiteConverter.from_saved_model(str(sm), signature_keys=["serving_default"])
        if p != "fp32":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
        if p == "fp16":
            c.target_spec.supported_types = [tf.float16]
        if p in ("int8", "int16x8"):
            c.representative_dataset = representative
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if p == "int8" else
                                           tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        (out / f"{p}.tflite").write_bytes(c.convert())
        times[f"tflite {p}"] = time.perf_counter() - t
    if onnx:
        t = time.perf_counter()
        graph_def, inputs, outputs, tables, rename = tf_loader.from_saved_model(
            str(sm), None, None, None, ["serving_default"], None, False,
            return_initialized_tables=True, return_tensors_to_rename=True)
        with tf.device("/cpu:0"):
            _convert_common(graph_def, name=str(sm), opset=17, input_names=inputs, output_names=outputs,
                            tensors_to_rename=rename, initialized_tables=tables, output_path=str(out / "fp32.onnx"))
        times["onnx fp32"] = time.perf_counter() - t
        for p in precisions:
            if p in ("fp32", "int16x8"):  # kdeploy: fp32 from the SavedModel; int16x8 has no ONNX form
                continue
            t = time.perf_counter()
            try:
                tf2onnx.convert.from_tflite(str(out / f"{p}.tflite"), opset=17, output_path=str(out / f"{p}.onnx"))
            except Exception as e:  # noqa: BLE001 - a bench records what failed and goes on
                print(f"onnx from {p}.tflite failed: {e}", file=sys.stderr)
            times[f"onnx {p}"] = time.perf_counter() - t
    return times


def time_tflite(path: Path, threads: int, iters: int = 60) -> float:
    """p50 ms of one batch-1 inference, LiteRT, after warm-up; the same loop for every artifact."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    runner = it.get_signature_runner("serving_default")
    (name, detail), = runner.get_input_details().items()
    x = np.random.default_rng(1).random((1, *SHAPE), dtype=np.float32)
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero = detail["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(detail["dtype"])
    for _ in range(5):
        runner(**{name: x})
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner(**{name: x})
        t.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(t))


def run_kdeploy(model: Path, data: Path, target: str, out: Path) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of `kdeploy optimize`, and its progress lines with the time each arrived."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kdeploy", "optimize", str(model), "--target", target,
                             "--data", str(data), "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=dict(os.environ, CI="false", COLUMNS="200"))
    lines = []
    for line in proc.stderr:
        lines.append((time.perf_counter() - start, line.rstrip()))
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"kdeploy failed (exit {proc.returncode}): {lines[-3:]}")
    return wall, lines


def stages(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Seconds per progress stage: each line ("  12.3s   convert TFLite int8") owns the time until the next."""
    spent: dict[str, float] = {"startup + imports (before the first line)": lines[0][0] if lines else wall}
    for (t, text), nxt in zip(lines, [*lines[1:], (wall, "")]):
        parts = text.split()
        if parts and parts[0].endswith("s") and parts[0][:-1].replace(".", "", 1).isdigit():
            parts = parts[1:]  # the CLI's own elapsed-time column
        stage = parts[0] if parts else "?"
        if stage == "convert":
            label = "convert " + " ".join(parts[1:3])
        elif stage == "run":
            label = "run on " + (parts[3] if len(parts) > 3 else "?")
        else:
            label = stage
        spent[label] = spent.get(label, 0.0) + (nxt[0] - t)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cpu-edge")
    ap.add_argument("--work", type=Path, default=None, help="keep files here (default: a temporary folder)")
    ap.add_argument("--bare", nargs=3, metavar=("MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        sys.path.insert(0, str(ROOT))
        from kdeploy.profiles import resolve_profile

        prof = resolve_profile(args.target)
        wanted = set(prof.runtimes) | set(prof.crosscheck_runtimes)
        times = bare(Path(args.bare[0]), Path(args.bare[1]), Path(args.bare[2]), list(prof.precisions),
                     "onnxruntime" in wanted)
        print(json.dumps(times))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="kdeploy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "mobilenet_v2.keras"
    data = work / "images.npz"
    if not model.is_file() or not data.is_file():
        print("building MobileNetV2(weights=None) and training it briefly ...", flush=True)
        info = build_model(model, data)
        print(f"  trained {info['train_s']:.0f} s: train accuracy {info['train_acc']:.2f}, held-out accuracy "
              f"{info['heldout_acc']:.2f}", flush=True)
    bare_out = work / "bare"
    bare_out.mkdir(exist_ok=True)
    print("bare converter calls ...", flush=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--target", args.target, "--bare", str(model), str(data),
                          str(bare_out)],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    bare_wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"bare script failed: {res.stderr[-2000:]}")
    bare_times = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  bare wall {bare_wall:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in bare_times.items()))

    print(f"kdeploy optimize --target {args.target} ...", flush=True)
    kd_out = work / "kdeploy-out"
    kd_wall, lines = run_kdeploy(model, data, args.target, kd_out)
    print(f"  kdeploy wall {kd_wall:.1f} s; by stage:")
    for label, s in sorted(stages(lines, kd_wall).items(), key=lambda kv: -kv[1]):
        print(f"    {s:6.1f} s  {label}")

    report = json.loads((kd_out / "report.json").read_text())
    sel = report["selected"]
    print(f"\nselected: {sel} (ready={report['ready']})")
    for f in report["findings"]:
        if f["code"] in ("quantized-slower", "latency-noisy"):
            print(f"  finding {f['code']}: {f['message']}")
    ratio = kd_wall / bare_wall
    print(f"\nOVERHEAD  kdeploy / bare converter calls = {kd_wall:.1f} / {bare_wall:.1f} s = {ratio:.2f}x "
          f"(goal <= 1.25x; wall goal <= 60 s: {'met' if kd_wall <= 60 else 'NOT met'})")
    if sel is None:
        print("no candidate selected: no latency comparison")
        return
    cand = next(c for c in report["candidates"] if c["name"] == sel)
    art = next((a for a in cand["artifacts"] if a["format"] == "tflite"), None)
    rows = [l for l in cand["latency"] if l["runtime"] == report["target"]["runtimes"][0] and l["batch"] == 1]
    best = min(rows, key=lambda l: l["p50_ms"]) if rows else None
    if art is None or best is None:
        print("selected candidate has no .tflite / latency row: no latency comparison")
        return
    threads = best["threads"]
    sel_ms = time_tflite(kd_out / art["path"], threads)
    naive_1 = time_tflite(bare_out / "dynamic.tflite", 1)
    naive_t = time_tflite(bare_out / "dynamic.tflite", threads) if threads != 1 else naive_1
    print(f"LATENCY   selected {sel} @ {threads} thread(s): {sel_ms:.2f} ms p50 (kdeploy measured "
          f"{best['p50_ms']:.2f} ms); naive dynamic-range .tflite: {naive_1:.2f} ms @ 1 thread, "
          f"{naive_t:.2f} ms @ {threads} thread(s)")
    print(f"SPEEDUP   vs naive dynamic @ 1 thread: {naive_1 / sel_ms:.2f}x; at the same thread count: "
          f"{naive_t / sel_ms:.2f}x (goal >= 1.4x where the hardware allows it)")


if __name__ == "__main__":
    main()
