// CPU (x86-64 AVX2 + FMA) decode / verification attention over one layer of QuantSpec's
// hierarchical KV cache, as an XLA FFI handler (built and registered by
// pallas_kernels/cpu_kernels.py; Python entry points in pallas_kernels/cpu_attention.py).
//
// Function: exactly `pallas_kernels.hier_attention.hier_attention_reference` (see the layout in
// pallas_kernels/hier_attention.py): a query row at position p (GQA: query head i reads KV head
// i / (h / kvh)) reads key j from the quantized part iff j < cut(p) = float_start(p) =
// R * max(0, ceil((p - 2R) / R)), dequantized as min + float(code) * (scale * (1/16)) with code =
// 16 u + l ("target", int8) or 16 u ("draft", upper int4 halves; the lower halves are never read),
// and from the float ring buffer for cut(p) <= j <= p (position j at index j mod NB, held for
// buf_start <= j < buf_start + NB). Scores are float32 dot(q, k) / float32(sqrt(hd)); softmax and
// the weighted sum of values in float32 (online softmax).
//
// The codes are read packed and dequantized next to the dot product: a block of kBlock tokens of
// one KV head is dequantized into an L1-resident tile (kBlock x hd floats), used by every query
// row of that head, then overwritten by the next block. No float copy of the cache is made.
//
// Work split: items (sequence b, split s) each own the quantized positions
// [s * kSplit, (s + 1) * kSplit), plus one item per sequence for the float buffer; an item walks
// its positions in blocks of kBlock tokens aligned to absolute positions, for every KV head and
// every query row, keeping a partial online softmax (max, sum, weighted values) per row. The
// partials of a row are then combined in a fixed order (splits in order, then the buffer),
// skipping those that hold no key of the row.
//
// Row independence (bit for bit): every quantity a row's result is built from (its blocks, which
// keys of a block it reads, the lane a key occupies, the reduction trees, the splits and their
// combination order) depends on the row's own position and on absolute positions only, never on
// the number of rows t in the call, the batch, or the thread that runs the item. So QuantSpec's
// verifier (gamma + 1 rows) computes exactly what the autoregressive step (one row) computes.
// Built with -ffp-contract=off (see int4_cpu.cc): no implicit FMA contraction that could differ
// between two inlined copies; the FMAs below are explicit intrinsics.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using qspec_cpu::HSum;
using qspec_cpu::ParallelFor;

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

// Codes of 32 channels from 16 packed bytes (hd/2 a multiple of 16): byte j's low nibble is
// channel c0 + j, its high nibble channel c0 + hd/2 + j. Returns the four 8-channel groups
// (c0, c0 + 8, hd/2 + c0, hd/2 + c0 + 8) as floats: 16 u (+ l for the target view), exact.
template <bool kTarget>
inline void Codes32(const uint8_t* h, const uint8_t* l, __m256 out[4]) {
  const __m256i nib = _mm256_set1_epi16(0xF);
  const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  __m256i ca = _mm256_slli_epi16(_mm256_and_si256(u, nib), 4);
  __m256i cb = _mm256_slli_epi16(_mm256_srli_epi16(u, 4), 4);
  if (kTarget) {
    const __m256i eight = _mm256_set1_epi16(8);
    const __m256i w =
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(l)));
    ca = _mm256_add_epi16(ca, _mm256_sub_epi16(_mm256_and_si256(w, nib), eight));
    cb = _mm256_add_epi16(cb, _mm256_sub_epi16(_mm256_srli_epi16(w, 4), eight));
  }
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(ca)));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(ca, 1)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(cb)));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(cb, 1)));
}

