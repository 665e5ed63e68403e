"""Independent check of kdeploy's int8 verdicts (bench/real.py): no kdeploy code, only keras/tf and ai_edge_litert.

For one kdeploy report folder: every candidate whose `.tflite` is int8 (int8, int8-mixed, int8-calibrated,
qat-int8, and any maintainers' `.tflite` given to `check`) is loaded with LiteRT's own
Interpreter and run sample by sample (batch 1; int8/uint8 inputs and outputs (de)quantized with the
tensor's own scale and zero point) on every sample of the bench's `data.npz`. The reference is the
model run here directly: a SavedModel's `serving_default` with tf, a `.keras`/`.h5` with
`keras.models.load_model` (the bench's --custom-objects module imported by path; keras_hub imported
for its registered classes).

Each output is judged by what its reference values are, not by kdeploy's classification:
- softmax (last axis sums to 1, values in [0, 1], more than one class): top-1 agreement over the
  last axis, per sample or per cell of a map;
- sigmoid (values in [0, 1], otherwise): agreement of `> 0.5` decisions, per element (its relative
  RMSE beside it: a regression whose values happen to lie in [0, 1], e.g. normalised landmarks, looks the same);
- anything else (regression, boxes, embeddings): relative RMSE (RMS error / RMS of the reference).

Outputs are paired with the artifact's by name, else by Keras' export name `output_<i>`, else by a
unique shape (signature-less files). Prints JSON: {candidate: {"outputs": [{output, kind, figure,
value, n}], "error": str|None}} on stdout.

    .venv/bin/python bench/real_verify.py --report OUT --model M --data data.npz [--custom-objects F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

INT8_NAMES = ("int8", "int8-mixed", "int8-calibrated", "qat-int8")


def reference(model: str, feeds: dict, custom_objects: str | None) -> list:
    """[(output name, array)] of the model on all samples, in the model's output order."""
    import numpy as np
    import tensorflow as tf

    path = Path(model)
    if path.is_dir():  # SavedModel
        fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        specs = fn.structured_input_signature[1]
        if len(specs) == 1 and len(feeds) == 1:
            args = {next(iter(specs)): tf.constant(next(iter(feeds.values())))}
        else:
            args = {k: tf.constant(feeds[k]) for k in specs}
        out = fn(**args)
        return [(k, np.asarray(v)) for k, v in sorted(out.items())]
    import keras

    objects = {}
    if custom_objects:
        spec = importlib.util.spec_from_file_location("bench_custom_objects", custom_objects)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        objects = dict(mod.CUSTOM_OBJECTS)
    try:
        import keras_hub  # noqa: F401 - registers its classes (the gemma model)
    except ImportError:
        pass
    m = keras.models.load_model(str(path), compile=False, custom_objects=objects)
    names = list(getattr(m, "output_names", None) or [])
    if len(feeds) == 1:
        x = next(iter(feeds.values()))
    else:
        x = {k: v for k, v in feeds.items()}
    y = m.predict(x, batch_size=8, verbose=0)
    if isinstance(y, dict):
        return list(y.items())
    ys = list(y) if isinstance(y, (list, tuple)) else [y]
    if len(names) != len(ys):
        names = [f"output_{i}" for i in range(len(ys))]
    return [(n, np.asarray(v)) for n, v in zip(names, ys)]


