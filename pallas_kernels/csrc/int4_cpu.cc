// CPU kernels (x86-64 AVX2 + FMA) for the packed int4 layout of pallas_kernels/int4.py, exposed
// to XLA as FFI handlers (see pallas_kernels/cpu_kernels.py, which builds and registers them).
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
// W4AX: int8 activation codes a [M, K] with float32 scales [M, K/Ga]; the same arithmetic as
// pallas_kernels.w4ax_matmul's reference: for each block of c = gcd(G, Ga) rows of K,
// acc = sum a * code in exact int32, then out += (float(acc) * sa) * sw (+ (float(rs) * sa) * mn
// with rs = sum of a over the block, for unsigned codes with mins). Signed codes are read as
// code + 8 in [0, 15] and corrected exactly in int32 (acc = acc' - 8 * rs).
//
// Integer inner loop: vpmaddubsw multiplies unsigned code bytes by signed activation bytes for
// two adjacent rows (r, r+1) of a half tile and adds the pair into int16 (at most
// 2 * 15 * 128 = 3840); eight pairs are summed in int16 (<= 30720 < 32767) before widening to
// int32, so nothing overflows.

inline __m256i PairCodes(__m128i r0, __m128i r1) {
  // 16 columns of two rows -> [r0c0, r1c0, r0c1, r1c1, ...] (column order kept)
  return _mm256_set_m128i(_mm_unpackhi_epi8(r0, r1), _mm_unpacklo_epi8(r0, r1));
}

template <bool kSigned, bool kMins>
void W4AXRow(const int8_t* a, const float* as, int64_t ga, const int32_t* rsum,
             const uint8_t* packed, const float* scales, const float* mins, int64_t k, int64_t n,
             int64_t g, int64_t c, int64_t n0, float* out) {
  // 16 columns [n0, n0 + 16) of one row.
  const __m128i nib = _mm_set1_epi8(0xF);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x88));
  __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
  __m256i blk0 = _mm256_setzero_si256(), blk1 = _mm256_setzero_si256();  // int32, this block
  const int64_t tiles = k / (2 * kHalf);
  // Half-tile h in order 2t (low nibbles) then 2t + 1 (high nibbles); a block closes after the
  // half whose end is a multiple of c.
  for (int64_t t = 0; t < tiles; ++t) {
    __m256i lo32_0 = _mm256_setzero_si256(), lo32_1 = _mm256_setzero_si256();
    __m256i hi32_0 = _mm256_setzero_si256(), hi32_1 = _mm256_setzero_si256();
    const uint8_t* p = packed + t * kHalf * n + n0;
    const int8_t* at = a + t * 2 * kHalf;
    for (int64_t r8 = 0; r8 < kHalf; r8 += 16) {  // 8 pairs of rows, int16 accumulation
      __m256i lo16 = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
      for (int64_t r = r8; r < r8 + 16; r += 2) {
        __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * n));
        __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (r + 1) * n));
        if (kSigned) {
          b0 = _mm_xor_si128(b0, flip);
          b1 = _mm_xor_si128(b1, flip);
        }
        const __m256i lo = PairCodes(_mm_and_si128(b0, nib), _mm_and_si128(b1, nib));
        const __m256i hi = PairCodes(_mm_and_si128(_mm_srli_epi16(b0, 4), nib),
                                     _mm_and_si128(_mm_srli_epi16(b1, 4), nib));
        int16_t alo, ahi;
        std::memcpy(&alo, at + r, 2);
        std::memcpy(&ahi, at + kHalf + r, 2);
        lo16 = _mm256_add_epi16(lo16, _mm256_maddubs_epi16(lo, _mm256_set1_epi16(alo)));
        hi16 = _mm256_add_epi16(hi16, _mm256_maddubs_epi16(hi, _mm256_set1_epi16(ahi)));
      }
      lo32_0 = _mm256_add_epi32(lo32_0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo16)));
      lo32_1 = _mm256_add_epi32(lo32_1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo16, 1)));
      hi32_0 = _mm256_add_epi32(hi32_0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi16)));
      hi32_1 = _mm256_add_epi32(hi32_1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi16, 1)));
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t h = 2 * t + half;
      blk0 = _mm256_add_epi32(blk0, half ? hi32_0 : lo32_0);
      blk1 = _mm256_add_epi32(blk1, half ? hi32_1 : lo32_1);
      if (((h + 1) * kHalf) % c) continue;
      const int64_t b = (h + 1) * kHalf / c - 1;  // block index
      const int64_t row0 = b * c;
      const int32_t rs = rsum[b];
      if (kSigned) {  // acc = acc' - 8 * rs (exact)
        const __m256i corr = _mm256_set1_epi32(8 * rs);
        blk0 = _mm256_sub_epi32(blk0, corr);
        blk1 = _mm256_sub_epi32(blk1, corr);
      }
      const __m256 sa = _mm256_set1_ps(as[row0 / ga]);
      const float* sw = scales + (row0 / g) * n + n0;
      __m256 t0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(blk0), sa), _mm256_loadu_ps(sw));
      __m256 t1 =
          _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(blk1), sa), _mm256_loadu_ps(sw + 8));
      if (kMins) {
        const float* mn = mins + (row0 / g) * n + n0;
        const __m256 rsa = _mm256_set1_ps(static_cast<float>(rs) * as[row0 / ga]);
        t0 = _mm256_add_ps(t0, _mm256_mul_ps(rsa, _mm256_loadu_ps(mn)));
        t1 = _mm256_add_ps(t1, _mm256_mul_ps(rsa, _mm256_loadu_ps(mn + 8)));
      }
      o0 = _mm256_add_ps(o0, t0);
      o1 = _mm256_add_ps(o1, t1);
      blk0 = blk1 = _mm256_setzero_si256();
    }
  }
  _mm256_storeu_ps(out + n0, o0);
  _mm256_storeu_ps(out + n0 + 8, o1);
}

