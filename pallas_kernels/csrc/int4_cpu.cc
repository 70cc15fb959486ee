// CPU kernels (x86-64 AVX2 + FMA; the W4AX body also built for AVX-512 VNNI and picked at run
// time) for the packed int4 layout of pallas_kernels/int4.py, exposed to XLA as FFI handlers
// (see pallas_kernels/cpu_kernels.py, which builds and registers them).
//
// Why they exist: XLA:CPU cannot fuse int4 unpacking into a dot, so its path dequantizes every
// weight to a float32 copy (hoisted out of the decode loop: 4 bytes a weight read per token,
// eight times the packed 0.5) and its group-wise int8 dot is a loop of tiny dots. These kernels
// read the packed bytes and dequantize in registers, next to the multiply.
//
// Layout (int4.py): packed[t*32 + r, n] holds code[t*64 + r, n] in its low nibble and
// code[t*64 + 32 + r, n] in its high nibble; scales / mins are [K/G, N] float32, G a multiple
// of 32, so each 32-row half tile lies in one group. Codes are unsigned [0, 15] with mins
// (w = code * scale + min) or signed [-8, 7] without (w = code * scale).
//
// Determinism: every output element is computed by the same sequence of floating-point
// operations whatever M (the number of rows) is and whichever thread computes it, so a row's
// result does not depend on the other rows in the call. That is what keeps QSpec's verification
// (gamma + 1 rows) bit-identical to autoregressive decoding (1 row). Built without -ffast-math
// and with -ffp-contract=off: g++ contracts a * b + c into an FMA by default in C++, and did so
// differently in the two inlined copies of the W4AX row code (the calling thread's and the
// pool's), which made identical calls differ in float32 rounding chunk by chunk.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using qspec_cpu::ParallelFor;

namespace {

constexpr int64_t kHalf = 32;  // rows in a half tile (one nibble plane of 32 packed rows)

// ---------------------------------------------------------------------------------------------
// W4A16: out[m, n] = sum_k x[m, k] * w[k, n], x float32.
//
// Per row and column: for each half tile h (32 rows of K, in order), acc_h = sum over its rows
// of x * code (float32 FMA, rows in order), then out = fma(acc_h, scale, out) and, with mins,
// out = fma(min, xsum_h, out), where xsum_h is the row's sum of x over the half (in order).

// One tile t (64 rows of K) of columns [n0, n0 + 8) for MB rows, added to o[i * n + 0..7].
template <int MB, bool kSigned, bool kMins>
inline void W4A16Tile(const float* x, int64_t k, const float* xsum, const uint8_t* packed,
                      const float* scales, const float* mins, int64_t n, int64_t g, int64_t t,
                      int64_t n0, float* o) {
  const __m256i nib = _mm256_set1_epi32(0xF);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x88));
  const __m256 eight = _mm256_set1_ps(8.0f);
  __m256 al[MB], ah[MB];
  for (int i = 0; i < MB; ++i) al[i] = ah[i] = _mm256_setzero_ps();
  const uint8_t* p = packed + t * kHalf * n + n0;
  const float* xt = x + t * 2 * kHalf;
  for (int64_t r = 0; r < kHalf; ++r) {
    __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + r * n));
    if (kSigned) b8 = _mm_xor_si128(b8, flip);  // nibble ^ 8 = code + 8
    const __m256i b = _mm256_cvtepu8_epi32(b8);
    __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, nib));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    if (kSigned) {
      lo = _mm256_sub_ps(lo, eight);  // exact: small integers
      hi = _mm256_sub_ps(hi, eight);
    }
    for (int i = 0; i < MB; ++i) {
      al[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(xt + i * k + r), lo, al[i]);
      ah[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(xt + i * k + kHalf + r), hi, ah[i]);
    }
  }
  const int64_t gl = (t * 2 * kHalf) / g, gh = (t * 2 * kHalf + kHalf) / g;
  const __m256 sl = _mm256_loadu_ps(scales + gl * n + n0);
  const __m256 sh = _mm256_loadu_ps(scales + gh * n + n0);
  const int64_t halves = k / kHalf;
  for (int i = 0; i < MB; ++i) {
    __m256 acc = _mm256_loadu_ps(o + i * n);
    acc = _mm256_fmadd_ps(al[i], sl, acc);
    if (kMins)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(mins + gl * n + n0),
                            _mm256_set1_ps(xsum[i * halves + 2 * t]), acc);
    acc = _mm256_fmadd_ps(ah[i], sh, acc);
    if (kMins)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(mins + gh * n + n0),
                            _mm256_set1_ps(xsum[i * halves + 2 * t + 1]), acc);
    _mm256_storeu_ps(o + i * n, acc);
  }
}

