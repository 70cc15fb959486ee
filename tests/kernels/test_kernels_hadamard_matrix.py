"""Exact Hadamard constructions: orthogonality, the sizes the models use, fixed sign patterns."""

import hashlib

import numpy as np
import pytest

from pallas_kernels.hadamard import (
    hadamard_base_matrix,
    hadamard_factors,
    hadamard_matrix,
    kronecker_plan,
    sylvester_matrix,
)

# Sizes the target models rotate: SmolLM2-135M hidden 576, MLP 1536, head 64; Llama-2-7B /
# Llama-3-8B hidden 4096, MLP 11008 / 14336, head 128; plus 960 (SmolLM2-360M hidden).
USED = {
    576: (36, 16),
    1536: (12, 128),
    64: (1, 64),
    128: (1, 128),
    4096: (1, 4096),
    11008: (344, 32),
    14336: (28, 512),
    960: (60, 16),
}


def _base_orders(limit: int):
    out = []
    for m in range(2, limit + 1):
        try:
            if hadamard_factors(m) == (m, 1):
                out.append(m)
        except NotImplementedError:
            pass
    return out


@pytest.mark.parametrize("m", _base_orders(400))
def test_base_matrices_are_exact_hadamard(m):
    """Every Paley I / II base order up to 400: entries +-1 and B B^T = m I exactly."""
    b = hadamard_base_matrix(m)
    assert b.shape == (m, m) and set(np.unique(b)) == {-1, 1}
    np.testing.assert_array_equal(b @ b.T, m * np.eye(m, dtype=np.int64))


@pytest.mark.parametrize("n,factors", sorted(USED.items()))
def test_used_sizes_orthonormal(n, factors):
    """H = kron(B_m, S_P)/sqrt(n) with B B^T = m I and S S^T = P I exactly, hence H H^T = I;
    checked densely as well for n <= 1536."""
    assert hadamard_factors(n) == factors
    m, p = factors
    b, s = hadamard_base_matrix(m), sylvester_matrix(p)
    np.testing.assert_array_equal(b @ b.T, m * np.eye(m, dtype=np.int64))
    if p <= 512:
        sf = s.astype(np.float64)  # exact: integer entries, BLAS instead of slow int matmul
        np.testing.assert_array_equal(sf @ sf.T, p * np.eye(p))
    else:  # S_P = kron(S_64, S_{P/64}), a Kronecker product of exact Hadamard matrices
        q = p // 64
        s64, sq = sylvester_matrix(64).astype(np.float64), sylvester_matrix(q).astype(np.float64)
        np.testing.assert_array_equal(s, np.kron(s64, sq))
        np.testing.assert_array_equal(s64 @ s64.T, 64 * np.eye(64))
        np.testing.assert_array_equal(sq @ sq.T, q * np.eye(q))
    if n <= 1536:
        h = hadamard_matrix(n)
        assert h.dtype == np.float64 and h.shape == (n, n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)
        np.testing.assert_array_equal(h, np.kron(b, s) / np.sqrt(n))
    if p >= 16:  # the Pallas kernel's factorisation covers n exactly
        mp, mpad, p2 = kronecker_plan(n)
        assert mp * p2 == n and mpad >= mp and p2 <= p


def test_power_of_two_orders():
    for k in range(0, 15):
        assert hadamard_factors(2**k) == (1, 2**k)


@pytest.mark.parametrize("n", [3, 6, 86, 172, 0])
def test_unconstructible_sizes_raise(n):
    with pytest.raises((NotImplementedError, ValueError), match=str(n) if n else None):
        hadamard_factors(n)


def test_sign_patterns_are_pinned():
    """The quantizer bakes hadamard_matrix(n) into weights and the model applies it online:
    the construction (field polynomial, Paley variant) must never change silently."""
    digests = {
        m: hashlib.sha256(np.ascontiguousarray(hadamard_base_matrix(m) > 0).tobytes()).hexdigest()[
            :16
        ]
        for m in (12, 20, 28, 36, 60, 344)
    }
    assert digests == PINNED


PINNED = {
    12: "6e3ec5c5530c2de6",
    20: "9a66aa52b8d9c8ff",
    28: "19f4be5b614fc63c",
    36: "41a3f7927fa274b5",
    60: "c8631718c0c89906",
    344: "073aa750bf582f8b",
}
