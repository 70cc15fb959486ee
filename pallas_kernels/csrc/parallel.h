// Shared by the CPU kernels in this directory (see pallas_kernels/cpu_kernels.py).
#ifndef QSPEC_JAX_CSRC_PARALLEL_H_
#define QSPEC_JAX_CSRC_PARALLEL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace qspec_cpu {

// Runs fn(begin, end) over [0, n) in chunks of at least min_chunk, about two per thread, on the
// calling thread and on XLA's intra-op pool. The caller claims chunks too and waits only for
// chunks another thread has claimed, so it never waits on a task the pool has not started (no
// deadlock when the pool is busy or absent).
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t min_chunk, const F& fn) {
  const int64_t threads = pool.num_threads() + 1;
  const int64_t chunk = std::max<int64_t>(min_chunk, (n + 2 * threads - 1) / (2 * threads));
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    fn(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [state, chunks, chunk, n, f]() {
    for (;;) {
      const int64_t i = state->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= chunks) return;  // a late helper touches nothing but the shared state
      (*f)(i * chunk, std::min(n, (i + 1) * chunk));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

}  // namespace qspec_cpu

#endif  // QSPEC_JAX_CSRC_PARALLEL_H_
