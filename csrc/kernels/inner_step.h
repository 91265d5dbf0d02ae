// The fused inner-loop update of T tasks over a [T, P] parameter batch, and its backward. Torch-free:
// the same code serves the PyTorch extension and the C++ unit tests (csrc/tests).
//
//   forward:  out = theta - L * u,   u = grad + prox * (theta - theta0) + weight_decay * theta
//   backward: d_theta = go * (1 - L * (prox + weight_decay)),  d_grad = -L * go,
//             d_lr = -reduce(go * u),  d_theta0 = prox * L * go (summed over tasks when theta0 is shared)
//
// L is the learning rate broadcast to [T, P]: one scalar, one rate per coordinate ([P], Meta-SGD), or one
// rate per contiguous column segment ([S] with offsets [S + 1], one segment per parameter tensor: MAML++'s
// per-layer rates). reduce() sums go * u back to that shape.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace metakernels::kernels {

enum class LrMode : int { kScalar = 0, kPerCoordinate = 1, kSegmented = 2 };

template <typename T>
struct LrSpec {
  LrMode mode = LrMode::kScalar;
  const T* values = nullptr;          // [1], [P] or [S]
  const int64_t* offsets = nullptr;   // [S + 1] when segmented: segment s is columns [offsets[s], offsets[s+1])
  int64_t num_segments = 1;
};

// Calls fn(p0, p1, per_coordinate_rates_or_null, constant_rate, segment) for the sub-spans of columns
// [c0, c1) over which the rate is either constant (scalar / one segment) or read per coordinate.
template <typename T, typename A, typename Fn>
inline void for_each_rate_span(const LrSpec<T>& lr, int64_t c0, int64_t c1, Fn&& fn) {
  switch (lr.mode) {
    case LrMode::kScalar:
      fn(c0, c1, static_cast<const T*>(nullptr), static_cast<A>(lr.values[0]), int64_t{0});
      return;
    case LrMode::kPerCoordinate:
      fn(c0, c1, lr.values + c0, A(0), int64_t{-1});
      return;
    case LrMode::kSegmented: {
      // First segment whose end lies beyond c0; offsets are validated non-decreasing by the caller.
      const int64_t* first = std::upper_bound(lr.offsets + 1, lr.offsets + lr.num_segments + 1, c0);
      for (int64_t s = first - (lr.offsets + 1); s < lr.num_segments && lr.offsets[s] < c1; ++s) {
        const int64_t p0 = std::max(c0, lr.offsets[s]);
        const int64_t p1 = std::min(c1, lr.offsets[s + 1]);
        if (p1 > p0) fn(p0, p1, static_cast<const T*>(nullptr), static_cast<A>(lr.values[s]), s);
      }
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// forward

template <typename T, typename A>
inline void inner_step_span(const T* theta, const T* grad, const T* theta0, const T* rates, A rate,
                            A prox, A wd, T* out, int64_t n) {
  // Four loop variants so each inner loop is branch-free and vectorises.
  if (theta0 != nullptr) {
    if (rates != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const A th = A(theta[i]);
        out[i] = T(th - A(rates[i]) * (A(grad[i]) + prox * (th - A(theta0[i])) + wd * th));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const A th = A(theta[i]);
        out[i] = T(th - rate * (A(grad[i]) + prox * (th - A(theta0[i])) + wd * th));
      }
    }
  } else {
    if (rates != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const A th = A(theta[i]);
        out[i] = T(th - A(rates[i]) * (A(grad[i]) + wd * th));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const A th = A(theta[i]);
        out[i] = T(th - rate * (A(grad[i]) + wd * th));
      }
    }
  }
}

// Outputs of at least this many bytes that alias no input are written with streaming (non-temporal)
// stores. An ordinary store first reads its destination line (write-allocate), so an out-of-place update
// moves 4 bytes over the memory bus for the 3 it needs; a streaming store skips that read. Measured at
// T*P = 1e8 float32 (1.2 GB, out= a separate buffer, 2 threads, dev VM): 18-21 GB/s with ordinary stores,
// 29-31 GB/s streaming, as fast as the in-place update (30-32 GB/s), which has no write-allocate to save.
// Smaller outputs can still be in the L3 (300 MiB here) when the next step reads them, which streaming
// would give up; 64 MiB keeps the step's working set (3x the output) near or beyond the L3.
constexpr int64_t kStreamingBytes = int64_t{64} << 20;
// Elements computed into an L1 buffer, then streamed out. 256 floats ran at 28-29 GB/s where 1024 and 4096
// ran at 25-27 and ~20 (same 1e8 case), the finer interleave of loads and streaming stores being faster.
constexpr int64_t kStreamChunk = 256;

// Copies n bytes from a cache-resident buffer to dst: streaming stores for the whole vectors of dst,
// ordinary ones for a partial vector at either end. The caller issues stream_fence() before the data
// is read by another thread.
inline void stream_copy(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#if defined(__AVX512F__) || defined(__AVX__)
#if defined(__AVX512F__)
  constexpr size_t kVector = 64;
#else
  constexpr size_t kVector = 32;
#endif
  const size_t head = std::min(n, (kVector - reinterpret_cast<uintptr_t>(d) % kVector) % kVector);
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + kVector <= n; i += kVector) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
#endif
  }
  std::memcpy(d + i, s + i, n - i);
