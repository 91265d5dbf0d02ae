// Reptile's outer interpolation over a [T, P] batch of adapted weights, in one pass:
//   out = theta + epsilon * (mean_t fast[t] - theta)
// Torch-free: shared by the PyTorch extension and the C++ unit tests.
#pragma once

#include <algorithm>
#include <cstdint>

#include "parallel.h"

namespace metakernels::kernels {

template <typename T, typename A>
void reptile_update(const T* theta, const T* fast, A epsilon, T* out, int64_t rows, int64_t cols,
                    int num_threads) {
  const int nt = effective_threads(rows, cols, num_threads);
  const double inv_rows = 1.0 / static_cast<double>(rows);
  run_team(nt, [&](int tid, int team) {
    int64_t begin, end;
    column_range(cols, tid, team, &begin, &end);
    double mean[kColumnTile];
    for (int64_t c0 = begin; c0 < end; c0 += kColumnTile) {
      const int64_t n = std::min(end, c0 + kColumnTile) - c0;
      std::fill(mean, mean + n, 0.0);
      for (int64_t t = 0; t < rows; ++t) {
        const T* row = fast + t * cols + c0;
        for (int64_t i = 0; i < n; ++i) mean[i] += double(row[i]);
      }
      for (int64_t i = 0; i < n; ++i) {
        const A th = A(theta[c0 + i]);
        out[c0 + i] = T(th + epsilon * (A(mean[i] * inv_rows) - th));
      }
    }
  });
}

}  // namespace metakernels::kernels
