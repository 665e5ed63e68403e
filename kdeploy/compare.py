"""Fidelity: how far a runtime's outputs are from the reference, and the verdict for a tolerance."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return asdict(self)


def output_kind(kind: str, ref: np.ndarray) -> str:
    """Resolves "unknown" kinds (SavedModel inputs) from the reference values."""
    if kind != "unknown":
        return kind
    if ref.ndim == 2 and ref.shape[1] > 1 and np.all(ref >= 0) and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3):
        return "multiclass"
    return "regression"


def metrics(ref: np.ndarray, got: np.ndarray, kind: str) -> OutputMetrics:
    """Error metrics of `got` against `ref` (same shape, batch first)."""
    if ref.shape != got.shape:
        raise ValueError(f"output shape {got.shape} differs from reference {ref.shape}")
    ref64 = ref.astype(np.float64)
    got64 = got.astype(np.float64)
    finite = bool(np.all(np.isfinite(got64)) and np.all(np.isfinite(ref64)))
    if not finite:
        nan = float("nan")
        return OutputMetrics(nan, nan, nan, nan, nan, nan, nan, None, False)
    d = np.abs(got64 - ref64)
    rng = float(ref64.max() - ref64.min()) if ref64.size else 0.0
    max_abs = float(d.max()) if d.size else 0.0
    mean_abs = float(d.mean()) if d.size else 0.0
    cos = cosines(ref64, got64)
    top1 = None
    if kind == "multiclass":
        top1 = float(np.mean(ref64.reshape(len(ref64), -1).argmax(1) == got64.reshape(len(got64), -1).argmax(1)))
    elif kind == "binary":
        top1 = float(np.mean((ref64 > 0.5) == (got64 > 0.5)))
    return OutputMetrics(
        max_abs_err=max_abs,
        mean_abs_err=mean_abs,
        max_rel_err=float((d / (np.abs(ref64) + 1e-8)).max()) if d.size else 0.0,
        norm_err=max_abs / rng if rng > 0 else max_abs,
        mean_norm_err=mean_abs / rng if rng > 0 else mean_abs,
        cosine_min=float(cos.min()) if cos.size else 1.0,
        cosine_mean=float(cos.mean()) if cos.size else 1.0,
        top1_agreement=top1,
        finite=True,
    )


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarities; for one value per sample, the one cosine over the batch."""
    a = ref.reshape(len(ref), -1)
    b = got.reshape(len(got), -1)
    if a.shape[1] == 1:
        a, b = a.T, b.T
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return np.clip(cos, -1.0, 1.0)


def judge(m: OutputMetrics, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> tuple[bool, str]:
    """Verdict and a line saying how far off each criterion is, and what the limit was."""
    if not m.finite:
        bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
        return False, f"non-finite outputs: {bad} NaN/Inf value(s) (reference has {int(np.size(ref) - np.count_nonzero(np.isfinite(ref)))})"
    parts: list[str] = []
    ok = True
    if tol.atol is not None or tol.rtol is not None:
        atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
        excess = np.abs(got.astype(np.float64) - ref) - (atol + rtol * np.abs(ref.astype(np.float64)))
        good = bool(np.all(excess <= 0))
        ok &= good
        parts.append(f"max_abs={m.max_abs_err:.2e} (atol {atol:g} + rtol {rtol:g}·|ref|: {'ok' if good else 'exceeded'})")
    for value, limit, name, higher_is_better in (
        (m.norm_err, tol.max_norm_err, "norm_err", False),
        (m.mean_norm_err, tol.max_mean_norm_err, "mean_norm_err", False),
        (m.cosine_min, tol.min_cosine, "cosine_min", True),
        (m.cosine_mean, tol.min_cosine_mean, "cosine_mean", True),
        (m.top1_agreement, tol.min_top1, "top1", True),
    ):
        if limit is None or value is None:
            continue
        good = value >= limit if higher_is_better else value <= limit
        note = ""
        if name == "top1":
            good, note = _top1_verdict(ref, got, value, limit, tol.near_tie_margin)
        ok &= good
        parts.append(f"{name}={value:.5g} ({'>=' if higher_is_better else '<='} {limit:g}{'' if good else ' FAILED'}"
                     f"{note})")
    if not parts:
        parts.append(f"max_abs={m.max_abs_err:.2e} (no criterion set)")
    return bool(ok), ", ".join(parts)


def flip_margins(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Keras' margin (top-1 minus top-2 probability; binary: |2p - 1|) of each sample whose top-1 class flipped."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    if a.shape[1] == 1:
        flipped = (a[:, 0] > 0.5) != (b[:, 0] > 0.5)
        return np.abs(2 * a[flipped, 0] - 1)
    flipped = a.argmax(1) != b.argmax(1)
    top2 = np.sort(a[flipped], axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def samples_needed(min_top1: float, confidence: float = 0.95) -> int:
    """Samples that must all agree to show top-1 agreement >= min_top1 at `confidence` (one-sided binomial)."""
    return int(np.ceil(np.log(1 - confidence) / np.log(min_top1))) if 0 < min_top1 < 1 else 1


def _top1_verdict(ref: np.ndarray, got: np.ndarray, value: float, limit: float,
                  near_tie: float | None) -> tuple[bool, str]:
    """The top-1 verdict on this sample count, and a note on the flips (margins, what a verdict would need)."""
    from math import comb

    n = len(ref)
    margins = flip_margins(ref, got)
    flips = len(margins)
    if flips == 0:
        return True, ""
    # P(at least `flips` flips in n samples | agreement exactly min_top1): a small p says the data
    # show agreement below the tolerance; a large one says the sample count cannot tell.
    p = 1 - limit
    p_value = max(0.0, 1 - sum(comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(flips)))
    text = (f": {flips} flip(s) of {n}, Keras margin{'s' if flips > 1 else ''} "
            f"{', '.join(f'{x:.3f}' for x in np.sort(margins)[:5])}; {samples_needed(limit)} agreeing samples "
            f"would show >= {limit:g} at 95%")
    if value >= limit:
        return True, text
    if near_tie is not None and p_value >= 0.05 and float(margins.max()) < near_tie:
        return True, text + f"; accepted: near-ties (margin < {near_tie:g}) and consistent with {limit:g} (p={p_value:.2f})"
    return False, text + (f"; p={p_value:.2g}" if near_tie is not None else "")


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
            results.append(FidelityResult(runtime, reference, name, precision, len(ref), *([float("nan")] * 7), None,
                                          False, f"output shape {got.shape} differs from reference {ref.shape}"))
            continue
        m = metrics(ref, got, output_kind(kind, ref))
        passed, detail = judge(m, ref, got, tol)
        results.append(FidelityResult(
            runtime=runtime, reference=reference, output=name, precision=precision, samples=len(ref),
            max_abs_err=m.max_abs_err, mean_abs_err=m.mean_abs_err, max_rel_err=m.max_rel_err,
            norm_err=m.norm_err, mean_norm_err=m.mean_norm_err, cosine_min=m.cosine_min,
            cosine_mean=m.cosine_mean, top1_agreement=m.top1_agreement,
            passed=passed, detail=detail,
        ))
    return results
