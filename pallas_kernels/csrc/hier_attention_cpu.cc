// CPU (x86-64 AVX2 + FMA) decode / verification attention over one layer of QuantSpec's
// hierarchical KV cache, as an XLA FFI handler (built and registered by
// pallas_kernels/cpu_kernels.py; Python entry points in pallas_kernels/cpu_attention.py).
//
// Function: `pallas_kernels.hier_attention.hier_attention_reference` (see the layout in
// pallas_kernels/hier_attention.py) up to float32 rounding: a query row at position p (GQA: query
// head i reads KV head i / (h / kvh)) reads key j from the quantized part iff j < cut(p) =
// float_start(p) = R * max(0, ceil((p - 2R) / R)), dequantized as min + float(code) * (scale *
// (1/16)) with code = 16 u + l ("target", int8) or 16 u ("draft", upper int4 halves; the lower
// halves are never read), and from the float ring buffer for cut(p) <= j <= p (position j at
// index j mod NB, held for buf_start <= j < buf_start + NB). Scores are dot(q, k) / sqrt(hd);
// softmax and the weighted sum of values in float32 (online softmax).
//
// How the quantized part is read (no dequantized key or value is ever formed):
// * keys: the per-channel key scales are folded into the query once per key group and row,
//   qs = q * step (step = scale / 16 for "target", scale for "draft"), bias = sum_d q[d] * x0[d]
//   (x0 = min - scale / 2 for "target", min for "draft"), so a score is
//   (bias + sum_d qs[d] * c[d]) / sqrt(hd) with c the non-negative code (16 u + l + 8 in [0, 255]
//   for "target": the two stored nibbles side by side; u in [0, 15] for "draft");
// * values: the per-token value scale is folded into the softmax weight, w_j = p_j * step_j, and
//   the offsets into one scalar per row, sum_j p_j * x0_j: acc = sum_j w_j * c_j + sum_j p_j x0_j;
// * codes: 8 packed bytes give 16 channels (vpmovzxbd, and / shift, vcvtdq2ps: exact floats),
//   converted in registers next to the FMAs that use them when an item has <= 3 query rows (the
//   decode / draft step of a 3-query-head GQA group: every code is loaded once for the 3 heads),
//   else converted once per block into an L1 tile that all rows read. Both give the same floats.
// The draft view reads and converts half the code bytes of the target view and does no nibble
// merging: that is where its speed advantage comes from.
//
// Error bound (against the float32 reference). Write M_j = sum_d |q[d]| (|x0[d]| + c_j[d]
// step[d]) / sqrt(hd) for key j; both the kernel's score and the reference's are within
// gamma(hd + 3) * M_j of the exact score of the same dequantized key (gamma(n) = n u / (1 - n u),
// u = 2^-24: a fixed-order float32 dot product of hd terms plus the fold's two roundings), so
// they differ by at most delta = 2 gamma(hd + 3) max_j M_j; to first order a score error delta
// moves the output (a convex combination of values) by at most 2 max|V| delta. The value
// folding rounds each term p_j step_j c_j and p_j x0_j at u, with |x0_j| + 255 step_j <=
// 3.2 max|V|, a relative error of a few u of max|V| per block sum. The online softmax over 32-key
// blocks, 256-key splits and their combination adds the same float32 reordering as before. These
// worst-case bounds are far above what is seen: tests/kernels/test_hier_attention_cpu.py asserts
// the unchanged tolerance 4e-6 * max|V| against the reference (measured there: see its docstring).
//
// Work split: items (sequence b, split s, KV head kv) each own the quantized positions
// [s * kSplit, (s + 1) * kSplit) of one KV head, plus one item per (sequence, KV head) for the
// float buffer; the calling thread and XLA's pool claim items one at a time. An item walks its
// positions in blocks of kBlock tokens aligned to absolute positions, keeping a partial online
// softmax (max, sum, weighted values) per row. The partials of a row are then combined in a fixed
// order (splits in order, then the buffer), skipping those that hold no key of the row.
//
// Row independence (bit for bit): every quantity a row's result is built from (its blocks, which
// keys of a block it reads, its key groups' folded queries, the lane a channel occupies, the
// reduction trees, the splits and their combination order) depends on the row's own query and
// position and on absolute positions only, never on the number of rows t in the call, the batch,
// the thread that runs the item, or whether the codes were converted in registers or into the
// tile (the same exact floats, the same FMAs in the same order). Keys of a block that a row does
// not read get weight +0 exactly. So QuantSpec's verifier (gamma + 1 rows) computes exactly what
// the autoregressive step (one row) computes.
// Built with -ffp-contract=off (see int4_cpu.cc): no implicit FMA contraction that could differ
// between two inlined copies; the FMAs below are explicit intrinsics.
//
// bfloat16: the queries and the output stay float32 here (pallas_kernels/cpu_attention.py
// converts bfloat16 queries and the output at the call boundary); the float ring buffer may be
// float32 or bfloat16. A bfloat16 buffer's rows of a block are converted (exactly) into a float32
// tile that the unchanged float code reads, so the result is the float32 kernel's on the converted
// buffer, with the same row independence.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using qspec_cpu::HSum;

