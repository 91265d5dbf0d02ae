// Register-blocked GEMM for the small per-task matrices of the layer ops (task_linear, mlp_loss_grad), plus
// the activation helpers they share. Torch-free: the same code serves the extension and the C++ unit tests.
//
//   C[m, n] = init(m, n) + sum_k A(m, k) * B[k, n]
//
// A is read element by element with arbitrary strides (A(m, k) = a[m * a_rs + k * a_cs]), so A or A^T
// of any row-major matrix is an operand without a copy; C is row-major with unit column stride, and so is
// B for this kernel (a GEMM policy that sends large products to BLAS also takes a transposed B). The kernel vectorises along n: each step over k broadcasts MR elements of A and
// loads NV vectors of one row of B, and MR x NV vector accumulators stay in registers for the whole k
// loop. Column tails use masked loads and stores, so no operand needs padding and nothing is read or
// written past the end of a row.
//
// Why not BLAS for these: the matrices of a sinusoid MLP are 40 x 40 with 10 samples. A sgemm call costs
// ~1 us of dispatch and packing before its first flop, as much as the whole 16k-FMA product here, and the
// ops make a dozen such products per task. The callers hand sufficiently large products to BLAS instead
// (see the Gemm functor in csrc/cpu/*.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace metakernels::kernels {

// ---------------------------------------------------------------------------------------------------
// A vector register type and the handful of operations the kernel needs. AVX-512 where available (the
// extension is built with -march=native); otherwise one scalar "lane", which the compiler may still
// vectorise across the unrolled accumulators. GCC's auto-vectoriser prefers 256-bit vectors on Intel
// cores, and its epilogues are not masked, so the AVX-512 path is written with intrinsics.

#if defined(__AVX512F__)
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float v) { return _mm512_set1_ps(v); }
  static Reg load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Reg v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  // Lanes [0, n) for n in [0, kWidth]; all lanes for n > kWidth; none for n <= 0.
  static Mask mask(int64_t n) {
    return n >= kWidth ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u);
  }
};

template <>
struct Vec<double> {
  using Reg = __m512d;
  using Mask = __mmask8;
  static constexpr int kWidth = 8;
  static Reg zero() { return _mm512_setzero_pd(); }
  static Reg set1(double v) { return _mm512_set1_pd(v); }
  static Reg load(const double* p, Mask m) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(double* p, Reg v, Mask m) { _mm512_mask_storeu_pd(p, m, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_pd(a, b, c); }
  static Mask mask(int64_t n) { return n >= kWidth ? Mask(0xFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u); }
};
#else
template <typename T>
struct Vec {
  using Reg = T;
  using Mask = bool;
  static constexpr int kWidth = 1;
  static Reg zero() { return T(0); }
  static Reg set1(T v) { return v; }
  static Reg load(const T* p, Mask m) { return m ? *p : T(0); }
  static void store(T* p, Reg v, Mask m) {
    if (m) *p = v;
  }
  static Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static Mask mask(int64_t n) { return n > 0; }
};
#endif

// ---------------------------------------------------------------------------------------------------
// GEMM

enum class GemmInit : int {
  kZero = 0,        // C = A B
  kAccumulate = 1,  // C += A B
  kRowBias = 2,     // C[m, :] = bias[m] + (A B)[m, :]
  kColumnBias = 3,  // C[:, n] = bias[n] + (A B)[:, n]
};

template <typename T>
struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const T* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;  // A(i, p) = a[i * a_rs + p * a_cs]
  const T* b = nullptr;
  int64_t ldb = 0;   // B[p, j] = b[p * ldb + j * b_cs]
  int64_t b_cs = 1;  // small_gemm needs 1; only a policy's BLAS path accepts another
  T* c = nullptr;
  int64_t ldc = 0;  // C[i, j] = c[i * ldc + j]
  GemmInit init = GemmInit::kZero;
  const T* bias = nullptr;  // [m] (kRowBias) or [n] (kColumnBias)