template <bool kSigned, bool kMins>
void W4A16Rows(int64_t mb, const float* x, int64_t k, const float* xsum, const uint8_t* packed,
               const float* scales, const float* mins, int64_t n, int64_t g, int64_t t, int64_t n0,
               float* o) {
  switch (mb) {
    case 4:
      return W4A16Tile<4, kSigned, kMins>(x, k, xsum, packed, scales, mins, n, g, t, n0, o);
    case 3:
      return W4A16Tile<3, kSigned, kMins>(x, k, xsum, packed, scales, mins, n, g, t, n0, o);
    case 2:
      return W4A16Tile<2, kSigned, kMins>(x, k, xsum, packed, scales, mins, n, g, t, n0, o);
    default:
      return W4A16Tile<1, kSigned, kMins>(x, k, xsum, packed, scales, mins, n, g, t, n0, o);
  }
}

// Memory order: a thread owns a contiguous range of columns and walks K tile by tile; within a
// tile it goes along the packed rows (32 forward streams the prefetchers follow), and for each
// 8-column block it runs every row block while those bytes are in L1. Partial sums live in out.
template <bool kSigned, bool kMins>
void W4A16(ffi::ThreadPool& pool, const float* x, const uint8_t* packed, const float* scales,
           const float* mins, float* out, int64_t m, int64_t k, int64_t n, int64_t g) {
  const int64_t halves = k / kHalf;
  std::vector<float> xsum(kMins ? m * halves : 0);
  if (kMins) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t h = 0; h < halves; ++h) {
        float s = 0.0f;
        for (int64_t r = 0; r < kHalf; ++r) s += x[i * k + h * kHalf + r];
        xsum[i * halves + h] = s;
      }
  }
  const int64_t tiles = k / (2 * kHalf);
  const int64_t col_blocks = n / 8;
  ParallelFor(pool, col_blocks, 8, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * 8, c1 = b1 * 8;
    for (int64_t i = 0; i < m; ++i) std::memset(out + i * n + c0, 0, (c1 - c0) * 4);
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t n0 = c0; n0 < c1; n0 += 8)
        for (int64_t i = 0; i < m; i += 4)
          W4A16Rows<kSigned, kMins>(std::min<int64_t>(4, m - i), x + i * k, k,
                                    kMins ? xsum.data() + i * halves : nullptr, packed, scales,
                                    mins, n, g, t, n0, out + i * n + n0);
  });
}

// ---------------------------------------------------------------------------------------------
// W4AX: int8 activation codes a [M, K] with float32 scales [M, K/Ga]; body in w4ax_body.inc,
// built twice (AVX2 and AVX-512 VNNI) and picked at run time.