namespace {

constexpr int64_t kBlock = 32;   // keys per online-softmax block (aligned to absolute positions)
constexpr int64_t kSplit = 256;  // quantized positions per work item (aligned, a kBlock multiple)
constexpr int64_t kMaxHd = 256;  // largest head_dim supported (a multiple of 32)
constexpr float kNeg = -FLT_MAX;

// exp(x) for 8 lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial, relative error
// ~1e-7); exactly 0 below -88.38 (so a masked score, kNeg - m, gives weight 0).
inline __m256 Exp(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-88.3762626647949f), _CMP_LT_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

inline float ExpScalar(float x) { return _mm256_cvtss_f32(Exp(_mm256_set1_ps(x))); }

inline float HMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lane i: dot(q, k[i]) over hd channels (FMA chain per 8-channel lane, then a fixed tree).
inline __m256 Dot8(const float* q, const float* const* k, int64_t hd) {
  __m256 a[8];
  const __m256 q0 = _mm256_loadu_ps(q);
  for (int i = 0; i < 8; ++i) a[i] = _mm256_mul_ps(q0, _mm256_loadu_ps(k[i]));
  for (int64_t d = 8; d < hd; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k[i] + d), a[i]);
  }
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// One row's online-softmax state: m, l and acc[hd] (acc = sum of weights * values).
struct RowState {
  float* m;
  float* l;
  float* acc;
};

// acc[d0 .. d0 + 8 NV) = alpha * acc + sum over lanes j in [lo, hi) of p[j] * v[j] (the sum in
// lane order, FMA per lane; NV is a constant so the accumulators stay in registers).
template <int NV>
inline void WeightedValues(const float* p, const float* const* vp, int64_t lo, int64_t hi,
                           int64_t d0, __m256 alpha, float* acc) {
  __m256 pv[NV];
  for (int u = 0; u < NV; ++u) pv[u] = _mm256_setzero_ps();
  for (int64_t j = lo; j < hi; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* v = vp[j] + d0;
    for (int u = 0; u < NV; ++u) pv[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * u), pv[u]);
  }
  for (int u = 0; u < NV; ++u) {
    float* a = acc + d0 + 8 * u;
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_mul_ps(alpha, _mm256_loadu_ps(a)), pv[u]));
  }
}

// Online-softmax update of one row with the keys of lanes [lo, hi) of a kBlock-key block (lane i
// = absolute position block_start + i; kp / vp point at each lane's key / value row, a zero row
// for lanes outside [lo, hi)). Called only when lo < hi.
inline void RowBlock(const float* q, const float* const* kp, const float* const* vp, int64_t lo,
                     int64_t hi, int64_t hd, float sqrt_hd, RowState st) {
  alignas(32) float s[kBlock];
  const int64_t g0 = lo & ~int64_t{7}, g1 = (hi + 7) & ~int64_t{7};
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 div = _mm256_set1_ps(sqrt_hd), neg = _mm256_set1_ps(kNeg);
  const __m256 flo = _mm256_set1_ps(static_cast<float>(lo));
  const __m256 fhi = _mm256_set1_ps(static_cast<float>(hi));
  __m256 vmax = neg;
  for (int64_t g = g0; g < g1; g += 8) {
    const __m256 idx = _mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(g)));
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(idx, flo, _CMP_GE_OQ),
                                    _mm256_cmp_ps(idx, fhi, _CMP_LT_OQ));
    __m256 sc = _mm256_div_ps(Dot8(q, kp + g, hd), div);
    sc = _mm256_blendv_ps(neg, sc, ok);
    _mm256_store_ps(s + g, sc);
    vmax = _mm256_max_ps(vmax, sc);
  }
  const float m_new = std::max(*st.m, HMax(vmax));
  const float alpha = ExpScalar(*st.m - m_new);
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 psum = _mm256_setzero_ps();
  for (int64_t g = g0; g < g1; g += 8) {
    const __m256 idx = _mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(g)));
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(idx, flo, _CMP_GE_OQ),
                                    _mm256_cmp_ps(idx, fhi, _CMP_LT_OQ));
    const __m256 p = _mm256_and_ps(ok, Exp(_mm256_sub_ps(_mm256_load_ps(s + g), mv)));
    _mm256_store_ps(s + g, p);
    psum = _mm256_add_ps(psum, p);
  }
  *st.l = alpha * *st.l + HSum(psum);
  *st.m = m_new;
  const __m256 av = _mm256_set1_ps(alpha);
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {  // 64 channels (or the last 32) per pass
    if (hd - d0 >= 64)
      WeightedValues<8>(s, vp, lo, hi, d0, av, st.acc);
    else
      WeightedValues<4>(s, vp, lo, hi, d0, av, st.acc);
  }
}

// ---------------------------------------------------------------- the quantized part
//
// Codes. A quantized entry is read as a non-negative integer code c and two per-view constants:
//   target: c = 16 u + (l + 8) in [0, 255] (the stored nibbles side by side), x = x0 + c * step
//           with step = scale * (1/16) and x0 = min - scale * 0.5 (the int8 code is c - 8);
//   draft:  c = u in [0, 15], x = min + c * scale (float(16 u) * (scale / 16) == u * scale).
// The float(c) are exact, so every term below is the reference's dequantized entry up to where
// the rounding happens (see "Error bound" at the top).

