"""Tests for edge_sdk.compression: unbiased int8 stochastic rounding, error bound, edge cases, byte ratio."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_sdk.compression import QMAX, dequantize_int8, quantize_int8

_BIG = float(np.float32(1e30))
finite32 = st.floats(-_BIG, _BIG, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(0, 500), elements=finite32), st.integers(0, 2**32 - 1))
def test_error_below_one_step_and_symmetric_range(x, seed):
    q, s = quantize_int8(x, np.random.default_rng(seed))
    assert q.dtype == np.int8 and q.shape == x.shape and isinstance(s, np.float32)
    assert np.all(q >= -QMAX) and np.all(q <= QMAX)  # -128 never produced
    xh = dequantize_int8(q, s)
    assert xh.dtype == np.float32
    if x.size:
        assert float(s) * QMAX >= float(np.max(np.abs(x.astype(np.float64))))
        # |x̂ − x| < s in exact arithmetic; float32 rounding of q·s adds at most 127·s·2^-24.
        err = np.abs(xh.astype(np.float64) - x.astype(np.float64))
        assert np.all(err <= float(s) * (1 + 1e-5))


def test_unbiased():
    """Mean of K independent dequantisations ≈ x: per element the error has std <= s/2, so the mean of K
    has std <= s/(2√K); we allow 6 of those (fails by chance with probability ~1e-9 per element)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=256).astype(np.float32)
    k = 4000
    acc = np.zeros(x.size)
    for _ in range(k):
        q, s = quantize_int8(x, rng)
        acc += dequantize_int8(q, s)
    mean = acc / k
    bound = 6 * float(s) / (2 * math.sqrt(k))
    assert np.max(np.abs(mean - x)) < bound
    # The bias of deterministic rounding would be visible: mean error over all elements ≈ 0 too.
    assert abs(np.mean(mean - x)) < bound / math.sqrt(x.size) * 2


def test_extreme_values_are_exact():
    x = np.array([-3.0, 0.0, 3.0, 1.5], dtype=np.float32)
    q, s = quantize_int8(x, np.random.default_rng(0))
    assert q[0] == -QMAX and q[2] == QMAX and q[1] == 0  # ±max|x| and 0 have no rounding freedom
    np.testing.assert_allclose(dequantize_int8(q, s)[[0, 2]], [-3.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3)])
def test_zeros(shape):
    q, s = quantize_int8(np.zeros(shape, dtype=np.float32))
    assert s == 0.0 and q.shape == shape and not np.any(q)
    assert not np.any(dequantize_int8(q, s))


def test_constant_tensor_is_exact():
    x = np.full((4, 4), -0.25, dtype=np.float32)
    q, s = quantize_int8(x, np.random.default_rng(0))
    assert np.all(q == -QMAX)
    np.testing.assert_allclose(dequantize_int8(q, s), x, rtol=1e-6)


def test_tiny_and_subnormal_values():
    x = np.array([1e-45, -1e-45, 0.0], dtype=np.float32)  # smallest subnormal: max/127 underflows
    q, s = quantize_int8(x, np.random.default_rng(0))
    assert s > 0
    assert np.all(np.abs(dequantize_int8(q, s).astype(np.float64) - x) <= float(s))


def test_byte_ratio_is_about_a_quarter():
    x = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    q, s = quantize_int8(x)
    ratio = (q.nbytes + np.float32(s).nbytes) / x.nbytes
    assert ratio == pytest.approx(0.25, abs=1e-4)


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(np.array([1.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="floating"):
        quantize_int8(np.array([1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="-128"):
        dequantize_int8(np.array([-128], dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="int8"):
        dequantize_int8(np.array([1], dtype=np.int16), 1.0)
    with pytest.raises(ValueError, match="scale"):
        dequantize_int8(np.array([1], dtype=np.int8), -1.0)


def test_matches_wire_int8_round_trip():
    """compression and wire agree on the int8 format (the wire decoder dequantises the same way)."""
    from edge_sdk import wire

    x = np.random.default_rng(3).normal(size=(3, 7)).astype(np.float32)
    q, s = quantize_int8(x, np.random.default_rng(4))
    raw = {"w": q, "w" + wire.SCALE_SUFFIX: np.asarray([s], dtype=np.float32)}
    np.testing.assert_array_equal(wire._dequantize_int8(raw)["w"], dequantize_int8(q, s))
