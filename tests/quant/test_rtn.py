"""RTN int4 quantization: round trip, error bound, exactness on the grid, clip search."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.int4 import pack_int4, unpack_int4
from qspec_jax.quant.rtn import group_params, pack_codes, quantize_weight_rtn, resolve_group_size

SETTINGS = dict(max_examples=40, deadline=None)


@st.composite
def weights(draw):
    k = draw(st.sampled_from([64, 192]))  # few shapes: each new shape compiles the unpacking
    n = draw(st.sampled_from([1, 5]))
    g = draw(st.sampled_from([0, 32, 64]))
    if g and k % g:
        g = 32
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(k, n)) * mag).astype(np.float32)
    if draw(st.booleans()):
        w[: min(g or k, k), 0] = 0.0  # an all-zero group
    return w, g


def _scales_per_row(qw, k):
    return np.repeat(np.asarray(qw.scales), k // qw.scales.shape[0], axis=0)


@settings(**SETTINGS)
@given(weights(), st.booleans())
def test_error_at_most_half_a_step(wg, symmetric):
    """|w - deq| <= scale / 2 for every weight (clip ratio 1 keeps every weight in range)."""
    w, g = wg
    qw = quantize_weight_rtn(w, g, symmetric)
    k, n = w.shape
    assert qw.shape == (k, n) and qw.group_size == (g or k) and qw.symmetric == symmetric
    deq = np.asarray(qw.dequantize())
    step = _scales_per_row(qw, k)
    # float32 rounding of w / scale and of code * scale (+ min): a few ulps of |w| and of the range
    slack = 4e-7 * (np.abs(w) + (step * 16))
    assert np.all(np.abs(w - deq) <= step / 2 + slack)
    codes = np.asarray(unpack_int4(qw.packed, signed=symmetric))
    if symmetric:
        assert codes.min() >= -8 and codes.max() <= 7
    else:
        assert codes.min() >= 0 and codes.max() <= 15


@settings(**SETTINGS)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([0, 32, 64]),
    st.integers(-12, 4),
    st.booleans(),
)
def test_exact_on_the_grid(seed, g, log2_scale, symmetric):
    """Weights that are code * scale (+ min) on the grid the quantizer picks come back exactly.

    Each group contains both ends of the code range (+-7, or 0 and 15) so the quantizer's scale is
    the grid's scale; power-of-two scales make scale = max / 7 (or range / 15) exact in float32.
    """
    rng = np.random.default_rng(seed)
    k, n = 128, 5
    gs = g or k
    s = np.float32(2.0**log2_scale) * rng.choice([1, 2, 4], size=(k // gs, 1, n)).astype(np.float32)
    if symmetric:
        codes = rng.integers(-7, 8, size=(k // gs, gs, n))
        codes[:, 0, :] = rng.choice([-7, 7], size=(k // gs, n))
        w = codes * s
    else:
        codes = rng.integers(0, 16, size=(k // gs, gs, n))
        codes[:, 0, :], codes[:, 1, :] = 0, 15
        m = rng.integers(-20, 5, size=(k // gs, 1, n)) * s
        w = codes * s + m
    w = w.reshape(k, n).astype(np.float32)
    qw = quantize_weight_rtn(w, g, symmetric)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), w)
    np.testing.assert_array_equal(
        np.asarray(unpack_int4(qw.packed, signed=symmetric)), codes.reshape(k, n)
    )


@settings(**SETTINGS)
@given(weights(), st.booleans())
def test_clip_search_never_worse_per_group(wg, symmetric):
    w, g = wg
    k, n = w.shape
    gs = g or k
    wgr = w.reshape(k // gs, gs, n)

    def group_err(clip):
        qw = quantize_weight_rtn(w, g, symmetric, clip_search=clip)
        d = np.asarray(qw.dequantize()).reshape(k // gs, gs, n)
        return ((d - wgr) ** 2).sum(1)

    assert np.all(group_err(True) <= group_err(False) * (1 + 1e-6) + 1e-30)


def test_numpy_packing_matches_pallas_kernels_layout():
    codes = np.random.default_rng(0).integers(-8, 8, size=(2, 128, 3))
    np.testing.assert_array_equal(np.asarray(pack_codes(codes)), np.asarray(pack_int4(codes)))


def test_vectorized_over_layers():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 128, 16)).astype(np.float32)
    for sym in (True, False):
        qw = quantize_weight_rtn(w, 32, sym)
        assert qw.packed.shape == (3, 64, 16) and qw.scales.shape == (3, 4, 16)
        for i in range(3):
            one = quantize_weight_rtn(w[i], 32, sym)
            np.testing.assert_array_equal(np.asarray(qw.packed[i]), np.asarray(one.packed))
            np.testing.assert_array_equal(np.asarray(qw.scales[i]), np.asarray(one.scales))


def test_symmetric_scale_is_max_over_7():
    w = np.zeros((64, 2), np.float32)
    w[3, 0], w[40, 0] = -3.5, 1.0
    w[:, 1] = np.linspace(-1, 2, 64)
    s, m = group_params(w[None], True)
    np.testing.assert_allclose(s[0, 0], [3.5 / 7, 2.0 / 7], rtol=1e-7)
    assert m is None
    s, m = group_params(w[None], False)
    np.testing.assert_allclose(s[0, 0], [4.5 / 15, 3.0 / 15], rtol=1e-6)
    np.testing.assert_allclose(m[0, 0], [-3.5, -1.0])


def test_resolve_group_size():
    assert resolve_group_size(576, 128) == 96  # SmolLM2 hidden size
    assert resolve_group_size(1536, 128) == 128
    assert resolve_group_size(576, 0) == 576
    assert resolve_group_size(576, 64) == 64
    assert resolve_group_size(128, 256) == 128
    assert resolve_group_size(128, 16) == 32
    with pytest.raises(ValueError):
        resolve_group_size(100, 32)
    with pytest.warns(UserWarning, match="does not divide"):
        quantize_weight_rtn(np.ones((192, 4), np.float32), 128)