template <bool kSigned, bool kMins>
void W4AX(ffi::ThreadPool& pool, const int8_t* a, const float* as, const uint8_t* packed,
          const float* scales, const float* mins, float* out, int64_t m, int64_t k, int64_t n,
          int64_t g, int64_t ga) {
  int64_t c = g, r = ga;  // c = gcd(G, Ga)
  while (r) {
    const int64_t t = c % r;
    c = r;
    r = t;
  }
  const int64_t blocks = k / c, nga = k / ga;
  std::vector<int32_t> rsum(m * blocks);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t s = 0;
      for (int64_t j = 0; j < c; ++j) s += a[i * k + b * c + j];
      rsum[i * blocks + b] = s;
    }
  constexpr int64_t kCols = 16;
  const int64_t col_blocks = n / kCols;
  ParallelFor(pool, col_blocks, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t cb = b0; cb < b1; ++cb)
      for (int64_t i = 0; i < m; ++i)
        W4AXRow<kSigned, kMins>(a + i * k, as + i * nga, ga, rsum.data() + i * blocks, packed,
                                scales, mins, k, n, g, c, cb * kCols, out + i * n);
  });
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
                    ffi::Buffer<ffi::F32> mins, int64_t has_mins,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto ad = a.dimensions(), sd = a_scales.dimensions();
  if (ad.size() != 2 || sd.size() != 2 || sd[0] != ad[0] || sd[1] < 1 || ad[1] % sd[1])
    return ffi::Error::InvalidArgument("w4ax cpu kernel: a [M, K] and a_scales [M, K/Ga]");
  const int64_t m = ad[0], k = ad[1], n = packed.dimensions()[1], ga = k / sd[1];
  if (ga % kHalf) return ffi::Error::InvalidArgument("w4ax cpu kernel: Ga not a multiple of 32");
  int64_t g;
  if (auto e = CheckWeights(k, n, packed.dimensions(), scales.dimensions(), has_mins,
                            mins.dimensions(), 16, &g);
      e.failure())
    return e;
  const float* mn = has_mins ? mins.typed_data() : nullptr;
  if (has_mins)
    W4AX<false, true>(pool, a.typed_data(), a_scales.typed_data(), packed.typed_data(),
                      scales.typed_data(), mn, out->typed_data(), m, k, n, g, ga);
  else
    W4AX<true, false>(pool, a.typed_data(), a_scales.typed_data(), packed.typed_data(),
                      scales.typed_data(), mn, out->typed_data(), m, k, n, g, ga);
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
