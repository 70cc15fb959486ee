"""CPU int4 / int8 matmul kernels (x86-64 AVX2 + FMA) as XLA FFI custom calls: the ``"cpu"`` impl.

XLA:CPU cannot fuse int4 unpacking into a dot, so `pallas_kernels.w4a16_matmul_xla` dequantizes
each weight to a float32 copy (the decode loop hoists it: 4 bytes a weight read per token, eight
times the packed 0.5) and `pallas_kernels.w4ax_matmul_xla` is a loop of tiny int8 dots, one per
group. The kernels in ``csrc/int4_cpu.cc`` read the packed bytes and dequantize in registers
next to the multiply, on the calling thread plus XLA's intra-op thread pool:

* `w4a16_matmul_cpu`: float32 x [M, K] times the int4 weight, float32 FMA accumulation;
* `w4ax_matmul_cpu`: int8 activation codes [M, K] (W4A4 / W4A8) times the int4 weight, exact
  int32 accumulation per block (``vpmaddubsw``), the reference's float epilogue per block;
* `q8_matmul_cpu` (``csrc/q8_head_cpu.cc``): float32 x times an int8 matrix in GGUF's Q8_0
  layout, the LM head when the model's head lies on that grid (`Params.head_q8`);
* `float_head_cpu` (same file): x times a float32 / bfloat16 matrix, the LM head otherwise;
* `float_linear_cpu` (``csrc/float_linear_cpu.cc``): x times a float32 / bfloat16 weight, the
  float linears of a decode or verification step (each weight read once for up to 4 rows);
* `attention_cpu` (``csrc/attention_cpu.cc``): decode-time causal attention of a few queries
  per sequence over the float32 or bfloat16 KV cache, reading only the live keys.

bfloat16: every kernel computes in float32. The attention kernels read a bfloat16 cache directly
(converted in registers, exactly); bfloat16 activations, queries and outputs (a few KB per call)
are converted at the call boundary by XLA (``astype``: exact upward, round-to-nearest-even
downward, elementwise), so a bfloat16 call returns exactly the float32 kernel's result on the
converted inputs, rounded once, and keeps its row independence. In the compiled decode step
XLA fuses these conversions into the elementwise ops next to the call (profiled:
docs/kernels.md, "Where the bfloat16 step goes").

The same library also holds ``csrc/hier_attention_cpu.cc``, the attention over QuantSpec's
hierarchical KV cache (Python entry points in `pallas_kernels.cpu_attention`).

Each output element is computed by the same operation sequence whatever M is, so one row's
result never depends on the other rows of the call (QSpec's gamma + 1 verification rows equal
autoregressive decoding's one row bit for bit). Results agree with the XLA references to float32
rounding (W4AX: the int32 part is exact; see tests/kernels/test_cpu_kernels.py).

The shared library is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``,
a few seconds) into ``<cache root>/cpu-kernels/`` (`pallas_kernels.cache_dir.cache_root`, never the
repository; a temporary directory when ``QSPEC_JAX_COMPILE_CACHE=0`` asks for no disk cache),
keyed by the source, the flags and the jaxlib version, and registered with ``jax.ffi``. `available()` is False, and dispatch keeps the XLA path, when the CPU lacks AVX2 /
FMA, no compiler works, or ``QSPEC_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cache_dir import cache_root, compile_cache_enabled
from pallas_kernels.int4 import HALF_TILE, PACK_TILE

ENV_SWITCH = "QSPEC_JAX_CPU_KERNELS"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# Every C++ source compiled into the one shared library (each file registers its own handlers
# below in TARGETS).
SOURCES = tuple(
    os.path.join(CSRC, name)
    for name in (
        "int4_cpu.cc",
        "q8_head_cpu.cc",
        "float_linear_cpu.cc",
        "attention_cpu.cc",
        "hier_attention_cpu.cc",
    )
)
HEADERS = tuple(os.path.join(CSRC, name) for name in ("parallel.h", "simd.h", "w4ax_body.inc"))
FLAGS = (
    "-O3",
    "-std=c++17",
    "-mavx2",
    "-mfma",
    "-fPIC",
    "-shared",
    "-fno-fast-math",
    "-ffp-contract=off",  # the same rounding in every inlined copy (see csrc/int4_cpu.cc)
)
TARGETS = {
    "qspec_w4a16_int4": "QspecW4A16Int4",
    "qspec_w4ax_int4": "QspecW4AXInt4",
    "qspec_w4ax_f32_int4": "QspecW4AXF32Int4",
    "qspec_q8_head": "QspecQ8Head",
    "qspec_float_head": "QspecFloatHead",
    "qspec_float_linear": "QspecFloatLinear",  # csrc/float_linear_cpu.cc
    "qspec_attention_f32": "QspecAttentionF32",
    "qspec_hier_attention": "QspecHierAttention",  # csrc/hier_attention_cpu.cc
}
# Column multiples the kernels vectorize over (N must be a multiple).
W4A16_COLS, W4AX_COLS = 8, 32
# The W4AX kernel's instruction sets: "auto" uses AVX-512 VNNI (vpdpbusd) where the CPU has it,
# else AVX2 (vpmaddubsw + vpmaddwd); "avx2" forces the latter. Both give bit-identical results.
W4AX_ISAS = {"auto": 0, "avx2": 1}
VNNI_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})

_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_info() -> dict[str, str]:
    """The first CPU's fields of Linux's /proc/cpuinfo ("model name", "cpu family", "model",
    "flags", ...); empty where there is none."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:  # the blank line after the first CPU
                    break
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo; empty where there is none)."""
    return set(cpu_info().get("flags", "").split())


def _library_path() -> str:
    """Where the library lives: the cache root's cpu-kernels/, or, when the user turned the
    compilation cache off (``QSPEC_JAX_COMPILE_CACHE=0``: write nothing there), a private
    temporary directory removed at exit."""
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            digest.update(os.path.basename(source).encode() + b"\0" + f.read())
    digest.update(
        " ".join(FLAGS).encode() + jax.lib.__version__.encode() + jax.__version__.encode()
    )
    name = f"qspec_cpu-{digest.hexdigest()[:16]}.so"
    if not compile_cache_enabled():
        tmp = tempfile.mkdtemp(prefix="qspec-jax-cpu-kernels-")
        atexit.register(shutil.rmtree, tmp, True)
        return os.path.join(tmp, name)
    return os.path.join(cache_root(), "cpu-kernels", name)


def _build(path: str) -> None:
    """Compiles the source to `path` atomically (a temporary file, then rename)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), *SOURCES, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot be used here, or None when they can (builds them if needed)."""
    with _lock:
        if "reason" in _state:
            return _state["reason"]  # type: ignore[return-value]
        reason = None
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
            reason = f"turned off by {ENV_SWITCH}"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            reason = f"not an x86-64 CPU ({platform.machine()})"
        elif not {"avx2", "fma"} <= cpu_flags():
            reason = "the CPU lacks AVX2 / FMA"
        else:
            try:
                path = _library_path()
                if not os.path.exists(path):
                    _build(path)
                lib = ctypes.cdll.LoadLibrary(path)
                for name, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                    )
                _state["lib"] = lib
            except (OSError, RuntimeError, AttributeError) as e:
                reason = f"building / loading the CPU kernels failed: {e}"
        _state["reason"] = reason
        return reason


def has_vnni() -> bool:
    """Whether this CPU runs the W4AX kernel's AVX-512 VNNI variant (what isa="auto" picks)."""
    return VNNI_FLAGS <= cpu_flags()


