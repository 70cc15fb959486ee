"""Decode attention over one layer of QuantSpec's hierarchical int4/int8 KV cache.

Cache format (the arrays `qspec_jax.cache.hierarchical.HierKVCache` stores, one layer sliced out;
Q = quantized capacity, G = key group, NB = float ring-buffer capacity, R = residual length):

* ``k_hi, k_lo, v_hi, v_lo``: uint8 [B, Q, kvh, hd/2]. Each key / value has an 8-bit code
  c = 16 u + l with an upper half u in [0, 15] and a lower half l in [-8, 7]; ``*_hi`` packs u,
  ``*_lo`` packs l + 8, two codes a byte: byte j holds channel j in its low nibble and channel
  j + hd/2 in its high nibble.
* ``k_scale, k_min``: float32 [B, Q/G, kvh, hd], per channel per G-token group (keys);
  ``v_scale, v_min``: float32 [B, Q, kvh], per token (values).
* ``k_buf, v_buf``: [B, NB, kvh, hd] float ring buffer: position p lives at index p mod NB and
  the buffer holds positions [buf_start, buf_start + NB) (``buf_start`` int32 [B], a multiple of
  R; NB a multiple of R).

Computes, for queries q [B, t, h, hd] at positions p = q_positions [B, t] (GQA: query head i reads
KV head i // (h / kvh)) and cut(p) = float_start(p) = R * max(0, ceil((p - 2R) / R)):

    code[j]  = 16 u[j] + l[j]           (view "target", the int8 code)
             = 16 u[j]                  (view "draft", upper halves only; l is never read)
    Kq[j, d] = k_min[j // G, d] + float32(code) * (k_scale[j // G, d] * (1/16))   (float32)
    Vq[j, d] = v_min[j] + float32(code) * (v_scale[j] * (1/16))                     (float32)
    keys seen by a row at p: Kq[j], Vq[j] for j < cut(p) (quantized part), and the buffer's
             K[j], V[j] for cut(p) <= j <= p, j in [buf_start, buf_start + NB)
    s[j]     = float32(dot(q, q.dtype(K[j]))) / sqrt(hd)       (keys rounded to q.dtype,
                                                                 float32 accumulation)
    out      = q.dtype( sum_j softmax(s)[j] * float32(V[j]) )

which is exactly what `HierKVCache.attend` (the XLA path the model runs on CPU) computes.
`hier_attention_reference` computes it by dequantizing the whole layer and one exact float32
softmax (the ground truth); `hier_attention` (Pallas, Triton lowering) and the attend path both
use an online softmax over key blocks, so they differ from it by float32 rounding only
(accumulation and rescaling order; the dequantized values themselves are the same formula, up to
an FMA contraction on the GPU).

Kernel structure (Triton lowering): grid (B, kvh, S + 1). The t * (h / kvh) query rows that share
a KV head are one [rows, hd] tile (rows padded to a power of two >= 16 for ``tl.dot``; padded
rows see no key). Programs s < S each own a fixed range of ``split_tokens`` quantized positions
(flash-decoding split); program S owns the float buffer. A program walks its range in blocks of
``block_k`` tokens (``block_k`` divides G, so one key scale/min row per block), loads the packed
bytes [block_k, hd/2] of u (and l), unpacks the two nibbles into the two channel halves
[0, hd/2) and [hd/2, hd), dequantizes them in registers, and updates a float32 online softmax
(running max, sum, and two [rows, hd/2] accumulators: the channel halves are never concatenated).
The buffer program walks the ring in blocks of ``block_buffer`` positions aligned to absolute
positions (``block_buffer`` divides R, so a block never wraps). Blocks that hold no key of any
row are skipped (per-sequence bounds computed outside the kernel); a block that holds none for
some rows leaves those rows' state unchanged. Each program writes its (output, max, sum); a
small jnp epilogue combines the S + 1 partial softmaxes in a fixed order. Block and split
boundaries are absolute positions, so a row adds the same terms in the same order whatever other
rows share the call (a verification block vs an autoregressive step); bit-for-bit row independence
is tested in interpret mode, and on a GPU by the GPU test class (the tile height may change the
dot's schedule there). No float copy of the quantized cache is ever written.

Supported by the kernel: hd/2 a power of two >= 16 (hd = 32, 64, 128, 256); G, R with power-of-two
blocks >= 16 dividing them; t * h / kvh <= 128 query rows per KV head (decode and verification,
not prefill). Anything else raises NotImplementedError (dispatch then falls back to XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util

VIEWS = ("target", "draft")
MAX_ROWS = 128  # query rows per KV head the kernel holds in one tile
_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the hierarchical-cache attention kernel.

    Attributes:
      block_k: quantized tokens per loop step (power of two >= 16 dividing the key group G).
      block_buffer: float-buffer positions per loop step (power of two >= 16 dividing R).
      split_tokens: quantized positions per program (a multiple of block_k; the largest such
        divisor of Q not above it is used): more programs for long caches (flash-decoding).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages of the block loops.
    """

    block_k: int = 64
    block_buffer: int = 64
    split_tokens: int = 512
    num_warps: int = 4
    num_stages: int = 2


