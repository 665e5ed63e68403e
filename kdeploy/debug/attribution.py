"""Per-layer error of a quantized `.tflite` against the float one, and the first diverging layer.

The tensors come from `kdeploy.debug.tensors` (a LiteRT child with every tensor preserved),
which also makes the comparisons of `compare_layers` itself (`dump_layers(compare=...)`): the
tensors of a MobileNetV2-224 on 9 samples are ~250 MB per artifact, and writing them, reading
them back here and comparing them here cost more than the comparison (and held them in this
process) where only the per-layer figures are wanted;
layers are matched by Keras layer name, so a quantized graph's extra QUANTIZE/DEQUANTIZE ops and
renamed output tensors do not matter. Errors accumulate along the graph: `rel_rmse` (RMSE over
the float tensor's range) and `cosine_mean` describe a layer's output, `added_cosine_loss`
what the layer adds to the worst of the layers feeding it (1 - cosine, above theirs) — the
ranking that says where the error starts. (RMSE over range hides a layer whose int8 output is
all zeros when a few outliers set the range: cancer_mlp's standardize layer, cosine 0.0.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdeploy.child import run_child
from kdeploy.compare import cosines, sum_squares

METRICS = ("added_cosine_loss", "rel_rmse", "cosine_mean")


@dataclass
class LayerTensors:
    """One artifact's per-layer outputs (float32, all samples) and what each layer's ops are."""

    outputs: dict[str, np.ndarray]
    meta: dict[str, dict[str, Any]]  # layer -> {op, ops, input_dtypes, nodes, fed_by}
    non_finite: list[dict[str, Any]] = field(default_factory=list)  # ops with NaN/Inf outputs, op order (tensors.py)


@dataclass
class LayerDump:
    """What the dump says of one artifact's layers; `load` reads their outputs where they were written (`path`).

    The tensors of a few artifacts reach hundreds of MB (`memory.layer_samples_for` bounds them): held
    from the selective search to the diagnosis they stood under the latency timing's peak
    (ResNet50V2 here), so the run keeps the file and reads it again when needed.
    """

    path: Path | None  # None: the outputs were compared in the child and not written
    index: int
    meta: dict[str, dict[str, Any]]
    non_finite: list[dict[str, Any]] = field(default_factory=list)

    def load(self) -> LayerTensors:
        if self.path is None:
            raise ValueError("these per-layer outputs were compared in the dump and not written")
        prefix = f"{self.index}/"
        with np.load(self.path) as z:
            return LayerTensors({k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}, self.meta,
                                self.non_finite)


@dataclass
class LayerErrors:
    """A candidate `.tflite`'s per-layer outputs against the float one's, compared in the dump (`compare_layers`)."""

    reference: LayerDump
    candidate: LayerDump
    sensitivity: list[dict[str, Any]]  # `sensitivity` rows, worst layer first
    first_failing: dict[str, Any] | None  # `first_failing_layer`
    first_non_finite: dict[str, Any] | None  # `first_non_finite` of the candidate (the float one's passed over)


@dataclass
class Comparison:
    """A comparison the dump makes (`compare_layers`): artifact `candidate` against artifact `reference` (indices
    into the dumped artifacts), in layer `order` (None: the reference's op order), the first failing layer judged
    at `tolerance` (a `profiles.Tolerance`'s fields; None: not looked for)."""

    reference: int
    candidate: int
    order: list[str] | None
    tolerance: dict[str, Any] | None
    precision: str
    reference_name: str = "fp32 .tflite"


def dump_layers(artifacts: list[tuple[Path, dict]], feeds_path: Path, model_name: str, layers: Any,
                job_dir: Path, samples: int, timeout_s: float, compare: list[Comparison] = (),
                write: bool = True, nice: int = 0, on_start=None) -> tuple[list[LayerDump], list[LayerErrors]]:
    """Runs the LiteRT tensor dump child on `artifacts` ((path, io) pairs): one LayerDump each (in `job_dir`), and
    the comparisons asked for, made in the child.

    Args:
        layers: the Keras layer paths the `LayerNamer` maps to; None for a SavedModel (ops grouped
            by name scope, `names.ScopeNamer`).
        compare: comparisons between the dumped artifacts, made in the child (`compare_layers`).
        write: write the tensors (`LayerDump.load`); False where the comparisons are all that is wanted.
        nice, on_start: as `child.run_child` takes them (a lower CPU priority; the child's Popen, to end it).

    Raises:
        ChildFailure: the child crashed, hung or raised.
    """
    from dataclasses import asdict

    out = job_dir / "layers.npz" if write else None
    job = {"artifacts": [{"path": str(p), "io": io} for p, io in artifacts], "feeds_path": str(feeds_path),
           "model_name": model_name, "layers": layers, "samples": samples, "out_path": str(out) if out else None,
           "compare": [asdict(c) for c in compare]}
    result = run_child("kdeploy.debug.tensors", job, job_dir, timeout_s=timeout_s, what="the LiteRT tensor dump",
                       nice=nice, on_start=on_start)
    bad = result.get("non_finite") or [[] for _ in result["artifacts"]]
    dumps = [LayerDump(out, i, meta, nf) for i, (meta, nf) in enumerate(zip(result["artifacts"], bad))]
    errors = [LayerErrors(dumps[c.reference], dumps[c.candidate], **got)
              for c, got in zip(compare, result.get("compared", []))]
    return dumps, errors


def compare_layers(ref: LayerTensors, cand: LayerTensors, c: Comparison | dict) -> dict[str, Any]:
    """`LayerErrors`' figures of `cand` against `ref` (the dump child's side): sensitivity, first failing layer,
    first non-finite op."""
    from kdeploy.profiles import Tolerance

    c = Comparison(**c) if isinstance(c, dict) else c
    order = c.order if c.order is not None else list(ref.meta)
    failing = None
    if c.tolerance is not None:
        failing = first_failing_layer(ref, cand, order, Tolerance(**c.tolerance), c.reference_name, c.precision)
    return {"sensitivity": sensitivity(ref, cand, order), "first_failing": failing,
            "first_non_finite": first_non_finite(cand, ref)}


def _rel_rmse(ref: np.ndarray, got: np.ndarray) -> float:
    rng = float(ref.max()) - float(ref.min()) or 1.0
    return float(np.sqrt(sum_squares(np.subtract(got, ref, dtype=np.float64)) / max(ref.size, 1)) / rng)


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
        rel[layer] = _rel_rmse(f, c)  # both in float64, cast as they go
        cos[layer] = float(cosines(f, c).mean())
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
                     atol: float, rtol: float, peak: float = 0.0) -> dict[str, Any] | None:
    """The first layer (Keras order) whose `.tflite` output exceeds `atol + rtol·|keras| + peak·magnitude`, or None.

    Args:
        peak: the tolerance's `max_peak_err`: a fraction of the layer output's magnitude (the larger
            of its max |value| and its range), as `acceptance` applies it to the model's outputs.

    Returns:
        `{layer, max_abs_err, tolerance}`: tolerance is the allowance at the worst element.
    """
    for layer in order:
        ref, got = keras_outputs.get(layer), tfl.outputs.get(layer)
        if ref is None or got is None or np.size(ref) != np.size(got):
            continue
        ref64 = ref.astype(np.float64).reshape(-1)
        got64 = got.astype(np.float64).reshape(-1)
        d = np.abs(got64 - ref64)
        magnitude = max(float(np.abs(ref64).max()), float(ref64.max() - ref64.min())) if peak and ref64.size else 0.0
        allowed = atol + rtol * np.abs(ref64) + peak * magnitude
        if np.any(~np.isfinite(d)) or np.any(d > allowed):
            worst = int(np.nanargmax(np.where(np.isfinite(d), d - allowed, np.inf)))
            return {"layer": layer, "max_abs_err": float(np.nanmax(np.where(np.isfinite(d), d, np.inf))),
                    "tolerance": float(allowed[worst])}
    return None


def first_non_finite(cand: LayerTensors, ref: LayerTensors | None = None) -> dict[str, Any] | None:
    """Where a `.tflite`'s NaN/Inf values start: the first op (execution order) whose float output holds some.

    Args:
        cand: the artifact's tensors (their `non_finite` ops).
        ref: the float `.tflite`'s: an op with as many non-finite values there (matched by node
            name) makes them in the model itself (e.g. a -inf attention mask), not the
            conversion, and is passed over.

    Returns:
        `{layer, op, node, node_name, count, elements, reference_count}` or None when no op's
        output held NaN/Inf (beyond the reference's); `layer` is the Keras layer (a name scope
        for a SavedModel) or None; `reference_count` is None without `ref`.
    """
    seen = {r["node_name"]: r["count"] for r in ref.non_finite} if ref is not None else {}
    for row in cand.non_finite:
        if row["count"] > seen.get(row["node_name"], 0):
            return {**row, "reference_count": seen.get(row["node_name"], 0) if ref is not None else None}
    return None


def first_failing_layer(ref: LayerTensors, cand: LayerTensors, order: list[str], tol, reference: str,
                        precision: str) -> dict[str, Any] | None:
    """The first layer (in `order`) whose output in `cand` fails `tol` against `ref` — the per-layer form of
    the candidate's fidelity check, with the criteria that do not depend on the output's scale or task.

    Top-1 agreement is left out (a hidden layer is no classifier); NaN/Inf fail.

    Returns:
        `{layer, op, max_abs_err, tolerance, detail, reference}` (`max_abs_err`: None where the
        output holds NaN/Inf; `tolerance`: atol + rtol·|ref| at the worst element when the
        tolerance has atol/rtol, else None; `detail`: the comparison's text), or None when every
        layer passes.
    """
    from kdeploy.compare import compare

    loose = tol.model_copy(update={"min_top1": None})
    for layer in order:
        f, c = ref.outputs.get(layer), cand.outputs.get(layer)
        if f is None or c is None or np.size(f) != np.size(c):
            continue
        (res,) = compare([f], [c.reshape(f.shape)], names=[layer], kinds=["regression"], tol=loose, runtime="litert",
                         reference=reference, precision=precision)
        if res.passed:
            continue
        d = np.abs(np.subtract(c.reshape(-1), f.reshape(-1), dtype=np.float64))
        tolerance = None
        if tol.atol is not None or tol.rtol is not None:
            allowed = (tol.atol or 0.0) + (tol.rtol or 0.0) * np.abs(f.astype(np.float64).reshape(-1))
            tolerance = float(allowed[int(np.nanargmax(np.where(np.isfinite(d), d - allowed, np.inf)))])
        return {"layer": layer, "op": cand.meta.get(layer, {}).get("op"),
                "max_abs_err": float(d.max()) if d.size and np.all(np.isfinite(d)) else None,  # None: NaN/Inf
                "tolerance": tolerance, "detail": res.detail, "reference": reference}
    return None
