"""Latency measurement and statistics."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class LatencyResult:
    runtime: str
    threads: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    samples: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(times_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Percentiles (linear interpolation), mean, standard deviation and coefficient of variation."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timing samples")
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "cv": std / mean if mean > 0 else 0.0,
    }


def measure(runner, feeds: dict[str, np.ndarray], *, warmup: int = 5, min_iters: int = 50,
            min_seconds: float = 0.5, max_iters: int = 2000) -> tuple[list[float], int]:
    """Times `runner.infer(feeds)` after `warmup` runs, until both `min_iters` and `min_seconds`.

    Returns:
        (per-iteration times in ms, warm-up count).
    """
    for _ in range(warmup):
        runner.infer(feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        runner.infer(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, warmup