def float_start(positions: jax.Array, residual: int) -> jax.Array:
    """R * max(0, ceil((p - 2R) / R)): below it a query at p reads keys from the quantized part.

    The same function as `qspec_jax.cache.hierarchical.float_start` (pallas_kernels does not
    import qspec_jax).
    """
    return residual * jnp.maximum(0, (positions - residual - 1) // residual)


# ------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class _Shapes:
    b: int
    t: int
    h: int
    hd: int
    kvh: int
    q_cap: int  # Q
    group: int  # G
    nbuf: int  # NB


def _check_shapes(
    q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
    buf_start, residual, view,
) -> _Shapes:  # fmt: skip
    """Validates the arrays against each other; ValueError on an inconsistent set."""
    if view not in VIEWS:
        raise ValueError(f"unknown KV view {view!r}; expected one of {VIEWS}")
    b, t, h, hd = q.shape
    if hd % 2:
        raise ValueError(f"head_dim must be even (two int4 codes a byte), got {hd}")
    _, q_cap, kvh, half = k_hi.shape
    codes = (b, q_cap, kvh, hd // 2)
    named = {"k_hi": k_hi, "v_hi": v_hi}
    if view == "target":
        if k_lo is None or v_lo is None:
            raise ValueError("view 'target' reads the lower halves: pass k_lo and v_lo")
        named.update(k_lo=k_lo, v_lo=v_lo)
    for name, x in named.items():
        if x.shape != codes or x.dtype != jnp.uint8:
            raise ValueError(f"{name} must be uint8 {codes}, got {x.dtype} {x.shape}")
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    ng = k_scale.shape[1]
    if ng < 1 or q_cap % ng:
        raise ValueError(f"k_scale's {ng} groups do not tile the quantized capacity {q_cap}")
    for name, x in (("k_scale", k_scale), ("k_min", k_min)):
        if x.shape != (b, ng, kvh, hd):
            raise ValueError(f"{name} must be {(b, ng, kvh, hd)}, got {x.shape}")
    for name, x in (("v_scale", v_scale), ("v_min", v_min)):
        if x.shape != (b, q_cap, kvh):
            raise ValueError(f"{name} must be {(b, q_cap, kvh)}, got {x.shape}")
    nbuf = k_buf.shape[1]
    for name, x in (("k_buf", k_buf), ("v_buf", v_buf)):
        if x.shape != (b, nbuf, kvh, hd):
            raise ValueError(f"{name} must be {(b, nbuf, kvh, hd)}, got {x.shape}")
    if q_positions.shape != (b, t) or buf_start.shape != (b,):
        raise ValueError(
            f"q_positions must be {(b, t)} and buf_start {(b,)}, got "
            f"{q_positions.shape} and {buf_start.shape}"
        )
    if residual < 1 or nbuf % residual:
        raise ValueError(f"buffer capacity {nbuf} is not a multiple of the residual {residual}")
    return _Shapes(b, t, h, hd, kvh, q_cap, q_cap // ng, nbuf)


# ------------------------------------------------------------------------- reference


def hier_attention_reference(
    q: jax.Array,
    q_positions: jax.Array,
    k_hi: jax.Array,
    k_lo: jax.Array | None,
    k_scale: jax.Array,
    k_min: jax.Array,
    v_hi: jax.Array,
    v_lo: jax.Array | None,
    v_scale: jax.Array,
    v_min: jax.Array,
    k_buf: jax.Array,
    v_buf: jax.Array,
    buf_start: jax.Array,
    *,
    residual: int,
    view: str = "target",
) -> jax.Array:
    """Pure-jnp ground truth: dequantize the whole layer, then one exact float32 softmax per row.

    Args: as `hier_attention` (see the module docstring for the layout).

    Returns:
      [B, t, h * hd] array of q.dtype.
    """
    s = _check_shapes(
        q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
        buf_start, residual, view,
    )  # fmt: skip
    target = view == "target"

    def unpack(p):  # uint8 [..., hd/2] -> int32 [..., hd]: low nibbles first, then high nibbles
        return jnp.concatenate([p & 15, p >> 4], axis=-1).astype(jnp.int32)

    def codes(hi, lo):
        c = 16 * unpack(hi)
        return c + (unpack(lo) - 8) if target else c

    k_s = jnp.repeat(k_scale, s.group, axis=1)  # [B, Q, kvh, hd]
    k_m = jnp.repeat(k_min, s.group, axis=1)
    kq = k_m + codes(k_hi, k_lo).astype(jnp.float32) * (k_s * (1.0 / 16.0))  # [B, Q, kvh, hd]
    vq = v_min[..., None] + codes(v_hi, v_lo).astype(jnp.float32) * (
        v_scale[..., None] * (1.0 / 16.0)
    )  # [B, Q, kvh, hd]
    # Ring index i holds position buf_start + ((i - buf_start) mod NB).
    idx = jnp.arange(s.nbuf, dtype=jnp.int32)[None]  # [1, NB]
    bpos = buf_start[:, None] + (idx - buf_start[:, None]) % s.nbuf  # [B, NB]
    qpos = jnp.broadcast_to(jnp.arange(s.q_cap, dtype=jnp.int32)[None], (s.b, s.q_cap))
    keys = jnp.concatenate([kq.astype(q.dtype), k_buf.astype(q.dtype)], axis=1)  # [B, N, kvh, hd]
    vals = jnp.concatenate([vq, v_buf.astype(jnp.float32)], axis=1)  # [B, N, kvh, hd]
    p = q_positions[:, :, None]  # [B, t, 1]
    cut = float_start(p, residual)
    mask = jnp.concatenate(
        [qpos[:, None, :] < cut, (bpos[:, None, :] >= cut) & (bpos[:, None, :] <= p)], axis=-1
    )  # [B, t, N]
    g = s.h // s.kvh
    qg = q.reshape(s.b, s.t, s.kvh, g, s.hd)
    sc = jnp.einsum(
        "btkgd,bnkd->btkgn",
        qg,
        keys,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    ) / math.sqrt(s.hd)  # [B, t, kvh, g, N]
    sc = jnp.where(mask[:, :, None, None, :], sc, -jnp.inf)
    w = jax.nn.softmax(sc, axis=-1)  # [B, t, kvh, g, N]
    out = jnp.einsum(
        "btkgn,bnkd->btkgd", w, vals, precision=jax.lax.Precision.HIGHEST
    )  # [B, t, kvh, g, hd]
    return out.reshape(s.b, s.t, s.h * s.hd).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("residual", "view"))
def hier_attention_xla(
    q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
    buf_start, *, residual: int, view: str = "target",
) -> jax.Array:  # fmt: skip
    """The XLA path of `pallas_kernels.dispatch.hier_attention`: the reference, jitted.

    It dequantizes one layer into a float temporary (like `w4a16_matmul_xla` dequantizes the
    whole weight). The model's CPU path is `HierKVCache.attend`, which runs block by block and
    materializes nothing; this path serves direct callers of the dispatch entry.

    Returns:
      [B, t, h * hd] array of q.dtype.
    """
    return hier_attention_reference(
        q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
        buf_start, residual=residual, view=view,
    )  # fmt: skip


# ------------------------------------------------------------------------- Pallas kernel


def _pick_pow2_block(dim: int, requested: int, what: str) -> int:
    """``requested`` if it is a power of two dividing ``dim``, else the largest power of two below
    it that does; NotImplementedError if that is below Triton's minimum dot size of 16."""
    if not _util.is_pow2(requested):
        raise NotImplementedError(f"block size {requested} for {what} must be a power of two")
    return _util.pick_block(dim, requested, _util.MIN_DOT, what)


def _kernel(
    q_ref, pos_ref, cut_ref, bounds_ref, k_hi_ref, *refs, target, half, block_k, block_buffer,
    group, split_blocks, n_splits, nbuf, precision,
):  # fmt: skip
    """One (sequence, KV head, split) program; refs are this program's blocks.

    q_ref [rows, hd]; pos_ref, cut_ref int32 [rows]; bounds_ref int32 [4] = (quantized blocks,
    first and end buffer block, buf_start); code refs uint8 [Q, hd/2]; k_scale/k_min [Q/G, hd];
    v_scale/v_min [Q]; buffers [NB, hd]; outputs o [rows, hd], m and l [rows] (float32).
    """
    if target:
        k_lo_ref, k_scale_ref, k_min_ref, v_hi_ref, v_lo_ref, *rest = refs
    else:
        k_scale_ref, k_min_ref, v_hi_ref, *rest = refs
        k_lo_ref = v_lo_ref = None
    v_scale_ref, v_min_ref, k_buf_ref, v_buf_ref, o_ref, m_ref, l_ref = rest
    rows = q_ref.shape[0]
    hd = 2 * half
    qa = q_ref[:, pl.ds(0, half)]  # [rows, hd/2] channels [0, hd/2)
    qb = q_ref[:, pl.ds(half, half)]  # [rows, hd/2] channels [hd/2, hd)
    cdt = q_ref.dtype  # keys are rounded to the query dtype before the dot
    pos = pos_ref[...]  # [rows] query positions (-1: padding row)
    cut = cut_ref[...]  # [rows] float_start(pos) (0: padding row)
    n_q = bounds_ref[0]
    buf_lo = bounds_ref[1]
    buf_hi = bounds_ref[2]
    buf_start = bounds_ref[3]

    def dot_t(a, b):  # a [rows, c] . b [n, c] -> [rows, n] float32
        return jax.lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )

    def dot(a, b):  # a [rows, n] float32 . b [n, c] float32 -> [rows, c]
        return jnp.dot(
            a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
        )

    def update(st, ka, kb, va, vb, mask):
        """Online softmax over one block: ka, kb [n, hd/2] (cdt), va, vb [n, hd/2] float32."""
        m, den, acc_a, acc_b = st
        s = (dot_t(qa, ka) + dot_t(qb, kb)) / math.sqrt(hd)  # [rows, n]
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [rows]
        alpha = jnp.exp(m - m_new)  # [rows]
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)  # [rows, n]
        den = alpha * den + jnp.sum(p, axis=1)
        acc_a = alpha[:, None] * acc_a + dot(p, va)  # [rows, hd/2]
        acc_b = alpha[:, None] * acc_b + dot(p, vb)
        return m_new, den, acc_a, acc_b

    def unpack(p_ref, start):  # packed [block_k, hd/2] -> (low nibbles, high nibbles) int32
        p = p_ref[pl.ds(start, block_k), :].astype(jnp.int32)
        return p & 15, p >> 4

    def codes(hi_ref, lo_ref, start):  # 8-bit codes (target) or 16 u (draft), two halves
        ua, ub = unpack(hi_ref, start)
        if lo_ref is None:
            return 16 * ua, 16 * ub
        la, lb = unpack(lo_ref, start)
        return 16 * ua + (la - 8), 16 * ub + (lb - 8)

    split = pl.program_id(2)  # read here: interpret mode cannot lower it inside a loop body

    def q_block(i, st):
        blk = split * split_blocks + i
        start = pl.multiple_of(blk * block_k, block_k)
        grp = jax.lax.div(blk, group // block_k)  # block_k divides G: one scale row per block
        ca, cb = codes(k_hi_ref, k_lo_ref, start)  # [block_k, hd/2] int32 each
        ks_a = k_scale_ref[pl.ds(grp, 1), pl.ds(0, half)] * (1.0 / 16.0)  # [1, hd/2]
        ks_b = k_scale_ref[pl.ds(grp, 1), pl.ds(half, half)] * (1.0 / 16.0)
        ka = k_min_ref[pl.ds(grp, 1), pl.ds(0, half)] + ca.astype(jnp.float32) * ks_a
        kb = k_min_ref[pl.ds(grp, 1), pl.ds(half, half)] + cb.astype(jnp.float32) * ks_b
        va_c, vb_c = codes(v_hi_ref, v_lo_ref, start)
        vs = (v_scale_ref[pl.ds(start, block_k)] * (1.0 / 16.0))[:, None]  # [block_k, 1]
        vm = v_min_ref[pl.ds(start, block_k)][:, None]
        va = vm + va_c.astype(jnp.float32) * vs  # [block_k, hd/2]
        vb = vm + vb_c.astype(jnp.float32) * vs
        kpos = start + jnp.arange(block_k, dtype=jnp.int32)  # [block_k]
        mask = kpos[None, :] < cut[:, None]  # [rows, block_k]
        return update(st, ka.astype(cdt), kb.astype(cdt), va, vb, mask)

    def b_block(i, st):
        first = buf_start + (buf_lo + i) * block_buffer  # absolute position of the block
        off = pl.multiple_of(jax.lax.rem(first, nbuf), block_buffer)  # never wraps
        ka = k_buf_ref[pl.ds(off, block_buffer), pl.ds(0, half)].astype(cdt)
        kb = k_buf_ref[pl.ds(off, block_buffer), pl.ds(half, half)].astype(cdt)
        va = v_buf_ref[pl.ds(off, block_buffer), pl.ds(0, half)].astype(jnp.float32)
        vb = v_buf_ref[pl.ds(off, block_buffer), pl.ds(half, half)].astype(jnp.float32)
        kpos = first + jnp.arange(block_buffer, dtype=jnp.int32)  # [block_buffer]
        mask = (kpos[None, :] >= cut[:, None]) & (kpos[None, :] <= pos[:, None])
        return update(st, ka, kb, va, vb, mask)

    st = (
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, half), jnp.float32),
        jnp.zeros((rows, half), jnp.float32),
    )
    is_buf = split == n_splits
    # This split's quantized blocks: [split * split_blocks, ...) clipped to the n_q in use.
    n_mine = jnp.minimum(jnp.maximum(n_q - split * split_blocks, 0), split_blocks)
    st = jax.lax.fori_loop(0, jnp.where(is_buf, 0, n_mine), q_block, st)
    st = jax.lax.fori_loop(0, jnp.where(is_buf, buf_hi - buf_lo, 0), b_block, st)
    m, den, acc_a, acc_b = st
    o_ref[:, pl.ds(0, half)] = acc_a
    o_ref[:, pl.ds(half, half)] = acc_b
    m_ref[...] = m
    l_ref[...] = den