// Dequantizes `n` tokens of one KV head into dst [n, hd]: codes hi (and lo) packed [hd/2] per
// token at stride `tok_stride` bytes; dst = min + float(code) * (scale * (1/16)), the reference's
// formula and rounding. Keys (kPerChannel): scales / mins per channel, row pointers per token
// (`scale_rows[i]`, one row per key group); values: one scale / min per token (`tok_scale`,
// `tok_min` at stride `tok_scale_stride`).
template <bool kTarget, bool kPerChannel>
inline void Dequant(const uint8_t* hi, const uint8_t* lo, int64_t tok_stride, int64_t n,
                    int64_t hd, const float* const* scale_rows, const float* const* min_rows,
                    const float* tok_scale, const float* tok_min, int64_t tok_scale_stride,
                    float* dst) {
  const int64_t half = hd / 2;
  const __m256 sixteenth = _mm256_set1_ps(1.0f / 16.0f);
  alignas(32) float sc[kMaxHd];  // key scale * (1/16) of the current group
  const float* group_row = nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* h = hi + i * tok_stride;
    const uint8_t* l = kTarget ? lo + i * tok_stride : nullptr;
    float* out = dst + i * hd;
    const float* mn = nullptr;
    __m256 ts = _mm256_setzero_ps(), tm = _mm256_setzero_ps();
    if (kPerChannel) {
      if (scale_rows[i] != group_row) {
        group_row = scale_rows[i];
        for (int64_t d = 0; d < hd; d += 8)
          _mm256_store_ps(sc + d, _mm256_mul_ps(_mm256_loadu_ps(group_row + d), sixteenth));
      }
      mn = min_rows[i];
    } else {
      ts = _mm256_mul_ps(_mm256_set1_ps(tok_scale[i * tok_scale_stride]), sixteenth);
      tm = _mm256_set1_ps(tok_min[i * tok_scale_stride]);
    }
    for (int64_t c = 0; c < half; c += 16) {
      __m256 f[4];
      Codes32<kTarget>(h + c, kTarget ? l + c : nullptr, f);
      const int64_t ch[4] = {c, c + 8, half + c, half + c + 8};
      for (int k = 0; k < 4; ++k) {
        const __m256 s = kPerChannel ? _mm256_load_ps(sc + ch[k]) : ts;
        const __m256 m = kPerChannel ? _mm256_loadu_ps(mn + ch[k]) : tm;
        _mm256_storeu_ps(out + ch[k], _mm256_add_ps(m, _mm256_mul_ps(f[k], s)));
      }
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
  const float *k_buf, *v_buf;                // [B, NB, kvh, hd]
  const int32_t* buf_start;                  // [B]
};

inline int64_t FloatStart(int64_t p, int64_t r) {
  const int64_t x = p - r - 1;
  const int64_t f = x >= 0 ? x / r : -((-x + r - 1) / r);  // floor division
  return r * std::max<int64_t>(0, f);
}

// Partials: [B, S + 1, kvh, rows, hd + 2] (acc[hd], m, l); slot S is the float buffer.
struct Partials {
  std::vector<float> data;
  int64_t slots, kvh, rows, hd;
  float* At(int64_t b, int64_t s, int64_t kv, int64_t r) {
    return data.data() + (((b * slots + s) * kvh + kv) * rows + r) * (hd + 2);
  }
};

template <bool kTarget>
void RunItem(const Problem& P, Partials& part, int64_t b, int64_t s, bool buffer, float* kt,
             float* vt, const float* zero) {
  const int64_t g = P.h / P.kvh, hd = P.hd, half = hd / 2;
  const float sqrt_hd = static_cast<float>(std::sqrt(static_cast<double>(hd)));
  std::vector<int64_t> cut(P.t), pos(P.t);
  int64_t max_cut = 0, max_pos = -1, min_lo = INT64_MAX;
  const int64_t bstart = P.buf_start[b];
  for (int64_t ti = 0; ti < P.t; ++ti) {
    pos[ti] = P.pos[b * P.t + ti];
    cut[ti] = std::min(FloatStart(pos[ti], P.residual), P.q_cap);
    max_cut = std::max(max_cut, cut[ti]);
    max_pos = std::max(max_pos, pos[ti]);
    min_lo = std::min(min_lo, std::max(cut[ti], bstart));
  }
  const float* kp[kBlock];
  const float* vp[kBlock];
  const float* srow[kBlock];
  const float* mrow[kBlock];
  if (!buffer) {
    const int64_t first = s * kSplit, end = std::min({first + kSplit, max_cut, P.q_cap});
    const int64_t tok = P.kvh * half;  // bytes between tokens
    for (int64_t j0 = first; j0 < end; j0 += kBlock) {
      const int64_t n = std::min(kBlock, end - j0);
      for (int64_t i = 0; i < kBlock; ++i) {
        kp[i] = i < n ? kt + i * hd : zero;
        vp[i] = i < n ? vt + i * hd : zero;
      }
      for (int64_t kv = 0; kv < P.kvh; ++kv) {
        const int64_t c0 = ((b * P.q_cap + j0) * P.kvh + kv) * half;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t grp = (b * P.n_groups + (j0 + i) / P.group) * P.kvh + kv;
          srow[i] = P.k_scale + grp * hd;
          mrow[i] = P.k_min + grp * hd;
        }
        Dequant<kTarget, true>(P.k_hi + c0, kTarget ? P.k_lo + c0 : nullptr, tok, n, hd, srow,
                               mrow, nullptr, nullptr, 0, kt);
        const int64_t t0 = (b * P.q_cap + j0) * P.kvh + kv;
        Dequant<kTarget, false>(P.v_hi + c0, kTarget ? P.v_lo + c0 : nullptr, tok, n, hd, nullptr,
                                nullptr, P.v_scale + t0, P.v_min + t0, P.kvh, vt);
        for (int64_t ti = 0; ti < P.t; ++ti) {
          const int64_t hi = std::min(kBlock, cut[ti] - j0);
          if (hi <= 0) continue;
          for (int64_t gi = 0; gi < g; ++gi) {
            const int64_t r = ti * g + gi;
            float* pr = part.At(b, s, kv, r);
            const float* q = P.q + ((b * P.t + ti) * P.h + kv * g + gi) * hd;
            RowBlock(q, kp, vp, 0, hi, hd, sqrt_hd, RowState{pr + hd, pr + hd + 1, pr});
          }
        }
      }
    }
    return;
  }
  // The float buffer: positions [max(cut, buf_start), min(p + 1, buf_start + NB)) per row.
  const int64_t end = std::min(max_pos + 1, bstart + P.nbuf);
  for (int64_t j0 = (min_lo / kBlock) * kBlock; j0 < end; j0 += kBlock) {
    for (int64_t kv = 0; kv < P.kvh; ++kv) {
      for (int64_t i = 0; i < kBlock; ++i) {
        const int64_t j = j0 + i;
        if (j < bstart || j >= bstart + P.nbuf) {
          kp[i] = vp[i] = zero;
          continue;
        }
        const int64_t off = ((b * P.nbuf + j % P.nbuf) * P.kvh + kv) * hd;
        kp[i] = P.k_buf + off;
        vp[i] = P.v_buf + off;
      }
      for (int64_t ti = 0; ti < P.t; ++ti) {
        const int64_t lo = std::max<int64_t>(std::max(cut[ti], bstart) - j0, 0);
        const int64_t hi = std::min({kBlock, pos[ti] + 1 - j0, bstart + P.nbuf - j0});
        if (lo >= hi) continue;
        for (int64_t gi = 0; gi < g; ++gi) {
          const int64_t r = ti * g + gi;
          float* pr = part.At(b, part.slots - 1, kv, r);
          const float* q = P.q + ((b * P.t + ti) * P.h + kv * g + gi) * hd;
          RowBlock(q, kp, vp, lo, hi, hd, sqrt_hd, RowState{pr + hd, pr + hd + 1, pr});
        }
      }
    }
  }
}

