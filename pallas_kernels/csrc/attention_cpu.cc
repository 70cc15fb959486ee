// CPU kernel (x86-64 AVX2 + FMA) for decode-time attention over the float KV cache, exposed to
// XLA as an FFI handler (see pallas_kernels/cpu_kernels.py, which builds and registers it).
//
// Computes causal grouped-query attention of a few new queries per sequence over one layer's
// float32 or bfloat16 cache, the function of qspec_jax.model.attention.attention without a tree
// mask (queries and output float32; pallas_kernels/cpu_kernels.py converts bfloat16 queries and
// the output at the call boundary, a few KB per call):
//
//   q [B, T, H, D], k / v [B, S, KVH, D], q_positions int32 [B, T]  ->  out [B, T, H * D]
//   out[b, t, h] = sum_{j <= p} softmax_j(q . k_j / sqrt(D)) v_j,  p = q_positions[b, t]
//
// Why it exists: (1) XLA's einsums compute a query row with blocking that depends on how many
// rows the call has, so QSpec's gamma + 1 verification rows could round differently from the
// autoregressive step's one row and flip a float32 near-tie (measured: math-047 in
// experiments/results/eval/check_qspec_equality.json). Here every query row is computed by the
// same operation sequence whatever T, B or the thread: keys 0..p in order, scores, max, exp,
// sum and the weighted sum of values in key order. (2) It reads only the live keys (0..p), not
// the whole cache capacity.
//
// Per row: s_j = dot(q, k_j) / sqrt(D) (8-lane FMA chain over D, lanes summed in a fixed tree);
// m = max_j s_j; e_j = Exp(s_j - m) (the polynomial below, the same in every call);
// l = sum_j e_j in key order; out = (sum_j e_j v_j in key order) / l.
// A bfloat16 cache is read 8 values at a time and converted to float32 in registers (exact:
// bfloat16 is float32's upper half), everything after is the float32 code above, so the result is
// bit for bit the float32 kernel's on the converted cache, with the same row independence.
// Built with -ffp-contract=off (see int4_cpu.cc).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using qspec_cpu::Load8;
using qspec_cpu::ParallelFor;

namespace {


// exp(x) for x <= 0 (scores minus their max), 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r) (relative error ~2e-7), times 2^n built in the exponent bits. Inputs
// below -87 give 0 (their weight is under 1e-38 of the largest).
inline __m256 Exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// One (sequence, query, KV head) unit: the G query heads of the group over keys [0, n).
// Scores go to `s` (G rows of n), probabilities overwrite them; the G outputs go to o.
// KV: float (a float32 cache) or uint16_t (bfloat16 bits).
template <typename KV>
void AttendGroup(const float* q, const KV* k, const KV* v, int64_t n, int64_t g_heads,
                 int64_t d, int64_t kv_stride, float scale_div, float* s, float* o) {
  const int64_t dv = d / 8;
  // scores
  for (int64_t j = 0; j < n; ++j) {
    const KV* kj = k + j * kv_stride;
    for (int64_t g = 0; g < g_heads; ++g) {
      const float* qg = q + g * d;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), Load8(kj));
      for (int64_t i = 1; i < dv; ++i)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * i), Load8(kj + 8 * i), acc);
      s[g * n + j] = qspec_cpu::HSum(acc) / scale_div;
    }
  }
  // softmax weights (unnormalized) and their sums, key order
  std::vector<float> denom(g_heads);
  for (int64_t g = 0; g < g_heads; ++g) {
    float* sg = s + g * n;
    float m = sg[0];
    for (int64_t j = 1; j < n; ++j) m = std::max(m, sg[j]);
    const __m256 mv = _mm256_set1_ps(m);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(sg + j, Exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), mv)));
    if (j < n) {  // tail through a padded buffer: the same Exp8 on every element
      alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = j; i < n; ++i) t[i - j] = sg[i];
      _mm256_store_ps(t, Exp8(_mm256_sub_ps(_mm256_load_ps(t), mv)));
      for (int64_t i = j; i < n; ++i) sg[i] = t[i - j];
    }
    float l = 0.0f;
    for (int64_t i = 0; i < n; ++i) l += sg[i];
    denom[g] = l;
  }
  // weighted values, 32 columns of D at a time so the G accumulators stay in registers
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    const int64_t w = std::min<int64_t>(4, (d - c0) / 8);
    for (int64_t g = 0; g < g_heads; ++g) {
      const float* pg = s + g * n;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(pg[j]);
        const KV* vj = v + j * kv_stride + c0;
        for (int64_t i = 0; i < w; ++i) acc[i] = _mm256_fmadd_ps(pj, Load8(vj + 8 * i), acc[i]);
      }
      const __m256 dn = _mm256_set1_ps(denom[g]);
      for (int64_t i = 0; i < w; ++i)
        _mm256_storeu_ps(o + g * d + c0 + 8 * i, _mm256_div_ps(acc[i], dn));
    }
  }
}

template <typename KV>
void Attend(ffi::ThreadPool& pool, const float* qp, const KV* kp, const KV* vp, const int32_t* pp,
            float* op, int64_t b, int64_t t, int64_t h, int64_t d, int64_t s, int64_t kvh) {
  const int64_t g_heads = h / kvh, units = b * t * kvh;
  const float scale_div = std::sqrt(static_cast<float>(d));
  ParallelFor(pool, units, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t kv = u % kvh, bt = u / kvh, bi = bt / t;
      const int64_t n = std::min<int64_t>(std::max<int32_t>(pp[bt], 0) + 1, s);
      scores.resize(g_heads * n);
      AttendGroup<KV>(qp + (bt * h + kv * g_heads) * d, kp + (bi * s * kvh + kv) * d,
                      vp + (bi * s * kvh + kv) * d, n, g_heads, d, kvh * d, scale_div,
                      scores.data(), op + (bt * h + kv * g_heads) * d);
    }
  });
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::Buffer<ffi::S32> pos,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             pd = pos.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 || kd[0] != qd[0] ||
      vd[0] != qd[0] || kd[1] != vd[1] || kd[2] != vd[2] || kd[3] != qd[3] || vd[3] != qd[3] ||
      pd[0] != qd[0] || pd[1] != qd[1] || qd[2] % kd[2] || qd[3] % 8)
    return ffi::Error::InvalidArgument(
        "attention cpu kernel: need q [B, T, H, D], k / v [B, S, KVH, D], positions [B, T], "
        "H a multiple of KVH, D a multiple of 8");
  const auto kt = k.element_type();
  if (v.element_type() != kt || (kt != ffi::DataType::F32 && kt != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument(
        "attention cpu kernel: k and v must both be float32 or both bfloat16");
  const int64_t b = qd[0], t = qd[1], h = qd[2], d = qd[3], s = kd[1], kvh = kd[2];
  if (kt == ffi::DataType::F32)
    Attend<float>(pool, q.typed_data(), k.typed_data<float>(), v.typed_data<float>(),
                  pos.typed_data(), out->typed_data(), b, t, h, d, s, kvh);
  else
    Attend<uint16_t>(pool, q.typed_data(), k.reinterpret_data<uint16_t>(),
                     v.reinterpret_data<uint16_t>(), pos.typed_data(), out->typed_data(), b, t,
                     h, d, s, kvh);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecAttentionF32, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, H, D]
                                  .Arg<ffi::AnyBuffer>()         // k [B, S, KVH, D] f32 / bf16
                                  .Arg<ffi::AnyBuffer>()         // v (k's dtype)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, T]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [B, T, H * D]
