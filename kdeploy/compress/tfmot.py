"""Parent side of pruning and clustering: plan recipes, run the TFMOT child, convert its models.

The child (`tfmot_worker`) does everything that touches TFMOT and tf_keras and writes one
SavedModel per recipe. Here each SavedModel is converted with the same exporters as the
post-training candidates (TFLite fp32/int8 with the run's calibration data, ONNX from the same
`.tflite`), its weight buffers are inspected (sparsity and unique values actually shipped), and a
`Build` is returned per artifact set, so pruned/clustered candidates go through the same
`evaluate` as every other candidate, held to the section's own tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kdeploy.errors import ConversionError
from kdeploy.profiles import tfmot_precisions

if TYPE_CHECKING:
    from kdeploy.pipeline import Build, Context
    from kdeploy.profiles import TargetProfile


# Precisions whose sparse-encoded .tflite LiteRT runs: sparse int8 (prune75-int8 on the digits CNN)
# failed with "failed to delegate FULLY_CONNECTED ... TfLiteXNNPackDelegate failed to prepare".
SPARSE_RUNNABLE = ("fp32", "fp16")


class TfmotFailure(Exception):
    """The TFMOT child crashed, hung or raised; the message says which and how."""


def plan(prof: "TargetProfile") -> list[dict[str, Any]]:
    """The recipes the profile enables, in a fixed order (one line each in the report)."""
    pr, cl = prof.pruning, prof.clustering
    recipes = []
    for s in pr.sparsities:
        recipes.append({"name": f"prune{round(s * 100):d}", "kind": "prune", "sparsity": s, "epochs": pr.epochs,
                        "learning_rate": pr.learning_rate, "min_layer_weights": pr.min_layer_weights})
    if pr.structured_2x4:
        recipes.append({"name": "prune2x4", "kind": "prune", "m_by_n": [2, 4], "epochs": pr.epochs,
                        "learning_rate": pr.learning_rate, "min_layer_weights": pr.min_layer_weights})
    for k in cl.clusters:
        recipes.append({"name": f"cluster{k}", "kind": "cluster", "clusters": k, "epochs": cl.epochs,
                        "learning_rate": cl.learning_rate, "min_layer_weights": cl.min_layer_weights})
    unique = {r["name"]: r for r in recipes}  # e.g. sparsities [0.5, 0.5]: one candidate
    return list(unique.values())


def run_worker(job: dict, job_dir: Path, timeout_s: float, progress: Callable[[str, str], None]) -> dict:
    """Runs the TFMOT child on `job`, relaying its progress lines.

    Raises:
        TfmotFailure: the child crashed (signal), timed out, or reported an exception.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file = job_dir / "job.json"
    job_file.write_text(json.dumps(job))
    log = job_dir / "stderr.log"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kdeploy.compress.tfmot_worker", str(job_file)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("PROGRESS "):
                    progress("tfmot", line[len("PROGRESS "):].rstrip())
            proc.wait()
        finally:
            timer.cancel()
    result_file = job_dir / "result.json"
    if killed.is_set():
        raise TfmotFailure(f"did not finish within {timeout_s:.0f} s (killed; finetune.timeout_s)")
    if proc.returncode < 0:
        raise TfmotFailure(f"crashed with signal {-proc.returncode}")
    if proc.returncode != 0 or not result_file.is_file():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise TfmotFailure(f"failed (exit {proc.returncode}): {tail[-1][:300] if tail else 'no output'}")
    result = json.loads(result_file.read_text())
    if "error" in result:
        raise TfmotFailure(f"raised {result['error']}")
    return result


