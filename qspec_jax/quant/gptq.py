"""GPTQ (Frantar et al., 2022): int4 weights that minimise the layer-output error on calibration data.

For one linear y = x @ w (w [K, N], [in, out]) and calibration inputs X [n, K], GPTQ quantizes
the K input rows of w one at a time and after each one updates the rows not yet quantized to
compensate the error it made, using the inverse of the Hessian H = 2 X^T X / n of the
layer-output error ||X w - X w_q||^2:

    for each input row i (in order):  q_i = quant(w_i);  e = (w_i - q_i) / U[i, i]
                                      w_j -= e * U[i, j]   for j > i
    with U = chol(H^-1) upper (H dampened by percdamp * mean(diag H)).

The updates are applied lazily in blocks of `blocksize` rows (one rank-`blocksize` update of the
remaining rows per block), which is exact. With groups the scale (and min) of a group is computed
from the updated weights when the group's first row is reached (standard GPTQ with groups);
`blocksize` is a multiple of the group size, so groups never straddle blocks and the updated
values are at hand. Optional act-order processes rows by decreasing diag(H); to keep the packed
group layout exact it uses "static groups": every group's scale is fixed from the original
weights before the loop and a row is always quantized with its own group's scale.

`gptq_quantize` works on one matrix given its Hessian; `qspec_jax.quant.quantize_model` runs the
sequential pipeline (calibrate layer i, quantize it, feed the quantized layer's outputs to
layer i + 1) through `qspec_jax.quant.calibration`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from qspec_jax.config import LlamaConfig
from qspec_jax.quant.format import QuantizedWeight
from qspec_jax.quant.rtn import (
    asymmetric_codes,
    group_params,
    pack_codes,
    resolve_group_size,
    symmetric_codes,
)

if TYPE_CHECKING:  # qspec_jax.model.params imports this package: no runtime import (cycle)
    from qspec_jax.model.params import LayerParams, Params

DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCKSIZE = 128


class HessianAccumulator:
    """Running H = 2 X^T X / n over batches of a linear's inputs (float64 [K, K])."""

    def __init__(self, k: int):
        self.h = np.zeros((k, k), np.float64)
        self.n = 0

    def add(self, x) -> None:
        """Adds inputs x [..., K] (any leading shape)."""
        x = jnp.asarray(x, jnp.float32).reshape(-1, self.h.shape[0])
        self.h += np.asarray(_gram(x), np.float64)  # float32 GEMM, float64 running sum
        self.n += x.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no calibration inputs were added")
        return 2.0 * self.h / self.n


@jax.jit
def _gram(x):
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def _inverse_cholesky_upper(h: np.ndarray) -> jnp.ndarray:
    """U upper-triangular with U^T U = H^-1 (float32, H symmetric positive definite)."""
    return _inverse_cholesky_upper_jit(jnp.asarray(h, jnp.float32))


@jax.jit
def _inverse_cholesky_upper_jit(h):
    # With J the reversal permutation and J H J = L L^T: H^-1 = (J L^-T J)(J L^-1 J), and
    # U = J L^-1 J is upper triangular, so one Cholesky and one triangular solve suffice.
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]


def _block_size(k: int, g: int, blocksize: int) -> int:
    """Lazy-batch block: the largest divisor of k that is <= blocksize and a multiple of the
    group size g (of 32 when per channel, g = k), so blocks tile K and groups never straddle."""
    unit = g if g < k else 32
    best = unit
    for bs in range(unit, max(blocksize, unit) + 1, unit):
        if k % bs == 0:
            best = bs
    return best


