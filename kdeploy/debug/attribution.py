"""Per-layer error of a quantized `.tflite` against the float one, and the first diverging layer.

The tensors come from `kdeploy.debug.tensors` (a LiteRT child with every tensor preserved);
layers are matched by Keras layer name, so a quantized graph's extra QUANTIZE/DEQUANTIZE ops and
renamed output tensors do not matter. Errors accumulate along the graph: `rel_rmse` (RMSE over
the float tensor's range) and `cosine_mean` describe a layer's output, `added_cosine_loss`
what the layer adds to the worst of the layers feeding it (1 - cosine, above theirs) — the
ranking that says where the error starts. (RMSE over range hides a layer whose int8 output is
all zeros when a few outliers set the range: cancer_mlp's standardize layer, cosine 0.0.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdeploy.child import run_child
from kdeploy.compare import cosines

METRICS = ("added_cosine_loss", "rel_rmse", "cosine_mean")


@dataclass
class LayerTensors:
    """One artifact's per-layer outputs (float32, all samples) and what each layer's ops are."""

    outputs: dict[str, np.ndarray]
    meta: dict[str, dict[str, Any]]  # layer -> {op, ops, input_dtypes, nodes, fed_by}


@dataclass
class LayerDump:
    """Where one artifact's per-layer outputs were written; `load` reads them (they are not kept in memory).

    The tensors of a few artifacts reach hundreds of MB (`memory.LAYER_TENSOR_BYTES` each): held
    from the selective search to the diagnosis they stood under the latency timing's peak
    (ResNet50V2 here), so the run keeps the file and reads it again when needed.
    """

    path: Path
    index: int
    meta: dict[str, dict[str, Any]]

    def load(self) -> LayerTensors:
        prefix = f"{self.index}/"
        with np.load(self.path) as z:
            return LayerTensors({k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}, self.meta)


def dump_layers(artifacts: list[tuple[Path, dict]], feeds_path: Path, model_name: str, layers: list[str],
                job_dir: Path, samples: int, timeout_s: float) -> list[LayerDump]:
    """Runs the LiteRT tensor dump child on `artifacts` ((path, io) pairs); one LayerDump each (in `job_dir`).

    Raises:
        ChildFailure: the child crashed, hung or raised.
    """
    out = job_dir / "layers.npz"
    job = {"artifacts": [{"path": str(p), "io": io} for p, io in artifacts], "feeds_path": str(feeds_path),
           "model_name": model_name, "layers": layers, "samples": samples, "out_path": str(out)}
    result = run_child("kdeploy.debug.tensors", job, job_dir, timeout_s=timeout_s, what="the LiteRT tensor dump")
    return [LayerDump(out, i, meta) for i, meta in enumerate(result["artifacts"])]


def _rel_rmse(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    rng = float(ref64.max() - ref64.min()) or 1.0
    return float(np.sqrt(np.mean((got64 - ref64) ** 2)) / rng)


def sensitivity(float_t: LayerTensors, cand: LayerTensors, order: list[str]) -> list[dict[str, Any]]:
    """`candidates[].sensitivity`: `{layer, op, metric, value}` rows, layers worst first by added error.

    Args:
        float_t: the float model's tensors.
        cand: the candidate's tensors (same samples).
        order: Keras layer order (ties keep it).
    """
    rel: dict[str, float] = {}
    cos: dict[str, float] = {}
    for layer in order:
        f, c = float_t.outputs.get(layer), cand.outputs.get(layer)
        if f is None or c is None or f.shape != c.shape or not np.all(np.isfinite(c)):
            continue
        rel[layer] = _rel_rmse(f, c)
        cos[layer] = float(cosines(f.astype(np.float64), c.astype(np.float64)).mean())
    loss = {layer: 1.0 - c for layer, c in cos.items()}
    added = {layer: max(0.0, v - max((loss.get(p, 0.0) for p in cand.meta[layer]["fed_by"]), default=0.0))
             for layer, v in loss.items()}
    ranked = sorted(rel, key=lambda layer: (-added[layer], order.index(layer)))
    rows = []
    for layer in ranked:
        op = cand.meta[layer]["op"]
        for metric, value in zip(METRICS, (added[layer], rel[layer], cos[layer])):
            rows.append({"layer": layer, "op": op, "metric": metric, "value": round(value, 6)})
    return rows


def ranked_layers(rows: list[dict[str, Any]]) -> list[str]:
    """Layer names of sensitivity rows, worst first, each once."""
    return list(dict.fromkeys(r["layer"] for r in rows))


def first_divergence(keras_outputs: dict[str, np.ndarray], tfl: LayerTensors, order: list[str],
                     atol: float, rtol: float) -> dict[str, Any] | None:
    """The first layer (Keras order) whose `.tflite` output exceeds `atol + rtol·|keras|`, or None.

    Returns:
        `{layer, max_abs_err, tolerance}`: tolerance is `atol + rtol·|keras|` at the worst element.
    """
    for layer in order:
        ref, got = keras_outputs.get(layer), tfl.outputs.get(layer)
        if ref is None or got is None or np.size(ref) != np.size(got):
            continue
        ref64 = ref.astype(np.float64).reshape(-1)
        got64 = got.astype(np.float64).reshape(-1)
        d = np.abs(got64 - ref64)
        allowed = atol + rtol * np.abs(ref64)
        if np.any(~np.isfinite(d)) or np.any(d > allowed):
            worst = int(np.nanargmax(np.where(np.isfinite(d), d - allowed, np.inf)))
            return {"layer": layer, "max_abs_err": float(np.nanmax(np.where(np.isfinite(d), d, np.inf))),
                    "tolerance": float(allowed[worst])}
    return None
