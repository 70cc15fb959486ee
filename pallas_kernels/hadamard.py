"""Orthonormal Hadamard matrices and the fast Hadamard transform along the last axis.

Computes ``y = x @ hadamard_matrix(n)`` along the last axis of ``x`` (``n = x.shape[-1]``), where
``hadamard_matrix(n)`` is the orthonormal (``H @ H.T == I``) matrix

    hadamard_matrix(n) = kron(B_m, S_P) / sqrt(n),   n = m * P,  P = 2^k,

``S_P`` is the Sylvester Hadamard matrix of order P (``S_1 = [1]``, ``S_2P = [[S, S], [S, -S]]``)
and ``B_m`` a {+1, -1} Hadamard matrix of order m built exactly by one of

* m = 1:                 ``B_1 = [1]`` (pure Sylvester);
* Paley I,  m = q + 1:   q a prime power with q = 3 (mod 4)  (12 = 11+1, 20 = 19+1, 28 = 27+1,
                         344 = 7^3+1, ...);
* Paley II, m = 2(q+1):  q a prime power with q = 1 (mod 4)  (36 = 2(17+1), ...).

For a given n the decomposition with the smallest m (the largest power of two P) is used, and
among constructions of the same m Paley I is preferred over Paley II; the result is therefore a
fixed function of n (the quantizer bakes it into the weights, the model applies it online, both
through this function). Sizes used by the target models:
SmolLM2-135M 576 = 36 * 16 and 1536 = 12 * 128; Llama-2-7B 4096 = 2^12 and 11008 = 344 * 32
(Paley I over GF(7^3)); Llama-3-8B 4096 and 14336 = 28 * 512 (Paley I over GF(3^3)).
A size with no such decomposition (e.g. 172 * 2^j alone is not enough: 172 needs a Williamson
construction, but 11008 = 344 * 32 is reached through 344) raises NotImplementedError.

The fast transform reshapes ``x`` to ``[..., m, P]``, applies the Walsh-Hadamard transform over the
P axis as a radix-r butterfly (``S_P = kron(S_r1, S_r2, ...)``, each stage a small dense matmul
with a Sylvester factor of order r <= 64), applies ``B_m`` over the m axis as one small dense
matmul, and scales by ``1/sqrt(n)``. Cost per row: ``n * (sum of radices + m)`` multiply-adds
instead of ``n^2``.

Three implementations of the same function:

* `hadamard_transform_reference`: dense ``x @ hadamard_matrix(n)`` in float32 (the definition);
* `hadamard_transform_xla`: the fast factorised transform in plain jnp (the CPU path);
* `hadamard_transform_pallas`: one Pallas kernel (Triton lowering) that treats each row as a
  matrix X [m', P2] (n = m' * P2, P2 a power of two) and computes ``A^T X C / sqrt(n)`` with
  ``A = kron(B_m, S_{P/P2})`` and ``C = S_{P2}``: two small dense matmuls per row, on tensor cores
  (``kron(A, C)`` applied to a row-major vec(X) is ``A^T X C``). Needs P >= 16.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# ----------------------------------------------------------------------------------------------
# Exact constructions
# ----------------------------------------------------------------------------------------------


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """Returns (p, e) with q = p**e for a prime p, or None if q is not a prime power (q >= 2)."""
    if q < 2:
        return None
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            e = 0
            while q % p == 0:
                q //= p
                e += 1
            return (p, e) if q == 1 else None
    return (q, 1)  # q is prime


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial a modulo monic f over GF(p); coefficients lowest degree first."""
    a = [c % p for c in a]
    df = len(f) - 1
    while len(a) - 1 >= df and any(a):
        if a[-1] == 0:
            a.pop()
            continue
        c = a[-1]
        shift = len(a) - 1 - df
        for i, fc in enumerate(f):
            a[shift + i] = (a[shift + i] - c * fc) % p
        a.pop()
    return a + [0] * (df - len(a)) if len(a) < df else a[:df]


