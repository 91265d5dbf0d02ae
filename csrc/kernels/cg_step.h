// One conjugate-gradient iteration of T independent systems, in place: the vector half of batched CG (the
// caller computes Ap = A_t p_t, e.g. Hessian-vector products, between calls). Torch-free: the same code
// serves the PyTorch extension and the C++ unit tests (csrc/tests/test_cg_step.cpp).
//
// Per task t whose status is kCgActive (the oracle is metakernels/reference/cg_step.py):
//   rs not finite -> kCgNonfinite; rs <= threshold -> kCgConverged          (no step; threshold is on r.r)
//   pAp = p.Ap: not finite -> kCgNonfinite;                                  (no step)
//     CgCurvatureRule::kStop:     pAp <= 0 -> kCgNegativeCurvature           (no step)
//     CgCurvatureRule::kContinue: pAp == 0 -> kCgNegativeCurvature           (no step: breakdown, alpha = inf);
//                                 pAp < 0 steps with alpha < 0 (plain CG, as imaml_dev's and TorchOpt's)
//   alpha = T(rs / pAp): not finite -> kCgNonfinite                          (no step)
//   r -= alpha Ap;  rr = r.r: not finite -> kCgNonfinite                    (x, rs, iterations unchanged)
//   else accepted: x += alpha p; iterations += 1; rs = rr; rr <= threshold -> kCgConverged;
//        beta = T(rr / rs_old): finite -> p = r + beta p, else kCgNonfinite (unless converged)
// Other tasks are not touched. Elementwise arithmetic in T (alpha, beta rounded to T once); dot products
// accumulated in double. Why double: alpha and beta are ratios of dot products over P (up to ~1e8) terms,
// and their errors feed back into every later iteration and into the convergence test on ||r||; double
// accumulation makes them exact to the data's rounding at no cost where it matters (the kernel is
// memory-bound: at DRAM speed the float->double conversions are hidden behind the loads).
//
// Pass structure. alpha needs all of p.Ap before r can be updated, and beta needs all of the new r.r
// before p can be: two dependent reductions, so three phases, each needing the previous one's sums:
//   phase 1: pAp = p.Ap                                   reads p, Ap
//   phase 2: r -= alpha Ap;  rr = r.r                      reads r, Ap;    writes r
//   phase 3: x += alpha p;  p = r + beta p                reads x, p, r;  writes x, p
// The x update rides along with phase 3, which reads p anyway (in phase 2 it would cost one more read of
// p). That is 7 reads + 3 writes of [T, P] per call against the 4 + 3 any implementation must move (x, r,
// p, Ap in; x, r, p out). The 3 extra reads are rereads, and they come from cache: all three phases of a
// task (or of a block of tasks) run before the next task's, so memory traffic is the minimal 7 whenever a
// task's four vectors stay in the last-level cache meanwhile (see cg_step below for the two schedules).
// Measured (benchmarks/bench_cg_step.py, 2 threads, float32, tasks of 250k at 107 MiB-1 GiB working sets):
// 32-37 GB/s counting the 7 units, 74-93% of an in-place triad over the same bytes timed alongside; 8 tasks of
// 5M (80 MB each, no reuse): 26.8 GB/s, 77%; a plain-torch step of the same math: 5.1 GB/s at 1 GiB.
// A task larger than the cache streams 10. (Running phase 2 backwards would let it start on the Ap that
// phase 1 read last, but the descending stream cost more than it saved: 0.87-0.90 vs 0.69 ns per element
// for phase 2 alone at 32M floats, one thread, in 1024-element forward pieces.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace metakernels::kernels {

enum CgStatus : int32_t { kCgActive = 0, kCgConverged = 1, kCgNegativeCurvature = 2, kCgNonfinite = 3 };

// What a task does when p.Ap is not positive (the op's stop_on_negative_curvature). kStop: stop it there (CG's
// iterates minimise 1/2 x^T A x - b^T x only while A is positive definite along every direction taken). kContinue:
// plain CG, which carries on with a negative alpha (the recurrences stay those of the Lanczos process on an
// indefinite A, and after n steps of exact arithmetic reach A^-1 b unless a pivot p.Ap vanishes); only p.Ap == 0,
// where alpha would be infinite, stops the task. A scoped enum rather than a bool: no integer argument of
// cg_step converts to it by mistake.
enum class CgCurvatureRule : bool { kStop, kContinue };

// Split tasks (see cg_step) are grouped into blocks of at most this many bytes of x, r, p and Ap (at least one
// task per block). A block's phases 2 and 3 reread what phases 1 and 2 read, so the block must stay in cache
// meanwhile: an eighth of this machine's 32 MiB L3 (2, 4 and 8 MiB ran alike, 16 MiB 5-10% slower, one
// thread, 64 tasks of 125k floats). Each block costs two barriers.
constexpr int64_t kCgBlockBytes = int64_t{4} << 20;