// u8 x s8 products of 4 adjacent bytes summed into each int32 lane, exactly (vpdpbusd's result):
// vpmaddubsw pairs them into int16 (at most 2 * 15 * 128 = 3840 for codes <= 15: no saturation),
// vpmaddwd by ones adds the pairs into int32.
inline __m256i DpBusdAvx2(__m256i acc, __m256i u8, __m256i s8) {
  const __m256i pairs = _mm256_maddubs_epi16(u8, s8);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

namespace avx2 {
#define QSPEC_DPBUSD(acc, u, s) DpBusdAvx2(acc, u, s)
#include "w4ax_body.inc"
#undef QSPEC_DPBUSD
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define QSPEC_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#include "w4ax_body.inc"
#undef QSPEC_DPBUSD
}  // namespace vnni
#pragma GCC pop_options

bool CpuHasVnni() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// isa: 0 = the best this CPU has (AVX-512 VNNI, else AVX2), 1 = AVX2 (tests compare the two).
// mins == nullptr: signed codes without mins; otherwise unsigned codes with mins.
template <bool kSigned, bool kMins>
void W4AXDispatch(ffi::ThreadPool& pool, const int8_t* a, const float* as,
                  const uint8_t* packed, const float* scales, const float* mins, float* out,
                  int64_t m, int64_t k, int64_t n, int64_t g, int64_t ga, int64_t isa);

void W4AXRun(ffi::ThreadPool& pool, const int8_t* a, const float* as, const uint8_t* packed,
             const float* scales, const float* mins, float* out, int64_t m, int64_t k, int64_t n,
             int64_t g, int64_t ga, int64_t isa) {
  if (mins)
    W4AXDispatch<false, true>(pool, a, as, packed, scales, mins, out, m, k, n, g, ga, isa);
  else
    W4AXDispatch<true, false>(pool, a, as, packed, scales, mins, out, m, k, n, g, ga, isa);
}

template <bool kSigned, bool kMins>
void W4AXDispatch(ffi::ThreadPool& pool, const int8_t* a, const float* as,
                  const uint8_t* packed, const float* scales, const float* mins, float* out,
                  int64_t m, int64_t k, int64_t n, int64_t g, int64_t ga, int64_t isa) {
  int64_t c = g, r = ga;  // c = gcd(G, Ga): the int32 blocks
  while (r) {
    const int64_t t = c % r;
    c = r;
    r = t;
  }
  const int64_t blocks = k / c;
  std::vector<int32_t> rsum(m * blocks);  // sum of a over each block (mins, signed codes)
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t s = 0;
      for (int64_t j = 0; j < c; ++j) s += a[i * k + b * c + j];
      rsum[i * blocks + b] = s;
    }
  if (isa == 0 && CpuHasVnni())
    vnni::W4AX<2, kSigned, kMins>(pool, a, as, packed, scales, mins, out, m, k, n, g, ga, c,
                                  rsum.data());
  else
    avx2::W4AX<1, kSigned, kMins>(pool, a, as, packed, scales, mins, out, m, k, n, g, ga, c,
                                  rsum.data());
}

// Activation quantization fused in front of the W4AX kernel (pallas_kernels.act_quant's
// reference, exactly): per row and group of Ga values, amax = max |x|, scale = amax * ratio
// (ratio = float32(r / qmax), one float32 product) or 1 where that is not > 0, and
// code = clip(round_half_even(x / scale), -qmax - 1, qmax) with an IEEE float32 division.
void QuantizeRows(const float* x, int64_t m, int64_t k, int64_t ga, float ratio, int32_t qmax,
                  int8_t* codes, float* a_scales) {
  const __m256 lo = _mm256_set1_ps(static_cast<float>(-qmax - 1));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(qmax));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k / ga; ++j) {
      const float* xg = x + i * k + j * ga;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t e = 0; e < ga; e += 8)
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + e)));
      float lanes[8];
      _mm256_storeu_ps(lanes, vmax);
      float amax = 0.0f;
      for (float v : lanes) amax = std::max(amax, v);
      float scale = amax * ratio;
      if (!(scale > 0.0f)) scale = 1.0f;
      a_scales[i * (k / ga) + j] = scale;
      const __m256 vs = _mm256_set1_ps(scale);
      int8_t* cg = codes + i * k + j * ga;
      for (int64_t e = 0; e < ga; e += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xg + e), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        alignas(32) int32_t v[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), _mm256_cvtps_epi32(q));
        for (int t = 0; t < 8; ++t) cg[e + t] = static_cast<int8_t>(v[t]);
      }
    }
}

// ---------------------------------------------------------------------------------------------
// FFI handlers. Shapes are validated in Python (pallas_kernels/cpu_kernels.py) and again here.

ffi::Error CheckWeights(int64_t k, int64_t n, ffi::Span<const int64_t> pd,
                        ffi::Span<const int64_t> sd, int64_t has_mins,
                        ffi::Span<const int64_t> md, int64_t cols, int64_t* g) {
  if (pd.size() != 2 || sd.size() != 2 || pd[0] * 2 != k || pd[1] != n || sd[1] != n ||
      sd[0] < 1 || k % sd[0] || k % (2 * kHalf) || n % cols)
    return ffi::Error::InvalidArgument("int4 cpu kernel: inconsistent weight shapes");
  *g = k / sd[0];
  if (*g % kHalf) return ffi::Error::InvalidArgument("int4 cpu kernel: group not a multiple of 32");
  if (has_mins && (md.size() != 2 || md[0] != sd[0] || md[1] != n))
    return ffi::Error::InvalidArgument("int4 cpu kernel: mins shape differs from scales");
  return ffi::Error::Success();
}