template <bool kTarget>
void Run(ffi::ThreadPool& pool, const Problem& P, float* out) {
  const int64_t g = P.h / P.kvh, rows = P.t * g, hd = P.hd;
  // Quantized splits per sequence: those holding any key of its rows.
  std::vector<int64_t> n_split(P.b);
  int64_t s_max = 0;
  for (int64_t b = 0; b < P.b; ++b) {
    int64_t mc = 0;
    for (int64_t ti = 0; ti < P.t; ++ti)
      mc = std::max(mc, std::min(FloatStart(P.pos[b * P.t + ti], P.residual), P.q_cap));
    n_split[b] = (mc + kSplit - 1) / kSplit;
    s_max = std::max(s_max, n_split[b]);
  }
  Partials part{std::vector<float>(P.b * (s_max + 1) * P.kvh * rows * (hd + 2)), s_max + 1,
                P.kvh, rows, hd};
  for (int64_t i = 0; i < P.b * (s_max + 1) * P.kvh * rows; ++i) {
    float* pr = part.data.data() + i * (hd + 2);
    pr[hd] = kNeg;  // m; l and acc stay 0
  }
  std::vector<std::pair<int64_t, int64_t>> items;  // (b, s); s == -1: the buffer
  for (int64_t b = 0; b < P.b; ++b) {
    items.emplace_back(b, -1);  // the buffer item first: it is usually the largest
    for (int64_t s = 0; s < n_split[b]; ++s) items.emplace_back(b, s);
  }
  ParallelFor(pool, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> tiles(2 * kBlock * hd + hd + 8, 0.0f);
    float* kt = tiles.data();
    float* vt = kt + kBlock * hd;
    const float* zero = vt + kBlock * hd;
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, s] = items[i];
      RunItem<kTarget>(P, part, b, s, s < 0, kt, vt, zero);
    }
  });
  // Combine each row's partials in a fixed order: splits 0.., then the buffer; a partial holding
  // no key of the row (l == 0) is skipped.
  for (int64_t b = 0; b < P.b; ++b)
    for (int64_t kv = 0; kv < P.kvh; ++kv)
      for (int64_t r = 0; r < rows; ++r) {
        float m_all = kNeg;
        for (int64_t s = 0; s <= s_max; ++s) {
          const float* pr = part.At(b, s, kv, r);
          if (pr[hd + 1] > 0.0f) m_all = std::max(m_all, pr[hd]);
        }
        alignas(32) float acc[kMaxHd];
        std::fill(acc, acc + hd, 0.0f);
        float den = 0.0f;
        for (int64_t s = 0; s <= s_max; ++s) {
          const float* pr = part.At(b, s, kv, r);
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

ffi::Error HierAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer,
                             ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> pos,
                             ffi::Buffer<ffi::U8> k_hi, ffi::Buffer<ffi::U8> k_lo,
                             ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> k_min,
                             ffi::Buffer<ffi::U8> v_hi, ffi::Buffer<ffi::U8> v_lo,
                             ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::F32> v_min,
                             ffi::Buffer<ffi::F32> k_buf, ffi::Buffer<ffi::F32> v_buf,
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
  P.k_buf = k_buf.typed_data() + li * bt;
  P.v_buf = v_buf.typed_data() + li * bt;
  P.buf_start = buf_start.typed_data();
  if (P.target)
    Run<true>(pool, P, out->typed_data());
  else
    Run<false>(pool, P, out->typed_data());
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_buf [L, B, NB, kvh, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_buf
                                  .Arg<ffi::Buffer<ffi::S32>>()  // buf_start [B]
                                  .Attr<int64_t>("residual")
                                  .Attr<int64_t>("target")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [B, t, h * hd]
