"""Update compression: per-tensor symmetric int8 with unbiased stochastic rounding (≈4× fewer bytes).

Applied on the device *after* clipping and noise, so it is post-processing of a DP release and costs no
privacy; its rounding randomness therefore need not be secret (any Generator will do). Unbiased rounding
keeps the aggregate unbiased: E[dequantize(quantize(x))] = x, and |x̂ − x| < scale elementwise.

Format (matches edge_sdk/wire.py, encoding "int8"): q int8 in [−127, 127] (−128 is never produced, so the
range is symmetric and decoders may reject it), scale float32 >= 0, x̂ = float32(q) · scale.
"""
from __future__ import annotations

import numpy as np

__all__ = ["quantize_int8", "dequantize_int8", "QMAX"]

QMAX = 127


def _scale_for(max_abs: float) -> np.float32:
    """Smallest float32 scale s with max_abs / s <= 127 (so clipping at ±127 never biases a value)."""
    if max_abs == 0.0:
        return np.float32(0.0)
    s = np.float32(max_abs / QMAX)
    # float32 rounding may make s slightly too small; step up one ulp at a time (at most a couple of steps).
    while s == 0 or max_abs / float(s) > QMAX:
        s = np.nextafter(s, np.float32(np.inf), dtype=np.float32)
    return s


def quantize_int8(x: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.float32]:
    """Quantise one tensor: scale = max|x|/127, q = floor(x/scale + u), u ~ U[0, 1); same shape as x.

    Unbiased because E[floor(v + u)] = v for u ~ U[0, 1). rng=None uses a fresh OS-seeded Generator.
    """
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise ValueError(f"quantize_int8 expects a floating-point array, got dtype {arr.dtype}")
    # float64 arithmetic: v = x/s must be exact enough that floor(v + u) is unbiased to well below 1e-9.
    v = arr.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("cannot quantise NaN or infinite values")
    max_abs = float(np.max(np.abs(v))) if v.size else 0.0
    scale = _scale_for(max_abs)
    if scale == 0:
        return np.zeros(arr.shape, dtype=np.int8), np.float32(0.0)
    gen = rng if rng is not None else np.random.default_rng()
    v /= float(scale)
    v += gen.random(v.shape)
    np.floor(v, out=v)
    # |x/s| <= 127 by construction of s, so the clip only guards the 127 + u -> 128.0 float round-up.
    np.clip(v, -QMAX, QMAX, out=v)
    return v.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: float) -> np.ndarray:
    """x̂ = float32(q) · float32(scale), exactly as the wire decoder computes it."""
    qa = np.asarray(q)
    if qa.dtype != np.int8:
        raise ValueError(f"dequantize_int8 expects int8, got dtype {qa.dtype}")
    s = np.float32(scale)
    if not np.isfinite(s) or s < 0:
        raise ValueError(f"scale must be finite and >= 0, got {scale!r}")
    if np.any(qa == -128):
        raise ValueError("int8 value -128 is outside the symmetric range [-127, 127]")
    return qa.astype(np.float32) * s