// The code vectors of 16 channels from 8 packed bytes (byte j: channel c0 + j in the low nibble,
// channel c0 + hd/2 + j in the high nibble): lo = channels c0 .. c0 + 7, hi = channels
// c0 + hd/2 .. c0 + hd/2 + 7, as exact floats.
template <bool kTarget>
inline void Codes16(const uint8_t* h, const uint8_t* l, __m256& lo, __m256& hi) {
  const __m256i hv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h)));
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  if (kTarget) {
    const __m256i lv =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(l)));
    const __m256i a = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(hv, m4), 4),
                                      _mm256_and_si256(lv, m4));
    const __m256i b =
        _mm256_or_si256(_mm256_and_si256(hv, _mm256_set1_epi32(0xF0)), _mm256_srli_epi32(lv, 4));
    lo = _mm256_cvtepi32_ps(a);
    hi = _mm256_cvtepi32_ps(b);
  } else {
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(hv, m4));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(hv, 4));
  }
}

// Where a block's codes come from. PackedSrc converts the packed bytes in registers next to
// their use (few query rows: each code is used by <= 3 rows); TileSrc reads a float tile the
// block was converted into once (many rows). Both give the same exact floats, so which one runs
// (it depends on the number of rows) never changes a result.
template <bool kTarget>
struct PackedSrc {
  using Tok = const uint8_t*;  // the token's upper-half bytes; lower halves at + lo_off
  int64_t lo_off;
  inline void Get(Tok t, int64_t c, __m256& lo, __m256& hi) const {
    Codes16<kTarget>(t + c, kTarget ? t + lo_off + c : nullptr, lo, hi);
  }
};

struct TileSrc {
  using Tok = const float*;  // the token's row of hd floats
  int64_t half;
  inline void Get(Tok t, int64_t c, __m256& lo, __m256& hi) const {
    lo = _mm256_loadu_ps(t + c);
    hi = _mm256_loadu_ps(t + half + c);
  }
};

// Raw scores (without the bias and 1/sqrt(hd)) of NR rows against 4 tokens: lane d of token k's
// accumulator gathers qs[c + d] * code[c + d] over the channel chunks in a fixed order (for byte
// offsets c = 0, 8, ..: chunk c, then chunk hd/2 + c, one FMA each), then the 8 lanes are summed
// in a fixed tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), the same for every token
// whichever tokens share the call. out[r * ld + k] = score of row r, token k.
template <int NR, class Src>
inline void Scores4(const Src& src, const typename Src::Tok tok[4], const float* qs, int64_t hd,
                    float* out, int64_t ld) {
  const int64_t half = hd / 2;
  __m256 a[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < 4; ++k) a[r][k] = _mm256_setzero_ps();
  for (int64_t c = 0; c < half; c += 8) {
    for (int k = 0; k < 4; ++k) {
      __m256 lo, hi;
      src.Get(tok[k], c, lo, hi);
      for (int r = 0; r < NR; ++r) {
        a[r][k] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + r * hd + c), lo, a[r][k]);
        a[r][k] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + r * hd + half + c), hi, a[r][k]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m256 h01 = _mm256_hadd_ps(a[r][0], a[r][1]), h23 = _mm256_hadd_ps(a[r][2], a[r][3]);
    const __m256 h = _mm256_hadd_ps(h01, h23);
    _mm_storeu_ps(out + r * ld,
                  _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
}

// Weighted codes of tokens [0, n) into NR rows: acc_r[d] = alpha_r * acc_r[d] + sum_j w[r][j] *
// code_j[d] (the sum from 0 in token order, one FMA per token; w[r][j] = 0 for keys the row does
// not read). Channels in passes of 16 (chunks c and hd/2 + c, from the same 8 bytes) held in
// registers.
template <int NR, class Src>
inline void Values(const Src& src, const typename Src::Tok* tok, int64_t n, const float* w,
                   int64_t ldw, const float* alpha, float* const* acc, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t c = 0; c < half; c += 8) {
    __m256 pv[NR][2];
    for (int r = 0; r < NR; ++r) pv[r][0] = pv[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      __m256 lo, hi;
      src.Get(tok[j], c, lo, hi);
      for (int r = 0; r < NR; ++r) {
        const __m256 wr = _mm256_set1_ps(w[r * ldw + j]);
        pv[r][0] = _mm256_fmadd_ps(wr, lo, pv[r][0]);
        pv[r][1] = _mm256_fmadd_ps(wr, hi, pv[r][1]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 al = _mm256_set1_ps(alpha[r]);
      float* a0 = acc[r] + c;
      float* a1 = acc[r] + half + c;
      _mm256_storeu_ps(a0, _mm256_add_ps(_mm256_mul_ps(al, _mm256_loadu_ps(a0)), pv[r][0]));
      _mm256_storeu_ps(a1, _mm256_add_ps(_mm256_mul_ps(al, _mm256_loadu_ps(a1)), pv[r][1]));
    }
  }
}

struct Problem {
  int64_t b, t, h, hd, kvh, q_cap, n_groups, group, nbuf, residual;
  bool target;
  const float* q;            // [B, t, h, hd]
  const int32_t* pos;        // [B, t]
  const uint8_t *k_hi, *k_lo, *v_hi, *v_lo;  // one layer: [B, Q, kvh, hd/2]
  const float *k_scale, *k_min;              // [B, Q/G, kvh, hd]
  const float *v_scale, *v_min;              // [B, Q, kvh]
  const float *k_buf, *v_buf;                // [B, NB, kvh, hd] (float32 buffers)
  const uint16_t *k_buf16, *v_buf16;         // the same, bfloat16 buffers (else nullptr)
  const int32_t* buf_start;                  // [B]
};

inline int64_t FloatStart(int64_t p, int64_t r) {
  const int64_t x = p - r - 1;
  const int64_t f = x >= 0 ? x / r : -((-x + r - 1) / r);  // floor division
  return r * std::max<int64_t>(0, f);
}

// Partials: [B, S + 1, kvh, rows, hd + 2] (acc[hd], m, l); slot S is the float buffer. Each work
// item initializes the slots it owns; the combination reads only owned slots.
struct Partials {
  float* data;
  int64_t slots, kvh, rows, hd;
  float* At(int64_t b, int64_t s, int64_t kv, int64_t r) const {
    return data + (((b * slots + s) * kvh + kv) * rows + r) * (hd + 2);
  }
};

// A 32-byte aligned float scratch area reused by a thread across calls (never shrinks).
inline float* ThreadScratch(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n + 8) v.resize(n + 8);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 31) & ~uintptr_t{31});
}