def run_tflite(path: Path, feeds: dict) -> dict:
    """{artifact output name: array over all samples}, run one sample at a time."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    probe = Interpreter(model_path=str(path))
    sigs = probe.get_signature_list()
    if sigs:  # names from the SignatureDef, mapped to tensor indices (a runner pins the tensors: probe only)
        runner = probe.get_signature_runner(next(iter(sigs)))
        in_idx = {k: d["index"] for k, d in runner.get_input_details().items()}
        out_idx = {k: d["index"] for k, d in runner.get_output_details().items()}
        in_names, out_names = list(in_idx), list(out_idx)
    del probe
    it = Interpreter(model_path=str(path))
    ins, outs = it.get_input_details(), it.get_output_details()
    if not sigs:
        in_names, out_names = [d["name"] for d in ins], [d["name"] for d in outs]
        in_idx = {d["name"]: d["index"] for d in ins}
        out_idx = {d["name"]: d["index"] for d in outs}
    detail = {d["index"]: d for d in ins + outs}
    if len(in_names) == 1 and len(feeds) == 1:
        pairs = {in_names[0]: next(iter(feeds.values()))}
    else:
        pairs = {k: feeds[k] for k in in_names}
    n = len(next(iter(feeds.values())))
    for k, v in pairs.items():  # batch 1
        it.resize_tensor_input(in_idx[k], [1, *v.shape[1:]])
    it.allocate_tensors()
    res: dict[str, list] = {k: [] for k in out_names}
    for i in range(n):
        for k, v in pairs.items():
            d = detail[in_idx[k]]
            x = v[i:i + 1]
            if d["dtype"] in (np.int8, np.uint8) and v.dtype.kind == "f":
                scale, zp = d["quantization"]
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale + zp), info.min, info.max)
            it.set_tensor(in_idx[k], x.astype(d["dtype"]))
        it.invoke()
        for k in out_names:
            d = detail[out_idx[k]]
            y = it.get_tensor(out_idx[k]).copy()
            if d["dtype"] in (np.int8, np.uint8, np.int16) and d["quantization"][0]:
                scale, zp = d["quantization"]
                y = (y.astype(np.float32) - zp) * scale
            res[k].append(y)
    return {k: np.concatenate(v) for k, v in res.items()}


def pair(ref: list, got: dict) -> dict[str, str]:
    """Reference output name -> artifact output name (name, `output_<i>`, then a unique shape)."""
    out = {}
    for i, (name, r) in enumerate(ref):
        if name in got:
            out[name] = name
        elif f"output_{i}" in got and got[f"output_{i}"].shape == r.shape:
            out[name] = f"output_{i}"
        else:
            same = [k for k, v in got.items() if v.shape == r.shape]
            if len(same) == 1:
                out[name] = same[0]
    return out


def judge(r, a) -> dict:
    """The decision figure of artifact output `a` against reference `r`, by the reference's values."""
    import numpy as np

    r, a = r.astype(np.float64), a.astype(np.float64)
    rel_rmse = float(np.sqrt(np.mean((a - r) ** 2)) / max(np.sqrt(np.mean(r ** 2)), 1e-12))
    in01 = r.min() >= 0.0 and r.max() <= 1.0
    if in01 and r.shape[-1] > 1 and np.allclose(r.sum(-1), 1.0, atol=1e-3):
        # agreement only where the artifact's top value is Keras' class alone (a tie at the top is no agreement:
        # argmax's first index would be luck), over the samples/cells where Keras' own top two differ
        top = np.argmax(r, -1)[..., None]
        mine = np.take_along_axis(a, top, -1)
        alone = (a >= mine).sum(-1) == 1
        two = np.sort(r, -1)[..., -2:]
        decided = (two[..., 1] - two[..., 0]) >= 1e-6
        n = int(decided.sum())
        if not n:  # Keras decides nothing (a constant softmax): its values are what is left to check
            return {"kind": "softmax (all ties)", "figure": "rel_rmse", "value": rel_rmse, "n": int(r.size),
                    "rel_rmse": rel_rmse}
        return {"kind": "softmax", "figure": "top1", "value": float(alone[decided].mean()) if n else float("nan"),
                "n": n, "rel_rmse": rel_rmse, "ties": int((~alone & decided & (np.argmax(a, -1) == top[..., 0])).sum())}
    if in01:
        agree = (r > 0.5) == (a > 0.5)
        return {"kind": "sigmoid", "figure": "agree@0.5", "value": float(agree.mean()), "n": int(agree.size),
                "rel_rmse": rel_rmse}
    return {"kind": "regression", "figure": "rel_rmse", "value": rel_rmse, "n": int(r.size), "rel_rmse": rel_rmse}