#else
  std::memcpy(d, s, n);
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

// theta, grad, out: [rows, cols] row-major contiguous. theta0: null, [cols] (shared) or [rows, cols].
// out may be theta itself (an in-place update).
template <typename T, typename A>
void inner_step_forward(const T* theta, const T* grad, const T* theta0, bool theta0_per_task,
                        const LrSpec<T>& lr, A prox, A wd, T* out, int64_t rows, int64_t cols,
                        int num_threads) {
  const int nt = effective_threads(rows, cols, num_threads);
  const bool streaming = rows * cols * int64_t{sizeof(T)} >= kStreamingBytes && out != theta &&
                         out != grad && out != theta0;
  run_team(nt, [&](int tid, int team) {
    int64_t begin, end;
    column_range(cols, tid, team, &begin, &end);
    alignas(64) T buffer[kStreamChunk];
    for (int64_t c0 = begin; c0 < end; c0 += kColumnTile) {
      const int64_t c1 = std::min(end, c0 + kColumnTile);
      for_each_rate_span<T, A>(lr, c0, c1, [&](int64_t p0, int64_t p1, const T* rates, A rate, int64_t) {
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t row = t * cols;
          const T* t0 = theta0 == nullptr ? nullptr : theta0 + (theta0_per_task ? row : 0) + p0;
          if (!streaming) {
            inner_step_span<T, A>(theta + row + p0, grad + row + p0, t0, rates, rate, prox, wd,
                                  out + row + p0, p1 - p0);
            continue;
          }
          for (int64_t q = p0, n; q < p1; q += n) {
            // Chunks end on a 64-byte boundary of out, so only a row span's two ends write partial lines.
            const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + row + q) % 64);
            n = std::min(kStreamChunk - misaligned / int64_t{sizeof(T)}, p1 - q);
            inner_step_span<T, A>(theta + row + q, grad + row + q, t0 == nullptr ? nullptr : t0 + (q - p0),
                                  rates == nullptr ? nullptr : rates + (q - p0), rate, prox, wd, buffer, n);
            stream_copy(out + row + q, buffer, static_cast<size_t>(n) * sizeof(T));
          }
        }
      });
    }
    if (streaming) stream_fence();
  });
}

// ---------------------------------------------------------------------------------------------------
// backward

// sum_i go[i] * u[i] in double, u = grad + prox * (theta - theta0) + wd * theta: one row span's share of a
// scalar or segmented d_lr. Written inline in inner_step_backward's lambda, this loop was a serial chain of
// scalar double adds (GCC may not reorder them, and does not vectorise it there); as a function of plain
// pointers with an omp simd reduction it runs in eight double lanes, combined in a fixed order (so still
// deterministic). Measured (dev VM, T = 4, d_grad + scalar d_lr, one thread): 9.1 -> 2.8 us at T*P = 1e4,
// 61 -> 21 us at 1e5; the d_lr part alone 4x faster.
template <typename T, typename A>
inline double sum_go_times_direction(const T* go, const T* gr, const T* th, const T* t0, A prox, A wd,
                                     int64_t n) {
  double s = 0.0;
  if (t0 != nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += double(A(go[i]) * (A(gr[i]) + prox * (A(th[i]) - A(t0[i])) + wd * A(th[i])));
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += double(A(go[i]) * (A(gr[i]) + wd * A(th[i])));
  }
  return s;
}

// Which gradients to produce; a null output pointer in InnerStepGrads means "not requested".
template <typename T>
struct InnerStepGrads {
  T* d_theta = nullptr;    // [rows, cols]
  T* d_grad = nullptr;     // [rows, cols]
  T* d_lr = nullptr;       // shape of the rate: [1], [cols] or [S]
  T* d_theta0 = nullptr;   // shape of theta0: [cols] or [rows, cols]
};

