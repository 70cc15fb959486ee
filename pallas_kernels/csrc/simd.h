// Small AVX2 helpers shared by the CPU kernels in this directory.
#ifndef QSPEC_JAX_CSRC_SIMD_H_
#define QSPEC_JAX_CSRC_SIMD_H_

#include <immintrin.h>

namespace qspec_cpu {

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