  int64_t flops() const { return 2 * m * n * k; }
};

// One MR x (NV * kWidth) tile of C at rows [i0, i0 + MR), columns [j0, j0 + NV * kWidth) (the masks
// cut the last vector to the columns that exist).
template <typename T, int MR, int NV>
inline void gemm_tile(const GemmArgs<T>& g, int64_t i0, int64_t j0, const typename Vec<T>::Mask* masks) {
  using V = Vec<T>;
  using Reg = typename V::Reg;
  constexpr int W = V::kWidth;
  Reg acc[MR][NV];
  T* c = g.c + i0 * g.ldc + j0;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      switch (g.init) {
        case GemmInit::kZero:
          acc[r][v] = V::zero();
          break;
        case GemmInit::kAccumulate:
          acc[r][v] = V::load(c + r * g.ldc + v * W, masks[v]);
          break;
        case GemmInit::kRowBias:
          acc[r][v] = V::set1(g.bias[i0 + r]);
          break;
        case GemmInit::kColumnBias:
          acc[r][v] = V::load(g.bias + j0 + v * W, masks[v]);
          break;
      }
    }
  }
  const T* a = g.a + i0 * g.a_rs;
  const T* b = g.b + j0;
  for (int64_t p = 0; p < g.k; ++p) {
    Reg bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + p * g.ldb + v * W, masks[v]);
    const T* ap = a + p * g.a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Reg av = V::set1(ap[r * g.a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(c + r * g.ldc + v * W, acc[r][v], masks[v]);
  }
}

// Rows are taken 8 at a time (8 x 2 vectors = 16 accumulators + 2 B vectors + 1 broadcast: 19 of the 32
// AVX-512 registers); the remaining 1..7 rows get a tile of their own height.
constexpr int kGemmRows = 8;

template <typename T, int NV>
inline void gemm_column_block(const GemmArgs<T>& g, int64_t j0, const typename Vec<T>::Mask* masks) {
  int64_t i0 = 0;
  for (; i0 + kGemmRows <= g.m; i0 += kGemmRows) gemm_tile<T, kGemmRows, NV>(g, i0, j0, masks);
  switch (g.m - i0) {
    case 1: gemm_tile<T, 1, NV>(g, i0, j0, masks); break;
    case 2: gemm_tile<T, 2, NV>(g, i0, j0, masks); break;
    case 3: gemm_tile<T, 3, NV>(g, i0, j0, masks); break;
    case 4: gemm_tile<T, 4, NV>(g, i0, j0, masks); break;
    case 5: gemm_tile<T, 5, NV>(g, i0, j0, masks); break;
    case 6: gemm_tile<T, 6, NV>(g, i0, j0, masks); break;
    case 7: gemm_tile<T, 7, NV>(g, i0, j0, masks); break;
    default: break;
  }
}

// C = init + A B with the register-blocked kernel. Column blocks of two vectors (32 floats / 16 doubles):
// a block of B (k x 2 vectors) is reused from L1 by every row tile.
template <typename T>
inline void small_gemm(const GemmArgs<T>& g) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  if (g.m <= 0 || g.n <= 0) return;
  for (int64_t j0 = 0; j0 < g.n; j0 += 2 * W) {
    const int64_t cols = std::min<int64_t>(2 * W, g.n - j0);
    const typename V::Mask masks[2] = {V::mask(cols), V::mask(cols - W)};
    if (cols > W) {
      gemm_column_block<T, 2>(g, j0, masks);
    } else {
      gemm_column_block<T, 1>(g, j0, masks);
    }
  }
}

// A GEMM policy decides which kernel computes a product. The kernels call policy(args), and ask
// policy.large(m, n, k) before choosing a data layout: a product the policy calls large may have a
// transposed B (b_cs != 1), since BLAS reads any layout in place where the small kernel would need a copy.
// The default policy: always the small kernel. The extension passes one that sends large products to BLAS.
struct SmallGemm {
  bool large(int64_t, int64_t, int64_t) const { return false; }
  template <typename T>
  void operator()(const GemmArgs<T>& g) const {
    small_gemm(g);
  }
};