@functools.partial(jax.jit, static_argnames=("residual", "view", "block_sizes", "interpret"))
def hier_attention(
    q: jax.Array,
    q_positions: jax.Array,
    k_hi: jax.Array,
    k_lo: jax.Array | None,
    k_scale: jax.Array,
    k_min: jax.Array,
    v_hi: jax.Array,
    v_lo: jax.Array | None,
    v_scale: jax.Array,
    v_min: jax.Array,
    k_buf: jax.Array,
    v_buf: jax.Array,
    buf_start: jax.Array,
    *,
    residual: int,
    view: str = "target",
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pallas decode attention over one hierarchical-cache layer (module docstring: exact math).

    Args:
      q: queries [B, t, h, hd] (float32 or bfloat16).
      q_positions: int32 [B, t] absolute positions of the query rows.
      k_hi, k_lo: uint8 [B, Q, kvh, hd/2] packed upper / lower (+8) key halves (k_lo may be None
        for view "draft": it is never read).
      k_scale, k_min: float32 [B, Q/G, kvh, hd] per-channel key group scales and minima.
      v_hi, v_lo: uint8 [B, Q, kvh, hd/2] value halves (v_lo may be None for "draft").
      v_scale, v_min: float32 [B, Q, kvh] per-token value scales and minima.
      k_buf, v_buf: [B, NB, kvh, hd] float ring buffer (position p at index p mod NB).
      buf_start: int32 [B] first position held by the buffer (a multiple of R).
      residual: R (static).
      view: "target" (int8 codes) or "draft" (upper int4 halves) (static).
      block_sizes: block sizes; None = `BlockSizes()` adapted to the shapes.
      interpret: run the kernel in Pallas interpret mode (CPU testing).

    Returns:
      [B, t, h * hd] array of q.dtype (the layout `HierKVCache.attend` returns).

    Raises:
      NotImplementedError: shapes or block sizes the kernel does not support.
      ValueError: inconsistent arrays.
    """
    s = _check_shapes(
        q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
        buf_start, residual, view,
    )  # fmt: skip
    half = s.hd // 2
    if not _util.is_pow2(half) or half < _util.MIN_DOT:
        raise NotImplementedError(
            f"head_dim {s.hd}: the kernel needs head_dim / 2 a power of two >= {_util.MIN_DOT}"
        )
    g = s.h // s.kvh
    n_rows = s.t * g
    if n_rows > MAX_ROWS:
        raise NotImplementedError(
            f"{n_rows} query rows per KV head (t={s.t} x {g} heads) exceed {MAX_ROWS}: this is a "
            "decode / verification kernel, not a prefill one"
        )
    bs = block_sizes or BlockSizes()
    bk = _pick_pow2_block(s.group, bs.block_k, "key group G")
    bb = _pick_pow2_block(residual, bs.block_buffer, "residual R")
    split_blocks = max(
        d for d in range(1, max(1, bs.split_tokens // bk) + 1) if (s.q_cap // bk) % d == 0
    )  # quantized blocks per split: the largest divisor of Q / block_k within split_tokens
    n_splits = s.q_cap // (bk * split_blocks)
    rows = max(_util.MIN_DOT, _util.next_pow2(n_rows))

    # Query rows that share a KV head: row ti * g + gi is query head kv * g + gi of token ti.
    qr = q.reshape(s.b, s.t, s.kvh, g, s.hd).transpose(0, 2, 1, 3, 4)
    qr = qr.reshape(s.b, s.kvh, n_rows, s.hd)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - n_rows), (0, 0)))  # [B, kvh, rows, hd]
    pos = q_positions.astype(jnp.int32)
    cut = float_start(pos, residual)  # [B, t]
    pad = ((0, 0), (0, rows - n_rows))
    pos_rows = jnp.pad(jnp.repeat(pos, g, axis=1), pad, constant_values=-1)  # [B, rows]
    cut_rows = jnp.pad(jnp.repeat(cut, g, axis=1), pad)  # [B, rows]: padding sees no key
    # Per-sequence loop bounds (blocks outside them hold no key of any row).
    bstart = buf_start.astype(jnp.int32)
    nbb = s.nbuf // bb
    n_q = -(-jnp.max(cut, axis=1) // bk)  # quantized blocks in use (cut is a multiple of R)
    buf_lo = jnp.clip((jnp.min(cut, axis=1) - bstart) // bb, 0, nbb)
    buf_hi = jnp.clip(-(-(jnp.max(pos, axis=1) + 1 - bstart) // bb), buf_lo, nbb)
    bounds = jnp.stack([n_q, buf_lo, buf_hi, bstart], axis=1).astype(jnp.int32)  # [B, 4]

    target = view == "target"
    code_spec = pl.BlockSpec((None, s.q_cap, None, half), lambda i, j, k: (i, 0, j, 0))
    kgrp_spec = pl.BlockSpec((None, s.q_cap // s.group, None, s.hd), lambda i, j, k: (i, 0, j, 0))
    vtok_spec = pl.BlockSpec((None, s.q_cap, None), lambda i, j, k: (i, 0, j))
    buf_spec = pl.BlockSpec((None, s.nbuf, None, s.hd), lambda i, j, k: (i, 0, j, 0))
    row_spec = pl.BlockSpec((None, rows), lambda i, j, k: (i, 0))
    in_specs = [
        pl.BlockSpec((None, None, rows, s.hd), lambda i, j, k: (i, j, 0, 0)),  # q [rows, hd]
        row_spec,  # positions [rows]
        row_spec,  # cuts [rows]
        pl.BlockSpec((None, 4), lambda i, j, k: (i, 0)),  # bounds [4]
        code_spec,  # k_hi [Q, hd/2]
    ]
    args = [qr, pos_rows, cut_rows, bounds, k_hi]
    if target:
        in_specs.append(code_spec)  # k_lo
        args.append(k_lo)
    in_specs += [kgrp_spec, kgrp_spec, code_spec]  # k_scale, k_min [Q/G, hd]; v_hi
    args += [k_scale.astype(jnp.float32), k_min.astype(jnp.float32), v_hi]
    if target:
        in_specs.append(code_spec)  # v_lo
        args.append(v_lo)
    in_specs += [vtok_spec, vtok_spec, buf_spec, buf_spec]  # v_scale, v_min [Q]; buffers
    args += [v_scale.astype(jnp.float32), v_min.astype(jnp.float32), k_buf, v_buf]

    part = (s.b, s.kvh, n_splits + 1, rows)
    kernel = functools.partial(
        _kernel,
        target=target,
        half=half,
        block_k=bk,
        block_buffer=bb,
        group=s.group,
        split_blocks=split_blocks,
        n_splits=n_splits,
        nbuf=s.nbuf,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    o, m, den = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((*part, s.hd), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ),
        grid=(s.b, s.kvh, n_splits + 1),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, None, None, rows, s.hd), lambda i, j, k: (i, j, k, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, k: (i, j, k, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, k: (i, j, k, 0)),
        ),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="hier_attention",
    )(*args)  # partial softmaxes [B, kvh, S + 1, rows, (hd)]

    # Combine the splits (a split with no key of a row has m = float32 min, sum 0: weight 0).
    m_all = jnp.max(m, axis=2, keepdims=True)  # [B, kvh, 1, rows]
    w = jnp.exp(m - m_all)  # [B, kvh, S + 1, rows]
    den = jnp.sum(w * den, axis=2)  # [B, kvh, rows]
    out = jnp.sum(w[..., None] * o, axis=2)  # [B, kvh, rows, hd]
    out = out / jnp.where(den > 0, den, 1.0)[..., None]  # padding rows: 0
    out = out[:, :, :n_rows].reshape(s.b, s.kvh, s.t, g, s.hd).transpose(0, 2, 1, 3, 4)
    return out.reshape(s.b, s.t, s.h * s.hd).astype(q.dtype)
