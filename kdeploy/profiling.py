"""Latency measurement and statistics, and the rules that decide when a figure needs measuring again.

Timing runs inside the runtime's child process (`runtimes/worker.py`): the runner is loaded,
warmed up, then timed one call at a time until both a minimum count and a minimum time are
reached (bounded by a maximum count and a maximum time, so a very slow candidate cannot stall a
run). Load time and the first inference are reported apart (cold), never mixed into these samples.
"""

from __future__ import annotations

import time

import numpy as np

# A run stops at max_seconds only after this many samples: fewer give no usable spread.
MIN_SAMPLES_AT_TIME_LIMIT = 5


def summarize(times_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Percentiles, mean, spread and coefficient of variation of per-call times.

    Args:
        times_ms: per-call times in milliseconds.

    Returns:
        `p25_ms`, `p50_ms`, `p75_ms`, `p90_ms`, `p99_ms` (linear interpolation between order
        statistics, numpy's default; p25..p75 is the spread `select` reads as measurement noise), `mean_ms`, `std_ms` (sample standard deviation, ddof=1; 0 for one sample),
        `cv` (std / mean), `min_ms`, `max_ms`.

    Raises:
        ValueError: no samples, or a negative or non-finite time.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timing samples")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"timing samples must be finite and >= 0 (received min {t.min()}, max {t.max()})")
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    return {
        "p25_ms": float(np.percentile(t, 25)),
        "p50_ms": float(np.percentile(t, 50)),
        "p75_ms": float(np.percentile(t, 75)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "cv": std / mean if mean > 0 else 0.0,
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
    }


def measure(runner, feeds: dict[str, np.ndarray], *, warmup: int = 5, min_iters: int = 50,
            min_seconds: float = 0.5, max_iters: int = 2000, max_seconds: float | None = None,
            min_samples: int = MIN_SAMPLES_AT_TIME_LIMIT, clock=time.perf_counter) -> tuple[list[float], int]:
    """Times `runner.infer(feeds)` after `warmup` untimed calls.

    Timed calls continue until both `min_iters` calls and `min_seconds` have passed, and stop
    at `max_iters` calls or, once `min_samples` calls are in, at `max_seconds`.

    Args:
        runner: an entered runner (anything with `infer(feeds)`).
        feeds: one batch of inputs.
        clock: time source in seconds (tests pass a fake one).

    Returns:
        (per-call times in ms, warm-up count).
    """
    for _ in range(warmup):
        runner.infer(feeds)
    times: list[float] = []
    start = clock()
    while len(times) < max_iters:
        elapsed = clock() - start
        if len(times) >= min_iters and elapsed >= min_seconds:
            break
        if max_seconds is not None and len(times) >= min_samples and elapsed >= max_seconds:
            break
        t0 = clock()
        runner.infer(feeds)
        times.append((clock() - t0) * 1e3)
    return times, warmup


def is_noisy(cv: float, threshold: float) -> bool:
    """True when the coefficient of variation is above `threshold` (a busy host or a coarse timer)."""
    return cv > threshold


def near_limit(value: float, limit: float, margin: float) -> bool:
    """True when `value` is within `margin` (a fraction of `limit`) of `limit`, on either side."""
    return abs(value - limit) <= margin * limit


def dominators(points: dict[str, tuple[float, ...]]) -> dict[str, list[str]]:
    """For each point, the names of the points that dominate it (all figures lower is better).

    A point is dominated when another is no worse in every figure and better in at least one.
    """
    return {name: [other for other, q in points.items()
                   if other != name and all(o <= v for o, v in zip(q, p)) and any(o < v for o, v in zip(q, p))]
            for name, p in points.items()}


def pareto_front(points: dict[str, tuple[float, ...]]) -> set[str]:
    """Names of the points no other point dominates (all figures lower is better)."""
    return {name for name, by in dominators(points).items() if not by}
