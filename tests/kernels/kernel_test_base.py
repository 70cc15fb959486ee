"""Shared test bases for the kernels in `pallas_kernels` (tokamax / jax-pallas style).

Each ``*Base`` class holds the cases and checks of one op, run through `pallas_kernels.dispatch`
with the class attribute ``IMPL``; a thin subclass per implementation ("xla",
"pallas_interpret", "pallas" on a GPU) lives in its own test file. Every case compares with the
pure-jnp reference of the kernel module on fresh random inputs (seeded per case, never zeros).

Error bounds (relative Frobenius norm ||y - ref|| / ||ref||), and why:

* float32 outputs, float math: kernel and reference do the same float32 products; they differ
  only in accumulation order, so the error is a few float32 ulps (2^-24 ~ 6e-8) times a slowly
  growing function of K: 2e-6 covers K = 14336 with a wide margin (measured <= 5e-7).
* bfloat16 outputs: both round an (almost) identical float32 value to bfloat16 once; elements
  whose float32 values straddle a rounding boundary differ by one bfloat16 ulp (2^-8 relative),
  so 2^-8 bounds the norm error even if every element differed (measured ~1e-4).
* W4AX (integer dots): the int32 block sums are exact; only the float32 epilogue (scale
  products and the sum over blocks) rounds, so the same 2e-6 as float32 applies.
* Activation quantization: codes and scales are bit-identical (same float32 ops, round half to
  even); with RMSNorm in front, the sum of squares is added in another order, so a code may
  differ by one where y / scale is within rounding of a .5 boundary (rare: <= 0.1% of codes).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.act_quant import quantize_activations_reference, rmsnorm_quantize_reference
from pallas_kernels.hadamard import (
    hadamard_base_matrix,
    hadamard_factors,
    hadamard_matrix,
    sylvester_matrix,
)
from pallas_kernels.int4 import pack_int4
from pallas_kernels.w4a16_matmul import w4a16_matmul_reference
from pallas_kernels.w4ax_matmul import w4ax_matmul_reference

RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 2.0**-8}  # see module docstring
W4AX_RTOL = 2e-6  # float32 epilogue rounding only

# Module-level jitted references: compiled once per shape for every subclass.
_ref_w4a16 = jax.jit(w4a16_matmul_reference)
_ref_w4ax = jax.jit(w4ax_matmul_reference)
_ref_quant = jax.jit(
    quantize_activations_reference, static_argnames=("bits", "group_size", "clip_ratio")
)
_ref_rms_quant = jax.jit(
    rmsnorm_quantize_reference, static_argnames=("eps", "bits", "group_size", "clip_ratio")
)

MS = (1, 4, 64, 256)  # 4 = gamma + 1 for gamma = 3
SMOL_SHAPES = ((576, 1536), (1536, 576), (576, 960))  # SmolLM2-135M (K, N)
LLAMA2_SHAPES = ((4096, 11008), (11008, 4096))  # Llama-2-7B MLP (K, N)


def seed_of(*parts) -> int:
    """A stable per-case seed (so cases differ, runs repeat)."""
    return zlib.crc32(repr(parts).encode())


def rel_err(y, ref) -> float:
    """Relative Frobenius-norm error in float64."""
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def group_sizes(k: int) -> tuple[int, ...]:
    """Weight / activation group sizes valid for K (0 = per channel / per token)."""
    return tuple(g for g in (32, 64, 128) if k % g == 0) + (0,)


def random_weight(key, k: int, n: int, group_size: int, asym: bool, dtype=jnp.float32):
    """Random packed int4 weight: (packed uint8 [K/2, N], scales [K/G, N], mins or None)."""
    g = group_size or k
    kc, ks, km = jax.random.split(key, 3)
    lo, hi = (0, 16) if asym else (-8, 8)
    codes = jax.random.randint(kc, (k, n), lo, hi)  # [K, N]
    scales = jax.random.uniform(ks, (k // g, n), minval=0.005, maxval=0.02).astype(dtype)
    mins = (0.05 * jax.random.normal(km, (k // g, n))).astype(dtype) if asym else None
    return pack_int4(codes), scales, mins


def random_activation_codes(key, m: int, k: int, bits: int, group_size: int):
    """Random int8 codes in the int{bits} range and positive float32 scales [M, K/Ga]."""
    ga = group_size or k
    kc, ks = jax.random.split(key)
    q = 2 ** (bits - 1)
    codes = jax.random.randint(kc, (m, k), -q, q).astype(jnp.int8)  # [M, K]
    scales = jax.random.uniform(ks, (m, k // ga), minval=0.01, maxval=0.1)  # [M, K/Ga]
    return codes, scales


def _with_slow(core: list, full: list) -> list:
    """The ``core`` cases, then every other case of ``full`` marked ``slow``."""
    seen = set(core)
    return list(core) + [pytest.param(*c, marks=pytest.mark.slow) for c in full if c not in seen]


def _w4a16_cases():
    # Default run: every M, every group size, sym + asym, f32 + bf16, and a Llama-2 shape each way.
    core = [
        (1, 576, 1536, 32, False, jnp.float32),
        (4, 576, 1536, 0, True, jnp.bfloat16),
        (64, 1536, 576, 64, True, jnp.float32),
        (256, 1536, 576, 128, False, jnp.float32),
        (4, 576, 960, 64, False, jnp.bfloat16),
        (1, 4096, 11008, 128, False, jnp.bfloat16),
        (4, 11008, 4096, 0, True, jnp.float32),
    ]
    full = []
    for k, n in SMOL_SHAPES:
        for g in group_sizes(k):
            for i, m in enumerate(MS):
                full.append((m, k, n, g, i % 2 == 1, (jnp.float32, jnp.bfloat16)[i // 2 % 2]))
    return _with_slow(core, full)


def _w4ax_cases():
    # Default run: every M, every weight group size G and activation group size Ga, both bits,
    # sym + asym, the odd-multiple-of-32 block (c = 96) branch, and a Llama-2 shape each way.
    core = [
        (1, 576, 1536, 32, 0, 4, False),
        (4, 576, 1536, 0, 32, 4, True),
        (64, 1536, 576, 64, 64, 8, False),
        (256, 1536, 576, 128, 0, 4, True),
        (4, 1536, 576, 0, 128, 4, False),
        (4, 576, 960, 0, 0, 4, False),
        (16, 576, 960, 96, 192, 4, True),
        (4, 4096, 11008, 128, 0, 4, False),
        (1, 11008, 4096, 0, 128, 8, True),
    ]
    full = []
    i = 0
    for k, n in SMOL_SHAPES:
        for g in group_sizes(k):
            for ga in group_sizes(k):
                full.append((MS[i % 4], k, n, g, ga, 4 if i % 3 else 8, i % 2 == 1))
                i += 1
    return _with_slow(core, full)


def _quant_cases():
    core = [
        (1, 576, 0, 4, 1.0),
        (4, 576, 32, 8, 0.9),
        (64, 1536, 64, 4, 0.9),
        (256, 1536, 128, 8, 1.0),
        (4, 11008, 128, 4, 1.0),
    ]
    full = []
    i = 0
    for k in (576, 1536, 960):
        for ga in group_sizes(k):
            for bits in (4, 8):
                full.append((MS[i % 4], k, ga, bits, (1.0, 0.9)[i % 2]))
                i += 1
    return _with_slow(core, full)


def _case_id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return "-".join(getattr(c, "__name__", str(c)) for c in values)


W4A16_CASES = _w4a16_cases()
W4AX_CASES = _w4ax_cases()
QUANT_CASES = _quant_cases()
RMS_QUANT_CASES = [(1, 576, 0, 4), (4, 576, 32, 4), (64, 1536, 128, 8), (256, 960, 64, 4)]
HADAMARD_CASES = [
    ((1,), 576, jnp.float32),
    ((2, 3), 576, jnp.bfloat16),  # leading dims
    ((64,), 1536, jnp.float32),
    ((4,), 4096, jnp.float32),
    ((256,), 960, jnp.float32),
    ((1,), 11008, jnp.float32),
    ((4,), 14336, jnp.bfloat16),
]


class W4A16Base:
    """W4A16 matmul vs `w4a16_matmul_reference`."""

    IMPL: str

    @pytest.mark.parametrize("m,k,n,g,asym,dtype", W4A16_CASES, ids=map(_case_id, W4A16_CASES))
    def test_matches_reference(self, m, k, n, g, asym, dtype):
        key = jax.random.key(seed_of("w4a16", m, k, n, g, asym))
        kx, kw = jax.random.split(key)
        x = (jax.random.normal(kx, (m, k)) * 2.0).astype(dtype)  # [M, K]
        packed, scales, mins = random_weight(kw, k, n, g, asym)
        y = dispatch.w4a16_matmul(x, packed, scales, mins, impl=self.IMPL)  # [M, N]
        ref = _ref_w4a16(x, packed, scales, mins)  # [M, N]
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel_err(y, ref) <= RTOL[dtype]

    def test_leading_dims(self):
        k, n = 576, 960
        packed, scales, mins = random_weight(jax.random.key(11), k, n, 32, True)
        x = jax.random.normal(jax.random.key(12), (2, 3, k))  # [B, T, K]
        y = dispatch.w4a16_matmul(x, packed, scales, mins, impl=self.IMPL)  # [B, T, N]
        ref = _ref_w4a16(x.reshape(6, k), packed, scales, mins).reshape(2, 3, n)
        assert rel_err(y, ref) <= RTOL[jnp.float32]


class W4AXBase:
    """W4A4 / W4A8 matmul vs `w4ax_matmul_reference`."""

    IMPL: str

    @pytest.mark.parametrize("m,k,n,g,ga,bits,asym", W4AX_CASES, ids=map(_case_id, W4AX_CASES))
    def test_matches_reference(self, m, k, n, g, ga, bits, asym):
        key = jax.random.key(seed_of("w4ax", m, k, n, g, ga, bits, asym))
        ka, kw = jax.random.split(key)
        a, sa = random_activation_codes(ka, m, k, bits, ga)
        packed, scales, mins = random_weight(kw, k, n, g, asym)
        y = dispatch.w4ax_matmul(a, sa, packed, scales, mins, impl=self.IMPL)  # [M, N]
        ref = _ref_w4ax(a, sa, packed, scales, mins)  # [M, N]
        assert y.shape == (m, n) and y.dtype == jnp.float32
        assert rel_err(y, ref) <= W4AX_RTOL

    def test_matches_float_math(self):
        """Exactness of the integer path: equals the float64 sum of dequantized products."""
        m, k, n = 4, 576, 960
        a, sa = random_activation_codes(jax.random.key(21), m, k, 4, 32)
        packed, scales, mins = random_weight(jax.random.key(22), k, n, 64, True)
        y = dispatch.w4ax_matmul(a, sa, packed, scales, mins, impl=self.IMPL)
        af = np.asarray(a, np.float64) * np.repeat(np.asarray(sa, np.float64), 32, axis=1)
        from pallas_kernels.int4 import unpack_int4

        wc = np.asarray(unpack_int4(packed, signed=False), np.float64)
        w = wc * np.repeat(np.asarray(scales, np.float64), 64, 0) + np.repeat(
            np.asarray(mins, np.float64), 64, 0
        )
        assert rel_err(y, af @ w) <= 1e-6

    def test_bf16_output(self):
        m, k, n = 4, 1536, 576
        a, sa = random_activation_codes(jax.random.key(31), m, k, 8, 0)
        packed, scales, _ = random_weight(jax.random.key(32), k, n, 128, False)
        y = dispatch.w4ax_matmul(a, sa, packed, scales, out_dtype=jnp.bfloat16, impl=self.IMPL)
        assert y.dtype == jnp.bfloat16
        assert rel_err(y, _ref_w4ax(a, sa, packed, scales)) <= RTOL[jnp.bfloat16]


class ActQuantBase:
    """Activation quantization vs its reference (bit-exact) and the fused RMSNorm variant."""

    IMPL: str

    @pytest.mark.parametrize("m,k,ga,bits,clip", QUANT_CASES, ids=map(_case_id, QUANT_CASES))
    def test_matches_reference(self, m, k, ga, bits, clip):
        key = jax.random.key(seed_of("quant", m, k, ga, bits))
        x = jax.random.normal(key, (m, k)) * jnp.exp(jax.random.normal(key, (m, 1)))  # [M, K]
        if m > 1:
            x = x.at[1].set(0.0)  # an all-zero row: scale 1, codes 0
        codes, scales = dispatch.quantize_activations(
            x, bits=bits, group_size=ga, clip_ratio=clip, impl=self.IMPL
        )
        rc, rs = _ref_quant(x, bits=bits, group_size=ga, clip_ratio=clip)
        assert codes.dtype == jnp.int8 and scales.dtype == jnp.float32
        assert scales.shape == (m, k // (ga or k))
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(rc))
        np.testing.assert_array_equal(np.asarray(scales), np.asarray(rs))
        assert np.all(np.isfinite(np.asarray(scales)))
        if m > 1:
            assert np.all(np.asarray(scales[1]) == 1.0) and not np.any(np.asarray(codes[1]))

    def test_bf16_input(self):
        x = jax.random.normal(jax.random.key(41), (4, 576)).astype(jnp.bfloat16)
        codes, scales = dispatch.quantize_activations(x, bits=4, group_size=64, impl=self.IMPL)
        rc, rs = _ref_quant(x, bits=4, group_size=64, clip_ratio=1.0)
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(rc))
        np.testing.assert_array_equal(np.asarray(scales), np.asarray(rs))

    @pytest.mark.parametrize("m,k,ga,bits", RMS_QUANT_CASES, ids=map(_case_id, RMS_QUANT_CASES))
    def test_rmsnorm_quantize(self, m, k, ga, bits):
        key = jax.random.key(seed_of("rmsq", m, k, ga, bits))
        kx, kw = jax.random.split(key)
        x = 3.0 * jax.random.normal(kx, (m, k))  # [M, K]
        w = 1.0 + 0.1 * jax.random.normal(kw, (k,))  # [K]
        codes, scales = dispatch.rmsnorm_quantize(
            x, w, 1e-5, bits=bits, group_size=ga, impl=self.IMPL
        )
        rc, rs = _ref_rms_quant(x, w, 1e-5, bits=bits, group_size=ga)
        diff = np.abs(np.asarray(codes, np.int32) - np.asarray(rc, np.int32))
        assert diff.max() <= 1 and diff.mean() <= 1e-3
        np.testing.assert_allclose(np.asarray(scales), np.asarray(rs), rtol=1e-6)


class HadamardBase:
    """Fast Hadamard transform vs the dense (or Kronecker-dense, float64) matrix product."""

    IMPL: str

    @staticmethod
    def dense_reference(x: np.ndarray) -> np.ndarray:
        """x @ hadamard_matrix(n) in float64: the dense matrix for n <= 4096, else the exact
        Kronecker identity y[c, d] = sum_ab x[a, b] B[a, c] S[b, d] / sqrt(n)."""
        n = x.shape[-1]
        x = np.asarray(x, np.float64).reshape(-1, n)
        if n <= 4096:
            y = x @ hadamard_matrix(n)
        else:
            m, p = hadamard_factors(n)
            b = hadamard_base_matrix(m).astype(np.float64)
            s = sylvester_matrix(p).astype(np.float64)
            y = np.einsum("rab,ac,bd->rcd", x.reshape(-1, m, p), b, s, optimize=True)
            y = y.reshape(-1, n) / np.sqrt(n)
        return y

    @pytest.mark.parametrize("lead,n,dtype", HADAMARD_CASES, ids=map(_case_id, HADAMARD_CASES))
    def test_matches_dense(self, lead, n, dtype):
        x = jax.random.normal(jax.random.key(seed_of("had", lead, n)), (*lead, n)).astype(dtype)
        y = dispatch.hadamard_transform(x, impl=self.IMPL)
        assert y.shape == x.shape and y.dtype == dtype
        ref = self.dense_reference(np.asarray(x.astype(jnp.float32)))
        assert rel_err(y.reshape(-1, n), ref) <= RTOL[dtype]

    def test_involution_of_orthogonal(self):
        """H is orthogonal: transforming twice with H then H^T (= inverse) gives x back."""
        n = 1536
        x = jax.random.normal(jax.random.key(51), (3, n))
        y = dispatch.hadamard_transform(x, impl=self.IMPL)
        back = np.asarray(y, np.float64) @ hadamard_matrix(n).T
        assert rel_err(back, x) <= RTOL[jnp.float32]
        np.testing.assert_allclose(
            np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
        )