def _is_irreducible(f: list[int], p: int) -> bool:
    """Monic f of degree e over GF(p) is irreducible iff no monic factor of degree 1..e//2 divides it."""
    e = len(f) - 1
    for d in range(1, e // 2 + 1):
        for idx in range(p**d):
            g = [(idx // p**i) % p for i in range(d)] + [1]
            if not any(_poly_mod(f, g, p)):
                return False
    return True


def _gf_quadratic_character(p: int, e: int) -> np.ndarray:
    """chi[a] for every element a of GF(p^e), a indexed by its base-p digits (coefficients).

    chi(0) = 0, chi(a) = 1 if a is a nonzero square, -1 otherwise. Elements are polynomials of
    degree < e over GF(p) modulo the lexicographically first monic irreducible polynomial.
    """
    q = p**e
    if e == 1:
        chi = -np.ones(q, dtype=np.int64)
        chi[0] = 0
        chi[(np.arange(1, q) ** 2) % p] = 1
        return chi
    f = None
    for idx in range(p**e):  # first monic irreducible of degree e
        cand = [(idx // p**i) % p for i in range(e)] + [1]
        if cand[0] != 0 and _is_irreducible(cand, p):
            f = cand
            break
    assert f is not None
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for idx in range(1, q):
        a = [(idx // p**i) % p for i in range(e)]
        prod = [0] * (2 * e - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                prod[i + j] += ai * aj
        sq = _poly_mod(prod, f, p)
        chi[sum(c * p**i for i, c in enumerate(sq))] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[a, b] = chi(a - b) of GF(q), int64 [q, q]."""
    p, e = _prime_power(q)
    chi = _gf_quadratic_character(p, e)
    digits = (np.arange(q)[:, None] // p ** np.arange(e)[None, :]) % p  # [q, e]
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, e]
    return chi[(diff * p ** np.arange(e)).sum(-1)]  # [q, q]


def _paley1(q: int) -> np.ndarray:
    """Paley I Hadamard matrix of order q+1 (q = 3 mod 4 prime power), int64 {+1,-1}."""
    jac = _jacobsthal(q)  # [q, q], skew-symmetric
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Paley II Hadamard matrix of order 2(q+1) (q = 1 mod 4 prime power), int64 {+1,-1}."""
    jac = _jacobsthal(q)  # [q, q], symmetric
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    zero_blk = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    one_blk = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c == 0, zero_blk) + np.kron(c, one_blk)


def _sylvester(p: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order p = 2^k, int64 {+1,-1}."""
    assert _is_power_of_two(p)
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def _base_construction(m: int) -> str | None:
    """Name of the construction used for a base order m, or None if none is available."""
    if m == 1:
        return "sylvester"
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0:
        pp = _prime_power(m // 2 - 1)
        if pp is not None and (m // 2 - 1) % 4 == 1:
            return "paley2"
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """Returns (m, P) with n = m * P, P a power of two and m the base order used for n.

    Raises:
      NotImplementedError: if n has no Sylvester / Paley I / Paley II decomposition here.
    """
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or (m % 4 == 0 and _base_construction(m) is not None):
            return m, p
        p //= 2
    raise NotImplementedError(
        f"no Hadamard matrix of order {n} is constructible here: n must be m * 2^k with m = 1, "
        "m = q+1 (q a prime power = 3 mod 4, Paley I) or m = 2(q+1) (q a prime power = 1 mod 4, "
        "Paley II)"
    )


@functools.lru_cache(maxsize=64)
def _base_matrix(m: int) -> np.ndarray:
    kind = _base_construction(m)
    if kind == "sylvester":
        return np.ones((1, 1), dtype=np.int64)
    if kind == "paley1":
        return _paley1(m - 1)
    if kind == "paley2":
        return _paley2(m // 2 - 1)
    raise NotImplementedError(f"no Hadamard construction for base order {m}")


def hadamard_base_matrix(m: int) -> np.ndarray:
    """The unnormalised {+1, -1} base matrix B_m (int64 [m, m]) used by `hadamard_matrix`."""
    return _base_matrix(m).copy()


def sylvester_matrix(p: int) -> np.ndarray:
    """The unnormalised Sylvester matrix S_p (int64 [p, p], p a power of two)."""
    if not _is_power_of_two(p):
        raise ValueError(f"Sylvester order must be a power of two, got {p}")
    return _sylvester(p)


@functools.lru_cache(maxsize=4)  # an order-11008 matrix is ~1 GB: keep few
def _hadamard_matrix_cached(n: int) -> np.ndarray:
    m, p = hadamard_factors(n)
    h = np.kron(_base_matrix(m).astype(np.float64), _sylvester(p).astype(np.float64))
    h /= math.sqrt(n)
    h.setflags(write=False)
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal Hadamard matrix of order n (float64 [n, n], H @ H.T = I).

    H = kron(B_m, S_P) / sqrt(n) with the decomposition of `hadamard_factors` (see module doc).

    Args:
      n: the order; m * 2^k for a base order m with a Sylvester / Paley I / Paley II construction.

    Returns:
      A fresh float64 array [n, n].

    Raises:
      NotImplementedError: if n has no construction here (the message names n).
    """
    return np.array(_hadamard_matrix_cached(n))


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def _radices(p: int, max_radix: int) -> tuple[int, ...]:
    """Splits p = 2^k into power-of-two radices <= max_radix, largest first."""
    out = []
    while p > 1:
        r = min(p, max_radix)
        out.append(r)
        p //= r
    return tuple(out)


def hadamard_transform_reference(x: jax.Array) -> jax.Array:
    """Dense reference: ``x @ hadamard_matrix(n)`` along the last axis, float32 math, x.dtype out.

    Args:
      x: float array [..., n].

    Returns:
      Array [..., n] of x.dtype.
    """
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n), jnp.float32)  # [n, n]
    y = jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)  # [..., n]
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("max_radix",))
def hadamard_transform_xla(x: jax.Array, *, max_radix: int = 64) -> jax.Array:
    """Fast ``x @ hadamard_matrix(n)`` along the last axis in plain jnp (float32 math, x.dtype out).

    Reshapes x to [..., m, P], runs a radix-``max_radix`` Walsh-Hadamard butterfly over the P axis
    (each stage a small dense matmul with a Sylvester factor), one dense [m, m] matmul with B_m
    over the m axis, and scales by 1/sqrt(n).

    Args:
      x: float array [..., n], n constructible by `hadamard_factors`.
      max_radix: the largest Sylvester factor used per butterfly stage.

    Returns:
      Array [..., n] of x.dtype.
    """
    *lead, n = x.shape
    m, p = hadamard_factors(n)
    hp = jax.lax.Precision.HIGHEST
    y = x.astype(jnp.float32).reshape(-1, m, p)  # [b, m, P]
    b = y.shape[0]
    # Butterfly over P: S_P = kron(S_r1, ..., S_rs); apply each factor on its own axis.
    rad = _radices(p, max_radix)
    if rad:
        y = y.reshape(b, m, *rad)  # [b, m, r1, ..., rs]
        for i, r in enumerate(rad):
            s = jnp.asarray(_sylvester(r), jnp.float32)  # [r, r] (symmetric)
            y = jnp.moveaxis(jnp.tensordot(y, s, axes=[[2 + i], [0]], precision=hp), -1, 2 + i)
        y = y.reshape(b, m, p)  # [b, m, P]
    if m > 1:
        bm = jnp.asarray(_base_matrix(m), jnp.float32)  # [m, m]
        y = jnp.einsum("bap,ac->bcp", y, bm, precision=hp)  # [b, m, P]
    y = y * (1.0 / math.sqrt(n))
    return y.reshape(*lead, n).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the Pallas Hadamard kernel.

    The kernel views each row of x as a matrix X [m', P2] (row-major, n = m' * P2, P2 a power of
    two) and computes ``A^T X C`` with ``A = kron(B_m, S_{P/P2})`` [m', m'] and ``C = S_{P2}``
    (``kron(A, C) = kron(B_m, S_P)``); m' is zero-padded to a power of two m'_pad.

    Attributes:
      block_m: rows of ``A^T X`` (out of m'_pad) per program (power of two >= 16).
      block_n: the largest P2 considered (power of two >= 16); P2 is chosen to minimise
        ``m'_pad^2 * P2 + m'_pad * P2^2`` multiply-adds per row.
      block_k: the contraction step over m'_pad (power of two >= 16).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def kronecker_plan(n: int, max_p2: int = 128) -> tuple[int, int, int]:
    """(m', m'_pad, P2) used by the Pallas kernel for order n (see `BlockSizes`).

    Raises:
      NotImplementedError: if n has no construction, or fewer than 16 Sylvester columns (P < 16).
    """
    m, p = hadamard_factors(n)
    best = None
    p2 = 16
    while p2 <= min(p, max_p2):
        mp = n // p2
        mpad = max(16, 1 << (mp - 1).bit_length())
        cost = mpad * mpad * p2 + mpad * p2 * p2
        if best is None or cost < best[0]:
            best = (cost, mp, mpad, p2)
        p2 *= 2
    if best is None:
        raise NotImplementedError(
            f"Pallas Hadamard kernel needs n = m * 2^k with 2^k >= 16 (dots of at least 16); n={n}"
        )
    return best[1], best[2], best[3]


@functools.lru_cache(maxsize=32)
def _kernel_constants(n: int, max_p2: int) -> tuple[np.ndarray, np.ndarray]:
    """(A^T zero-padded to [m'_pad, m'_pad], C = S_P2 [P2, P2]) as float32 numpy arrays."""
    m, p = hadamard_factors(n)
    mp, mpad, p2 = kronecker_plan(n, max_p2)
    a = np.kron(_base_matrix(m), _sylvester(p // p2)).astype(np.float32)  # [m', m']
    at = np.zeros((mpad, mpad), np.float32)
    at[:mp, :mp] = a.T
    return at, _sylvester(p2).astype(np.float32)


def _hadamard_kernel(x_ref, at_ref, c_ref, o_ref, *, block_k, scale, precision):
    """One row of x (as X [m'_pad, P2]) and ``block_m`` rows of the result ``(A^T X) C``."""
    bo = at_ref.shape[0]
    mpad, p2 = x_ref.shape

    def body(kb, t):
        col = pl.multiple_of(kb * block_k, block_k)
        at = at_ref[:, pl.ds(col, block_k)]  # [bo, bk]
        xb = x_ref[pl.ds(col, block_k), :]  # [bk, P2]
        return t + jnp.dot(at, xb, preferred_element_type=jnp.float32, precision=precision)

    t = jax.lax.fori_loop(0, mpad // block_k, body, jnp.zeros((bo, p2), jnp.float32))  # [bo, P2]
    y = jnp.dot(
        t,
        c_ref[...],
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )  # [bo, P2]
    o_ref[...] = (y * jnp.float32(scale)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def hadamard_transform_pallas(
    x: jax.Array, *, block_sizes: BlockSizes | None = None, interpret: bool = False
) -> jax.Array:
    """Pallas ``x @ hadamard_matrix(n)`` along the last axis (float32 math, x.dtype out).

    Each row is reshaped to X [m', P2] and the kernel computes ``(A^T X) C / sqrt(n)``: the
    first dot in x.dtype (A is +-1, exact in 16-bit floats) with float32 accumulation, the second
    in float32 at HIGHEST precision.

    Args:
      x: float array [..., n].
      block_sizes: block sizes (None = defaults).
      interpret: run in Pallas interpret mode (CPU testing).

    Returns:
      Array [..., n] of x.dtype.

    Raises:
      NotImplementedError: n not constructible, P < 16, or invalid block sizes.
    """
    *lead, n = x.shape
    bs = block_sizes or BlockSizes()
    for name, v in (("block_m", bs.block_m), ("block_n", bs.block_n), ("block_k", bs.block_k)):
        if not _is_power_of_two(v) or v < 16:
            raise NotImplementedError(f"{name}={v} must be a power of two >= 16")
    mp, mpad, p2 = kronecker_plan(n, bs.block_n)
    at_np, c_np = _kernel_constants(n, bs.block_n)
    bo = min(bs.block_m, mpad)
    bk = min(bs.block_k, mpad)
    rows = math.prod(lead)
    x3 = x.reshape(rows, mp, p2)  # [R, m', P2]
    if mpad != mp:
        x3 = jnp.pad(x3, ((0, 0), (0, mpad - mp), (0, 0)))  # [R, m'_pad, P2]
    at = jnp.asarray(at_np, x.dtype)  # [m'_pad, m'_pad]
    c = jnp.asarray(c_np, jnp.float32)  # [P2, P2]
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(
        _hadamard_kernel, block_k=bk, scale=1.0 / math.sqrt(n), precision=precision
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, mpad, p2), x.dtype),
        grid=(rows, mpad // bo),
        in_specs=[
            pl.BlockSpec((None, mpad, p2), lambda i, j: (i, 0, 0)),  # X [m'_pad, P2]
            pl.BlockSpec((bo, mpad), lambda i, j: (j, 0)),  # A^T rows [bo, m'_pad]
            pl.BlockSpec((p2, p2), lambda i, j: (0, 0)),  # C [P2, P2]
        ],
        out_specs=pl.BlockSpec((None, bo, p2), lambda i, j: (i, j, 0)),  # [bo, P2]
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="hadamard_transform",
    )(x3, at, c)  # [R, m'_pad, P2]
    return y[:, :mp].reshape(*lead, n)


HadamardBlockSizes = BlockSizes  # the name used before the kernel modules settled on BlockSizes


def hadamard_transform(x: jax.Array, *, impl: str | None = None) -> jax.Array:
    """``x @ hadamard_matrix(n)`` along the last axis; ``impl`` as in `pallas_kernels.dispatch`.

    Args:
      x: float array [..., n].
      impl: None (auto: Pallas on GPU, XLA elsewhere, XLA fallback for unsupported n), "xla",
        "pallas" or "pallas_interpret".

    Returns:
      Array [..., n] of x.dtype.
    """
    from pallas_kernels import dispatch  # dispatch imports this module

    return dispatch.hadamard_transform(x, impl=impl)