// Accumulator lanes of the dot products: 16 independent double sums (four AVX2 registers) hide the 4-cycle
// latency of the adds; combined pairwise in a fixed order, so a result depends only on the data and on
// where the thread's column range starts and ends.
constexpr int kCgLanes = 16;

inline double cg_combine(double* acc) {
  for (int w = kCgLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// sum_i a[i] * b[i] in double.
template <typename T>
inline double cg_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  double acc[kCgLanes] = {};
  int64_t i = 0;
  for (; i + kCgLanes <= n; i += kCgLanes)
    for (int j = 0; j < kCgLanes; ++j) acc[j] += double(a[i + j]) * double(b[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc[j] += double(a[i]) * double(b[i]);
  return cg_combine(acc);
}

// r -= alpha * ap over n elements; returns sum_i r_new[i]^2 in double, in the lanes of cg_dot. One forward
// loop: GCC vectorises it (measured, one thread: 0.17-0.18 ns per float element in L2, 0.49 at 32M elements;
// updating 1024-element pieces and summing each with cg_dot from L1 took 0.25 and 0.55-0.61, and walking
// backwards compiled to scalar code).
template <typename T>
inline double cg_residual_update(T* __restrict__ r, const T* __restrict__ ap, T alpha, int64_t n) {
  double acc[kCgLanes] = {};
  int64_t i = 0;
  for (; i + kCgLanes <= n; i += kCgLanes) {
    for (int j = 0; j < kCgLanes; ++j) {
      const T v = r[i + j] - alpha * ap[i + j];
      r[i + j] = v;
      acc[j] += double(v) * double(v);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const T v = r[i] - alpha * ap[i];
    r[i] = v;
    acc[j] += double(v) * double(v);
  }
  return cg_combine(acc);
}

// x += alpha * p, then p = r + beta * p (turn) or p unchanged (!turn).
template <typename T>
inline void cg_direction_update(T* __restrict__ x, T* __restrict__ p, const T* __restrict__ r, T alpha, T beta,
                                bool turn, int64_t n) {
  if (turn) {
    for (int64_t i = 0; i < n; ++i) {
      const T pi = p[i];
      x[i] = x[i] + alpha * pi;
      p[i] = r[i] + beta * pi;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] + alpha * p[i];
  }
}

// The per-task decisions, as pure functions of the reduced dot products and the state before the call, so
// every thread computes the same values without sharing them (and the serial epilogue once more).
template <typename T>
struct CgAlpha {
  bool step;       // take the step
  T alpha;         // when step
  int32_t status;  // when !step: why (kCgNegativeCurvature or kCgNonfinite)
};

template <typename T>
inline CgAlpha<T> cg_alpha(double pap, double rs, CgCurvatureRule rule) {
  if (!std::isfinite(pap)) return {false, T(0), kCgNonfinite};
  const bool stops = rule == CgCurvatureRule::kStop ? !(pap > 0.0) : pap == 0.0;
  if (stops) return {false, T(0), kCgNegativeCurvature};
  const T alpha = T(rs / pap);
  if (!std::isfinite(alpha)) return {false, T(0), kCgNonfinite};
  return {true, alpha, kCgActive};
}

template <typename T>
struct CgBeta {
  bool accept;     // the step stands: x, rs and iterations are updated
  bool turn;       // p = r + beta p
  T beta;
  int32_t status;  // the task's status after the call
};

template <typename T>
inline CgBeta<T> cg_beta(double rr, double rs, double threshold) {
  if (!std::isfinite(rr)) return {false, false, T(0), kCgNonfinite};
  const bool converged = rr <= threshold;
  const T beta = T(rr / rs);
  const bool turn = std::isfinite(beta);
  return {true, turn, beta, converged ? kCgConverged : turn ? kCgActive : kCgNonfinite};
}

// x, r, p, ap: [tasks, cols] row-major contiguous, pairwise disjoint. rs, threshold: [tasks] (double);
// status, iterations: [tasks]. rule: see CgCurvatureRule. block_bytes: see kCgBlockBytes; whole_tasks = false
// splits every task (tests).
//
// Two ways to share the work among the threads:
//  * whole tasks: each thread runs all three phases of its own tasks, one task at a time, with no barrier at
//    all (its dot products are its own), for the largest multiple of the team size of tasks;
//  * split tasks: the rest (fewer tasks than threads) go in blocks of <= block_bytes, every thread taking a
//    column range of each task of the block, partial sums per thread and task, a barrier before alpha and
//    one before beta are known.
// Barriers are what a loaded machine punishes: on this 2-core VM with other jobs running, every OpenMP
// synchronisation point can cost a scheduler time slice (measured: 8 ms for a 250k-element torch add_, 16 ms
// for a split cg_step of the same size, 7% of the in-place triad's rate for 64 split tasks of 125k floats
// against 92-100% whole); whole tasks have none but the end of the parallel region. On a quiet machine
// splitting would keep only one task per team in the cache instead of one per thread, but it did not pay:
// 8 tasks of 1.25M floats (20 MB each) ran at 74% of the triad split and 73% whole.
template <typename T>
void cg_step(T* x, T* r, T* p, const T* ap, double* rs, int32_t* status, int64_t* iterations,
             const double* threshold, CgCurvatureRule rule, int64_t tasks, int64_t cols, int num_threads,
             int64_t block_bytes = kCgBlockBytes, bool whole_tasks = true) {
  // Tasks already converged (or with a non-finite residual) stop before the step; the rest take it.
  std::vector<int64_t> active;
  active.reserve(static_cast<size_t>(tasks));
  for (int64_t t = 0; t < tasks; ++t) {
    if (status[t] != kCgActive) continue;
    if (!std::isfinite(rs[t])) {
      status[t] = kCgNonfinite;
    } else if (rs[t] <= threshold[t]) {
      status[t] = kCgConverged;
    } else {
      active.push_back(t);
    }
  }
  const int64_t num_active = static_cast<int64_t>(active.size());
  if (num_active == 0) return;  // every task has stopped: no memory traffic at all

  const int64_t task_bytes = 4 * cols * static_cast<int64_t>(sizeof(T));
  const int64_t per_block = std::max<int64_t>(1, block_bytes / std::max<int64_t>(1, task_bytes));
  const int nt = effective_threads(num_active, cols, num_threads);
  // Per-thread partial sums [thread][task], rows padded to whole cache lines (no false sharing). A whole task's
  // sums sit in its thread's row, the other rows' entries for it stay 0.
  const int64_t stride = (tasks + 7) / 8 * 8 + 8;
  std::vector<double> pap_part(static_cast<size_t>(nt * stride), 0.0);
  std::vector<double> rr_part(static_cast<size_t>(nt * stride), 0.0);
  auto reduced = [&](const std::vector<double>& part, int64_t t) {
    double s = 0.0;
    for (int j = 0; j < nt; ++j) s += part[static_cast<size_t>(j * stride + t)];
    return s;
  };

  run_team(nt, [&](int tid, int team) {
    double* my_pap = pap_part.data() + tid * stride;
    double* my_rr = rr_part.data() + tid * stride;
    // Whole tasks (all of them on one thread).
    const int64_t num_whole = whole_tasks || team == 1 ? num_active / team * team : 0;
    for (int64_t a = tid; a < num_whole; a += team) {
      const int64_t t = active[a];
      const int64_t at = t * cols;
      my_pap[t] = cg_dot(p + at, ap + at, cols);
      const CgAlpha<T> d = cg_alpha<T>(my_pap[t], rs[t], rule);
      if (!d.step) continue;
      my_rr[t] = cg_residual_update(r + at, ap + at, d.alpha, cols);
      const CgBeta<T> e = cg_beta<T>(my_rr[t], rs[t], threshold[t]);
      if (e.accept) cg_direction_update(x + at, p + at, r + at, d.alpha, e.beta, e.turn, cols);
    }
    // Split tasks, block by block.
    int64_t c0, c1;
    column_range(cols, tid, team, &c0, &c1);
    const int64_t n = c1 - c0;
    for (int64_t a0 = num_whole; a0 < num_active; a0 += per_block) {
      const int64_t a1 = std::min(num_active, a0 + per_block);
      // phase 1: p.Ap
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t at = active[a] * cols + c0;
        my_pap[active[a]] = cg_dot(p + at, ap + at, n);
      }
#pragma omp barrier
      // phase 2: r -= alpha Ap and r.r
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t t = active[a];
        const CgAlpha<T> d = cg_alpha<T>(reduced(pap_part, t), rs[t], rule);
        if (d.step) my_rr[t] = cg_residual_update(r + t * cols + c0, ap + t * cols + c0, d.alpha, n);
      }
#pragma omp barrier
      // phase 3: x += alpha p; p = r + beta p
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t t = active[a];
        const CgAlpha<T> d = cg_alpha<T>(reduced(pap_part, t), rs[t], rule);
        if (!d.step) continue;
        const CgBeta<T> e = cg_beta<T>(reduced(rr_part, t), rs[t], threshold[t]);
        if (!e.accept) continue;
        const int64_t at = t * cols + c0;
        cg_direction_update(x + at, p + at, r + at, d.alpha, e.beta, e.turn, n);
      }
      // No barrier before the next block: it touches other tasks' rows and partial-sum slots.
    }
  });

  // The per-task state, written once the team is done (the team reads rs throughout).
  for (int64_t t : active) {
    const CgAlpha<T> d = cg_alpha<T>(reduced(pap_part, t), rs[t], rule);
    if (!d.step) {
      status[t] = d.status;
      continue;
    }
    const double rr = reduced(rr_part, t);
    const CgBeta<T> e = cg_beta<T>(rr, rs[t], threshold[t]);
    status[t] = e.status;
    if (e.accept) {
      rs[t] = rr;
      iterations[t] += 1;
    }
  }
}

}  // namespace metakernels::kernels
