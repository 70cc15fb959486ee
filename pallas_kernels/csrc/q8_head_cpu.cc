// CPU kernel (x86-64 AVX2 + FMA) for an int8 LM head in GGUF's Q8_0 layout, exposed to XLA as
// an FFI handler (see pallas_kernels/cpu_kernels.py, which builds and registers it).
//
// Why it exists: the tied LM head of SmolLM2 is a [49152, 576] matrix. As float32 it is 113 MB
// read for every decoded token, more than all packed int4 linears together; the GGUF file stores
// it as Q8_0 (int8 codes, one fp16 scale per 32 values), 28 MB plus scales. This kernel reads the
// int8 codes and converts them in registers.
//
// Computes, for x float32 [M, D], codes int8 [V, D] and scales float32 [V, D/32]:
//
//   out[m, v] = sum over groups g of scales[v, g] * (sum_{i<32} x[m, 32 g + i] * codes[v, 32 g + i])
//
// Per output, the operation sequence is fixed (see Rows): each group's 32 products accumulate in 8
// lanes (one product, three FMAs), the group joins an 8-lane accumulator with one FMA by its
// scale, and the accumulator's lanes are summed in a fixed tree. Nothing depends on M or on which
// thread computes the output, so one row's logits are bit-identical whatever other rows share
// the call (QSpec's gamma + 1 verification rows see exactly what autoregressive decoding's one
// row sees). Built with -ffp-contract=off (see int4_cpu.cc).
//
// The weights are the Q8_0 values exactly (fp16 scale * int8 code is exact in float32), so the
// logits equal x @ W for the float head W up to float32 summation order.
//
// The same file holds the float head (QspecFloatHead): x float32 [M, D] times a float32 or
// bfloat16 matrix w [D, V] (the LM head of a model without Q8_0 codes, e.g. in bfloat16), float32
// out. XLA's dot is not row independent here (measured: bfloat16 [4, 128] x [128, 256] differs
// from four [1, 128] calls by 4e-6; float32 [4, 576] x [576, 49152] by 1.2e-4), which flips greedy
// near-ties between verification and autoregressive decoding. Per output: acc = 0 and
// acc = fma(x[d], w[d], acc) for d = 0.. in order, in the output's own SIMD lane; bfloat16 weights
// are converted in registers (exactly). Nothing depends on M or the thread.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using qspec_cpu::ParallelFor;

namespace {

constexpr int64_t kGroup = 32;

inline __m256 Codes8(const int8_t* c) {  // 8 int8 codes -> 8 floats (exact)
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}


// MB rows of x against one head row v: for each group g in order, per x row
// p = x[0..8) * c[0..8), then p = fma(x[8 j..], c[8 j..], p) for j = 1..3, then
// acc = fma(p, scale_g, acc); finally the 8 lanes of acc summed by HSum (simd.h). The codes come either
// straight from the int8 row (kFromCodes) or from a float copy of it; both hold the same values,
// so the result is the same bits either way.
template <int MB, bool kFromCodes>
inline void Rows(const float* x, int64_t d, const int8_t* c8, const float* cf, const float* s,
                 float* out, int64_t ldo) {
  __m256 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < d / kGroup; ++g) {
    const int64_t o = g * kGroup;
    __m256 c[4];
    for (int j = 0; j < 4; ++j)
      c[j] = kFromCodes ? Codes8(c8 + o + 8 * j) : _mm256_loadu_ps(cf + o + 8 * j);
    const __m256 sv = _mm256_set1_ps(s[g]);
    for (int r = 0; r < MB; ++r) {
      const float* xr = x + r * d + o;
      __m256 p = _mm256_mul_ps(_mm256_loadu_ps(xr), c[0]);
      p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), c[1], p);
      p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), c[2], p);
      p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), c[3], p);
      acc[r] = _mm256_fmadd_ps(p, sv, acc[r]);
    }
  }
  for (int r = 0; r < MB; ++r) out[r * ldo] = qspec_cpu::HSum(acc[r]);
}

// Head rows [v0, v1) for all M rows of x. One x row: codes converted in registers. Several: each
// head row's codes are converted once into a float copy (L1) and read by blocks of 4 x rows.
void Q8Head(const float* x, const int8_t* codes, const float* scales, float* out, int64_t m,
            int64_t d, int64_t n_vocab, int64_t v0, int64_t v1) {
  const int64_t groups = d / kGroup;
  if (m == 1) {
    for (int64_t v = v0; v < v1; ++v)
      Rows<1, true>(x, d, codes + v * d, nullptr, scales + v * groups, out + v, n_vocab);
    return;
  }
  std::vector<float> cf(d);
  for (int64_t v = v0; v < v1; ++v) {
    const int8_t* c = codes + v * d;
    const float* s = scales + v * groups;
    for (int64_t j = 0; j < d; j += 8) _mm256_storeu_ps(cf.data() + j, Codes8(c + j));
    for (int64_t i = 0; i < m; i += 4) {
      const float* xi = x + i * d;
      float* oi = out + i * n_vocab + v;
      switch (std::min<int64_t>(4, m - i)) {
        case 4:
          Rows<4, false>(xi, d, nullptr, cf.data(), s, oi, n_vocab);
          break;
        case 3:
          Rows<3, false>(xi, d, nullptr, cf.data(), s, oi, n_vocab);
          break;
        case 2:
          Rows<2, false>(xi, d, nullptr, cf.data(), s, oi, n_vocab);
          break;
        default:
          Rows<1, false>(xi, d, nullptr, cf.data(), s, oi, n_vocab);
      }
    }
  }
}

