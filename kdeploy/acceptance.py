"""The acceptance policy: how a runtime's outputs become a verdict, for every precision, in one place.

Evaluation, the selective int8 search's judge and `kdeploy check` all reach it through
`compare.compare` (fidelity against Keras and between runtimes) and `taskmetrics.budget_checks`
(labels). The rule, by what the tolerance of the artifact's precision sets:

- **Magnitude** (`max_peak_err`, `min_cosine`): an fp32 conversion is the same function computed
  with other kernels and another accumulation order, so it is held to an error relative to each
  output's magnitude (its peak |value| or its range, whichever is larger: never a blow-up on a
  near-constant output) and to the per-sample cosine. Drift measured on deep networks passes; a
  real defect (a perturbed layer, a wrong op, swapped outputs) is one to two orders above it.
- **Decisions** (`min_top1`): a quantized artifact is judged on what users act on. For a softmax
  output, its top-1 class along the last (class) axis: one decision per sample for (N, C), one per
  location for a per-location softmax map (N, ..., C); for sigmoid outputs and score maps, the
  decision at `decision_threshold`. Agreement below `min_top1` fails only when the number of flips
  shows it at 95% confidence for the sample count (one-sided binomial test of H0 "agreement >=
  min_top1"): one low-margin flip on a small validation set does not turn a verdict. For maps
  (rank > 2) the trials of that test are the samples, not the cells (`_bound_counts`). A decision
  agrees only when the runtime picks the same class alone: a tie at the runtime's top (an int8
  softmax rounding two classes, or all of them, to one level) is a flip, not argmax's first index.
  A decision Keras itself does not make (top-1 margin below `TIE_MARGIN`, e.g. a constant softmax)
  is not counted; an output with no such decision left is judged by its relative error instead
  (a random MobileNetV2's constant 0.001 softmax, all zeros in int8, had "top-1 1.000").
- **Relative error** (`max_rel_rmse`): regression and box outputs, RMS error over RMS of the
  reference.
- Other criteria (`atol`/`rtol`, `max_norm_err`, `max_mean_norm_err`, `min_cosine_mean`) apply to
  every output where a profile sets them; the built-in profiles no longer do for quantized
  precisions (`mean_norm_err` divides by the range of a nearly flat softmax and blows up).
- NaN/Inf always fails. With labels, the task budget decides (`task_verdict`): by default the
  artifact keeps 99% of Keras' accuracy (MLPerf Inference's rule for quantized models), with the
  same confidence bound on the sample count.
- Verdicts come from the target's deployed runtimes; agreement between runtimes is reported as
  consistency and gates for fp32 (two runtimes of one float model disagreeing is a converter bug)
  and for quantized graphs only where the profile's `[consistency] gate_quantized` asks
  (`gates_consistency`): integer kernels legitimately round differently.

Pure functions over arrays and figures (no run context, no report objects).
"""

from __future__ import annotations

from math import erfc, exp, lgamma, log, log1p, sqrt
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # of every sample-count bound here (decision agreement, task accuracy)
# A Keras decision closer than this to a tie (top-1 minus top-2 probability; distance to the threshold) is no
# decision: float32 drift alone can turn it (fp32 .tflite vs Keras differ by up to ~1e-4 of the magnitude).
TIE_MARGIN = 1e-6
DECISION_KINDS = ("multiclass", "binary", "multilabel")


def binomial_p(n: int, k: int, rate: float) -> float:
    """P(X >= k) for X ~ Binomial(n, rate): how likely `k` or more failures are at a failure rate of `rate`."""
    if k <= 0:
        return 1.0
    if rate <= 0:
        return 0.0
    if rate >= 1 or k > n:
        return 1.0 if rate >= 1 else 0.0
    if n > 5000:  # many decisions (sigmoid elements): the normal approximation, continuity-corrected
        sd = sqrt(n * rate * (1 - rate))
        return 0.5 * erfc((k - 0.5 - n * rate) / (sd * sqrt(2)))
    log_r, log_q = log(rate), log1p(-rate)
    cdf = sum(exp(lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) + i * log_r + (n - i) * log_q) for i in range(k))
    return min(1.0, max(0.0, 1.0 - cdf))


