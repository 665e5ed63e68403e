"""Model-zoo sweep: `kdeploy optimize` on real architectures nobody on the project wrote.

Builds each model offline (keras.applications with `weights=None` at the smallest input each
allows, briefly fitted on scikit-learn's digits upscaled to that size so outputs are not
degenerate; KerasHub backbones from small configs; a few models for layer variety), runs
`kdeploy optimize --target cpu-edge` (quick timing) on it in a subprocess, samples the peak
resident memory of that process tree from /proc, and writes a Markdown table.

    python bench/zoo.py --work /tmp/zoo                       # everything (slow: ~1 h on 2 cores)
    python bench/zoo.py --work /tmp/zoo --only bert,gpt2,vit  # some
    python bench/zoo.py --list

Two tables: the candidates (verdicts, failures, warnings), and full int8's verdict with the repair
ladder (report.json `repair`: each step tried, pass/fail, seconds, conversions; where evaluation's
verdict differs from the step's judge, it says so), with the selected candidate, wall time and
peak memory. `mobilenetv2` is MobileNetV2 alpha 0.35.

Not part of the tests. Each model is built in its own child process (`--build NAME`), so one
model's memory does not count against the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16  # sequence length of the text models
SAMPLES = 192  # data samples per model (calibration + validation)

# name -> (keras.applications class, smallest input side it allows[, constructor keywords])
APPLICATIONS = {
    "mobilenet": ("MobileNet", 32),
    "mobilenetv2": ("MobileNetV2", 32, {"alpha": 0.35}),
    "mobilenetv3large": ("MobileNetV3Large", 32),
    "efficientnetb0": ("EfficientNetB0", 32),
    "efficientnetv2b0": ("EfficientNetV2B0", 32),
    "densenet121": ("DenseNet121", 32),
    "resnet50v2": ("ResNet50V2", 32),
    "convnexttiny": ("ConvNeXtTiny", 32),
    "nasnetmobile": ("NASNetMobile", 32),
    "inceptionv3": ("InceptionV3", 75),
    "xception": ("Xception", 71),
}
TEXT_INPUTS = {"bert": ("token_ids", "segment_ids", "padding_mask"), "gpt2": ("token_ids", "padding_mask"),
               "distilbert": ("token_ids", "padding_mask"), "roberta": ("token_ids", "padding_mask")}


# ----------------------------------------------------------------------------------------------
# Builders (run in a child process): each writes model.keras and data.npz into `folder`
# ----------------------------------------------------------------------------------------------
def _digits(side: int | None = None, channels: int = 3):
    """scikit-learn's digits (bundled), scaled to [0, 1]; upscaled to side x side x channels when given."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    if side is not None:
        import tensorflow as tf

        x = tf.image.resize(x, (side, side)).numpy()
        x = np.repeat(x, channels, axis=-1)
    return x, d.target.astype("int32")


def _fit_and_save(model, x, y, folder: Path, epochs: int = 1) -> None:
    import numpy as np

    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    model.save(folder / "model.keras")
    idx = np.random.default_rng(0).permutation(len(x))[:SAMPLES]
    np.savez(folder / "data.npz", x=x[idx], y=y[idx])  # "x": the single input, whatever its name


def build_application(name: str, folder: Path) -> None:
    import keras

    cls, side, *kw = APPLICATIONS[name]
    x, y = _digits(side)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, cls)(weights=None, input_shape=(side, side, 3), classes=10, **(kw or [{}])[0])
    _fit_and_save(model, x, y, folder)