def tfmot_builds(ctx: "Context") -> list["Build"]:
    """Pruned and clustered candidates for the run, or [] (with a finding saying why).

    Args:
        ctx: the run context; `ctx.model.signature_outputs` must already hold the reference
            SavedModel's output keys (call after the reference export).

    Returns:
        One Build per recipe and precision (plus sparse-encoded TFLite twins when smaller).
    """
    prof, m = ctx.profile, ctx.model
    recipes = plan(prof)
    if not recipes:
        return []
    names = ", ".join(r["name"] for r in recipes)
    if m.keras_model is None or m.format not in ("keras", "h5"):
        ctx.finding("warning", "tfmot-skipped",
                    f"pruning/clustering recipes ({names}) skipped: they need a .keras or .h5 model, received a {m.format}")
        return []
    job_dir = ctx.work / "tfmot"
    job_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"train__{k}": v for k, v in ctx.calibration.inputs.items()}
    arrays.update({f"val__{k}": v for k, v in ctx.validation.inputs.items()})
    if ctx.calibration.labels and not ctx.data.synthetic:
        arrays.update({f"label__{k}": v for k, v in ctx.calibration.labels.items()})
    np.savez(job_dir / "data.npz", **arrays)
    ft = prof.finetune
    job = {
        "model_path": str(Path(m.path).resolve()),
        "inputs": [t.to_dict() for t in m.inputs],
        "outputs": [t.name for t in m.outputs],
        "output_kinds": list(m.output_kinds),
        "signature_outputs": list(m.signature_outputs),
        "data_path": str(job_dir / "data.npz"),
        "out_dir": str(job_dir / "models"),
        "recipes": recipes,
        "finetune": ft.model_dump(exclude={"timeout_s"}),
        "seed": ctx.seed,
    }
    ctx.progress("tfmot", f"pruning/clustering in a child process: {names}")
    try:
        result = run_worker(job, job_dir, ft.timeout_s, ctx.progress)
    except TfmotFailure as e:
        ctx.finding("error", "tfmot-failed", f"pruning/clustering recipes ({names}) skipped: the TFMOT child process {e}")
        return []
    if "load_error" in result:
        ctx.finding("warning", "tfmot-skipped",
                    f"pruning/clustering recipes ({names}) skipped: Keras 3 safe loading in the TFMOT child failed "
                    f"({result['load_error']}); models that need custom code are not translated to tf_keras")
        return []
    sha = result.get("reference_weights_sha256", {})
    if sha.get("before") != sha.get("after"):
        ctx.finding("error", "reference-mutated", "the original model's weights changed during pruning/clustering "
                    f"(sha256 {sha.get('before')} → {sha.get('after')}); TFMOT candidates discarded")
        return []
    bridge = result["bridge"]
    if not bridge["ok"]:
        if "layer" in bridge:
            why = f"layer '{bridge['layer']}' ({bridge['class']}): {bridge['reason']}"
        else:
            why = (f"the tf_keras translation differs from the original by {bridge['max_abs_diff']:.2e} "
                   f"(> {bridge['atol']:.0e}) on {bridge['samples']} validation samples")
        ctx.finding("warning", "tfmot-bridge-unsupported",
                    f"pruning/clustering recipes ({names}) skipped: the Keras 3 → tf_keras bridge cannot be trusted "
                    f"for this model: {why}")
        return []
    if bridge.get("dropped_config_keys"):
        ctx.finding("info", "tfmot-bridge-dropped-keys",
                    f"Keras 3 → tf_keras bridge dropped config keys tf_keras does not know: {bridge['dropped_config_keys']} "
                    f"(outputs still equal within {bridge['atol']:.0e})")
    bridge_out = {k: bridge[k] for k in ("max_abs_diff", "atol", "samples", "classes", "unrolled")}
    bridge_out["reference_weights_sha256"] = sha["after"]  # equal before and after the TFMOT work (checked above)
    baseline = _baseline_sizes(ctx, result.get("baseline_savedmodel"))
    builds: list[Build] = []
    for row in result["recipes"]:
        if "error" in row:
            ctx.finding("warning", "tfmot-recipe-failed", f"recipe {row['name']} failed: {row['error']}")
            continue
        if "skipped" in row:
            ctx.finding("info", "tfmot-recipe-skipped", f"recipe {row['name']} skipped: {row['skipped']}")
            continue
        builds += _convert(ctx, row, bridge_out, baseline)
    return builds


def _baseline_sizes(ctx: "Context", savedmodel: str | None) -> dict[str, dict]:
    """Sizes of the bridged model without pruning/clustering, per precision the sections use."""
    from kdeploy.export import tflite

    if not savedmodel:
        return {}
    prof, m = ctx.profile, ctx.model
    precisions = list(dict.fromkeys([*tfmot_precisions(prof, prof.pruning), *tfmot_precisions(prof, prof.clustering)]))
    sizes = {}
    for precision in precisions:
        path = ctx.work / "tfmot" / f"baseline-{precision}.tflite"
        try:
            art = tflite.convert(Path(savedmodel), precision, path, ctx.calibration.inputs, [t.name for t in m.inputs],
                                 m.signature_outputs)
        except ConversionError:
            continue
        sizes[precision] = {"size_bytes": art.size_bytes, "gzip_bytes": art.gzip_bytes}
        path.unlink(missing_ok=True)
    return sizes


def _section(prof: "TargetProfile", name: str):
    return prof.pruning if name.startswith("prune") else prof.clustering


