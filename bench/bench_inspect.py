"""Times `kdeploy inspect` against `kdeploy optimize --target cpu-edge`, and checks its predictions.

For each fixture and a MobileNetV2 (keras.applications, weights=None, 96x96x3, built here), both
commands run as a user runs them (a fresh `python -m kdeploy` process each, TensorFlow import
included). Then inspect's predictions are held against what optimize hit:
- fp32 TFLite: predicted builtin-only (no select-tf-ops layer, no failed conversion) vs optimize's
  fp32 candidate having a .tflite that ran on LiteRT;
- ONNX: predicted route for every layer vs optimize's fp32 candidate having an .onnx artifact;
- the TFLite op list: inspect's op counts vs those counted in optimize's fp32 .tflite;
- predicted size per precision vs the size of optimize's artifact of that precision.

Usage: python bench/bench_inspect.py [--keep DIR]   (a few minutes on 2 cores; not part of the tests)
       python bench/bench_inspect.py --zoo DIR [DIR ...]   inspect's predictions against a zoo sweep's
       finished optimize runs (`bench/zoo.py --work DIR`: each model's command, model and report)
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
FIX = ROOT / "fixtures"
MODELS = [("digits_cnn", FIX / "digits_cnn.keras", FIX / "digits.npz"),
          ("cancer_mlp", FIX / "cancer_mlp.keras", FIX / "cancer.npz"),
          ("diabetes_reg", FIX / "diabetes_reg.keras", FIX / "diabetes.npz"),
          ("digits_gru", FIX / "digits_gru.keras", FIX / "digits_seq.npz"),
          ("multi_io", FIX / "multi_io.keras", FIX / "multi_io.npz")]


def build_mobilenet(folder: Path) -> Path:
    """MobileNetV2 from its config (no download), 96x96x3, 10 classes, saved as .keras."""
    code = ("import keras, sys; keras.utils.set_random_seed(0); "
            "keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10).save(sys.argv[1])")
    path = folder / "mobilenetv2_96.keras"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return path


def run(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "kdeploy", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
    return time.perf_counter() - started, p


def compare(name: str, ins: dict, rep: dict) -> dict:
    """inspect's predictions vs optimize's outcomes for one model."""
    fp32 = next((c for c in rep["candidates"] if c["recipe"].get("precision") == "fp32"), None)
    arts = {a["format"]: a for a in (fp32 or {}).get("artifacts", [])}
    ran_litert = fp32 is not None and "tflite" in arts and not any(
        k["name"] == "runs on litert" and not k["passed"] for k in fp32["checks"])
    pred_tflite = ins["conversion"]["error"] is None and not any(r["tflite"] == "select-tf-ops" for r in ins["layers"])
    pred_onnx = ins["conversion"]["error"] is None and not any(r["onnx"] == "no-route" for r in ins["layers"])
    got_ops = (fp32 or {}).get("compute", {}).get("ops", {})
    sizes = {}
    for c in rep["candidates"]:
        p = c["recipe"].get("precision")
        art = next((a for a in c["artifacts"] if a["format"] == "tflite"), None)
        pred = (ins["summary"].get("predicted_size_bytes") or {}).get(p)
        if art and pred and c["name"] == p:
            sizes[p] = (pred - art["size_bytes"]) / art["size_bytes"]
    return {"model": name, "tflite_pred": pred_tflite, "tflite_got": ran_litert,
            "onnx_pred": pred_onnx, "onnx_got": "onnx" in arts,
            "ops_equal": ins["conversion"]["tflite_ops"] == got_ops,
            "ops_diff": {k: (ins["conversion"]["tflite_ops"].get(k, 0), got_ops.get(k, 0))
                         for k in sorted(set(got_ops) | set(ins["conversion"]["tflite_ops"]))
                         if ins["conversion"]["tflite_ops"].get(k, 0) != got_ops.get(k, 0)},
            "size_err": sizes}


def zoo_checks(work_dirs: list[Path]) -> list[dict]:
    """inspect, run with the same profile, data and input shapes, against each zoo model's optimize report."""
    checks = []
    for work in work_dirs:
        for row in json.loads((work / "zoo.json").read_text()):
            args = row["command"].split()
            model = Path(args[args.index("optimize") + 1])
            report = model.parent / "out" / "report.json"
            if not report.is_file():
                print(f"{row['model']:16s} no optimize report (exit {row['exit']}); skipped")
                continue
            keep = [a for i, a in enumerate(args) for flag in ("--profile", "--data", "--input-shape")
                    if a == flag or (i > 0 and args[i - 1] == flag)]
            t, p = run(["inspect", model, *keep, "--json", "--quiet"])
            if p.returncode not in (0, 1):
                print(f"{row['model']:16s} inspect exit {p.returncode}: {p.stderr.strip()[-300:]}")
                continue
            checks.append(compare(row["model"], json.loads(p.stdout), json.loads(report.read_text())))
            print(f"{row['model']:16s} inspect {t:6.1f} s vs optimize {row['wall_s']:6.1f} s ({t / row['wall_s']:.1%})",
                  flush=True)
    return checks