// Rows of one call for sequence b: row r = ti * g + gi is query head kv * g + gi of token ti.
struct Rows {
  int64_t n;                 // t * g
  std::vector<int64_t> cut;  // per token ti: min(float_start(pos), Q)
  std::vector<int64_t> pos;
  int64_t max_cut, max_pos, min_lo;
};

Rows RowsOf(const Problem& P, int64_t b) {
  Rows R;
  R.n = P.t * (P.h / P.kvh);
  R.cut.resize(P.t);
  R.pos.resize(P.t);
  R.max_cut = 0;
  R.max_pos = -1;
  R.min_lo = INT64_MAX;
  for (int64_t ti = 0; ti < P.t; ++ti) {
    R.pos[ti] = P.pos[b * P.t + ti];
    R.cut[ti] = std::min(FloatStart(R.pos[ti], P.residual), P.q_cap);
    R.max_cut = std::max(R.max_cut, R.cut[ti]);
    R.max_pos = std::max(R.max_pos, R.pos[ti]);
    R.min_lo = std::min(R.min_lo, std::max(R.cut[ti], static_cast<int64_t>(P.buf_start[b])));
  }
  return R;
}

// Up to this many rows per item convert the codes in registers (PackedSrc, once per 3 rows);
// more rows convert each block into a float tile once (TileSrc).
constexpr int64_t kPackedRows = 3;