def build_keras_hub(name: str, folder: Path) -> None:
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    small = dict(num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32)
    if name == "vit":
        model = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                             hidden_dim=16, mlp_dim=32)
        x, _ = _digits(32)
        data = {"images": x[:SAMPLES]}
    else:
        cls = {"bert": "BertBackbone", "gpt2": "GPT2Backbone", "distilbert": "DistilBertBackbone",
               "roberta": "RobertaBackbone"}[name]
        model = getattr(keras_hub.models, cls)(vocabulary_size=100, max_sequence_length=SEQ, **small)
        data = {"token_ids": rng.integers(1, 100, (SAMPLES, SEQ)).astype("int32"),
                "padding_mask": np.ones((SAMPLES, SEQ), "int32")}
        data["padding_mask"][: SAMPLES // 2, SEQ // 2:] = 0  # half the samples padded
        if "segment_ids" in TEXT_INPUTS[name]:
            data["segment_ids"] = np.zeros((SAMPLES, SEQ), "int32")
    model.save(folder / "model.keras")
    np.savez(folder / "data.npz", **data)


def build_variety(name: str, folder: Path) -> None:
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    x, y = _digits()  # (n, 8, 8, 1)
    L = keras.layers
    if name == "bilstm_text":  # pixel intensities as 17 tokens, rows concatenated: a 64-token "text"
        xi = np.rint(x[..., 0] * 16).astype("int32").reshape(len(x), 64)
        inp = keras.Input((64,), dtype="int32", name="tokens")
        h = L.Bidirectional(L.LSTM(8))(L.Embedding(17, 8)(inp))
        model, x = keras.Model(inp, L.Dense(10, activation="softmax")(h), name="bilstm_text"), xi
    elif name == "conv1d":
        inp = keras.Input((8, 8), name="rows")
        h = L.Conv1D(16, 3, activation="relu")(inp)
        h = L.GlobalAveragePooling1D()(L.Conv1D(16, 3, activation="relu", padding="same")(h))
        model, x = keras.Model(inp, L.Dense(10, activation="softmax")(h), name="conv1d"), x[..., 0]
    elif name == "timedistributed":
        inp = keras.Input((8, 8), name="rows")
        h = L.Flatten()(L.TimeDistributed(L.Dense(8, activation="relu"))(inp))
        model, x = keras.Model(inp, L.Dense(10, activation="softmax")(h), name="timedistributed"), x[..., 0]
    elif name == "preprocessing":  # raw 0-16 pixels in; rescaling, normalization, resizing inside the model
        norm = L.Normalization()
        norm.adapt(x * 16)
        inp = keras.Input((8, 8, 1), name="pixels")
        h = L.Resizing(16, 16)(L.Rescaling(1.0)(norm(inp)))
        h = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, activation="relu")(h))
        model, x = keras.Model(inp, L.Dense(10, activation="softmax")(h), name="preprocessing"), x * 16
    else:
        raise KeyError(name)
    _fit_and_save(model, x, y, folder, epochs=3)


VARIETY = ("bilstm_text", "conv1d", "timedistributed", "preprocessing")
HUB = ("bert", "gpt2", "vit", "distilbert", "roberta")
BUILDERS: dict[str, Callable[[str, Path], None]] = {
    **{n: build_application for n in APPLICATIONS}, **{n: build_keras_hub for n in HUB},
    **{n: build_variety for n in VARIETY}}


