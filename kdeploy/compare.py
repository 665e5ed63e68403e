"""Fidelity: how far a runtime's outputs are from the reference; the verdict is `kdeploy.acceptance`'s."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kdeploy.acceptance import DECISION_KINDS, agreement_of, decisions, judge
from kdeploy.profiles import Tolerance


@dataclass
class OutputMetrics:
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    norm_err: float  # max abs error / reference range (max - min)
    mean_norm_err: float  # mean abs error / reference range
    cosine_min: float
    cosine_mean: float
    top1_agreement: float | None
    finite: bool
    peak_err: float = float("nan")  # max abs error / the output's magnitude (the larger of max |ref| and its range)
    rel_rmse: float = float("nan")  # RMS error / RMS of the reference
    decision_agreement: float | None = None  # top-1 class (softmax) or decision at the threshold (sigmoid, score maps)
    decisions: int | None = None  # decisions compared: samples (softmax), cells (softmax map), elements (sigmoid)


@dataclass
class FidelityResult:
    """One output of one runtime against one reference, with its verdict (truthy when passed)."""

    runtime: str
    reference: str
    output: str
    precision: str
    samples: int
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    norm_err: float
    mean_norm_err: float
    cosine_min: float
    cosine_mean: float
    top1_agreement: float | None
    passed: bool
    detail: str
    peak_err: float | None = None
    rel_rmse: float | None = None
    decision_agreement: float | None = None
    decisions: int | None = None
    summary: str = ""  # the failed criteria in user terms ("" when passed)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return asdict(self)


def output_kind(kind: str, ref: np.ndarray) -> str:
    """Resolves "unknown" kinds (SavedModel inputs) from the reference values.

    Non-negative values summing to 1 along the last axis are a softmax: a classifier's (N, C), or a
    per-location map (N, ..., C) whose decisions `acceptance.decisions` takes cell by cell.
    """
    if kind != "unknown":
        return kind
    if (ref.ndim >= 2 and ref.shape[-1] > 1 and np.all(ref >= 0)
            and np.allclose(ref.sum(axis=-1), 1.0, atol=1e-3)):
        return "multiclass"
    return "regression"


def metrics(ref: np.ndarray, got: np.ndarray, kind: str, threshold: float = 0.5) -> OutputMetrics:
    """Error metrics of `got` against `ref` (same shape, batch first); decisions of sigmoid outputs at `threshold`."""
    if ref.shape != got.shape:
        raise ValueError(f"output shape {got.shape} differs from reference {ref.shape}")
    # Figures in float64 without float64 copies of the inputs (a hidden layer's output is compared this way too,
    # `debug.attribution`: MobileNetV2's first blocks hold ~10M values): each operation casts as it goes.
    finite = bool(np.all(np.isfinite(got)) and np.all(np.isfinite(ref)))
    if not finite:
        nan = float("nan")
        return OutputMetrics(nan, nan, nan, nan, nan, nan, nan, None, False)
    d = np.subtract(got, ref, dtype=np.float64)
    np.abs(d, out=d)
    lo, hi = (float(ref.min()), float(ref.max())) if ref.size else (0.0, 0.0)
    rng = hi - lo
    max_abs = float(d.max()) if d.size else 0.0
    mean_abs = float(d.mean()) if d.size else 0.0
    cos = cosines(ref, got)
    top1 = None
    if kind == "multiclass":  # along the last (class) axis: per sample, or per location of a map
        top1 = agreement_of(*decisions(ref, got, kind))[0] if d.size else 1.0
    elif kind == "binary":
        top1 = agreement_of(*decisions(ref, got, kind))[0]
    agree = n_dec = None
    if kind in DECISION_KINDS and d.size:
        agree, n_dec = agreement_of(*decisions(ref, got, kind, threshold))
    magnitude = max(hi, -lo, rng)  # the larger of max |ref| and its range
    ref_rms = float(np.sqrt(sum_squares(ref) / ref.size)) if ref.size else 0.0
    rmse = float(np.sqrt(sum_squares(d) / d.size)) if d.size else 0.0
    max_rel = 0.0
    if d.size:
        rel = np.abs(ref, dtype=np.float64)
        rel += 1e-8
        max_rel = float(np.divide(d, rel, out=d).max())  # d's last use
    return OutputMetrics(
        max_abs_err=max_abs,
        mean_abs_err=mean_abs,
        max_rel_err=max_rel,
        norm_err=max_abs / rng if rng > 0 else max_abs,
        mean_norm_err=mean_abs / rng if rng > 0 else mean_abs,
        cosine_min=float(cos.min()) if cos.size else 1.0,
        cosine_mean=float(cos.mean()) if cos.size else 1.0,
        top1_agreement=top1,
        finite=True,
        peak_err=max_abs / magnitude if magnitude > 0 else max_abs,
        rel_rmse=rmse / ref_rms if ref_rms > 0 else rmse,
        decision_agreement=agree,
        decisions=n_dec,
    )


def sum_squares(x: np.ndarray) -> float:
    """Sum of squares, accumulated in float64, without a temporary the size of `x`."""
    flat = x.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarities; for one value per sample, the one cosine over the batch.

    A sample whose reference and output are both (near) zero, below 1e-6 of the batch's largest
    norm (a ReLU map that is off for that input), agrees: its direction is rounding noise.
    """
    a = ref.reshape(len(ref), -1)
    b = got.reshape(len(got), -1)
    if a.shape[1] == 1:
        a, b = a.T, b.T
    # per-row dot products in float64, cast as they go: no temporary the size of the batch
    na = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
    dot = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    tiny = 1e-6 * max(float(na.max(initial=0.0)), float(nb.max(initial=0.0)))
    both_zero = (na <= tiny) & (nb <= tiny)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return np.clip(cos, -1.0, 1.0)


def compare(
    ref_outputs: list[np.ndarray],
    got_outputs: list[np.ndarray],
    *,
    names: list[str],
    kinds: list[str],
    tol: Tolerance,
    runtime: str,
    reference: str,
    precision: str,
) -> list[FidelityResult]:
    """One FidelityResult per output."""
    results = []
    for ref, got, name, kind in zip(ref_outputs, got_outputs, names, kinds):
        got = np.asarray(got).reshape(ref.shape) if np.size(got) == np.size(ref) else np.asarray(got)
        if got.shape != ref.shape:
            text = f"output shape {got.shape} differs from reference {ref.shape}"
            results.append(FidelityResult(runtime, reference, name, precision, len(ref), *([float("nan")] * 7), None,
                                          False, text, summary=f"{runtime}: {text}"))
            continue
        kind = output_kind(kind, ref)
        threshold = 0.5 if tol.decision_threshold is None else tol.decision_threshold
        m = metrics(ref, got, kind, threshold)
        passed, detail, summary = judge(m, ref, got, tol, kind, runtime=runtime, reference=reference)
        results.append(FidelityResult(
            runtime=runtime, reference=reference, output=name, precision=precision, samples=len(ref),
            max_abs_err=m.max_abs_err, mean_abs_err=m.mean_abs_err, max_rel_err=m.max_rel_err,
            norm_err=m.norm_err, mean_norm_err=m.mean_norm_err, cosine_min=m.cosine_min,
            cosine_mean=m.cosine_mean, top1_agreement=m.top1_agreement,
            passed=passed, detail=detail, peak_err=m.peak_err, rel_rmse=m.rel_rmse,
            decision_agreement=m.decision_agreement, decisions=m.decisions, summary=summary,
        ))
    return results