// One (sequence b, split s, KV head kv) item: quantized positions [s * kSplit, (s + 1) * kSplit)
// below the rows' cut, in kBlock-token blocks aligned to absolute positions.
//   keys:   s[r][j] = (bias_r + sum_d qs_r[d] * c_j[d]) / sqrt(hd), with qs_r = q_r * step_k and
//           bias_r = sum_d q_r[d] * x0_k[d] per key group (the key scales folded into the query);
//   values: sum_j p_j V_j = sum_j (p_j * step_v[j]) * c_j + sum_j p_j * x0_v[j] (the value
//           scales folded into the softmax weights; the constant part kept per row, added to
//           acc once at the end of the item).
template <bool kTarget>
void CodesItem(const Problem& P, const Rows& R, const Partials& part, int64_t b, int64_t s,
               int64_t kv) {
  const int64_t g = P.h / P.kvh, hd = P.hd, half = hd / 2, nr = R.n;
  const float sqrt_hd = static_cast<float>(std::sqrt(static_cast<double>(hd)));
  constexpr int64_t ld = kBlock + 4;  // score row stride (Scores4 may write 3 past a run)
  thread_local std::vector<float> store;
  float* qs = ThreadScratch(store, nr * (hd + 2 * ld + 4) + 2 * kBlock * hd + 4 * kBlock + hd);
  float* sc = qs + nr * hd;  // [nr, ld] scores, then weights
  float* wt = sc + nr * ld;  // [nr, ld]
  float* bias = wt + nr * ld;
  float* cst = bias + nr;
  float* alpha = cst + nr;
  float* kt = qs + (nr * (hd + 2 * ld + 3) + 7) / 8 * 8;  // [kBlock, hd] key codes (TileSrc)
  float* vt = kt + kBlock * hd;
  float* vstep = vt + kBlock * hd;  // [kBlock]
  float* vx0 = vstep + kBlock;
  float* zero = vx0 + kBlock;  // [hd] zeros: dummy token rows
  std::fill(zero, zero + hd, 0.0f);
  for (int64_t r = 0; r < nr; ++r) {
    float* pr = part.At(b, s, kv, r);
    std::fill(pr, pr + hd, 0.0f);
    pr[hd] = kNeg;
    pr[hd + 1] = 0.0f;
    cst[r] = 0.0f;
  }
  const bool packed = nr <= kPackedRows;
  const int64_t first = s * kSplit, end = std::min(first + kSplit, R.max_cut);
  const int64_t tok = P.kvh * half;  // bytes between tokens
  const int64_t base = ((b * P.q_cap) * P.kvh + kv) * half;
  const uint8_t* khi = P.k_hi + base;
  const uint8_t* vhi = P.v_hi + base;
  const PackedSrc<kTarget> ksrc{kTarget ? P.k_lo - P.k_hi : 0};
  const PackedSrc<kTarget> vsrc{kTarget ? P.v_lo - P.v_hi : 0};
  const TileSrc tsrc{half};
  const float kfac = kTarget ? 1.0f / 16.0f : 1.0f;
  const __m256 kfv = _mm256_set1_ps(kfac), halfv = _mm256_set1_ps(0.5f);
  int64_t cur_grp = -1;
  const uint8_t* ptok[kBlock + 4];
  const float* ftok[kBlock + 4];
  for (int64_t j0 = first; j0 < end; j0 += kBlock) {
    const int64_t n = std::min(kBlock, end - j0);
    for (int64_t i = 0; i < kBlock + 4; ++i) {
      ptok[i] = khi + (j0 + (i < n ? i : 0)) * tok;  // past n: a real token, score unused
      ftok[i] = i < n ? kt + i * hd : zero;
    }
    if (!packed) {  // convert the block's key and value codes once
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* kh = khi + (j0 + i) * tok;
        const uint8_t* vh = vhi + (j0 + i) * tok;
        for (int64_t c = 0; c < half; c += 8) {
          __m256 lo, hi;
          ksrc.Get(kh, c, lo, hi);
          _mm256_storeu_ps(kt + i * hd + c, lo);
          _mm256_storeu_ps(kt + i * hd + half + c, hi);
          vsrc.Get(vh, c, lo, hi);
          _mm256_storeu_ps(vt + i * hd + c, lo);
          _mm256_storeu_ps(vt + i * hd + half + c, hi);
        }
      }
    }
    // Scores, in runs of one key group (a new group: fold its scales into the queries).
    for (int64_t i = 0; i < n;) {
      const int64_t grp = (j0 + i) / P.group;
      const int64_t iend = std::min(n, (grp + 1) * P.group - j0);
      if (grp != cur_grp) {
        cur_grp = grp;
        const int64_t goff = ((b * P.n_groups + grp) * P.kvh + kv) * hd;
        const float* ks = P.k_scale + goff;
        const float* km = P.k_min + goff;
        for (int64_t r = 0; r < nr; ++r) {
          const float* q = P.q + ((b * P.t + r / g) * P.h + kv * g + r % g) * hd;
          __m256 bacc = _mm256_setzero_ps();
          for (int64_t d = 0; d < hd; d += 8) {
            const __m256 ksv = _mm256_loadu_ps(ks + d), qv = _mm256_loadu_ps(q + d);
            const __m256 x0 = kTarget ? _mm256_sub_ps(_mm256_loadu_ps(km + d),
                                                      _mm256_mul_ps(ksv, halfv))
                                      : _mm256_loadu_ps(km + d);
            _mm256_store_ps(qs + r * hd + d, _mm256_mul_ps(qv, _mm256_mul_ps(ksv, kfv)));
            bacc = _mm256_fmadd_ps(qv, x0, bacc);
          }
          bias[r] = HSum(bacc);
        }
      }
      for (int64_t i4 = i; i4 < iend; i4 += 4) {
        const int64_t cnt = std::min<int64_t>(4, iend - i4);
        for (int64_t r0 = 0; r0 < nr; r0 += 3) {
          const int64_t k = std::min<int64_t>(3, nr - r0);
          float* o = sc + r0 * ld + i4;
          const float* qr = qs + r0 * hd;
          if (packed) {
            const uint8_t* tk[4];
            for (int u = 0; u < 4; ++u) tk[u] = ptok[u < cnt ? i4 + u : i4];
            if (k == 3) Scores4<3>(ksrc, tk, qr, hd, o, ld);
            else if (k == 2) Scores4<2>(ksrc, tk, qr, hd, o, ld);
            else Scores4<1>(ksrc, tk, qr, hd, o, ld);
          } else {
            const float* tk[4];
            for (int u = 0; u < 4; ++u) tk[u] = u < cnt ? ftok[i4 + u] : zero;
            if (k == 3) Scores4<3>(tsrc, tk, qr, hd, o, ld);
            else if (k == 2) Scores4<2>(tsrc, tk, qr, hd, o, ld);
            else Scores4<1>(tsrc, tk, qr, hd, o, ld);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r)  // + the run's bias (its key group's offsets)
        for (int64_t u = i; u < iend; ++u) sc[r * ld + u] = bias[r] + sc[r * ld + u];
      i = iend;
    }
    // The block's value steps and offsets (tokens past n: 0, never read).
    for (int64_t i = 0; i < kBlock; ++i) {
      if (i < n) {
        const int64_t vi = (b * P.q_cap + j0 + i) * P.kvh + kv;
        const float vs = P.v_scale[vi];
        vstep[i] = vs * kfac;
        vx0[i] = kTarget ? P.v_min[vi] - vs * 0.5f : P.v_min[vi];
      } else {
        vstep[i] = vx0[i] = 0.0f;
      }
    }
    // Online softmax per row over the keys it reads, [0, hi): weights into wt.
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 div = _mm256_set1_ps(sqrt_hd), neg = _mm256_set1_ps(kNeg);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t hi = std::min(kBlock, R.cut[r / g] - j0);
      float* pr = part.At(b, s, kv, r);
      float* w = wt + r * ld;
      if (hi <= 0) {  // reads no key of this block: unchanged, zero weights
        alpha[r] = 1.0f;
        std::fill(w, w + kBlock, 0.0f);
        continue;
      }
      const __m256 fhi = _mm256_set1_ps(static_cast<float>(hi));
      __m256 vmax = neg;
      for (int64_t i = 0; i < kBlock; i += 8) {
        const __m256 ok = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(i))),
                                        fhi, _CMP_LT_OQ);
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(sc + r * ld + i), div);
        v = _mm256_blendv_ps(neg, v, ok);
        _mm256_storeu_ps(sc + r * ld + i, v);
        vmax = _mm256_max_ps(vmax, v);
      }
      const float m_new = std::max(pr[hd], HMax(vmax));
      const float al = ExpScalar(pr[hd] - m_new);
      const __m256 mv = _mm256_set1_ps(m_new);
      __m256 psum = _mm256_setzero_ps(), csum = _mm256_setzero_ps();
      for (int64_t i = 0; i < kBlock; i += 8) {
        const __m256 ok = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(i))),
                                        fhi, _CMP_LT_OQ);
        const __m256 p = _mm256_and_ps(ok, Exp(_mm256_sub_ps(_mm256_loadu_ps(sc + r * ld + i), mv)));
        psum = _mm256_add_ps(psum, p);
        csum = _mm256_fmadd_ps(p, _mm256_loadu_ps(vx0 + i), csum);
        _mm256_storeu_ps(w + i, _mm256_mul_ps(p, _mm256_loadu_ps(vstep + i)));
      }
      pr[hd + 1] = al * pr[hd + 1] + HSum(psum);
      pr[hd] = m_new;
      cst[r] = al * cst[r] + HSum(csum);
      alpha[r] = al;
    }
    // Values: acc = alpha * acc + sum_j w_j * code_j (rows reading no key: alpha 1, w 0).
    for (int64_t r0 = 0; r0 < nr; r0 += 3) {
      const int64_t k = std::min<int64_t>(3, nr - r0);
      float* acc[3];
      for (int64_t u = 0; u < k; ++u) acc[u] = part.At(b, s, kv, r0 + u);
      const float* w = wt + r0 * ld;
      if (packed) {
        const uint8_t* vk[kBlock];
        for (int64_t i = 0; i < n; ++i) vk[i] = vhi + (j0 + i) * tok;
        if (k == 3) Values<3>(vsrc, vk, n, w, ld, alpha + r0, acc, hd);
        else if (k == 2) Values<2>(vsrc, vk, n, w, ld, alpha + r0, acc, hd);
        else Values<1>(vsrc, vk, n, w, ld, alpha + r0, acc, hd);
      } else {
        const float* vk[kBlock];
        for (int64_t i = 0; i < n; ++i) vk[i] = vt + i * hd;
        if (k == 3) Values<3>(tsrc, vk, n, w, ld, alpha + r0, acc, hd);
        else if (k == 2) Values<2>(tsrc, vk, n, w, ld, alpha + r0, acc, hd);
        else Values<1>(tsrc, vk, n, w, ld, alpha + r0, acc, hd);
      }
    }
  }
  // acc += the values' constant part.
  for (int64_t r = 0; r < nr; ++r) {
    float* pr = part.At(b, s, kv, r);
    const __m256 cv = _mm256_set1_ps(cst[r]);
    for (int64_t d = 0; d < hd; d += 8)
      _mm256_storeu_ps(pr + d, _mm256_add_ps(_mm256_loadu_ps(pr + d), cv));
  }
}