ffi::Error W4A16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                     ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> mins, int64_t has_mins,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("w4a16 cpu kernel: x must be [M, K]");
  const int64_t m = xd[0], k = xd[1], n = packed.dimensions()[1];
  int64_t g;
  if (auto e = CheckWeights(k, n, packed.dimensions(), scales.dimensions(), has_mins,
                            mins.dimensions(), 8, &g);
      e.failure())
    return e;
  const float* mn = has_mins ? mins.typed_data() : nullptr;
  if (has_mins)
    W4A16<false, true>(pool, x.typed_data(), packed.typed_data(), scales.typed_data(), mn,
                       out->typed_data(), m, k, n, g);
  else
    W4A16<true, false>(pool, x.typed_data(), packed.typed_data(), scales.typed_data(), mn,
                       out->typed_data(), m, k, n, g);
  return ffi::Error::Success();
}

ffi::Error W4AXImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::F32> a_scales,
                    ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scales,
                    ffi::Buffer<ffi::F32> mins, int64_t has_mins, int64_t isa,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto ad = a.dimensions(), sd = a_scales.dimensions();
  if (ad.size() != 2 || sd.size() != 2 || sd[0] != ad[0] || sd[1] < 1 || ad[1] % sd[1])
    return ffi::Error::InvalidArgument("w4ax cpu kernel: a [M, K] and a_scales [M, K/Ga]");
  const int64_t m = ad[0], k = ad[1], n = packed.dimensions()[1], ga = k / sd[1];
  if (ga % kHalf) return ffi::Error::InvalidArgument("w4ax cpu kernel: Ga not a multiple of 32");
  int64_t g;
  if (auto e = CheckWeights(k, n, packed.dimensions(), scales.dimensions(), has_mins,
                            mins.dimensions(), 32, &g);
      e.failure())
    return e;
  W4AXRun(pool, a.typed_data(), a_scales.typed_data(), packed.typed_data(), scales.typed_data(),
          has_mins ? mins.typed_data() : nullptr, out->typed_data(), m, k, n, g, ga, isa);
  return ffi::Error::Success();
}

ffi::Error W4AXF32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> scales,
                       ffi::Buffer<ffi::F32> mins, int64_t has_mins, int64_t group_size,
                       int64_t qmax, float ratio, int64_t isa, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("w4ax cpu kernel: x must be [M, K]");
  const int64_t m = xd[0], k = xd[1], n = packed.dimensions()[1];
  const int64_t ga = group_size ? group_size : k;
  if (ga % kHalf || k % ga || (qmax != 7 && qmax != 127))
    return ffi::Error::InvalidArgument("w4ax cpu kernel: Ga must be a multiple of 32 dividing K");
  int64_t g;
  if (auto e = CheckWeights(k, n, packed.dimensions(), scales.dimensions(), has_mins,
                            mins.dimensions(), 32, &g);
      e.failure())
    return e;
  std::vector<int8_t> codes(m * k);
  std::vector<float> a_scales(m * (k / ga));
  QuantizeRows(x.typed_data(), m, k, ga, ratio, static_cast<int32_t>(qmax), codes.data(),
               a_scales.data());
  W4AXRun(pool, codes.data(), a_scales.data(), packed.typed_data(), scales.typed_data(),
          has_mins ? mins.typed_data() : nullptr, out->typed_data(), m, k, n, g, ga, isa);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecW4A16Int4, W4A16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_mins")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecW4AXInt4, W4AXImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_mins")
                                  .Attr<int64_t>("isa")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecW4AXF32Int4, W4AXF32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_mins")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("qmax")
                                  .Attr<float>("ratio")
                                  .Attr<int64_t>("isa")
                                  .Ret<ffi::Buffer<ffi::F32>>());