template <typename T, typename A>
void inner_step_backward(const T* grad_out, const T* theta, const T* grad, const T* theta0,
                         bool theta0_per_task, const LrSpec<T>& lr, A prox, A wd,
                         const InnerStepGrads<T>& g, int64_t rows, int64_t cols, int num_threads) {
  const int nt = effective_threads(rows, cols, num_threads);
  const A contraction = prox + wd;
  const bool want_lr = g.d_lr != nullptr;
  const bool want_t0 = g.d_theta0 != nullptr && theta0 != nullptr;
  const bool per_coordinate = lr.mode == LrMode::kPerCoordinate;
  // Scalar and segmented rates reduce over columns that several threads own: per-thread partial sums
  // in double, combined once at the end. Per-coordinate rates and a shared theta0 reduce over rows
  // only, so the thread that owns a column owns its sum.
  const int64_t partial_width = per_coordinate ? 0 : lr.num_segments;
  std::vector<double> partials(static_cast<size_t>(nt) * partial_width, 0.0);

  run_team(nt, [&](int tid, int team) {
    int64_t begin, end;
    column_range(cols, tid, team, &begin, &end);
    double* my_partials = partials.data() + static_cast<size_t>(tid) * partial_width;
    double column_lr[kColumnTile];
    double column_t0[kColumnTile];
    for (int64_t c0 = begin; c0 < end; c0 += kColumnTile) {
      const int64_t c1 = std::min(end, c0 + kColumnTile);
      if (want_lr && per_coordinate) std::fill(column_lr, column_lr + (c1 - c0), 0.0);
      if (want_t0 && !theta0_per_task) std::fill(column_t0, column_t0 + (c1 - c0), 0.0);
      for_each_rate_span<T, A>(lr, c0, c1, [&](int64_t p0, int64_t p1, const T* rates, A rate, int64_t seg) {
        const int64_t n = p1 - p0;
        double* col_lr = column_lr + (p0 - c0);
        double* col_t0 = column_t0 + (p0 - c0);
        double span_sum = 0.0;
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t at = t * cols + p0;
          const T* go = grad_out + at;
          const T* th = theta + at;
          const T* gr = grad + at;
          const T* t0 = theta0 == nullptr ? nullptr : theta0 + (theta0_per_task ? at : p0);
          if (g.d_theta != nullptr) {
            T* out = g.d_theta + at;
            if (rates) for (int64_t i = 0; i < n; ++i) out[i] = T(A(go[i]) * (A(1) - A(rates[i]) * contraction));
            else for (int64_t i = 0; i < n; ++i) out[i] = T(A(go[i]) * (A(1) - rate * contraction));
          }
          if (g.d_grad != nullptr) {
            T* out = g.d_grad + at;
            if (rates) for (int64_t i = 0; i < n; ++i) out[i] = T(-A(rates[i]) * A(go[i]));
            else for (int64_t i = 0; i < n; ++i) out[i] = T(-rate * A(go[i]));
          }
          if (want_lr) {
            // u = grad + prox * (theta - theta0) + wd * theta, the direction the rate multiplies.
            if (per_coordinate) {
              if (t0) for (int64_t i = 0; i < n; ++i) col_lr[i] += double(A(go[i]) * (A(gr[i]) + prox * (A(th[i]) - A(t0[i])) + wd * A(th[i])));
              else for (int64_t i = 0; i < n; ++i) col_lr[i] += double(A(go[i]) * (A(gr[i]) + wd * A(th[i])));
            } else {
              span_sum += sum_go_times_direction<T, A>(go, gr, th, t0, prox, wd, n);
            }
          }
          if (want_t0) {
            if (theta0_per_task) {
              T* out = g.d_theta0 + at;
              if (rates) for (int64_t i = 0; i < n; ++i) out[i] = T(prox * A(rates[i]) * A(go[i]));
              else for (int64_t i = 0; i < n; ++i) out[i] = T(prox * rate * A(go[i]));
            } else {
              if (rates) for (int64_t i = 0; i < n; ++i) col_t0[i] += double(prox * A(rates[i]) * A(go[i]));
              else for (int64_t i = 0; i < n; ++i) col_t0[i] += double(prox * rate * A(go[i]));
            }
          }
        }
        if (want_lr && !per_coordinate) my_partials[seg] += span_sum;
      });
      if (want_lr && per_coordinate)
        for (int64_t i = c0; i < c1; ++i) g.d_lr[i] = T(-column_lr[i - c0]);
      if (want_t0 && !theta0_per_task)
        for (int64_t i = c0; i < c1; ++i) g.d_theta0[i] = T(column_t0[i - c0]);
    }
  });

  if (want_lr && !per_coordinate) {
    for (int64_t s = 0; s < partial_width; ++s) {
      double total = 0.0;
      for (int tid = 0; tid < nt; ++tid) total += partials[static_cast<size_t>(tid) * partial_width + s];
      g.d_lr[s] = T(-total);
    }
  }
}

}  // namespace metakernels::kernels