// ---------------------------------------------------------------- the float buffer

// One (sequence b, KV head kv) item over the float ring buffer: positions
// [max(cut, buf_start), min(p + 1, buf_start + NB)) per row, in kBlock blocks aligned to
// absolute positions (RowBlock: float dots and weighted values).
void BufferItem(const Problem& P, const Rows& R, const Partials& part, int64_t b, int64_t kv) {
  const int64_t g = P.h / P.kvh, hd = P.hd;
  const float sqrt_hd = static_cast<float>(std::sqrt(static_cast<double>(hd)));
  alignas(32) static const float kZero[kMaxHd] = {};
  const int64_t slot = part.slots - 1;
  for (int64_t r = 0; r < R.n; ++r) {
    float* pr = part.At(b, slot, kv, r);
    std::fill(pr, pr + hd, 0.0f);
    pr[hd] = kNeg;
    pr[hd + 1] = 0.0f;
  }
  const float* kp[kBlock];
  const float* vp[kBlock];
  thread_local std::vector<float> tile;  // bfloat16 buffers: [2, kBlock, hd] float32 rows
  if (P.k_buf16 && static_cast<int64_t>(tile.size()) < 2 * kBlock * hd)
    tile.resize(2 * kBlock * hd);
  const int64_t bstart = P.buf_start[b];
  const int64_t end = std::min(R.max_pos + 1, bstart + P.nbuf);
  for (int64_t j0 = (R.min_lo / kBlock) * kBlock; j0 < end; j0 += kBlock) {
    for (int64_t i = 0; i < kBlock; ++i) {
      const int64_t j = j0 + i;
      if (j < bstart || j >= bstart + P.nbuf) {
        kp[i] = vp[i] = kZero;
        continue;
      }
      const int64_t off = ((b * P.nbuf + j % P.nbuf) * P.kvh + kv) * hd;
      if (P.k_buf16) {
        float* kt = tile.data() + i * hd;
        float* vt = tile.data() + (kBlock + i) * hd;
        qspec_cpu::Bf16ToF32(P.k_buf16 + off, kt, hd);
        qspec_cpu::Bf16ToF32(P.v_buf16 + off, vt, hd);
        kp[i] = kt;
        vp[i] = vt;
        continue;
      }
      kp[i] = P.k_buf + off;
      vp[i] = P.v_buf + off;
    }
    for (int64_t ti = 0; ti < P.t; ++ti) {
      const int64_t lo = std::max<int64_t>(std::max(R.cut[ti], bstart) - j0, 0);
      const int64_t hi = std::min({kBlock, R.pos[ti] + 1 - j0, bstart + P.nbuf - j0});
      if (lo >= hi) continue;
      for (int64_t gi = 0; gi < g; ++gi) {
        float* pr = part.At(b, slot, kv, ti * g + gi);
        const float* q = P.q + ((b * P.t + ti) * P.h + kv * g + gi) * hd;
        RowBlock(q, kp, vp, lo, hi, hd, sqrt_hd, RowState{pr + hd, pr + hd + 1, pr});
      }
    }
  }
}

