// Small AVX2 helpers shared by the CPU kernels in this directory.
#ifndef QSPEC_JAX_CSRC_SIMD_H_
#define QSPEC_JAX_CSRC_SIMD_H_

#include <immintrin.h>

#include <cstdint>

namespace qspec_cpu {

// 8 consecutive floats, from float32 or from bfloat16 (uint16_t bits: the float32 with the same
// upper 16 bits, an exact conversion). The kernels that take either dtype read through these, so
// a bfloat16 input computes exactly what the float32 kernel computes on the converted values.
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// dst[0, n) = float32(src[0, n)) for bfloat16 src (n a multiple of 8); exact.
inline void Bf16ToF32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(dst + i, Load8(src + i));
}

// The 8 lanes of v summed in a fixed tree ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)): the same
// rounding in every call, which the kernels' row-independence guarantees rely on.
inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace qspec_cpu

#endif  // QSPEC_JAX_CSRC_SIMD_H_
