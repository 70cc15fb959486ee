// CPU kernel (x86-64 AVX2 + FMA) for the float (non-quantized) linear layers of a decode step:
// x float32 [M, K] times w float32 or bfloat16 [K, N], float32 out [M, N]. Exposed to XLA as an
// FFI handler (QspecFloatLinear; see pallas_kernels/cpu_kernels.py, float_linear_cpu).
//
// Why it exists: QuantSpec's float verification runs gamma + 1 rows through the float target.
// Decoding is bound by reading the weights (SmolLM2-135M: 425 MB of float32 linears a token,
// far beyond the L3), so gamma + 1 rows should cost about one row. XLA:CPU's float32 dot was
// measured at 1.85x one row for 4 rows (experiments/micro_float_linear.py), its bfloat16 dot
// at 0.5 GB/s. This kernel streams w row by row (as XLA's matrix-vector product reads it), each
// weight read once from memory for all M rows, the partial sums kept in the output (L1 / L2).
// It runs on the calling thread only: spread over XLA's thread pool (ParallelFor) the same loop
// was measured 2-4x slower on the loaded 2-core development machine (docs/results.md, "Float
// linears for the float verifier"); on a quiet machine two threads may pay (not done).
//
// Row independence: per output element the operation sequence is acc = 0, then
// acc = fma(x[m, k], w[k, n], acc) for k = 0 .. K-1 in order, in the element's own SIMD lane
// (partial sums stored to out and reloaded between groups of k: exact). Nothing depends on M or
// on the group size used for M, so one row's result is bit-identical whatever other rows share
// the call (QuantSpec's gamma + 1 verification rows see exactly what autoregressive decoding's
// one row sees). It is the float head's sequence too (q8_head_cpu.cc, QspecFloatHead). bfloat16
// weights are converted in registers (exactly). Built with -ffp-contract=off (see int4_cpu.cc).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;  // columns per step (N a multiple of 16)

// Columns [c0, c1) of every row of the output: the partial sums live in out (M x (c1 - c0)
// floats, L1 / L2), zeroed, then for each group of KU rows of w (in order) one contiguous read
// of w[k .. k + KU, c0:c1) (KU streams the prefetchers follow) and, per 16 columns and row r of
// x, out[r, c] = fma(x[r, k + j], w[k + j, c], out[r, c]) for j = 0 .. KU - 1 in order (the
// partial sum in a register, stored once per group: exact). Per output element the sequence
// is out = 0, then one FMA per k in order, whatever M or the column range.
template <int KU, typename W>
inline void RowGroup(const float* x, int64_t m, int64_t k, int64_t d, const W* w, int64_t n,
                     int64_t c0, int64_t c1, float* out) {
  for (int64_t c = c0; c < c1; c += kTile) {
    __m256 w0[KU], w1[KU];
    for (int j = 0; j < KU; ++j) {
      w0[j] = qspec_cpu::Load8(w + (d + j) * n + c);
      w1[j] = qspec_cpu::Load8(w + (d + j) * n + c + 8);
    }
    for (int64_t r = 0; r < m; ++r) {
      float* o = out + r * n + c;
      __m256 a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8);
      for (int j = 0; j < KU; ++j) {
        const __m256 xb = _mm256_broadcast_ss(x + r * k + d + j);
        a0 = _mm256_fmadd_ps(xb, w0[j], a0);
        a1 = _mm256_fmadd_ps(xb, w1[j], a1);
      }
      _mm256_storeu_ps(o, a0);
      _mm256_storeu_ps(o + 8, a1);
    }
  }
}

constexpr int kRowGroup = 4;

template <typename W>
void Columns(const float* x, int64_t m, int64_t k, const W* w, int64_t n, int64_t c0,
             int64_t c1, float* out) {
  for (int64_t r = 0; r < m; ++r) std::fill(out + r * n + c0, out + r * n + c1, 0.0f);
  int64_t d = 0;
  // One or two rows: one row of w at a time (faster in one noisy measurement); more: kRowGroup
  // rows of w per pass (fewer loads and stores of the partial sums). The per-element sequence
  // is the same either way.
  if (m > 2)
    for (; d + kRowGroup <= k; d += kRowGroup) RowGroup<kRowGroup>(x, m, k, d, w, n, c0, c1, out);
  for (; d < k; ++d) RowGroup<1>(x, m, k, d, w, n, c0, c1, out);
}

template <typename W>
void FloatLinear(ffi::ThreadPool& pool, const float* x, const W* w, float* out, int64_t m,
                 int64_t k, int64_t n) {
  (void)pool;  // one thread (see the top of this file)
  Columns(x, m, k, w, n, 0, n, out);
}

ffi::Error FloatLinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[0] != xd[1] || xd[1] < 1 || wd[1] % 16)
    return ffi::Error::InvalidArgument(
        "float linear cpu kernel: need x [M, K], w [K, N], N a multiple of 16");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  if (m == 0) return ffi::Error::Success();
  if (w.element_type() == ffi::DataType::F32)
    FloatLinear(pool, x.typed_data(), w.typed_data<float>(), out->typed_data(), m, k, n);
  else if (w.element_type() == ffi::DataType::BF16)
    FloatLinear(pool, x.typed_data(), w.reinterpret_data<uint16_t>(), out->typed_data(), m, k, n);
  else
    return ffi::Error::InvalidArgument("float linear cpu kernel: w must be float32 or bfloat16");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QspecFloatLinear, FloatLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [M, K]
                                  .Arg<ffi::AnyBuffer>()           // w [K, N] f32 / bf16
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [M, N]