// ---------------------------------------------------------------------------------------------------
// activations: derivatives are taken from the activation's output h, which is what the layers keep

enum class Activation : int { kIdentity = 0, kRelu = 1, kTanh = 2 };

// tanh over a buffer with std::tanh, one element at a time. The extension passes a vectorised one (SLEEF,
// as torch.tanh uses), ~15x faster in float32.
struct ScalarTanh {
  template <typename T>
  void operator()(T* x, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
  }
};

// x <- act(x) for n contiguous elements.
template <typename T, typename Tanh>
inline void apply_activation(Activation act, T* x, int64_t n, const Tanh& tanh_fn) {
  switch (act) {
    case Activation::kIdentity:
      return;
    case Activation::kRelu:
      // max(x, 0) keeps NaN where torch.relu does (x > 0 ? x : 0 would turn NaN into 0): x < 0 is false for NaN.
      for (int64_t i = 0; i < n; ++i) x[i] = x[i] < T(0) ? T(0) : x[i];
      return;
    case Activation::kTanh:
      tanh_fn(x, n);
      return;
  }
}

// d act(z) / dz as a function of h = act(z): relu 1[h > 0], tanh 1 - h^2, identity 1.
template <typename T>
inline T activation_slope(Activation act, T h) {
  switch (act) {
    case Activation::kRelu:
      return h > T(0) ? T(1) : T(0);
    case Activation::kTanh:
      return T(1) - h * h;
    case Activation::kIdentity:
    default:
      return T(1);
  }
}

// g <- g * act'(h), elementwise over n contiguous elements. relu selects rather than multiplies, so an
// infinite gradient behind a dead unit stays 0 as in torch's threshold_backward.
template <typename T>
inline void multiply_by_slope(Activation act, T* g, const T* h, int64_t n) {
  switch (act) {
    case Activation::kIdentity:
      return;
    case Activation::kRelu:
      for (int64_t i = 0; i < n; ++i) g[i] = h[i] > T(0) ? g[i] : T(0);
      return;
    case Activation::kTanh:
      for (int64_t i = 0; i < n; ++i) g[i] *= T(1) - h[i] * h[i];
      return;
  }
}

// dst[j, i] = src[i, j] for a rows x cols row-major src (leading dimension ld_src) into dst (ld_dst).
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  // 8 x 8 blocks keep both the reads and the writes within a few cache lines.
  constexpr int64_t kBlock = 8;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = std::min(cols, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// threading over tasks

// Below this many flops per call the tasks run on the calling thread: waking a 2-thread OpenMP team costs
// a few microseconds (see parallel.h), ~100k flops of these kernels.
constexpr int64_t kTaskParallelFlops = int64_t{1} << 19;

inline int task_threads(int64_t tasks, int64_t flops_per_task, int requested) {
  if (requested <= 1 || tasks < 2 || tasks * flops_per_task < kTaskParallelFlops) return 1;
  return static_cast<int>(std::min<int64_t>(requested, tasks));
}

// Runs fn(task, scratch) for every task, on a team of threads each with its own scratch of `elems`.
template <typename T, typename Fn>
void for_each_task(int64_t tasks, int64_t elems, int threads, Fn&& fn) {
  std::unique_ptr<T[]> scratch(new T[static_cast<size_t>(std::max<int64_t>(1, elems * threads))]);
  run_team(threads, [&](int tid, int team) {
    const int64_t begin = tasks * tid / team, end = tasks * (tid + 1) / team;
    T* mine = scratch.get() + static_cast<int64_t>(tid) * elems;
    for (int64_t t = begin; t < end; ++t) fn(t, mine);
  });
}

}  // namespace metakernels::kernels
