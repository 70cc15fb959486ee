"""QuantSpec's hierarchical KV cache: int8 codes split into two int4 halves, plus a float buffer.

Format (QuantSpec, arXiv 2502.10424), per layer and sequence:

* **quantized part.** Each value x of a group gets an 8-bit code over the group's range:
  scale = (max - min) / 15, step = scale / 16, c = round((x - min) / step) in [0, 240]. The code
  is split into an **upper int4** u = (c + 8) >> 4 in [0, 15] and a **lower int4**
  l = c - 16 u in [-8, 7] (the signed residual at scale / 16). The draft view reads the upper
  halves only: x ~ min + u * scale (asymmetric int4); the target view reads both:
  x ~ min + (16 u + l) * step (int8). Keys are grouped **per channel over `key_group` tokens**
  (128 by default), values **per token** (over head_dim, per KV head). Each half is packed two
  codes a byte (`k_hi` / `k_lo`, `v_hi` / `v_lo`), so the draft reads half the code bytes.
* **float buffer.** The most recent tokens stay unquantized: after every commit the buffer holds
  positions [buf_start, length) with length - buf_start <= 2R (R = `residual`, 128 by default).
  When it passes 2R, the oldest R leave it (QuantSpec's flush).

Invariants after every `commit` and `flush` (the state is a function of the verified lengths
alone, however the tokens arrived: one by one, in speculative blocks, or as a prompt). The
decoding loop commits with `flush=False` and flushes at the start of its next step, so the
invariants hold whenever a forward reads the cache:

* q_len = floor(length / R) * R: every complete R-chunk of verified tokens is quantized (eagerly,
  as soon as it is complete and verified; flushes never touch unverified draft entries);
* buf_start = float_start(length) = R * max(0, ceil((length - 2R) / R)): the float buffer starts
  there and holds positions [buf_start, buf_start + buffer), so buf_start <= q_len <= length.
  The buffer is a ring: position p lives at index p mod buffer (buffer a multiple of R), so a
  flush moves no data, it only advances buf_start.

**Which representation a query sees.** A query at position p reads key j from the quantized
part iff j < float_start(p), else from the float buffer. This is exactly what autoregressive
decoding sees at p (its buffer starts at float_start(p)), and it depends on p alone, so a
verifier row at p sees the same keys, values and block order as the autoregressive step at p:
that is what makes speculative greedy output equal autoregressive greedy output on this cache.
It needs the chunks below float_start(p) already quantized and the buffer to reach p, both true
when a step writes at most R + 1 positions (gamma <= R), checked by `HierLayout`.

**Rollback** is moving `lengths` back; it is only allowed inside the float buffer, to lengths
>= q_len (positions below q_len are committed and quantized). The decoding loop only ever rolls
back to the last committed length, which satisfies this. Draft K/V written past the length sit in
the buffer until the verifier overwrites them; they are never flushed.

Attention (`attend`) runs block by block with an online softmax: over the quantized part in
blocks of `block` tokens (each block's codes dequantized on the fly, never the whole cache), then
over the float buffer in blocks of `buffer_block` tokens aligned to absolute positions (so a
verifier row and an autoregressive row add the same terms in the same order). Which code runs is
the kernel registry's choice (`pallas_kernels.dispatch.hier_cache_attention`, op
"hier_cache_attention"): on a CPU backend the AVX2 kernel `pallas_kernels.cpu_attention`
(`HierLayout.attention_impl` "cpu": the same function and the same absolute-position blocking,
read straight from the packed codes); on a GPU backend "auto", the Pallas kernel
`pallas_kernels.hier_attention` (same function, float32 rounding apart) once it has passed its
self-check against XLA, per call with the fallback to this XLA path; else that XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import dispatch
from qspec_jax.cache.kv_cache import KVCache, write_layer
from qspec_jax.config import LlamaConfig

CODE_MAX = 240  # 8-bit codes span 15 upper steps of 16 lower steps: [0, 240]
VIEWS = ("target", "draft")
ATTENTION_IMPLS = ("xla", "auto", "pallas", "pallas_interpret", "cpu")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_attention_impl(head_dim: int | None = None, dtype=None) -> str:
    """The attention a cache gets by default: the kernel registry's choice
    (`pallas_kernels.dispatch.hier_attention_default`, the "hier_cache_attention" chain).

    "cpu" (the AVX2 kernel, `pallas_kernels.cpu_attention`) on a CPU backend where the CPU kernels
    build and cover the shapes (float32, head_dim a multiple of 32 up to 256); "auto" on a GPU
    backend (the Pallas kernel after its self-check against XLA, per call, XLA where it refuses
    a shape); else "xla" (the block-wise jnp path). Both "cpu" and "xla" are exact in the sense
    speculative decoding needs (a row's result does not depend on the other rows of the call);
    "cpu" reads the codes at memory speed instead of dequantizing blocks through XLA.
    """
    return dispatch.hier_attention_default(
        32 if head_dim is None else head_dim, jnp.float32 if dtype is None else dtype
    )


@dataclasses.dataclass(frozen=True)
class HierLayout:
    """Static layout of a hierarchical cache (hashable; part of the pytree's static structure).

    Attributes:
        residual: R; the float buffer holds between R + 1 and 2R verified tokens once the
            sequence is longer than 2R, and R-token chunks are quantized together.
        key_group: tokens per key quantization group (per channel); divides `residual`.
        block: tokens per attention block over the quantized part (a multiple of key_group).
        buffer_block: tokens per attention block over the float buffer (divides `residual`).
        buffer: float ring buffer capacity in tokens (>= 2R + step_tokens, a multiple of R).
        q_capacity: token capacity of the quantized part (= the cache's capacity; a multiple of
            `block` and of `residual`).
        step_tokens: the most positions one decoding step writes (gamma + 1, or 1); <= R + 1.
        attention_impl: which implementation `attend` runs: "xla" (the block-wise jnp path
            below), "cpu" (the AVX2 kernel `pallas_kernels.cpu_attention`; its
            NotImplementedError propagates), "auto" (the Pallas kernel on a GPU backend, the CPU
            kernel on a CPU backend, when they support the shapes, else "xla"), "pallas" /
            "pallas_interpret" (the Pallas kernel, compiled / in interpret mode; its
            NotImplementedError propagates). `HierKVCache.init` picks
            `default_attention_impl()` when not told (the kernel registry's choice: "cpu" where
            it is available, "auto" on a GPU, else "xla").
        mesh: the `jax.sharding.Mesh` the cache is placed on (`qspec_jax.sharding.shard_cache`),
            or None. With a mesh, the per-row bookkeeping outside the model's forward
            (`finish_prefill`, `commit`, `flush`) runs under `jax.shard_map` on each device's
            rows and KV heads (`_per_shard`): left to GSPMD, its per-row dynamic slices
            resharded the whole cache over the "data" axis (all-to-alls, all-gathers).
    """

    residual: int
    key_group: int
    block: int
    buffer_block: int
    buffer: int
    q_capacity: int
    step_tokens: int
    attention_impl: str = "xla"
    mesh: Any = None

    @property
    def stage_chunks(self) -> int:
        """R-chunks one step's commit can complete (step_tokens // R + 1): the stage's size."""
        return self.step_tokens // self.residual + 1

    @classmethod
    def make(
        cls,
        capacity: int,
        residual: int = 128,
        key_group: int | None = None,
        block: int | None = None,
        step_tokens: int = 1,
        attention_impl: str | None = None,
    ) -> HierLayout:
        """A layout for `capacity` tokens; raises ValueError (one sentence) on a bad setting.

        `attention_impl` None means "xla" here (`HierKVCache.init` resolves None with the
        cache's head_dim and dtype, see `default_attention_impl`).
        """
        attention_impl = "xla" if attention_impl is None else attention_impl
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {attention_impl!r}; expected one of {ATTENTION_IMPLS}"
            )
        if residual < 1:
            raise ValueError(f"the residual length R must be >= 1, got {residual}")
        key_group = min(128, residual) if key_group is None else key_group
        if key_group < 1 or residual % key_group:
            raise ValueError(f"key_group {key_group} must divide the residual length {residual}")
        if block is None:  # 512-token blocks, or fewer for a short cache
            block = min(_round_up(512, key_group), _round_up(max(capacity, 1), key_group))
        if block < 1 or block % key_group:
            raise ValueError(f"attention block {block} must be a multiple of key_group {key_group}")
        if not 1 <= step_tokens <= residual + 1:
            raise ValueError(
                f"a step writing {step_tokens} positions needs residual >= {step_tokens - 1}: "
                f"use gamma <= {residual} or a larger residual length"
            )
        buffer_block = math.gcd(residual, 128)
        buffer = _round_up(2 * residual + step_tokens, residual)
        q_capacity = _round_up(max(capacity, 1), math.lcm(block, residual))
        return cls(
            residual, key_group, block, buffer_block, buffer, q_capacity, step_tokens,
            attention_impl,
        )  # fmt: skip


def float_start(positions: jnp.ndarray, residual: int) -> jnp.ndarray:
    """R * max(0, ceil((p - 2R) / R)): the first position a query at p reads in float.

    Also where the float buffer starts once `positions` tokens are committed.
    """
    return residual * jnp.maximum(0, (positions - residual - 1) // residual)


# ------------------------------------------------------------------------- quantization (pure)


def quantize(x: jnp.ndarray, axis: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """8-bit asymmetric codes of x over groups spanning `axis`.

    Returns:
        (codes int32 in [0, 240] shaped like x, scale float32, min float32), scale and min with
        `axis` kept as size 1. scale = (max - min) / 15 is the upper half's step; the 8-bit
        code's step is scale / 16. A constant group has scale 0 and codes 0 (exact).
    """
    xf = x.astype(jnp.float32)
    mn = jnp.min(xf, axis=axis, keepdims=True)
    scale = (jnp.max(xf, axis=axis, keepdims=True) - mn) / 15.0
    step = scale / 16.0
    codes = jnp.round((xf - mn) / jnp.where(step > 0, step, 1.0))
    return jnp.clip(codes, 0, CODE_MAX).astype(jnp.int32), scale, mn


def split_codes(codes: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """8-bit codes [0, 240] -> (upper in [0, 15], lower in [-8, 7]), codes = 16 upper + lower."""
    upper = (codes + 8) >> 4
    return upper, codes - 16 * upper


def pack_nibbles(x: jnp.ndarray) -> jnp.ndarray:
    """[..., n] ints in [0, 15] -> uint8 [..., n/2]: byte j = x[j] | x[j + n/2] << 4."""
    half = x.shape[-1] // 2
    x = x.astype(jnp.uint8)
    return x[..., :half] | (x[..., half:] << 4)


def unpack_nibbles(p: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., n/2] -> int32 [..., n], the inverse of `pack_nibbles`."""
    return jnp.concatenate([p & 15, p >> 4], axis=-1).astype(jnp.int32)


def dequantize(
    hi: jnp.ndarray, lo: jnp.ndarray | None, scale: jnp.ndarray, mn: jnp.ndarray
) -> jnp.ndarray:
    """min + code * scale / 16 with code = 16 hi (+ lo when given): the draft / target values.

    Args:
        hi: int upper halves in [0, 15]; lo: int lower halves in [-8, 7] or None (draft view).
        scale, mn: float32, broadcastable to hi.
    """
    codes = 16 * hi if lo is None else 16 * hi + lo
    return mn + codes.astype(jnp.float32) * (scale * (1.0 / 16.0))


# ------------------------------------------------------------------------- the cache


def _per_shard(method):
    """Runs a `HierKVCache` method on each device's shard when the layout holds a mesh.

    Every array of the cache (and of the method's array arguments: lengths [batch], a scratch
    `KVCache`) is split by `qspec_jax.sharding.cache_specs` (rows over "data", KV heads over
    "model"), and the method's work is per row and per KV head, so each device computes exactly
    its part of the single-device result. Keyword arguments are static.
    """

    @functools.wraps(method)
    def wrapped(self, *args, **kw):
        mesh = self.layout.mesh
        if mesh is None:
            return method(self, *args, **kw)
        from qspec_jax.sharding import cache_specs  # noqa: PLC0415 (sharding imports the model)

        local = dataclasses.replace(self.layout, mesh=None)
        specs = cache_specs(self.replace(layout=local))

        def body(cache, *a):
            return method(cache, *a, **kw)

        out = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(specs, *cache_specs(args)),
            out_specs=specs,
            check_vma=False,
        )(self.replace(layout=local), *args)
        return out.replace(layout=self.layout)

    return wrapped


@struct.dataclass
class HierKVCache:
    """The hierarchical KV cache (a pytree: arrays are leaves, the layout is static).

    Attributes:
        k_hi, k_lo: uint8 [layers, batch, q_capacity, kv_heads, head_dim // 2] packed upper /
            lower (stored + 8) int4 halves of the key codes.
        k_scale, k_min: float32 [layers, batch, q_capacity // key_group, kv_heads, head_dim]
            per-channel key group scales (upper step) and minima.
        v_hi, v_lo: uint8 [layers, batch, q_capacity, kv_heads, head_dim // 2] value halves.
        v_scale, v_min: float32 [layers, batch, q_capacity, kv_heads] per-token value scales.
        k_buf, v_buf: [layers, batch, buffer, kv_heads, head_dim] float ring buffer: position p
            (buf_start[b] <= p < buf_start[b] + buffer) lives at index p mod buffer.
        k_stage, v_stage: [layers, batch, stage_chunks * R, kv_heads, head_dim] float copies of
            the chunks at [q_len, q_len + stage_chunks * R), taken by `commit(flush=False)` and
            quantized by the next `flush()` (see `flush` for why).
        lengths: int32 [batch] valid positions (verified, or during a step the draft's).
        q_len: int32 [batch] positions [0, q_len) hold quantized codes.
        buf_start: int32 [batch] the oldest position held in float (a multiple of R).
        layout: the static HierLayout.
    """

    k_hi: jnp.ndarray
    k_lo: jnp.ndarray
    k_scale: jnp.ndarray
    k_min: jnp.ndarray
    v_hi: jnp.ndarray
    v_lo: jnp.ndarray
    v_scale: jnp.ndarray
    v_min: jnp.ndarray
    k_buf: jnp.ndarray
    v_buf: jnp.ndarray
    k_stage: jnp.ndarray
    v_stage: jnp.ndarray
    lengths: jnp.ndarray
    q_len: jnp.ndarray
    buf_start: jnp.ndarray
    layout: HierLayout = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.layout.q_capacity

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def init(
        cls,
        cfg: LlamaConfig,
        batch: int,
        capacity: int,
        *,
        residual: int = 128,
        key_group: int | None = None,
        block: int | None = None,
        step_tokens: int = 1,
        dtype=None,
        attention_impl: str | None = None,
    ) -> HierKVCache:
        """An empty cache for `capacity` tokens (rounded up, see `HierLayout.make`).

        `attention_impl` None: `default_attention_impl(head_dim, dtype)` ("cpu" on a CPU with the
        kernels and covered shapes, "auto" on a GPU, else "xla").
        """
        if cfg.head_dim % 2:
            raise ValueError(f"head_dim must be even to pack int4 pairs, got {cfg.head_dim}")
        if attention_impl is None:
            attention_impl = default_attention_impl(cfg.head_dim, dtype or cfg.jnp_dtype)
        lay = HierLayout.make(capacity, residual, key_group, block, step_tokens, attention_impl)
        nl, kvh, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        codes = (nl, batch, lay.q_capacity, kvh, hd // 2)
        kgroups = (nl, batch, lay.q_capacity // lay.key_group, kvh, hd)
        vtok = (nl, batch, lay.q_capacity, kvh)
        buf = (nl, batch, lay.buffer, kvh, hd)
        stage = (nl, batch, lay.stage_chunks * lay.residual, kvh, hd)
        dt = dtype or cfg.jnp_dtype
        z32 = jnp.zeros((batch,), jnp.int32)
        return cls(
            k_hi=jnp.zeros(codes, jnp.uint8), k_lo=jnp.zeros(codes, jnp.uint8),
            k_scale=jnp.zeros(kgroups, jnp.float32), k_min=jnp.zeros(kgroups, jnp.float32),
            v_hi=jnp.zeros(codes, jnp.uint8), v_lo=jnp.zeros(codes, jnp.uint8),
            v_scale=jnp.zeros(vtok, jnp.float32), v_min=jnp.zeros(vtok, jnp.float32),
            k_buf=jnp.zeros(buf, dt), v_buf=jnp.zeros(buf, dt),
            k_stage=jnp.zeros(stage, dt), v_stage=jnp.zeros(stage, dt),
            lengths=z32, q_len=z32, buf_start=z32, layout=lay,
        )  # fmt: skip

    # ---------------------------------------------------------------- writing

    def write_layer(self, layer, positions: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray):
        """Writes k, v [batch, t, kv_heads, head_dim] of `layer` into the float buffer.

        Positions [batch, t] outside the buffer (below buf_start or past its end) are dropped.
        Lengths are not changed (`commit` / `rollback` do that).
        """
        nb = self.layout.buffer
        rel = positions - self.buf_start[:, None]  # [batch, t]
        idx = jnp.where((rel < 0) | (rel >= nb), nb, positions % nb)  # ring index, or dropped
        kb, vb = write_layer(self.k_buf, self.v_buf, jnp.asarray(layer), idx, k, v)
        return self.replace(k_buf=kb, v_buf=vb)

    def prefill_cache(self, prompt_len: int) -> KVCache:
        """A float scratch cache for a padded prompt of `prompt_len` tokens.

        The prompt attends to itself in float (QuantSpec prefills at full precision); its K/V
        are then quantized by `finish_prefill`.
        """
        nl, b, _, kvh, hd = self.k_buf.shape
        z = jnp.zeros((nl, b, prompt_len, kvh, hd), self.k_buf.dtype)  # [L, batch, T, kvh, hd]
        return KVCache(k=z, v=z, lengths=jnp.zeros((b,), jnp.int32))

    @_per_shard
    def finish_prefill(self, scratch: KVCache, lengths: jnp.ndarray) -> HierKVCache:
        """This cache holding the prompts' K/V from `scratch` [layers, batch, T, ...] at `lengths`.

        Every complete R-chunk below the length is quantized; the float buffer is filled from
        float_start(length) on. The result is what committing the same tokens one by one gives.
        """
        lay = self.layout
        lengths = jnp.clip(lengths, 0, lay.q_capacity).astype(jnp.int32)
        t = scratch.k.shape[2]
        n = min(_round_up(t, lay.residual), lay.q_capacity)  # positions quantized here
        pad = max(n, lay.buffer) + lay.buffer - t
        sk = jnp.pad(scratch.k, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))  # [L, B, T+pad, ..]
        sv = jnp.pad(scratch.v, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
        kc = _quantize_keys(sk[:, :, :n], lay.key_group)
        vc = _quantize_values(sv[:, :, :n])
        cache = self.replace(
            k_hi=self.k_hi.at[:, :, :n].set(kc[0]), k_lo=self.k_lo.at[:, :, :n].set(kc[1]),
            k_scale=self.k_scale.at[:, :, : n // lay.key_group].set(kc[2]),
            k_min=self.k_min.at[:, :, : n // lay.key_group].set(kc[3]),
            v_hi=self.v_hi.at[:, :, :n].set(vc[0]), v_lo=self.v_lo.at[:, :, :n].set(vc[1]),
            v_scale=self.v_scale.at[:, :, :n].set(vc[2]), v_min=self.v_min.at[:, :, :n].set(vc[3]),
        )  # fmt: skip
        start = float_start(lengths, lay.residual)  # [batch]
        roll = start % lay.buffer  # ring: position start + j goes to index (start + j) mod buffer
        ring = jax.vmap(lambda x, sh: jnp.roll(x, sh, axis=1), (1, 0), 1)
        return cache.replace(
            k_buf=ring(_take_tokens(sk, start, lay.buffer), roll).astype(self.k_buf.dtype),
            v_buf=ring(_take_tokens(sv, start, lay.buffer), roll).astype(self.v_buf.dtype),
            lengths=lengths,
            q_len=(lengths // lay.residual) * lay.residual,
            buf_start=start,
        )

    @_per_shard
    def commit(self, lengths: jnp.ndarray, flush: bool = True) -> HierKVCache:
        """Sets the verified lengths [batch]; with `flush`, quantizes completed chunks now.

        Lengths are clipped to [q_len, capacity] (committed, quantized positions cannot be
        un-committed). Every R-chunk completed by the new length is quantized from the buffer
        (all its tokens are below the verified length), then the buffer drops the chunks that
        no later query reads in float (it then starts at float_start(length)); any number of
        chunks, read from the ring. `flush=False` (the decoding loop's commit; lengths grow by
        at most `layout.step_tokens`) copies the `layout.stage_chunks` chunks from q_len on, the
        ones that may have completed, into the stage and leaves quantizing them to the next
        `flush()`, which the loop runs at the start of its next step; the cache any forward then
        reads is the same.
        """
        lengths = jnp.clip(lengths, self.q_len, self.layout.q_capacity).astype(jnp.int32)
        cache = self.replace(lengths=lengths)
        if flush:
            n_max = jnp.max(cache._pending_chunks())
            run = lambda body, q: jax.lax.fori_loop(0, n_max, body, q)  # noqa: E731
            return cache._quantize_pending(run, cache._ring_chunk)
        with jax.named_scope("hier_stage"):
            chunks = [self._ring_chunk(i) for i in range(self.layout.stage_chunks)]
            k_stage = jnp.concatenate([k for k, _ in chunks], axis=2)
            v_stage = jnp.concatenate([v for _, v in chunks], axis=2)
        return cache.replace(k_stage=k_stage, v_stage=v_stage)  # [L, batch, stage, kvh, hd]

    @_per_shard
    def flush(self) -> HierKVCache:
        """Quantizes the chunks the last `commit(flush=False)` staged; advances the buffer.

        The chunks' tokens are all verified (`lengths` is the committed length here). At most
        `layout.stage_chunks` chunks can be pending after one such commit; that many are
        unrolled, each written only where it is pending.

        Why the decoding loop flushes at the start of a step, from a stage: at the end of a
        step, XLA:CPU cannot order the in-place chunk writes after the attention kernel's reads
        of the same arrays (an autoregressive step's new length does not depend on its logits
        when no EOS is set), so it copied every quantized array twice per step; and reading the
        chunks from the float buffer at the start of a step, unordered against the first layer's
        in-place write of the buffer, made it copy the whole float buffer (k and v, all layers)
        four times per step. The stage is read from the buffer after the step's last write and
        is the only thing the flush reads, so every array is updated in place (counted with
        `experiments/count_hlo_copies.py`).
        """
        r = self.layout.residual

        def unrolled(body, q):
            for i in range(self.layout.stage_chunks):
                q = body(i, q)
            return q

        def from_stage(i):  # chunk i's float K/V [L, batch, R, kvh, hd] (i static)
            return self.k_stage[:, :, i * r : (i + 1) * r], self.v_stage[:, :, i * r : (i + 1) * r]

        return self._quantize_pending(unrolled, from_stage)

    def _ring_chunk(self, i):
        """Chunk i from q_len on, from the float ring: k, v [layers, batch, R, kv_heads, hd].

        Held whenever it is pending (its start is at or past buf_start).
        """
        r = self.layout.residual
        off = (self.q_len + i * r) % self.layout.buffer  # [batch]
        return _take_tokens(self.k_buf, off, r), _take_tokens(self.v_buf, off, r)

    def _pending_chunks(self) -> jnp.ndarray:
        """[batch] complete R-chunks below `lengths` not yet quantized."""
        r = self.layout.residual
        return jnp.maximum((self.lengths // r) * r - self.q_len, 0) // r

    def _quantize_pending(self, run, read) -> HierKVCache:
        """Quantizes the pending chunks into the quantized arrays; sets q_len and buf_start.

        Chunk i's float K/V come from `read(i)`; `run(body, arrays)` runs body(i, arrays) over
        the chunks (a loop or unrolled).
        """
        lay = self.layout
        r = lay.residual
        n_chunks = self._pending_chunks()  # [batch]
        names = ("k_hi", "k_lo", "k_scale", "k_min", "v_hi", "v_lo", "v_scale", "v_min")

        def quantize_chunk(i, q):  # q: the 8 quantized arrays
            do = i < n_chunks  # [batch]
            start = self.q_len + i * r  # [batch] absolute position of the chunk
            k, v = read(i)
            kq = _quantize_keys(k, lay.key_group)
            vq = _quantize_values(v)
            g = start // lay.key_group
            at = (start, start, g, g, start, start, start, start)
            return tuple(_put_tokens(x, o, u, do) for x, o, u in zip(q, at, kq + vq))

        with jax.named_scope("hier_flush"):
            q = run(quantize_chunk, tuple(getattr(self, n) for n in names))
        return self.replace(
            **dict(zip(names, q)),
            q_len=self.q_len + n_chunks * r,
            buf_start=jnp.maximum(float_start(self.lengths, r), self.buf_start),  # [batch]
        )

    # ---------------------------------------------------------------- reading

    def attend(
        self,
        layer,
        q: jnp.ndarray,
        q_positions: jnp.ndarray,
        view: str = "target",
        mask: jnp.ndarray | None = None,
    ):
        """Causal attention of q [batch, t, heads, head_dim] over `layer` -> [batch, t, q_size].

        Key j is read from the quantized part (upper halves only for view="draft", both halves
        for "target") iff j < float_start(p) of the query at p, else from the float buffer.
        Block by block with an online softmax; no float copy of the quantized part is made.
        With `layout.attention_impl` other than "xla" a kernel (the CPU kernel or the Pallas
        one, see `_attend_kernel`) computes the same function; "xla" runs the code below.
        """
        if view not in VIEWS:
            raise ValueError(f"unknown KV view {view!r}; expected one of {VIEWS}")
        if mask is not None:
            raise NotImplementedError(
                "tree attention masks (mode hspec) need the float KV cache; use kv_cache='float'"
            )
        out = self._attend_kernel(layer, q, q_positions, view)
        if out is not None:
            return out
        lay = self.layout
        b, t, h, hd = q.shape
        kvh = self.k_buf.shape[3]
        qg = q.reshape(b, t, kvh, h // kvh, hd)  # [batch, t, kv_heads, group, hd]
        cut = float_start(q_positions, lay.residual)  # [batch, t]
        layer = jnp.asarray(layer, jnp.int32)
        neg = jnp.finfo(jnp.float32).min
        state = (
            jnp.full((b, kvh, t, h // kvh), neg, jnp.float32),  # running max
            jnp.zeros((b, kvh, t, h // kvh), jnp.float32),  # running sum of exp
            jnp.zeros((b, kvh, t, h // kvh, hd), jnp.float32),  # running weighted values
        )

        # One layer's arrays, sliced once: the block loop then carries [batch, ...] slices, not
        # the whole [layers, ...] cache (which XLA would copy into every loop's state).
        k_hi, v_hi = self.k_hi[layer], self.v_hi[layer]  # [b, q_capacity, kvh, hd/2]
        k_lo, v_lo = (self.k_lo[layer], self.v_lo[layer]) if view == "target" else (None, None)
        k_scale, k_min = self.k_scale[layer], self.k_min[layer]  # [b, q_capacity / G, kvh, hd]
        v_scale, v_min = self.v_scale[layer], self.v_min[layer]  # [b, q_capacity, kvh]

        def q_block(i, st):
            c, g = lay.block, lay.block // lay.key_group
            start = i * c

            def codes(hi, lo):  # 16 u (+ l) of one block, [b, c, kvh, hd]
                u = unpack_nibbles(jax.lax.dynamic_slice_in_dim(hi, start, c, axis=1))
                if lo is None:
                    return u, None
                return u, unpack_nibbles(jax.lax.dynamic_slice_in_dim(lo, start, c, axis=1)) - 8

            kc = codes(k_hi, k_lo)
            vc = codes(v_hi, v_lo)
            k_s = jnp.repeat(jax.lax.dynamic_slice_in_dim(k_scale, i * g, g, 1), lay.key_group, 1)
            k_m = jnp.repeat(jax.lax.dynamic_slice_in_dim(k_min, i * g, g, 1), lay.key_group, 1)
            k = dequantize(kc[0], kc[1], k_s, k_m)  # [b, c, kvh, hd] one block only
            v_s = jax.lax.dynamic_slice_in_dim(v_scale, start, c, 1)[..., None]  # [b, c, kvh, 1]
            v_m = jax.lax.dynamic_slice_in_dim(v_min, start, c, 1)[..., None]
            v = dequantize(vc[0], vc[1], v_s, v_m)  # [b, c, kvh, hd]
            pos = start + jnp.arange(c, dtype=jnp.int32)  # [c]
            mask = pos[None, None, :] < cut[:, :, None]  # [b, t, c]
            return _online_update(st, qg, k, v, mask)

        with jax.named_scope("hier_attention"):
            n_q = (jnp.max(cut) + lay.block - 1) // lay.block  # blocks holding any quantized key
            state = jax.lax.fori_loop(0, n_q, q_block, state)
            k_buf, v_buf = self.k_buf[layer], self.v_buf[layer]  # [b, buffer, kvh, hd] ring
            c = lay.buffer_block
            nb = lay.buffer // c
            take = jax.vmap(lambda x, o: jax.lax.dynamic_slice_in_dim(x, o, c, axis=0))
            for i in range(nb):  # a few static blocks; empty ones are no-ops
                first = self.buf_start + i * c  # [b] absolute position of the block
                ring_off = first % lay.buffer  # contiguous: c divides R divides buffer
                pos = first[:, None] + jnp.arange(c, dtype=jnp.int32)  # [b, c]
                p = pos[:, None, :]  # [b, 1, c]
                mask = (p >= cut[:, :, None]) & (p <= q_positions[:, :, None])  # [b, t, c]
                state = _online_update(
                    state, qg, take(k_buf, ring_off), take(v_buf, ring_off), mask
                )
            _, denom, acc = state
            out = acc / denom[..., None]  # [b, kvh, t, group, hd]
        return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h * hd).astype(q.dtype)

    def _attend_kernel(self, layer, q, q_positions, view):
        """A kernel's attention over this layer when `layout.attention_impl` asks for one.

        The kernel registry decides (`pallas_kernels.dispatch.hier_cache_attention`): a forced
        name ("cpu", "pallas", "pallas_interpret") runs that kernel on the stacked arrays plus
        the layer index (its NotImplementedError propagates); "auto" walks the chain (the Pallas
        kernel on a GPU after its self-check, the CPU kernel where it covers the shapes). Returns
        None (the caller then runs the XLA path) for "xla" and when auto's choice is XLA.
        """
        impl = self.layout.attention_impl
        if impl == "xla":
            return None
        lo = view == "target"  # the draft view never reads (or passes) the lower halves
        with jax.named_scope(f"hier_attention_{impl}"):
            out = dispatch.hier_cache_attention(
                jnp.asarray(layer, jnp.int32), q, q_positions,
                self.k_hi, self.k_lo if lo else None, self.k_scale, self.k_min,
                self.v_hi, self.v_lo if lo else None, self.v_scale, self.v_min,
                self.k_buf, self.v_buf, self.buf_start,
                residual=self.layout.residual, view=view, xla_fn=lambda: None,
                impl=None if impl == "auto" else impl,
            )  # fmt: skip
        return None if out is None else out.astype(q.dtype)  # [batch, t, heads * head_dim]

    def linear_buffer(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The float buffer in position order: index i holds position buf_start + i.

        Returns:
            (k, v) [layers, batch, buffer, kv_heads, head_dim] (for tests and debugging).
        """
        roll = jax.vmap(lambda x, sh: jnp.roll(x, -sh, axis=1), (1, 0), 1)
        shift = self.buf_start % self.layout.buffer
        return roll(self.k_buf, shift), roll(self.v_buf, shift)

    # ---------------------------------------------------------------- memory

    def kv_bytes_per_token(self) -> float:
        """Bytes of K/V one quantized token costs, all layers, keys and values, scales included.

        Codes: one byte per value (two int4 halves); keys: a float32 scale and min per channel
        per key_group tokens; values: a float32 scale and min per KV head per token.
        """
        nl, kvh, hd = self.k_buf.shape[0], self.k_buf.shape[3], self.k_buf.shape[4]
        keys = kvh * hd + 8 * kvh * hd / self.layout.key_group
        values = kvh * hd + 8 * kvh
        return float(nl * (keys + values))

    def kv_bytes(self, lengths) -> int:
        """Bytes of K/V holding sequences of these lengths: quantized chunks plus float buffer.

        Positions in [buf_start, q_len) are held twice (quantized eagerly, kept in float until
        no later query reads them in float); both copies are counted.
        """
        nl, kvh, hd = self.k_buf.shape[0], self.k_buf.shape[3], self.k_buf.shape[4]
        fbytes = 2 * nl * kvh * hd * self.k_buf.dtype.itemsize
        r = self.layout.residual
        total = 0.0
        for n in lengths:
            n = int(n)
            q = (n // r) * r
            start = r * max(0, -(-(n - 2 * r) // r))
            total += q * self.kv_bytes_per_token() + (n - start) * fbytes
        return int(total)


def dequantize_layer(cache: HierKVCache, layer: int, view: str = "target"):
    """Reference: the whole quantized part of one layer as floats, [batch, q_capacity, kvh, hd].

    For tests and debugging only: this materializes what `attend` never does.
    """
    lay = cache.layout
    lo = view == "target"
    k = dequantize(
        unpack_nibbles(cache.k_hi[layer]),
        unpack_nibbles(cache.k_lo[layer]) - 8 if lo else None,
        jnp.repeat(cache.k_scale[layer], lay.key_group, axis=1),
        jnp.repeat(cache.k_min[layer], lay.key_group, axis=1),
    )
    v = dequantize(
        unpack_nibbles(cache.v_hi[layer]),
        unpack_nibbles(cache.v_lo[layer]) - 8 if lo else None,
        cache.v_scale[layer][..., None],
        cache.v_min[layer][..., None],
    )
    return k, v


# ------------------------------------------------------------------------- helpers


def _online_update(state, qg, k, v, mask):
    """One online-softmax step over a block of keys.

    Args:
        state: (m [b, kvh, t, g], denom [b, kvh, t, g], acc [b, kvh, t, g, hd]) float32.
        qg: [b, t, kvh, g, hd] queries; k, v: [b, c, kvh, hd] the block; mask: bool [b, t, c].

    The block is broadcast over the query rows so that t is a *batch* dimension of both dots:
    XLA:CPU then computes every row with the same kernel whatever the number of rows (with t as
    a free dimension, a [t, hd] x [hd, c] product changes its accumulation order with t, which
    measurably changed bits). A fully masked block leaves the state bit-for-bit unchanged (max
    with the floor, exp(0) = 1, zero weights), so blocks holding nothing for a row cost nothing.
    """
    m, denom, acc = state
    b, t, kvh, _, hd = qg.shape
    c = k.shape[1]
    bshape = (b, kvh, t, c, hd)
    kb = jnp.broadcast_to(k.transpose(0, 2, 1, 3)[:, :, None].astype(qg.dtype), bshape)
    s = jnp.einsum("btkgd,bktcd->bktgc", qg, kb, preferred_element_type=jnp.float32)
    s = s / math.sqrt(hd)  # [b, kvh, t, g, c]
    mk = mask[:, None, :, None, :]  # [b, 1, t, 1, c]
    s = jnp.where(mk, s, jnp.finfo(jnp.float32).min)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [b, kvh, t, g]
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mk, jnp.exp(s - m_new[..., None]), 0.0)  # [b, kvh, t, g, c]
    denom = alpha * denom + jnp.sum(p, axis=-1)
    vb = jnp.broadcast_to(v.transpose(0, 2, 1, 3)[:, :, None].astype(jnp.float32), bshape)
    pv = jnp.einsum("bktgc,bktcd->bktgd", p, vb, preferred_element_type=jnp.float32)
    return m_new, denom, alpha[..., None] * acc + pv


def _take_tokens(x: jnp.ndarray, offsets: jnp.ndarray, n: int) -> jnp.ndarray:
    """Per sequence b: x[:, b, offsets[b]:offsets[b] + n] of [layers, batch, tokens, ...].

    One dynamic slice per sequence (batch is static and small): a vmapped slice would move the
    batch axis first, and XLA:CPU then materializes transposed copies of the whole array.
    """
    rows = [
        jax.lax.dynamic_slice_in_dim(x[:, b : b + 1], offsets[b], n, axis=2)
        for b in range(x.shape[1])
    ]  # each [layers, 1, n, ...]
    return jnp.concatenate(rows, axis=1)


def _put_tokens(x: jnp.ndarray, offsets: jnp.ndarray, new: jnp.ndarray, do: jnp.ndarray):
    """Per sequence b with do[b]: x[:, b, offsets[b]:offsets[b] + n] = new[:, b] (n = new's axis 2).

    One in-place dynamic update per sequence (not vmapped, for the reason in `_take_tokens`).
    """
    size = new.shape[:1] + (1,) + new.shape[2:]
    for b in range(x.shape[1]):
        start = (0, b, offsets[b]) + (0,) * (x.ndim - 3)
        old = jax.lax.dynamic_slice(x, start, size)
        upd = jnp.where(do[b], new[:, b : b + 1].astype(x.dtype), old)
        x = jax.lax.dynamic_update_slice(x, upd, start)
    return x


def _quantize_keys(k: jnp.ndarray, group: int):
    """Keys [L, B, n, kvh, hd] -> packed (hi, lo) [L, B, n, kvh, hd/2], (scale, min) [L, B, n/group, kvh, hd]."""
    nl, b, n, kvh, hd = k.shape
    codes, scale, mn = quantize(k.reshape(nl, b, n // group, group, kvh, hd), axis=3)
    hi, lo = split_codes(codes.reshape(nl, b, n, kvh, hd))
    return pack_nibbles(hi), pack_nibbles(lo + 8), scale[:, :, :, 0], mn[:, :, :, 0]


def _quantize_values(v: jnp.ndarray):
    """Values [L, B, n, kvh, hd] -> packed (hi, lo) [L, B, n, kvh, hd/2], (scale, min) [L, B, n, kvh]."""
    codes, scale, mn = quantize(v, axis=-1)
    hi, lo = split_codes(codes)
    return pack_nibbles(hi), pack_nibbles(lo + 8), scale[..., 0], mn[..., 0]


def rollback(cache: HierKVCache, lengths: jnp.ndarray) -> HierKVCache:
    """Moves lengths back to `lengths` [batch] (never forward, never below q_len).

    Only the length moves: entries past it (rejected drafts, in the float buffer) are simply
    invalid. Positions below q_len are committed and quantized, so the length stops there.
    """
    new = jnp.maximum(jnp.minimum(cache.lengths, lengths), cache.q_len)
    return cache.replace(lengths=new.astype(jnp.int32))