def available() -> bool:
    """True when the CPU kernels are built and registered (see `unavailable_reason`)."""
    return unavailable_reason() is None


def _weight_args(k: int, n: int, packed, scales, mins, cols: int):
    if k % PACK_TILE or packed.shape != (k // 2, n) or scales.ndim != 2 or scales.shape[1] != n:
        raise NotImplementedError(f"int4 cpu kernel: weight shapes {packed.shape}, {scales.shape}")
    if n % cols or k % scales.shape[0] or (k // scales.shape[0]) % HALF_TILE:
        raise NotImplementedError(
            f"int4 cpu kernel: N={n} must be a multiple of {cols} and the group size of 32"
        )
    if mins is not None and mins.shape != scales.shape:
        raise NotImplementedError("int4 cpu kernel: mins shape differs from scales")
    dummy = jnp.zeros((1, 1), jnp.float32)
    return (
        packed.astype(jnp.uint8),
        scales.astype(jnp.float32),
        dummy if mins is None else mins.astype(jnp.float32),
        np.int64(mins is not None),
    )


def w4a16_matmul_cpu(x: jax.Array, packed: jax.Array, scales: jax.Array, mins=None) -> jax.Array:
    """``x @ dequant(W)`` on the CPU kernel (float32 FMA; dequantized in registers).

    Args:
      x: float activations [M, K] (float32 or bfloat16; computed in float32).
      packed: uint8 packed int4 codes [K/2, N].
      scales: float scales [K/G, N].
      mins: float mins [K/G, N] (unsigned codes) or None (signed codes).

    Returns:
      [M, N] array of x.dtype (the float32 result rounded once).

    Raises:
      NotImplementedError: shapes the kernel does not cover (N not a multiple of 8, ...), or
        the kernels are unavailable here; dispatch then uses the XLA path.
    """
    if not available():
        raise NotImplementedError(f"CPU kernels unavailable: {unavailable_reason()}")
    m, k = x.shape
    n = packed.shape[1]
    p, s, mn, has_mins = _weight_args(k, n, packed, scales, mins, W4A16_COLS)
    out = jax.ffi.ffi_call("qspec_w4a16_int4", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        x.astype(jnp.float32), p, s, mn, has_mins=has_mins
    )  # [M, N]
    return out.astype(x.dtype)


def w4ax_matmul_cpu(
    a_codes: jax.Array,
    a_scales: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins=None,
    *,
    out_dtype=jnp.float32,
    isa: str = "auto",
) -> jax.Array:
    """W4A4 / W4A8 matmul of int8 activation codes on the CPU kernel (exact int32 blocks).

    Args:
      a_codes: int8 activation codes [M, K].
      a_scales: float32 activation scales [M, K/Ga] (Ga a multiple of 32).
      packed: uint8 packed int4 weight codes [K/2, N].
      scales: weight scales [K/G, N].
      mins: weight mins [K/G, N] or None (signed codes).
      out_dtype: output dtype.
      isa: "auto" (AVX-512 VNNI where the CPU has it, else AVX2) or "avx2" (`W4AX_ISAS`; the
        two give bit-identical results).

    Returns:
      [M, N] array of out_dtype.

    Raises:
      NotImplementedError: unsupported shapes (N not a multiple of 32, ...) or kernels
        unavailable (dispatch uses XLA).
    """
    if isa not in W4AX_ISAS:
        raise ValueError(f"unknown isa {isa!r}; expected one of {tuple(W4AX_ISAS)}")
    if not available():
        raise NotImplementedError(f"CPU kernels unavailable: {unavailable_reason()}")
    m, k = a_codes.shape
    n = packed.shape[1]
    if a_codes.dtype != jnp.int8:
        raise ValueError(f"a_codes must be int8, got {a_codes.dtype}")
    if a_scales.shape[0] != m or k % a_scales.shape[1] or (k // a_scales.shape[1]) % HALF_TILE:
        raise NotImplementedError(f"int4 cpu kernel: a_scales shape {a_scales.shape}")
    p, s, mn, has_mins = _weight_args(k, n, packed, scales, mins, W4AX_COLS)
    out = jax.ffi.ffi_call("qspec_w4ax_int4", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a_codes,
        a_scales.astype(jnp.float32),
        p,
        s,
        mn,
        has_mins=has_mins,
        isa=np.int64(W4AX_ISAS[isa]),
    )  # [M, N]
    return out.astype(out_dtype)


def quantize_w4ax_matmul_cpu(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins=None,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    out_dtype=jnp.float32,
    isa: str = "auto",
) -> jax.Array:
    """Activation quantization and the W4AX matmul in one CPU kernel call.

    Computes exactly ``w4ax_matmul_cpu(*quantize_activations_reference(x, ...), packed, ...)``
    (`pallas_kernels.act_quant`: per-group amax, scale = amax * float32(r / qmax), codes by
    round-half-even of an IEEE float32 division, clipped), with the codes and scales kept in
    the kernel's own memory. One custom call instead of XLA's quantization fusions before it:
    in the decode loop those small ops cost more than the matmul they feed (README, "Speed").

    Args:
      x: float activations [M, K] (float32 or bfloat16; quantized from float32).
      packed, scales, mins: the int4 weight as in `w4ax_matmul_cpu`.
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token); a multiple of 32 dividing K.
      clip_ratio: scale multiplier r.
      out_dtype: output dtype.
      isa: as in `w4ax_matmul_cpu`.

    Returns:
      [M, N] array of out_dtype.

    Raises:
      NotImplementedError: unsupported bits / shapes or kernels unavailable (dispatch then
        quantizes with XLA and calls the matmul separately).
    """
    if not available():
        raise NotImplementedError(f"CPU kernels unavailable: {unavailable_reason()}")
    if isa not in W4AX_ISAS:
        raise ValueError(f"unknown isa {isa!r}; expected one of {tuple(W4AX_ISAS)}")
    m, k = x.shape
    n = packed.shape[1]
    ga = group_size or k
    if bits not in (4, 8) or k % ga or ga % HALF_TILE:
        raise NotImplementedError(
            f"int4 cpu kernel: {bits}-bit activations in groups of {ga} over K={k}"
        )
    qmax = 2 ** (bits - 1) - 1
    p, s, mn, has_mins = _weight_args(k, n, packed, scales, mins, W4AX_COLS)
    out = jax.ffi.ffi_call("qspec_w4ax_f32_int4", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        x.astype(jnp.float32),
        p,
        s,
        mn,
        has_mins=has_mins,
        group_size=np.int64(group_size),
        qmax=np.int64(qmax),
        ratio=np.float32(clip_ratio / qmax),
        isa=np.int64(W4AX_ISAS[isa]),
    )  # [M, N]
    return out.astype(out_dtype)


Q8_GROUP = 32  # values per Q8_0 scale


def q8_matmul_cpu(x: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
    """``x @ (codes * scales).T`` for an int8 matrix in GGUF's Q8_0 layout (the LM head).

    Args:
      x: float activations [M, D] (float32 or bfloat16; computed in float32).
      codes: int8 codes [V, D] (row v is output v's weights; the embedding's layout).
      scales: float32 scales [V, D / 32], one per 32 consecutive codes of a row.

    Returns:
      float32 [M, V]; every output by the same operation sequence whatever M (see
      csrc/q8_head_cpu.cc).

    Raises:
      NotImplementedError: D not a multiple of 32, or the kernels are unavailable here.
    """
    if not available():
        raise NotImplementedError(f"CPU kernels unavailable: {unavailable_reason()}")
    m, d = x.shape
    v = codes.shape[0]
    if d % Q8_GROUP or codes.shape != (v, d) or scales.shape != (v, d // Q8_GROUP):
        raise NotImplementedError(
            f"q8 cpu kernel: x {x.shape}, codes {codes.shape}, scales {scales.shape}"
        )
    if codes.dtype != jnp.int8:
        raise ValueError(f"codes must be int8, got {codes.dtype}")
    return jax.ffi.ffi_call("qspec_q8_head", jax.ShapeDtypeStruct((m, v), jnp.float32))(
        x.astype(jnp.float32), codes, scales.astype(jnp.float32)
    )  # [M, V]


def _float_matmul_ffi(target: str, what: str, dim: str, cols: int, x, w) -> jax.Array:
    """The float FFI matmuls' shared checks and call: x [M, K] @ w [K, N] -> float32 [M, N]."""
    if not available():
        raise NotImplementedError(f"CPU kernels unavailable: {unavailable_reason()}")
    m, k = x.shape
    floats = (jnp.float32, jnp.bfloat16)
    if (
        w.ndim != 2
        or w.shape[0] != k
        or w.shape[1] % cols
        or x.dtype not in floats
        or (w.dtype not in floats)
    ):
        raise NotImplementedError(
            f"{what} cpu kernel: x {x.shape} {x.dtype}, w {w.shape} {w.dtype} (float32 or "
            f"bfloat16, {dim} a multiple of {cols})"
        )
    out = jax.ShapeDtypeStruct((m, w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x.astype(jnp.float32), w)  # [M, N]


FLOAT_HEAD_COLS = 16  # V must be a multiple


def float_head_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a float LM head w [D, V] (csrc/q8_head_cpu.cc, ``QspecFloatHead``).

    Args:
      x: activations [M, D], float32 or bfloat16 (computed in float32).
      w: the head [D, V], float32 or bfloat16 (read as it is; bfloat16 converted in registers).

    Returns:
      float32 [M, V]; every output by the same operation sequence whatever M (acc = 0, then
      one FMA per d in order), unlike XLA's dot.

    Raises:
      NotImplementedError: V not a multiple of 16, another dtype, or the kernels unavailable.
    """
    return _float_matmul_ffi("qspec_float_head", "float head", "V", FLOAT_HEAD_COLS, x, w)  # [M, V]


FLOAT_LINEAR_COLS = 16  # N must be a multiple


def float_linear_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a float linear layer w [K, N] (csrc/float_linear_cpu.cc, ``QspecFloatLinear``).

    Args:
      x: activations [M, K], float32 or bfloat16 (computed in float32).
      w: the weight [K, N], float32 or bfloat16 (read as it is; bfloat16 converted in registers).

    Returns:
      float32 [M, N]; every output by the same operation sequence whatever M (acc = 0, then one
      FMA per k in order, as `float_head_cpu`), unlike XLA's dot; up to 4 rows share each read of
      the weights.

    Raises:
      NotImplementedError: N not a multiple of 16, another dtype, or the kernels unavailable.
    """
    return _float_matmul_ffi("qspec_float_linear", "float linear", "N", FLOAT_LINEAR_COLS, x, w)


def attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array) -> jax.Array:
    """Causal grouped-query attention over a float cache layer (see csrc/attention_cpu.cc).

    Args:
      q: queries [B, T, H, D], float32 or bfloat16 (converted to float32 here, exactly).
      k, v: cache [B, S, KVH, D] (the new K/V already written), both float32 or both bfloat16
        (read as they are; a bfloat16 cache is converted in registers); H a multiple of KVH.
      q_positions: int32 [B, T]; query (b, t) sees keys 0..q_positions[b, t].

    Returns:
      float32 [B, T, H * D] (the caller rounds it to its dtype); each query row computed by the
      same operation sequence whatever T and B are, and for bfloat16 inputs exactly the float32
      result on the converted values.

    Raises:
      NotImplementedError: another dtype, D not a multiple of 8, or the kernels are unavailable.
    """
    if not available():
        raise NotImplementedError(f"CPU kernels unavailable: {unavailable_reason()}")
    b, t, h, d = q.shape
    floats = (jnp.float32, jnp.bfloat16)
    if (
        q.dtype not in floats
        or k.dtype not in floats
        or v.dtype != k.dtype
        or d % 8
        or k.shape != v.shape
        or k.shape[0] != b
        or k.shape[3] != d
        or h % k.shape[2]
    ):
        raise NotImplementedError(
            f"attention cpu kernel: q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape} "
            f"{v.dtype} (float32 or bfloat16, D a multiple of 8)"
        )
    return jax.ffi.ffi_call(
        "qspec_attention_f32", jax.ShapeDtypeStruct((b, t, h * d), jnp.float32)
    )(q.astype(jnp.float32), k, v, q_positions.astype(jnp.int32))  # [B, T, H * D]
