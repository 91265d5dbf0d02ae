// Register-blocked GEMM for the small per-task matrices of the layer ops (task_linear, mlp_loss_grad), plus
// the transposes, activations and task threading they share. Torch-free.
//
//   C[m, n] = init(m, n) + sum_k A(m, k) * B[k, n]
//
// A is read element by element with arbitrary strides (A(m, k) = a[m * a_rs + k * a_cs]), so A or A^T of
// any row-major matrix is an operand without a copy; C is row-major with unit column stride, and so is B
// for this kernel (a GEMM policy that sends large products to BLAS also takes a transposed B). The kernel
// vectorises along n: each step over k broadcasts MR elements of A and loads NV vectors of one row of B,
// and MR x NV vector accumulators stay in registers for the whole k loop. Column tails use masked loads
// and stores, so no operand needs padding and nothing is read or written past the end of a row.
//
// Why not BLAS for these: the matrices of a sinusoid MLP are 40 x 40 with 10 samples. An at::mm call costs
// ~2-3 us before its first flop (measured: 3.4 us against 1.0 us for the whole 16k-MAC product here), and
// the ops make a dozen such products per task. The GEMM policy of the extension (BlasGemm in
// csrc/cpu/layer_common.h) hands products from 128k multiply-adds up to BLAS.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
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
  static float sum(Reg a) { return _mm512_reduce_add_ps(a); }
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
  static double sum(Reg a) { return _mm512_reduce_add_pd(a); }
  static Mask mask(int64_t n) { return n >= kWidth ? Mask(0xFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u); }
};
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA (e.g. AMD EPYC without AVX-512): 8 floats / 4 doubles per register; masked loads and stores
// through vmaskmov, whose masked-off lanes neither fault nor write, so tails need no padding here either.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using Reg = __m256;
  using Mask = __m256i;
  static constexpr int kWidth = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float v) { return _mm256_set1_ps(v); }
  static Reg load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, Reg v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Reg a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  // Lanes [0, n): lane i is on when n > i.
  static Mask mask(int64_t n) {
    const int c = static_cast<int>(std::clamp<int64_t>(n, 0, kWidth));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

template <>
struct Vec<double> {
  using Reg = __m256d;
  using Mask = __m256i;
  static constexpr int kWidth = 4;
  static Reg zero() { return _mm256_setzero_pd(); }
  static Reg set1(double v) { return _mm256_set1_pd(v); }
  static Reg load(const double* p, Mask m) { return _mm256_maskload_pd(p, m); }
  static void store(double* p, Reg v, Mask m) { _mm256_maskstore_pd(p, m, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
  static double sum(Reg a) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static Mask mask(int64_t n) {
    const int64_t c = std::clamp<int64_t>(n, 0, kWidth);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(c), _mm256_setr_epi64x(0, 1, 2, 3));
  }
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
  static T sum(Reg a) { return a; }
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
  // Everything the k loop reads lives in locals: read through g, GCC reloaded the strides every iteration
  // and chained the row addresses (8 dependent adds per step), which made the 40 x 10 x 40 product of the
  // sinusoid MLP 2x slower. One pointer per row of A, each advanced independently.
  const int64_t k = g.k, a_cs = g.a_cs, ldb = g.ldb, ldc = g.ldc;
  const T* ap[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ap[r] = g.a + (i0 + r) * g.a_rs;
  const T* bp = g.b + j0;
  T* c = g.c + i0 * ldc + j0;
  Reg acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      switch (g.init) {
        case GemmInit::kZero:
        default:
          acc[r][v] = V::zero();
          break;
        case GemmInit::kAccumulate:
          acc[r][v] = V::load(c + r * ldc + v * W, masks[v]);
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
  for (int64_t p = 0; p < k; ++p) {
    Reg bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = V::load(bp + v * W, masks[v]);
    bp += ldb;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Reg av = V::set1(*ap[r]);
      ap[r] += a_cs;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(c + r * ldc + v * W, acc[r][v], masks[v]);
  }
}

// Rows are taken 8 at a time (8 x 2 vectors = 16 accumulators + 2 B vectors + 1 broadcast: 19 of the 32
// AVX-512 registers); the remaining 1..7 rows get a tile of their own height. AVX2 has 16 registers: 6 rows
// (12 + 2 + 1 = 15).
#if defined(__AVX512F__)
constexpr int kGemmRows = 8;
#else
constexpr int kGemmRows = 6;
#endif

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

// C [m, 1] = init + A b: a product with one output column (an MLP's scalar head, or the weight gradient
// of a one-input first layer), where the tile kernel would use one lane of each vector. Vectorised along
// m when A's columns are contiguous, else along k (one dot product per row, masked tail).
template <typename T>
inline void small_gemv(const GemmArgs<T>& g) {
  using V = Vec<T>;
  using Reg = typename V::Reg;
  constexpr int W = V::kWidth;
  const int64_t m = g.m, k = g.k, a_rs = g.a_rs, a_cs = g.a_cs, ldb = g.ldb, ldc = g.ldc;
  T* c = g.c;
  for (int64_t i = 0; i < m; ++i) {
    switch (g.init) {
      case GemmInit::kZero: c[i * ldc] = T(0); break;
      case GemmInit::kAccumulate: break;
      case GemmInit::kRowBias: c[i * ldc] = g.bias[i]; break;
      case GemmInit::kColumnBias: c[i * ldc] = g.bias[0]; break;
    }
  }
  if (a_rs == 1 && ldc == 1) {  // c += sum_p b[p] A[:, p]: axpy along the contiguous columns of A
    for (int64_t i0 = 0; i0 < m; i0 += W) {
      const typename V::Mask mk = V::mask(m - i0);
      Reg acc = V::load(c + i0, mk);
      for (int64_t p = 0; p < k; ++p) acc = V::fma(V::load(g.a + p * a_cs + i0, mk), V::set1(g.b[p * ldb]), acc);
      V::store(c + i0, acc, mk);
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    const T* ai = g.a + i * a_rs;
    if (a_cs == 1 && ldb == 1) {
      Reg acc = V::zero();
      for (int64_t p = 0; p < k; p += W) {
        const typename V::Mask mk = V::mask(k - p);
        acc = V::fma(V::load(ai + p, mk), V::load(g.b + p, mk), acc);
      }
      c[i * ldc] += V::sum(acc);
    } else {
      T sum = T(0);
      for (int64_t p = 0; p < k; ++p) sum += ai[p * a_cs] * g.b[p * ldb];
      c[i * ldc] += sum;
    }
  }
}

// C = init + A B with the register-blocked kernel. Column blocks of two vectors (32 floats / 16 doubles):
// a block of B (k x 2 vectors) is reused from L1 by every row tile.
template <typename T>
inline void small_gemm(const GemmArgs<T>& g) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  if (g.m <= 0 || g.n <= 0) return;
  if (g.n == 1 && W > 1) {
    small_gemv(g);
    return;
  }
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

// tanh over a buffer with std::tanh, one element at a time. The extension passes a vectorised one (SLEEF's,
// from libtorch): 8x faster in float32, 3.4x in float64 (400 elements, dev VM).
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

// --- transposes ------------------------------------------------------------------------------------
// The forward products read W^T, which the layers transpose once per call into scratch. A scalar loop
// moves ~1 element per cycle (1600 cycles for a 40 x 40 weight, as long as its product); the AVX-512
// kernels below transpose 16 x 16 floats (8 x 8 doubles) in registers with 64 (24) shuffles.

// dst[j, i] = src[i, j] for a rows x cols row-major src (leading dimension ld_src) into dst (ld_dst).
template <typename T>
inline void transpose_scalar(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 8;  // both the reads and the writes within a few cache lines
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = std::min(cols, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

#if defined(__AVX512F__)
// out[L] = [s[0].lane(L), s[1].lane(L), s[2].lane(L), s[3].lane(L)]: a 4 x 4 transpose of 128-bit lanes.
inline void transpose_lanes(const __m512 s[4], __m512 out[4]) {
  const __m512 x0 = _mm512_shuffle_f32x4(s[0], s[1], 0x88), x1 = _mm512_shuffle_f32x4(s[0], s[1], 0xDD);
  const __m512 x2 = _mm512_shuffle_f32x4(s[2], s[3], 0x88), x3 = _mm512_shuffle_f32x4(s[2], s[3], 0xDD);
  out[0] = _mm512_shuffle_f32x4(x0, x2, 0x88);
  out[2] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
  out[1] = _mm512_shuffle_f32x4(x1, x3, 0x88);
  out[3] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
}

// One block of at most 16 x 16 floats (rows x cols of src), transposed into dst.
inline void transpose_block(const float* src, int64_t ld_src, int rows, int cols, float* dst, int64_t ld_dst) {
  const __mmask16 cm = Vec<float>::mask(cols), rm = Vec<float>::mask(rows);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * ld_src) : _mm512_setzero_ps();
  // t[2p] lane L = (a_2p[4L], a_2p+1[4L], a_2p[4L+1], a_2p+1[4L+1]); t[2p+1] the same for 4L+2, 4L+3
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
  }
  // s[c][q] lane L = (a_4q[4L+c], a_4q+1[4L+c], a_4q+2[4L+c], a_4q+3[4L+c])
  __m512 s[4][4];
  for (int q = 0; q < 4; ++q) {
    const __m512d lo0 = _mm512_castps_pd(t[4 * q]), lo1 = _mm512_castps_pd(t[4 * q + 2]);
    const __m512d hi0 = _mm512_castps_pd(t[4 * q + 1]), hi1 = _mm512_castps_pd(t[4 * q + 3]);
    s[0][q] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    s[1][q] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    s[2][q] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    s[3][q] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  // output row j = 4L + c, lane q = s[c][q].lane(L)
  for (int c = 0; c < 4; ++c) {
    __m512 out[4];
    transpose_lanes(s[c], out);
    for (int l = 0; l < 4; ++l) {
      const int j = 4 * l + c;
      if (j < cols) _mm512_mask_storeu_ps(dst + j * ld_dst, rm, out[l]);
    }
  }
}

inline void transpose_lanes(const __m512d s[4], __m512d out[4]) {
  const __m512d x0 = _mm512_shuffle_f64x2(s[0], s[1], 0x88), x1 = _mm512_shuffle_f64x2(s[0], s[1], 0xDD);
  const __m512d x2 = _mm512_shuffle_f64x2(s[2], s[3], 0x88), x3 = _mm512_shuffle_f64x2(s[2], s[3], 0xDD);
  out[0] = _mm512_shuffle_f64x2(x0, x2, 0x88);
  out[2] = _mm512_shuffle_f64x2(x0, x2, 0xDD);
  out[1] = _mm512_shuffle_f64x2(x1, x3, 0x88);
  out[3] = _mm512_shuffle_f64x2(x1, x3, 0xDD);
}

// One block of at most 8 x 8 doubles.
inline void transpose_block(const double* src, int64_t ld_src, int rows, int cols, double* dst, int64_t ld_dst) {
  const __mmask8 cm = Vec<double>::mask(cols), rm = Vec<double>::mask(rows);
  __m512d r[8];
  for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm512_maskz_loadu_pd(cm, src + i * ld_src) : _mm512_setzero_pd();
  // s[c][p] lane L = (a_2p[2L+c], a_2p+1[2L+c])
  __m512d s[2][4];
  for (int p = 0; p < 4; ++p) {
    s[0][p] = _mm512_unpacklo_pd(r[2 * p], r[2 * p + 1]);
    s[1][p] = _mm512_unpackhi_pd(r[2 * p], r[2 * p + 1]);
  }
  for (int c = 0; c < 2; ++c) {
    __m512d out[4];
    transpose_lanes(s[c], out);
    for (int l = 0; l < 4; ++l) {
      const int j = 2 * l + c;
      if (j < cols) _mm512_mask_storeu_pd(dst + j * ld_dst, rm, out[l]);
    }
  }
}

template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t B = 64 / sizeof(T);
  for (int64_t i0 = 0; i0 < rows; i0 += B)
    for (int64_t j0 = 0; j0 < cols; j0 += B)
      transpose_block(src + i0 * ld_src + j0, ld_src, static_cast<int>(std::min(B, rows - i0)),
                      static_cast<int>(std::min(B, cols - j0)), dst + j0 * ld_dst + i0, ld_dst);
}
#else
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  transpose_scalar(src, rows, cols, ld_src, dst, ld_dst);
}
#endif

// W^T [in, out] of a weight-shaped m [out, in] as the B operand of a layer's forward product: in place when a
// dimension is 1 (W^T then has W's memory layout) or when the policy sends the product to BLAS (which reads
// the transpose through its strides), else from scratch, into which it is transposed when `fill` (a second
// product with the same m reuses it).
template <typename T, typename Gemm>
inline void transposed_operand(const Gemm& gemm, const T* m, int64_t in, int64_t out, int64_t n, T* scratch,
                               bool fill, GemmArgs<T>& g) {
  if (in == 1 || out == 1) {
    g.b = m, g.ldb = in == 1 ? out : 1, g.b_cs = 1;
  } else if (gemm.large(n, out, in)) {
    g.b = m, g.ldb = 1, g.b_cs = in;
  } else {
    if (fill) transpose(m, out, in, in, scratch, out);
    g.b = scratch, g.ldb = out, g.b_cs = 1;
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

// Runs fn(begin, end, scratch) on a team of threads, each with its own range of tasks and its own scratch of
// `elems` elements (one allocation per call, not per task).
template <typename T, typename Fn>
void for_each_task_range(int64_t tasks, int64_t elems, int threads, Fn&& fn) {
  std::unique_ptr<T[]> scratch(new T[static_cast<size_t>(std::max<int64_t>(1, elems * threads))]);
  run_team(threads, [&](int tid, int team) {
    const int64_t begin = tasks * tid / team, end = tasks * (tid + 1) / team;
    if (begin < end) fn(begin, end, scratch.get() + static_cast<int64_t>(tid) * elems);
  });
}

// Runs fn(task, scratch) for every task (see for_each_task_range).
template <typename T, typename Fn>
void for_each_task(int64_t tasks, int64_t elems, int threads, Fn&& fn) {
  for_each_task_range<T>(tasks, elems, threads, [&](int64_t begin, int64_t end, T* scratch) {
    for (int64_t t = begin; t < end; ++t) fn(t, scratch);
  });
}

}  // namespace metakernels::kernels