# ----------------------------------------------------------------------------------------------
# Beside kdeploy's figures (parent process, bench/real.py: reads report.json, imports nothing heavy)
# ----------------------------------------------------------------------------------------------
DECISION_MIN, REL_RMSE_MAX = 0.99, 0.05  # this check's own bar: kdeploy's documented defaults, no confidence bound


def _kd_figure(f: dict) -> str:
    mark = "" if f["passed"] else " FAIL"
    if f.get("decision_agreement") is not None:
        fig = "top1" if f.get("top1_agreement") is not None else "agree"
        return f"{fig}={f['decision_agreement']:.4g} n={f.get('decisions')}{mark}"
    return f"rel_rmse={f['rel_rmse']:.3g}{mark}" if f.get("rel_rmse") is not None else f"{f['detail'][:40]}{mark}"


def compare_lines(result: dict, rep: dict) -> list[str]:
    """One line per candidate: this check's figure per output, kdeploy's LiteRT-vs-Keras figure beside it, and
    `≠ kdeploy` where this check's simple bar and kdeploy's LiteRT fidelity verdict disagree."""
    cands = {c["name"]: c for c in rep.get("candidates", [])}
    lines = []
    for name, res in result.items():
        c = cands.get(name, {})
        fid = {f["output"]: f for f in c.get("fidelity", []) if f["runtime"] == "litert" and f["reference"] == "keras"}
        kd_ok = all(f["passed"] for f in fid.values()) if fid else None
        if res.get("error"):
            mine_ok, parts = False, [f"LiteRT error: {res['error']}"]
        else:
            mine_ok, parts = True, []
            for o in res["outputs"]:
                v = o["value"]
                if v is None:
                    mine_ok = False
                    parts.append(f"{o['output']}: unpaired")
                    continue
                good = v <= REL_RMSE_MAX if o["figure"] == "rel_rmse" else v >= DECISION_MIN
                mine_ok &= good
                kd = _kd_figure(fid[o["output"]]) if o["output"] in fid else "-"
                also = f", rel_rmse={o['rel_rmse']:.3g}" if o["kind"] == "sigmoid" else ""  # [0, 1] may be a regression
                parts.append(f"{o['output']} {o['figure']}={v:.4g}{also} n={o['n']}{'' if good else ' (low)'} [kdeploy {kd}]")
        flag = "" if kd_ok is None or kd_ok == mine_ok else " **≠ kdeploy**"
        verdict = "pass" if c.get("passed") else "FAIL"
        lines.append(f"{name} (kdeploy {verdict}; LiteRT fidelity {'-' if kd_ok is None else 'ok' if kd_ok else 'FAIL'})"
                     f": {'; '.join(parts)}{flag}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, required=True, help="A kdeploy --out folder (report.json).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--custom-objects")
    args = ap.parse_args()
    import numpy as np

    rep = json.loads((args.report / "report.json").read_text())
    todo = []
    for c in rep.get("candidates", []):
        tfl = next((a for a in c.get("artifacts", []) if a["format"] == "tflite"), None)
        external = tfl is not None and tfl.get("source") == "external"  # given to `check`: any precision
        if tfl is None or not (c["name"] in INT8_NAMES or tfl.get("precision") == "int8" or external):
            continue
        p = Path(tfl["path"])
        todo.append((c["name"], p if p.is_absolute() else args.report / p))
    result: dict = {}
    if not todo:
        print(json.dumps(result))
        return 0
    with np.load(args.data) as z:
        feeds = {k: z[k] for k in z.files if k != "y"}
    ref = reference(args.model, feeds, args.custom_objects)
    for name, path in todo:
        try:
            got = run_tflite(path, feeds)
        except Exception as e:  # a runtime crash is a result (LiteRT's message, first line)
            result[name] = {"outputs": [], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            continue
        pairing = pair(ref, got)
        rows = []
        for out_name, r in ref:
            k = pairing.get(out_name)
            if k is None or got[k].shape != r.shape:
                rows.append({"output": out_name, "kind": "?", "figure": "unpaired", "value": None, "n": 0})
                continue
            rows.append({"output": out_name, "tensor": k, **judge(r, got[k])})
        result[name] = {"outputs": rows, "error": None}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