# ----------------------------------------------------------------------------------------------
# Running and measuring
# ----------------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(entry)
        children.setdefault(int(fields[1]), []).append(p)
        rss[p] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def run_sampled(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, int]:
    """Runs `cmd`, sampling the process tree's RSS every 0.2 s; returns (exit code, wall s, peak bytes)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        peak = 0
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                done.wait(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        done.set()
        t.join()
    return code, time.perf_counter() - start, peak


def quick_profile(work: Path) -> Path:
    """cpu-edge with quick timing and one thread count (the sweep checks conversions, not speed)."""
    import tomllib

    text = (ROOT / "profiles" / "cpu-edge.toml").read_text()
    data = tomllib.loads(text)
    path = work / "cpu-edge-zoo.toml"
    assert "timing" not in data and text.startswith('name = "cpu-edge"')
    text = text.replace('name = "cpu-edge"', 'name = "cpu-edge-zoo"', 1).replace("threads = [1, 2]", "threads = [1]", 1)
    path.write_text(text + "\n[timing]\nwarmup = 2\nmin_iters = 10\nmin_seconds = 0.2\nmax_iters = 200\nmax_seconds = 1.0\n")
    return path


def sweep_one(name: str, work: Path, profile: Path, timeout: float) -> dict:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    row: dict = {"model": name}
    build = subprocess.run([sys.executable, __file__, "--build", name, "--work", str(work)], capture_output=True,
                           text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=timeout)
    if build.returncode != 0:
        row.update(exit="build failed", why=(build.stderr.strip().splitlines() or ["?"])[-1][:200])
        return row
    cmd = [sys.executable, "-m", "kdeploy", "optimize", str(folder / "model.keras"), "--profile", str(profile),
           "--data", str(folder / "data.npz"), "--out", str(folder / "out"), "-q"]
    for inp in TEXT_INPUTS.get(name, ()):
        cmd += ["--input-shape", f"{inp}={SEQ}"]
    row["command"] = " ".join(cmd)
    code, wall, peak = run_sampled(cmd, folder / "optimize.log", timeout)
    row.update(exit=code, wall_s=round(wall, 1), peak_mb=round(peak / 2**20))
    report = folder / "out" / "report.json"
    if not report.is_file():
        row["why"] = (folder / "optimize.log").read_text().strip().splitlines()[-1:] or ["?"]
        return row
    rep = json.loads(report.read_text())
    row["selected"] = rep.get("selected")
    fp32 = next((c for c in rep["candidates"] if c["name"] == "fp32"), None)
    if fp32 is not None:
        for rt in ("litert", "onnxruntime"):
            rows = [f for f in fp32["fidelity"] if f["runtime"] == rt and f["reference"] == "keras"]
            row[f"fp32_{rt}"] = ("pass" if all(f["passed"] for f in rows) else "FAIL") if rows else "-"
    failed = []
    for c in rep["candidates"]:
        if not c["passed"]:
            why = [k["name"] for k in c["checks"] if not k["passed"]][:2] + [e[:80] for e in c["errors"]][:1]
            failed.append(f"{c['name']} ({'; '.join(why) or '?'})")
    row["failed"] = ", ".join(failed) or "-"
    row["findings"] = sorted({f["code"] for f in rep["findings"] if f["severity"] != "info"})
    row.update(ladder(rep.get("repair")))
    from real import verify  # the independent check: LiteRT and keras/tf in a child, no kdeploy code

    row["verify"] = verify(folder / "out", str(folder / "model.keras"), str(folder / "data.npz"), [])
    return row


def ladder(repair: dict | None) -> dict:
    """Full int8's verdict and each repair step from report.json's `repair` (None: int8 not judged)."""
    if not repair:
        return {"int8": "-", "steps": "-"}
    i8 = repair["int8"]
    steps = []
    for s in repair["steps"]:
        if s.get("tried"):
            ev = s.get("evaluation_passed")
            ev = "" if ev is None or ev == s["passed"] else f", evaluation {'pass' if ev else 'FAIL'}"
            conv = f", {s['conversions']} conv" if s.get("conversions") else ""
            steps.append(f"{s['step']} {'pass' if s['passed'] else 'fail'} ({s['seconds']:.0f} s{conv}{ev})")
        else:
            steps.append(f"{s['step']} {s.get('detail', '').split(':')[0]}")
    detail = i8["detail"]
    if i8["passed"] and "accepted on" in detail:  # top-1 agreement short, the labels' task budget decided
        detail = "accepted on" + detail.split("accepted on", 1)[1]
    return {"int8": ("pass" if i8["passed"] else "FAIL") + f" ({detail[:110]})",
            "steps": "; ".join(steps) or "not run", "ladder_s": repair.get("seconds")}


def table(rows: list[dict]) -> str:
    head = "| model | exit | selected | fp32 LiteRT | fp32 ORT | failed candidates (why) | warnings/errors | wall s | peak MB |"
    out = [head, "|" + "---|" * 9]
    for r in rows:
        out.append(f"| {r['model']} | {r.get('exit')} | {r.get('selected') or '-'} | {r.get('fp32_litert', '-')} | "
                   f"{r.get('fp32_onnxruntime', '-')} | {r.get('failed', r.get('why', '-'))} | "
                   f"{', '.join(r.get('findings', [])) or '-'} | {r.get('wall_s', '-')} | {r.get('peak_mb', '-')} |")
    out += ["", "| model | full int8 (new policy) | repair ladder: each step tried, its result | ladder s | selected | "
            "independent check: LiteRT vs Keras, all samples [kdeploy's figure] | wall s | peak MB |", "|" + "---|" * 8]
    for r in rows:
        lad = "-" if r.get("ladder_s") is None else f"{r['ladder_s']:.0f}"
        ver = "<br>".join(r.get("verify") or []) or "-"
        out.append(f"| {r['model']} | {r.get('int8', '-')} | {r.get('steps', '-')} | {lad} | {r.get('selected') or '-'} | "
                   f"{ver} | {r.get('wall_s', '-')} | {r.get('peak_mb', '-')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("zoo-work"), help="Folder for models, outputs and zoo.md.")
    ap.add_argument("--only", help=f"Comma-separated model names (default: all): {', '.join(BUILDERS)}")
    ap.add_argument("--timeout", type=float, default=1800, help="Seconds per model (build, and optimize).")
    ap.add_argument("--list", action="store_true", help="List the model names and exit.")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # child process: build one model
    args = ap.parse_args()
    if args.list:
        print("\n".join(BUILDERS))
        return 0
    if args.build:
        BUILDERS[args.build](args.build, args.work / args.build)
        return 0
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BUILDERS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        print(f"unknown model(s) {unknown}; allowed: {', '.join(BUILDERS)}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    profile = quick_profile(args.work)
    rows = []
    for name in names:
        print(f"[zoo] {name} ...", file=sys.stderr, flush=True)
        rows.append(sweep_one(name, args.work, profile, args.timeout))
        print(f"[zoo] {name}: exit {rows[-1].get('exit')} in {rows[-1].get('wall_s', '-')} s", file=sys.stderr, flush=True)
        (args.work / "zoo.json").write_text(json.dumps(rows, indent=1))
        (args.work / "zoo.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
