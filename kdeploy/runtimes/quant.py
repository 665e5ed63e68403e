"""Quantize float inputs for, and dequantize integer outputs of, a quantized artifact's edge tensors."""

from __future__ import annotations

import numpy as np


def quantize(x: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    """`x` as the tensor's type: float data into an integer tensor goes through its scale and zero point."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def dequantize(y: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float values of an integer output tensor (a copy of `y` when it is not quantized)."""
    if np.issubdtype(y.dtype, np.integer) and scale:
        return (y.astype(np.float32) - zero_point) * scale
    return np.array(y)