// Runs fn(i) for i in [0, n), one index at a time claimed from a shared counter by the calling
// thread and XLA's intra-op pool (items differ in size: fine-grained claiming keeps both cores
// busy to the end; qspec_cpu::ParallelFor's two chunks per thread left one core idle for about a
// tenth of a call here). The caller waits only for items another thread has claimed.
template <typename F>
void ParallelItems(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [state, n, f]() {
    for (;;) {
      const int64_t i = state->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;  // a late helper touches nothing but the shared state
      (*f)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  // Wait for items a helper claimed; on a loaded machine that helper may be waiting for this
  // very core, so after a short spin the caller yields it.
  for (int64_t spin = 0; state->done.load(std::memory_order_acquire) < n; ++spin) {
    if (spin < 4096)
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

// `for_each(n, fn)` runs fn(i) for every item i in [0, n) (in any order, on any threads).
template <bool kTarget, typename ForEach>
void Run(const ForEach& for_each, const Problem& P, float* out) {
  const int64_t g = P.h / P.kvh, hd = P.hd;
  std::vector<Rows> rows(P.b);
  std::vector<int64_t> n_split(P.b);
  int64_t s_max = 0;
  for (int64_t b = 0; b < P.b; ++b) {
    rows[b] = RowsOf(P, b);
    n_split[b] = (rows[b].max_cut + kSplit - 1) / kSplit;  // splits holding a key of a row
    s_max = std::max(s_max, n_split[b]);
  }
  const int64_t nr = P.t * g;
  thread_local std::vector<float> part_store;
  const int64_t need = P.b * (s_max + 1) * P.kvh * nr * (hd + 2);
  if (static_cast<int64_t>(part_store.size()) < need) part_store.resize(need);
  const Partials part{part_store.data(), s_max + 1, P.kvh, nr, hd};
  struct Item {
    int64_t b, s, kv;  // s == -1: the float buffer
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < P.b; ++b)
    for (int64_t kv = 0; kv < P.kvh; ++kv) items.push_back({b, -1, kv});  // usually the largest
  for (int64_t b = 0; b < P.b; ++b)
    for (int64_t s = 0; s < n_split[b]; ++s)
      for (int64_t kv = 0; kv < P.kvh; ++kv) items.push_back({b, s, kv});
  for_each(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Item& it = items[i];
    if (it.s < 0)
      BufferItem(P, rows[it.b], part, it.b, it.kv);
    else
      CodesItem<kTarget>(P, rows[it.b], part, it.b, it.s, it.kv);
  });
  // Combine each row's partials in a fixed order: splits 0.., then the buffer; a partial holding
  // no key of the row (l == 0) is skipped.
  for (int64_t b = 0; b < P.b; ++b)
    for (int64_t kv = 0; kv < P.kvh; ++kv)
      for (int64_t r = 0; r < nr; ++r) {
        auto slot = [&](int64_t i) {  // i in [0, n_split]: the splits, then the buffer
          return part.At(b, i < n_split[b] ? i : s_max, kv, r);
        };
        float m_all = kNeg;
        for (int64_t i = 0; i <= n_split[b]; ++i) {
          const float* pr = slot(i);
          if (pr[hd + 1] > 0.0f) m_all = std::max(m_all, pr[hd]);
        }
        alignas(32) float acc[kMaxHd];
        std::fill(acc, acc + hd, 0.0f);
        float den = 0.0f;
        for (int64_t i = 0; i <= n_split[b]; ++i) {
          const float* pr = slot(i);
          if (!(pr[hd + 1] > 0.0f)) continue;
          const float w = ExpScalar(pr[hd] - m_all);
          den = den + w * pr[hd + 1];
          const __m256 wv = _mm256_set1_ps(w);
          for (int64_t d = 0; d < hd; d += 8)
            _mm256_store_ps(acc + d, _mm256_add_ps(_mm256_load_ps(acc + d),
                                                   _mm256_mul_ps(wv, _mm256_loadu_ps(pr + d))));
        }
        const int64_t ti = r / g, gi = r % g;
        float* o = out + ((b * P.t + ti) * P.h + kv * g + gi) * hd;
        const __m256 dv = _mm256_set1_ps(den > 0.0f ? den : 1.0f);
        for (int64_t d = 0; d < hd; d += 8)
          _mm256_storeu_ps(o + d, _mm256_div_ps(_mm256_load_ps(acc + d), dv));
      }
}

}  // namespace

namespace {

ffi::Error HierAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer,
                             ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> pos,
                             ffi::Buffer<ffi::U8> k_hi, ffi::Buffer<ffi::U8> k_lo,
                             ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> k_min,
                             ffi::Buffer<ffi::U8> v_hi, ffi::Buffer<ffi::U8> v_lo,
                             ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::F32> v_min,
                             ffi::AnyBuffer k_buf, ffi::AnyBuffer v_buf,
                             ffi::Buffer<ffi::S32> buf_start, int64_t residual, int64_t target,
                             ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), cd = k_hi.dimensions(), sd = k_scale.dimensions();
  const auto vd = v_scale.dimensions(), bd = k_buf.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || sd.size() != 5 || vd.size() != 4 || bd.size() != 5)
    return ffi::Error::InvalidArgument("hier attention cpu kernel: wrong ranks");
  Problem P;
  P.b = qd[0];
  P.t = qd[1];
  P.h = qd[2];
  P.hd = qd[3];
  const int64_t nl = cd[0];
  P.q_cap = cd[2];
  P.kvh = cd[3];
  P.n_groups = sd[2];
  P.nbuf = bd[2];
  P.residual = residual;
  P.target = target != 0;
  const int64_t half = P.hd / 2;
  if (cd[1] != P.b || cd[4] != half || P.hd % 32 || P.hd > kMaxHd || P.kvh < 1 ||
      P.h % P.kvh || P.n_groups < 1 || P.q_cap % P.n_groups || sd[0] != nl || sd[1] != P.b ||
      sd[3] != P.kvh || sd[4] != P.hd || vd[0] != nl || vd[1] != P.b || vd[2] != P.q_cap ||
      vd[3] != P.kvh || bd[0] != nl || bd[1] != P.b || bd[3] != P.kvh || bd[4] != P.hd ||
      residual < 1 || P.nbuf % residual || static_cast<int64_t>(pos.element_count()) != P.b * P.t ||
      static_cast<int64_t>(buf_start.element_count()) != P.b || layer.element_count() != 1 ||
      v_hi.dimensions().size() != 5 || v_hi.element_count() != k_hi.element_count() ||
      (P.target && (k_lo.element_count() != k_hi.element_count() ||
                    v_lo.element_count() != k_hi.element_count())))
    return ffi::Error::InvalidArgument("hier attention cpu kernel: inconsistent shapes");
  const int64_t li = layer.typed_data()[0];
  if (li < 0 || li >= nl) return ffi::Error::InvalidArgument("hier attention: layer out of range");
  P.group = P.q_cap / P.n_groups;
  const int64_t codes = P.b * P.q_cap * P.kvh * half;
  P.q = q.typed_data();
  P.pos = pos.typed_data();
  P.k_hi = k_hi.typed_data() + li * codes;
  P.v_hi = v_hi.typed_data() + li * codes;
  P.k_lo = P.target ? k_lo.typed_data() + li * codes : nullptr;
  P.v_lo = P.target ? v_lo.typed_data() + li * codes : nullptr;
  const int64_t kg = P.b * P.n_groups * P.kvh * P.hd;
  P.k_scale = k_scale.typed_data() + li * kg;
  P.k_min = k_min.typed_data() + li * kg;
  const int64_t vt = P.b * P.q_cap * P.kvh;
  P.v_scale = v_scale.typed_data() + li * vt;
  P.v_min = v_min.typed_data() + li * vt;
  const int64_t bt = P.b * P.nbuf * P.kvh * P.hd;
  // bfloat16 buffers arrive as BF16 or as their uint16 bits (U16; cpu_attention.py passes the
  // bits, see there): both are read as bfloat16.
  const auto bty = k_buf.element_type();
  if (v_buf.element_type() != bty ||
      (bty != ffi::DataType::F32 && bty != ffi::DataType::BF16 && bty != ffi::DataType::U16))
    return ffi::Error::InvalidArgument(
        "hier attention cpu kernel: k_buf and v_buf must both be float32 or both bfloat16");
  const bool bf16 = bty != ffi::DataType::F32;
  P.k_buf = bf16 ? nullptr : k_buf.typed_data<float>() + li * bt;
  P.v_buf = bf16 ? nullptr : v_buf.typed_data<float>() + li * bt;
  P.k_buf16 = bf16 ? k_buf.reinterpret_data<uint16_t>() + li * bt : nullptr;
  P.v_buf16 = bf16 ? v_buf.reinterpret_data<uint16_t>() + li * bt : nullptr;
  P.buf_start = buf_start.typed_data();
  const auto for_each = [&pool](int64_t n, const auto& fn) { ParallelItems(pool, n, fn); };
  if (P.target)
    Run<true>(for_each, P, out->typed_data());
  else
    Run<false>(for_each, P, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecHierAttention, HierAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, t, h, hd]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, t]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // k_hi [L, B, Q, kvh, hd/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // k_lo (or a dummy: draft)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_scale [L, B, Q/G, kvh, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_min
                                  .Arg<ffi::Buffer<ffi::U8>>()   // v_hi
                                  .Arg<ffi::Buffer<ffi::U8>>()   // v_lo (or a dummy)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_scale [L, B, Q, kvh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_min
                                  .Arg<ffi::AnyBuffer>()  // k_buf [L, B, NB, kvh, hd] f32/bf16/u16
                                  .Arg<ffi::AnyBuffer>()  // v_buf (k_buf's dtype)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // buf_start [B]
                                  .Attr<int64_t>("residual")
                                  .Attr<int64_t>("target")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [B, t, h * hd]