def consistent_with(n: int, failures: int, rate: float) -> tuple[bool, float]:
    """Whether `failures` in `n` trials are consistent with a failure rate <= `rate` at CONFIDENCE, and the p-value."""
    p = binomial_p(n, failures, rate)
    return p >= 1 - CONFIDENCE, p


def samples_needed(min_agreement: float, confidence: float = CONFIDENCE) -> int:
    """Samples that must all agree to show agreement >= min_agreement at `confidence` (one-sided binomial)."""
    return int(np.ceil(np.log(1 - confidence) / np.log(min_agreement))) if 0 < min_agreement < 1 else 1


def decisions(ref: np.ndarray, got: np.ndarray, kind: str, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and decision (shape (N, decisions per sample)), whether it flipped, and Keras' margin of it.

    multiclass: the top-1 class along the last (class) axis: one decision per sample for (N, C),
    one per location for a per-location softmax map (N, ..., C), e.g. a detector's (N, H, W, 2)
    face/not-face map (one argmax over the flattened map would be arbitrary among the many cells
    near 1.0); margin = top-1 minus top-2 probability of that sample or cell.
    binary / multilabel (sigmoid outputs, score maps): one decision per element, above `threshold`
    or not; margin = |value - threshold|.
    A multiclass decision flips when another class is above Keras' class or tied with it. Decisions
    with a margin below `TIE_MARGIN` are Keras ties: `decided` leaves them out of every count.
    """
    n = len(ref)
    if kind == "multiclass":
        width = ref.shape[-1] if ref.ndim >= 2 else (ref.size // n if n else 1)
        a = ref.reshape(-1, width).astype(np.float64)
        b = got.reshape(-1, width).astype(np.float64)
        mine = b[np.arange(len(b)), a.argmax(1)]  # the runtime's value of Keras' class
        flipped = (b >= mine[:, None]).sum(1) > 1  # another class above it, or tied with it
        top2 = np.sort(a, axis=1)[:, -2:] if width > 1 else np.concatenate([np.zeros_like(a), a], axis=1)
        return flipped.reshape(n, -1), (top2[:, 1] - top2[:, 0]).reshape(n, -1)
    a = ref.reshape(n, -1).astype(np.float64)
    b = got.reshape(n, -1).astype(np.float64)
    return (a > threshold) != (b > threshold), np.abs(a - threshold)


def decided(margins: np.ndarray) -> np.ndarray:
    """The decisions Keras makes (its margin at least `TIE_MARGIN`), of `decisions`' margins."""
    return margins >= TIE_MARGIN


def agreement_of(flipped: np.ndarray, margins: np.ndarray) -> tuple[float | None, int]:
    """(agreement, decisions counted) over the decisions Keras makes; (None, 0) when it makes none."""
    mask = decided(margins)
    n = int(mask.sum())
    return (1.0 - int((flipped & mask).sum()) / n, n) if n else (None, 0)


def _bound_counts(flipped: np.ndarray, is_map: bool, mask: np.ndarray | None = None) -> tuple[int, int]:
    """(trials, failures) of the binomial bound on decision agreement.

    Rank-2 outputs: every decision is a trial (a softmax: one per sample; sigmoid outputs: one per
    element, as before). Maps (rank > 2): the cells of one sample share its input, so their flips
    come in clusters (a quantization error shifts a whole region's decisions together); counting
    cells as independent trials would turn one sample's shifted region into proof against the
    artifact. The sample is the independent draw: trials = samples, failures = the samples' flipped
    fractions summed and rounded (net samples lost, as `task_verdict` counts them). That assumes
    the worst correlation (all cells of a sample move together), so a map needs as much evidence
    as a per-sample classifier on the same validation set: conservative toward passing, like
    every bound here (a verdict fails only on flips the data show).
    """
    mask = np.ones_like(flipped, dtype=bool) if mask is None else mask
    if not is_map:
        return int(mask.sum()), int((flipped & mask).sum())
    n = len(flipped)
    cells = mask.reshape(n, -1).sum(axis=1)
    lost = (flipped & mask).reshape(n, -1).sum(axis=1)
    has = cells > 0  # a sample whose cells Keras all ties on is no trial
    return int(has.sum()), int(round(float((lost[has] / cells[has]).sum())))


def decision_verdict(ref: np.ndarray, got: np.ndarray, kind: str, limit: float, threshold: float,
                     near_tie: float | None) -> dict[str, Any]:
    """The decision-agreement verdict of one output: {agreement, decisions, ties, flips, passed, p, note}
    (`agreement` None when Keras makes no decision: `ties` are all there are)."""
    flipped, margins = decisions(ref, got, kind, threshold)
    mask = decided(margins)
    n, flips = int(mask.sum()), int((flipped & mask).sum())
    ties = int(flipped.size - n)
    tie_note = f" ({ties} Keras tie(s) below margin {TIE_MARGIN:g} not counted)" if ties else ""
    agreement = 1.0 - flips / n if n else None
    out = {"agreement": agreement, "decisions": n, "ties": ties, "flips": flips, "passed": True, "p": 1.0,
           "note": tie_note}
    if flips == 0:
        return out
    flip_margins = np.sort(margins[flipped & mask])
    is_map = ref.ndim > 2
    trials, failures = _bound_counts(flipped, is_map, mask)
    ok, p = consistent_with(trials, failures, 1 - limit)
    if near_tie is not None and agreement < limit and float(flip_margins.max()) >= near_tie:
        ok = False  # the profile accepts only near-tie flips below min_top1 (legacy `near_tie_margin`)
    if kind == "multiclass":
        unit = "cell(s) (top-1 along the last axis)" if is_map else "sample(s)"
    else:
        unit = f"decision(s) at {threshold:g}"
    where = f" in {len(ref)} samples" if is_map else ""
    trials_note = f"the {len(ref)} samples as trials, {failures} net sample(s) lost; " if is_map else ""
    out.update(passed=bool(agreement >= limit or ok), p=p,
               note=f": {flips} flipped {unit} of {n}{where}, Keras margin{'s' if flips > 1 else ''} "
                    f"{', '.join(f'{x:.3f}' for x in flip_margins[:5])}; p={p:.2g} for agreement >= {limit:g} "
                    f"({trials_note}{samples_needed(limit)} agreeing samples would show it at {CONFIDENCE:.0%})"
                    f"{tie_note}")
    return out


def judge(m: Any, ref: np.ndarray, got: np.ndarray, tol: Any, kind: str, runtime: str = "the runtime",
          reference: str = "keras") -> tuple[bool, str, str]:
    """The verdict of one output: (passed, detail with every criterion and its limit, summary in user terms).

    Args:
        m: the output's `compare.OutputMetrics`.
        tol: the `profiles.Tolerance` of the artifact's precision.
        kind: the resolved output kind (`compare.output_kind`).
    """
    other = "Keras" if reference == "keras" else reference
    if not m.finite:
        bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
        ref_bad = int(np.size(ref) - np.count_nonzero(np.isfinite(ref)))
        return (False, f"non-finite outputs: {bad} NaN/Inf value(s) (reference has {ref_bad})",
                f"{runtime} returns {bad} NaN/Inf value(s)")
    parts: list[str] = []
    failed: list[str] = []
    if tol.atol is not None or tol.rtol is not None:
        atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
        excess = np.abs(got.astype(np.float64) - ref) - (atol + rtol * np.abs(ref.astype(np.float64)))
        good = bool(np.all(excess <= 0))
        allowance = f"atol {atol:g} + rtol {rtol:g}·|ref|"
        parts.append(f"max_abs={m.max_abs_err:.2e} ({allowance}: {'ok' if good else 'exceeded'})")
        if not good:
            failed.append(f"{runtime} differs from {other} by up to {m.max_abs_err:.2g} ({allowance})")
    threshold = 0.5 if tol.decision_threshold is None else tol.decision_threshold
    no_decisions = False  # set when Keras makes no decision on a decision output (all ties)
    for value, limit, name, higher, applies in (
        (m.peak_err, tol.max_peak_err, "peak_err", False, True),
        (m.norm_err, tol.max_norm_err, "norm_err", False, True),
        (m.mean_norm_err, tol.max_mean_norm_err, "mean_norm_err", False, True),
        (m.cosine_min, tol.min_cosine, "cosine_min", True, True),
        (m.cosine_mean, tol.min_cosine_mean, "cosine_mean", True, True),
        (None, tol.min_top1, "decisions", True, kind in DECISION_KINDS),
        (m.rel_rmse, tol.max_rel_rmse, "rel_rmse", False, kind not in DECISION_KINDS),
    ):
        if name == "rel_rmse" and limit is not None and no_decisions:
            applies = True  # Keras makes no decision on this output: its values are what is left to judge
        if limit is None or not applies:
            continue
        if name == "decisions":
            v = decision_verdict(ref, got, kind, limit, threshold, tol.near_tie_margin)
            if v["agreement"] is None:
                no_decisions = True
                parts.append(f"decisions: none (Keras ties on all {v['ties']} within {TIE_MARGIN:g}; judged by "
                             "rel_rmse)")
                continue
            is_map = ref.ndim > 2  # per-location decisions (`decisions`)
            label = ("top1/cell" if is_map else "top1") if kind == "multiclass" else f"decisions@{threshold:g}"
            parts.append(f"{label}={v['agreement']:.5g} (>= {limit:g}{'' if v['passed'] else ' FAILED'}{v['note']})")
            if not v["passed"]:
                what = "change class" if kind == "multiclass" else f"change side of the {threshold:g} threshold"
                if kind == "multiclass":
                    n_what = f"cells (of {len(ref)} samples)" if is_map else "samples"
                else:
                    n_what = "samples" if kind == "binary" and not is_map else "output elements"
                failed.append(f"{v['flips']} of {v['decisions']} {n_what} {what} on {runtime} vs {other} "
                              f"({v['agreement']:.1%} agree; {limit:.1%} required, p={v['p']:.2g})")
            continue
        if value is None:
            continue
        good = value >= limit if higher else value <= limit
        parts.append(f"{name}={value:.5g} ({'>=' if higher else '<='} {limit:g}{'' if good else ' FAILED'})")
        if not good:
            failed.append(_summary(name, value, limit, runtime, other))
    if not parts:
        parts.append(f"max_abs={m.max_abs_err:.2e} (no criterion set)")
    return not failed, ", ".join(parts), "; ".join(failed)


def _summary(name: str, value: float, limit: float, runtime: str, other: str) -> str:
    if name == "peak_err":
        return (f"{runtime} differs from {other} by {value:.2g} of the output's magnitude (limit {limit:g}: more than "
                "kernel/accumulation-order drift, a conversion defect)")
    if name.startswith("cosine"):
        return f"{runtime}'s outputs point away from {other}'s ({name} {value:.6g} < {limit:g})"
    if name == "rel_rmse":
        return f"{runtime}'s values are off by {value:.1%} RMS of their magnitude vs {other} (limit {limit:.1%})"
    return f"{runtime} vs {other}: {name} {value:.3g} (limit {limit:g})"


def gates_consistency(precision: str, gate_quantized: bool) -> bool:
    """Whether two runtimes' disagreement on one artifact gates: always for fp32, for quantized where asked."""
    return precision == "fp32" or gate_quantized


def accuracy_allowance(keras_accuracy: float, max_drop: float | None, max_relative_drop: float | None) -> float | None:
    """The accuracy an artifact may lose against Keras: the tighter of the absolute and relative budgets."""
    allowed = [x for x in (max_drop, None if max_relative_drop is None else max_relative_drop * keras_accuracy)
               if x is not None]
    return min(allowed) if allowed else None


def task_verdict(drop: float, samples: int | None, allowed: float) -> tuple[bool, str]:
    """The task budget's verdict on an accuracy drop (or an error increase): within the allowance, or consistent
    with it at CONFIDENCE for the sample count (net samples lost, one-sided binomial); and a note saying which."""
    if drop <= allowed + 1e-12:  # rounding of the rows only
        return True, ""
    if not samples:
        return False, ""
    lost = int(round(drop * samples))
    ok, p = consistent_with(samples, lost, allowed)
    return ok, (f"; {lost} net sample(s) of {samples} lost: {'consistent' if ok else 'not consistent'} with a drop "
                f"<= {allowed:.4g} at {CONFIDENCE:.0%} (p={p:.2g})")
