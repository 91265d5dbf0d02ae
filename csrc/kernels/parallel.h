// Column partitioning shared by the [T, P] kernels. Torch-free so the kernels build and test without torch.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace metakernels::kernels {

// Below this many elements a kernel runs on the calling thread: waking the OpenMP team costs a few
// microseconds, more than the whole update of a 1e4-element [T, P] batch (measured: ~3 us per call of
// a 2-thread team vs ~1.5 us for 1e4 fused updates on one thread). The learners live in that regime.
constexpr int64_t kParallelGrain = 1 << 15;

// Columns are processed in tiles so that per-column accumulators (a per-coordinate learning-rate
// gradient, a shared theta0 gradient, the Reptile mean) fit in L1 while each row segment of a tile is
// still a long contiguous stream for the hardware prefetcher.
constexpr int64_t kColumnTile = 2048;

inline int effective_threads(int64_t rows, int64_t cols, int requested) {
  if (requested < 1 || rows * cols < kParallelGrain) return 1;
  // At least 256 columns per thread keeps each thread's row segments long enough to stream.
  int64_t by_cols = std::max<int64_t>(1, cols / 256);
  return static_cast<int>(std::min<int64_t>(requested, by_cols));
}

// The column range [begin, end) that thread `tid` of `nthreads` owns.
inline void column_range(int64_t cols, int tid, int nthreads, int64_t* begin, int64_t* end) {
  const int64_t chunk = (cols + nthreads - 1) / nthreads;
  *begin = std::min<int64_t>(cols, tid * chunk);
  *end = std::min<int64_t>(cols, *begin + chunk);
}

// Runs fn(tid, nthreads) on a team of `nthreads` OpenMP threads (or inline when nthreads == 1).
template <typename Fn>
inline void run_team(int nthreads, Fn&& fn) {
#ifdef _OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    fn(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  fn(0, 1);
}

}  // namespace metakernels::kernels