@functools.partial(jax.jit, static_argnames=("g", "bs", "symmetric", "clip_search", "dynamic"))
def _gptq_core(w, u, fixed_scales, fixed_mins, *, g, bs, symmetric, clip_search, dynamic):
    """The GPTQ column loop (lazy-batch blocks of bs columns) in float32.

    Args:
        w: [N, K] weights, columns = input rows in processing order.
        u: [K, K] upper Cholesky factor of H^-1 (same order).
        fixed_scales, fixed_mins: [K, N] scale (and min) of each column when not `dynamic`.
        g: group size; with `dynamic` a group's scale is computed from the updated weights when
            its first column is reached (g divides bs).

    Returns:
        (codes [N, K] float32, dequantized [N, K], group scales [K/g, N], group mins [K/g, N]);
        the group scales / mins are only meaningful with `dynamic`.
    """
    n, k = w.shape
    ng = k // g
    cols = jnp.arange(k)

    def quant(col, scale, mn):
        if symmetric:
            c = symmetric_codes(col, scale)
            return c, c * scale
        c = asymmetric_codes(col, scale, mn)
        return c, c * scale + mn

    def block(b, carry):
        w, codes, deq, scales, mins = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (0, i1), (n, bs))  # [N, bs]
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))  # [bs, bs]

        def column(i, c):
            w1, err1, codes1, deq1, scales, mins, scale, mn = c
            col = i1 + i
            if dynamic:

                def fresh(_):
                    wg = jax.lax.dynamic_slice(w1, (0, i), (n, g)).T  # [g, N]
                    s, m = group_params(wg, symmetric, clip_search)  # [1, N]
                    return s[0], (s[0] * 0 if m is None else m[0])

                scale, mn = jax.lax.cond(i % g == 0, fresh, lambda _: (scale, mn), None)
                scales = jax.lax.dynamic_update_slice(scales, scale[None], (col // g, 0))
                mins = jax.lax.dynamic_update_slice(mins, mn[None], (col // g, 0))
            else:
                scale, mn = fixed_scales[col], fixed_mins[col]
            wc = w1[:, i]
            code, q = quant(wc, scale, mn)
            err = (wc - q) / u1[i, i]
            w1 = w1 - err[:, None] * u1[i][None, :]  # u1[i, :i] == 0: only later columns move
            err1 = err1.at[:, i].set(err)
            codes1 = codes1.at[:, i].set(code)
            deq1 = deq1.at[:, i].set(q)
            return w1, err1, codes1, deq1, scales, mins, scale, mn

        zeros = jnp.zeros((n, bs), w.dtype)
        init = (w1, zeros, zeros, zeros, scales, mins, scales[0], mins[0])
        _, err1, codes1, deq1, scales, mins, _, _ = jax.lax.fori_loop(0, bs, column, init)
        codes = jax.lax.dynamic_update_slice(codes, codes1, (0, i1))
        deq = jax.lax.dynamic_update_slice(deq, deq1, (0, i1))
        urow = jax.lax.dynamic_slice(u, (i1, 0), (bs, k)) * (cols >= i1 + bs)  # later columns
        w = w - jnp.matmul(err1, urow, precision=jax.lax.Precision.HIGHEST)
        return w, codes, deq, scales, mins

    zeros_nk = jnp.zeros((n, k), w.dtype)
    zeros_g = jnp.zeros((ng, n), w.dtype)
    carry = (w, zeros_nk, zeros_nk, zeros_g, zeros_g)
    _, codes, deq, scales, mins = jax.lax.fori_loop(0, k // bs, block, carry)
    return codes, deq, scales, mins


def gptq_quantize(
    w,
    hessian: np.ndarray,
    group_size: int = 0,
    symmetric: bool = True,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    blocksize: int = DEFAULT_BLOCKSIZE,
    act_order: bool = False,
    clip_search: bool = False,
    return_dequantized: bool = False,
):
    """GPTQ-quantizes one weight matrix to int4.

    Args:
        w: float [K, N] weight ([in, out]).
        hessian: [K, K] Hessian of the layer-output error, 2 X^T X / n.
        group_size: rows of K per scale (0 = per output channel); adjusted per
            `qspec_jax.quant.rtn.resolve_group_size` when it does not divide K.
        symmetric: codes in [-8, 7] (else asymmetric [0, 15] with mins).
        percdamp: H += percdamp * mean(diag H) * I before inversion (raised 10x up to twice
            if H is still not numerically positive definite in float32).
        blocksize: rows per lazy-batch block at most (the block is a divisor of K and a
            multiple of the group size).
        act_order: process rows by decreasing diag(H) with static group scales.
        clip_search: choose each group's clip ratio by least squared error (of the weights the
            group holds when its scale is chosen).
        return_dequantized: also return the dequantized float weight [K, N].

    Returns:
        QuantizedWeight (and the dequantized float32 numpy [K, N] weight with
        `return_dequantized`, equal to the QuantizedWeight's dequantization).
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    g = resolve_group_size(k, group_size, warn=True)
    h = np.array(hessian, np.float64, copy=True)
    if h.shape != (k, k):
        raise ValueError(f"hessian shape {h.shape} does not match the weight's K={k}")
    W = w.T.copy()  # [N, K]: columns are input rows, as in the paper

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0

    dynamic = g < k and not act_order
    if dynamic:
        fixed_s = fixed_m = np.zeros((k, n), np.float32)
    else:
        # Per channel: one scale per output column from the original weights (standard
        # GPTQ); act-order: static groups, every group's scale from the original weights.
        s, m = group_params(W.T.reshape(k // g, g, n), symmetric, clip_search)  # [K/G, 1, N]
        group_s = s[:, 0]
        group_m = np.zeros_like(group_s) if m is None else m[:, 0]
        fixed_s = np.repeat(group_s, g, axis=0)  # [K, N] per original row
        fixed_m = np.repeat(group_m, g, axis=0)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    W, h = W[:, perm], h[perm][:, perm]
    fixed_s, fixed_m = fixed_s[perm], fixed_m[perm]

    damp = percdamp * np.mean(np.diag(h))
    for _ in range(3):
        hd = h + damp * np.eye(k)
        U = _inverse_cholesky_upper(hd)
        if bool(jnp.all(jnp.isfinite(U))):
            break
        damp *= 10.0
    else:
        raise ValueError("GPTQ: the Hessian is not positive definite even after dampening")

    bs = _block_size(k, g, blocksize)
    codes, deq, scales, mins = _gptq_core(
        jnp.asarray(W),
        U,
        jnp.asarray(fixed_s),
        jnp.asarray(fixed_m),
        g=g,
        bs=bs,
        symmetric=symmetric,
        clip_search=clip_search,
        dynamic=dynamic,
    )
    inv = np.argsort(perm)
    codes = np.asarray(codes)[:, inv].T.astype(np.int8)  # [K, N]
    if not dynamic:
        scales, mins = group_s, group_m
    qw = QuantizedWeight(
        packed=pack_codes(codes),
        scales=jnp.asarray(scales, jnp.float32),
        mins=None if symmetric else jnp.asarray(mins, jnp.float32),
    )
    if return_dequantized:
        return qw, np.asarray(deq)[:, inv].T
    return qw


# ------------------------------------------------------------------------------------------------
# Sequential calibration over the decoder (layer by layer, quantized outputs feed the next layer)
# ------------------------------------------------------------------------------------------------

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


def _layer_fns(cfg: LlamaConfig, rotated: bool):
    """Jitted pieces of one decoder block on full causal sequences (no KV cache).

    Returns functions computing, from the residual x [b, t, D], the input of each linear given
    (dequantized) weights of the earlier linears; they mirror `qspec_jax.model.llama._block`.
    """
    from pallas_kernels.hadamard import hadamard_transform_xla  # noqa: PLC0415
    from qspec_jax.model.llama import apply_rope, attention, rms_norm, rope_inv_freq  # noqa: PLC0415

    eps = cfg.rms_norm_eps
    had = hadamard_transform_xla if rotated else (lambda a: a)

    @jax.jit
    def qkv_in(x, attn_norm):
        return rms_norm(x, attn_norm, eps)

    @jax.jit
    def wo_in(h, wqkv, bqkv):
        b, t, _ = h.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rope_inv_freq(cfg)
        qkv = h @ wqkv.astype(h.dtype)
        if bqkv is not None:
            qkv = qkv + bqkv.astype(qkv.dtype)
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        return had(attention(q, k, v, positions))  # [b, t, q]

    @jax.jit
    def gate_up_in(x, a, wo, mlp_norm):
        x = x + a @ wo.astype(a.dtype)
        return x, rms_norm(x, mlp_norm, eps)

    @jax.jit
    def down_in(h, w_gate_up):
        gate, up = jnp.split(h @ w_gate_up.astype(h.dtype), 2, axis=-1)
        return had(jax.nn.silu(gate.astype(jnp.float32)).astype(h.dtype) * up)  # [b, t, F]

    @jax.jit
    def block_out(x, a, w_down):
        return x + a @ w_down.astype(a.dtype)

    return qkv_in, wo_in, gate_up_in, down_in, block_out


def _hessian(x: jnp.ndarray) -> np.ndarray:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def _stack(qws: list[QuantizedWeight]) -> QuantizedWeight:
    return QuantizedWeight(
        packed=jnp.stack([q.packed for q in qws]),
        scales=jnp.stack([q.scales for q in qws]),
        mins=None if qws[0].mins is None else jnp.stack([q.mins for q in qws]),
    )


def gptq_quantize_layers(
    params: Params,
    cfg: LlamaConfig,
    tokens,
    group_size: int = 0,
    symmetric: bool = True,
    *,
    rotated: bool = False,
    percdamp: float = DEFAULT_PERCDAMP,
    blocksize: int = DEFAULT_BLOCKSIZE,
    act_order: bool = False,
    clip_search: bool = False,
    progress: bool = True,
) -> LayerParams:
    """Sequential GPTQ of every decoder linear on calibration tokens.

    Runs the float model block by block on `tokens` (causal attention over each whole sequence,
    positions from 0). In block i the linears are quantized in execution order (wqkv, wo,
    w_gate_up, w_down): each one's Hessian comes from its inputs computed with the already
    quantized (dequantized) earlier linears of the block, and the block's quantized output is the
    input of block i + 1 (the "true sequential" order of the GPTQ reference code).

    Args:
        params: float parameters (already QuaRot-rotated when `rotated`).
        cfg: model config.
        tokens: int32 [num_seqs, t] calibration tokens.
        group_size, symmetric, percdamp, blocksize, act_order, clip_search: see `gptq_quantize`.
        rotated: apply the online Hadamard to the inputs of wo and w_down (as the model does when
            `QuantConfig.rotated`).
        progress: tqdm bar over layers.

    Returns:
        LayerParams with the four linears as stacked QuantizedWeight.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [num_seqs, t], got shape {tokens.shape}")
    fns = _layer_fns(cfg, rotated)
    lp = params.layers
    x = params.embed[tokens].astype(cfg.jnp_dtype)  # [b, t, D]
    kw = dict(percdamp=percdamp, blocksize=blocksize, act_order=act_order, clip_search=clip_search)
    out: dict[str, list[QuantizedWeight]] = {name: [] for name in LINEARS}

    layers = range(cfg.num_layers)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        layers = tqdm(layers, desc="GPTQ", unit="layer")
    for i in layers:
        layer = jax.tree_util.tree_map(lambda a, i=i: a[i], lp)  # one block, no layer axis
        qws, x = gptq_quantize_block(fns, x, layer, cfg, group_size, symmetric, **kw)
        for name in LINEARS:
            out[name].append(qws[name])
    return lp.replace(**{name: _stack(qws) for name, qws in out.items()})


def gptq_quantize_block(
    fns,
    x: jnp.ndarray,
    layer: LayerParams,
    cfg: LlamaConfig,
    group_size: int,
    symmetric: bool,
    **kw,
) -> tuple[dict[str, QuantizedWeight], jnp.ndarray]:
    """GPTQ of one decoder block's four linears, in execution order.

    Args:
        fns: `_layer_fns(cfg, rotated)`.
        x: the block's input residual [b, t, D] (the previous quantized block's output).
        layer: the block's float weights without the layer axis.
        cfg, group_size, symmetric: as `gptq_quantize_layers`.
        **kw: percdamp, blocksize, act_order, clip_search (see `gptq_quantize`).

    Returns:
        ({linear name: QuantizedWeight}, the quantized block's output [b, t, D]).
    """
    qkv_in, wo_in, gate_up_in, down_in, block_out = fns
    out: dict[str, QuantizedWeight] = {}

    def quant(name, inp):
        qw, deq = gptq_quantize(
            getattr(layer, name),
            _hessian(inp),
            group_size,
            symmetric,
            return_dequantized=True,
            **kw,
        )
        out[name] = qw
        return jnp.asarray(deq, cfg.jnp_dtype)

    h = qkv_in(x, layer.attn_norm)
    wqkv = quant("wqkv", h)
    a = wo_in(h, wqkv, layer.bqkv)
    wo = quant("wo", a)
    x, h = gate_up_in(x, a, wo, layer.mlp_norm)
    w_gate_up = quant("w_gate_up", h)
    a = down_in(h, w_gate_up)
    w_down = quant("w_down", a)
    return out, block_out(x, a, w_down)