def _convert(ctx: "Context", row: dict, bridge_out: dict, baseline: dict[str, dict]) -> list["Build"]:
    from kdeploy.export import tflite
    from kdeploy.compress.inspect_tflite import weight_stats
    from kdeploy.pipeline import Build

    prof, m = ctx.profile, ctx.model
    section = _section(prof, row["name"])
    wanted = set(prof.runtimes) | set(prof.crosscheck_runtimes)
    art_dir = ctx.staging / "artifacts"
    in_names = [t.name for t in m.inputs]
    technique = "pruning" if row["name"].startswith("prune") else "clustering"
    base_recipe = {"converter": "tflite", "optimization": technique,
                   **{k: row[k] for k in ("schedule", "initial_sparsity", "final_sparsity", "end_step", "init") if k in row}}
    common = {"technique": technique, "bridge": bridge_out, "finetune": row["finetune"], "layers": row["layers"],
              "skipped_layers": row["skipped_layers"], "child_seconds": row.get("seconds")}
    builds = []
    for precision in tfmot_precisions(prof, section):
        name = f"{row['name']}-{precision}"
        recipe = {**base_recipe, "precision": precision}
        if precision in ("int8", "int16x8"):
            recipe["calibration_samples"] = len(ctx.calibration)
        ctx.progress("convert", f"TFLite {name}")
        b = Build(name, precision, recipe)
        b.tolerance = section.tolerance
        builds.append(b)
        try:
            tfl = tflite.convert(Path(row["savedmodel"]), precision, art_dir / f"{name}.tflite", ctx.calibration.inputs,
                                 in_names, m.signature_outputs)
        except ConversionError as e:
            b.errors.append(str(e))
            b.optimization = common
            continue
        b.optimization = {**common, "tflite": _summary(weight_stats(tfl.path))}
        if precision in baseline:
            # Same export path, original weights: the size difference to this is what the recipe saved.
            b.optimization["unoptimized_same_export"] = baseline[precision]
        if "litert" in wanted:
            b.artifacts.append(tfl)
        onnx_art = _onnx(ctx, b, tfl, art_dir / f"{name}.onnx") if "onnxruntime" in wanted else None
        if technique == "pruning" and prof.pruning.sparse_encoding and "litert" in wanted:
            twin = _sparse_twin(ctx, row, precision, recipe, tfl, onnx_art, b.optimization)
            if twin is not None:
                builds.append(twin)
        if "litert" not in wanted:
            tfl.path.unlink(missing_ok=True)
    return builds


def _onnx(ctx: "Context", b: "Build", tfl, out: Path):
    from kdeploy.export import onnx as onnx_export
    from kdeploy.pipeline import _onnx_missing

    ctx.progress("convert", f"ONNX {b.name}")
    try:
        art = onnx_export.from_tflite(tfl, out)
    except ConversionError as e:
        _onnx_missing(ctx, b, str(e))
        return None
    b.artifacts.append(art)
    b.recipe["onnx"] = "tf2onnx from the same .tflite"
    return art


def _sparse_twin(ctx: "Context", row: dict, precision: str, recipe: dict, dense, dense_onnx, optimization: dict):
    """The same model converted with Optimize.EXPERIMENTAL_SPARSITY, as its own candidate when smaller."""
    from kdeploy.export import onnx as onnx_export
    from kdeploy.export import tflite
    from kdeploy.compress.inspect_tflite import weight_stats
    from kdeploy.pipeline import Build

    name = f"{row['name']}-{precision}-sparse"
    path = ctx.staging / "artifacts" / f"{name}.tflite"
    try:
        art = tflite.convert(Path(row["savedmodel"]), precision, path, ctx.calibration.inputs,
                             [t.name for t in ctx.model.inputs], ctx.model.signature_outputs, sparse=True)
    except ConversionError as e:
        optimization["sparse_encoding"] = {"built": False, "error": str(e)}
        return None
    stats = weight_stats(art.path)
    smaller = bool(stats["sparse_encoded"] and art.size_bytes < dense.size_bytes)
    info = {"size_bytes": art.size_bytes, "gzip_bytes": art.gzip_bytes, "dense_size_bytes": dense.size_bytes,
            "dense_gzip_bytes": dense.gzip_bytes, "sparse_encoded_tensors": stats["sparse_encoded"],
            "kept_as_candidate": smaller and precision in SPARSE_RUNNABLE}
    if smaller and precision not in SPARSE_RUNNABLE:
        info["why_not"] = ("sparse-encoded int8 FULLY_CONNECTED fails to prepare in LiteRT's XNNPACK delegate "
                           "(seen with ai-edge-litert 2.3)")
    elif not smaller:
        info["why_not"] = "not smaller than the dense encoding"
    optimization["sparse_encoding"] = info
    if not info["kept_as_candidate"]:
        art.path.unlink(missing_ok=True)
        return None
    b = Build(name, precision, {**recipe, "tflite_optimizations": "EXPERIMENTAL_SPARSITY"})
    b.tolerance = _section(ctx.profile, row["name"]).tolerance
    b.optimization = {**optimization, "tflite": _summary(stats)}
    b.artifacts.append(art)
    if dense_onnx is not None:
        # tf2onnx cannot read sparse-encoded TFLite tensors: the ONNX twin comes from the dense
        # .tflite of the same model (identical weight values once densified).
        ctx.progress("convert", f"ONNX {name}")
        try:
            b.artifacts.append(onnx_export.from_tflite(dense, ctx.staging / "artifacts" / f"{name}.onnx"))
            b.recipe["onnx"] = f"tf2onnx from the dense-encoded .tflite of {row['name']}-{precision} (same weights)"
        except ConversionError as e:
            b.errors.append(str(e))
    return b


def _summary(stats: dict) -> dict:
    rows = [{k: t[k] for k in ("name", "op", "shape", "dtype", "weights", "zeros", "unique", "unique_per_channel",
                               "sparse_encoded")} for t in stats["tensors"]]
    return {**{k: v for k, v in stats.items() if k != "tensors"}, "tensors": rows}