ffi::Error Q8HeadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || cd[1] != xd[1] ||
      xd[1] % kGroup || sd[0] != cd[0] || sd[1] * kGroup != cd[1])
    return ffi::Error::InvalidArgument(
        "q8 head cpu kernel: need x [M, D], codes [V, D], scales [V, D/32], D a multiple of 32");
  const int64_t m = xd[0], d = xd[1], n_vocab = cd[0];
  const float* xp = x.typed_data();
  const int8_t* cp = codes.typed_data();
  const float* sp = scales.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, n_vocab, 256, [&](int64_t v0, int64_t v1) {
    Q8Head(xp, cp, sp, op, m, d, n_vocab, v0, v1);
  });
  return ffi::Error::Success();
}

// Float head: rows [0, mb) of x times columns [c0, c0 + kHeadChunk) of w (ld = V), into out.
// Memory order: d outer (each step reads kHeadChunk contiguous weights of row d, a stream the
// prefetchers follow), the chunk's partial sums in out (L1). Per output element the operations
// are out = 0, then out = fma(x[d], w[d], out) for d = 0.. in order, in the element's own lane:
// the same whatever M, the row block or the thread.
constexpr int64_t kHeadChunk = 128;

template <int MB, typename W>
inline void FloatHeadChunk(const float* x, int64_t d, const W* w, int64_t ld, int64_t c0,
                           float* out) {
  for (int r = 0; r < MB; ++r) std::fill(out + r * ld + c0, out + r * ld + c0 + kHeadChunk, 0.0f);
  for (int64_t k = 0; k < d; ++k) {
    const W* wk = w + k * ld + c0;
    __m256 xr[MB];
    for (int r = 0; r < MB; ++r) xr[r] = _mm256_broadcast_ss(x + r * d + k);
    for (int64_t c = 0; c < kHeadChunk; c += 16) {
      const __m256 w0 = qspec_cpu::Load8(wk + c), w1 = qspec_cpu::Load8(wk + c + 8);
      for (int r = 0; r < MB; ++r) {
        float* o = out + r * ld + c0 + c;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(xr[r], w0, _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(xr[r], w1, _mm256_loadu_ps(o + 8)));
      }
    }
  }
}

// Columns of a last partial chunk (V not a multiple of kHeadChunk): the same per-element
// sequence, 16 columns at a time.
template <typename W>
inline void FloatHeadTail(const float* x, int64_t m, int64_t d, const W* w, int64_t ld,
                          int64_t c0, int64_t c1, float* out) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = c0; c < c1; c += 16) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t k = 0; k < d; ++k) {
        const __m256 xv = _mm256_broadcast_ss(x + i * d + k);
        a0 = _mm256_fmadd_ps(xv, qspec_cpu::Load8(w + k * ld + c), a0);
        a1 = _mm256_fmadd_ps(xv, qspec_cpu::Load8(w + k * ld + c + 8), a1);
      }
      _mm256_storeu_ps(out + i * ld + c, a0);
      _mm256_storeu_ps(out + i * ld + c + 8, a1);
    }
}

template <typename W>
void FloatHead(ffi::ThreadPool& pool, const float* x, const W* w, float* out, int64_t m,
               int64_t d, int64_t v) {
  const int64_t chunks = v / kHeadChunk;
  ParallelFor(pool, chunks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = 0; i < m; i += 4) {
        const float* xi = x + i * d;
        float* oi = out + i * v;
        const int64_t c0 = b * kHeadChunk;
        switch (std::min<int64_t>(4, m - i)) {
          case 4:
            FloatHeadChunk<4>(xi, d, w, v, c0, oi);
            break;
          case 3:
            FloatHeadChunk<3>(xi, d, w, v, c0, oi);
            break;
          case 2:
            FloatHeadChunk<2>(xi, d, w, v, c0, oi);
            break;
          default:
            FloatHeadChunk<1>(xi, d, w, v, c0, oi);
        }
      }
  });
  if (chunks * kHeadChunk < v) FloatHeadTail(x, m, d, w, v, chunks * kHeadChunk, v, out);
}

ffi::Error FloatHeadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[0] != xd[1] || xd[1] < 1 || wd[1] % 16)
    return ffi::Error::InvalidArgument(
        "float head cpu kernel: need x [M, D], w [D, V], V a multiple of 16");
  const int64_t m = xd[0], d = xd[1], v = wd[1];
  if (w.element_type() == ffi::DataType::F32)
    FloatHead(pool, x.typed_data(), w.typed_data<float>(), out->typed_data(), m, d, v);
  else if (w.element_type() == ffi::DataType::BF16)
    FloatHead(pool, x.typed_data(), w.reinterpret_data<uint16_t>(), out->typed_data(), m, d, v);
  else
    return ffi::Error::InvalidArgument("float head cpu kernel: w must be float32 or bfloat16");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecFloatHead, FloatHeadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, D]
                                  .Arg<ffi::AnyBuffer>()         // w [D, V] f32 / bf16
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, V]

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecQ8Head, Q8HeadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