def print_agreement(checks: list[dict]) -> None:
    print("\nPredictions (inspect) vs outcomes (optimize), fp32 candidate:")
    print(f"{'model':16s} {'tflite builtin':>16s} {'onnx route':>12s} {'op counts':>10s}  size error per precision")
    agree = total = 0
    for c in checks:
        t_ok, o_ok = c["tflite_pred"] == c["tflite_got"], c["onnx_pred"] == c["onnx_got"]
        agree += t_ok + o_ok + c["ops_equal"]
        total += 3
        sizes = ", ".join(f"{p} {e:+.1%}" for p, e in c["size_err"].items())
        print(f"{c['model']:16s} {str(c['tflite_pred']) + '/' + str(c['tflite_got']):>16s} "
              f"{str(c['onnx_pred']) + '/' + str(c['onnx_got']):>12s} {'equal' if c['ops_equal'] else 'DIFF':>10s}  {sizes}")
        if c["ops_diff"]:
            print(f"{'':16s} op count differences (inspect, optimize): {c['ops_diff']}")
    print(f"\nagreement: {agree}/{total} predictions (predicted/got shown as pred/got)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="Keep the optimize outputs in this folder.")
    ap.add_argument("--zoo", type=Path, nargs="+", help="Compare against the finished runs of zoo sweeps instead.")
    a = ap.parse_args()
    if a.zoo:
        print_agreement(zoo_checks(a.zoo))
        return
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-inspect-"))
    work.mkdir(parents=True, exist_ok=True)
    models = MODELS + [("mobilenetv2_96", build_mobilenet(work), None)]
    rows, checks = [], []
    for name, model, data in models:
        extra = ["--data", data] if data else []
        t_ins, p_ins = run(["inspect", model, "--target", "cpu-edge", "--json", "--quiet", *extra])
        out = work / f"out-{name}"
        t_opt, p_opt = run(["optimize", model, "--target", "cpu-edge", "--out", out, "--json", "--quiet", *extra])
        rows.append((name, t_ins, t_opt, p_ins.returncode, p_opt.returncode))
        # In-process work (the figures each command reports), without Python/TensorFlow start-up,
        # which is the same ~5 s for both commands and dominates on tiny models.
        w_ins = json.loads(p_ins.stdout).get("duration_s") if p_ins.returncode in (0, 1) else None
        w_opt = json.loads(p_opt.stdout).get("duration_s") if p_opt.returncode in (0, 1) else None
        work_ratio = f"  work {w_ins:.1f} s vs {w_opt:.1f} s = {w_ins / w_opt:6.1%}" if w_ins and w_opt else ""
        print(f"{name:16s} inspect {t_ins:6.1f} s (exit {p_ins.returncode})  optimize {t_opt:6.1f} s "
              f"(exit {p_opt.returncode})  ratio {t_ins / t_opt:6.1%}{work_ratio}", flush=True)
        if p_ins.returncode in (0, 1) and p_opt.returncode in (0, 1):
            checks.append(compare(name, json.loads(p_ins.stdout), json.loads((out / "report.json").read_text())))
        else:
            print(f"  inspect stderr: {p_ins.stderr[-300:]}\n  optimize stderr: {p_opt.stderr[-300:]}")
    total_i, total_o = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\n{'total':16s} inspect {total_i:6.1f} s  optimize {total_o:6.1f} s  ratio {total_i / total_o:6.1%} "
          f"(goal <= 25% per model; worst {max(r[1] / r[2] for r in rows):.1%})")
    print_agreement(checks)


if __name__ == "__main__":
    main()
