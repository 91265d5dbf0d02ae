// PCGrad in three stages over a [T, P] batch of task gradients G (row stride ld, unit column stride):
//   1. gram:         K = G_s G_s^T over the shared columns (runs of columns), one blocked pass over G;
//   2. coefficients: W [T, T] from K alone (the projection recurrence), single-threaded, O(T^3);
//   3. combine:      out = c^T G over the shared columns, 1^T G over the others, one pass over G.
// Torch-free: shared by the PyTorch extension (csrc/cpu/pcgrad.cpp) and C++ tests.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace metakernels::kernels::pcgrad {

// A maximal range [begin, end) of shared columns. No mask: the one run [0, P).
struct Run {
  int64_t begin;
  int64_t end;
};

// Vector width: one register of the widest ISA the extension is compiled for (-march=native): 64 bytes with
// AVX-512 (32 registers), 32 with AVX2 (16 registers). A wider GCC vector than the ISA's registers is split
// by the compiler, and the register tiles below then spill: on an AVX2-only EPYC, 64-byte vectors with the
// AVX-512 tile sizes ran the T = 64, P = 1e6 Gram at ~10 GFLOP/s. L is the (unaligned, aliasing) load type.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(kVecBytes)));
  typedef T L __attribute__((vector_size(kVecBytes), aligned(sizeof(T)), may_alias));
  static constexpr int kWidth = kVecBytes / int(sizeof(T));
  // Columns per flush of the working-type accumulators into float64: each lane sums at most 128 products in
  // its own type before the partial sums are added in float64, so a float32 entry of K errs by at most
  // gamma_128 = 128 u (7.6e-6 relative, worst case; ~sqrt(128) u typically) of sum_c |g_a,c g_b,c|,
  // however large P is. Flushing costs ~8 vector ops per pair per 128 FMA steps.
  static constexpr int64_t kFlushColumns = 128 * kWidth;
};

typedef double D8 __attribute__((vector_size(64)));
typedef double D4 __attribute__((vector_size(32), may_alias));
typedef float F8 __attribute__((vector_size(32)));

template <typename T>
inline typename Simd<T>::V load(const T* p) {
  return *reinterpret_cast<const typename Simd<T>::L*>(p);
}

// Adds a register accumulator's lanes into a float64 accumulator of 8 lanes (float32: widened; fewer than
// 8 lanes: into the low lanes, the others stay 0). Only the sum of the 8 lanes is used.
template <typename V>
inline void flush(D8* dst, V acc) {
  using E = std::remove_reference_t<decltype(acc[0])>;
  constexpr int lanes = int(sizeof(V) / sizeof(E));
  if constexpr (std::is_same_v<E, double> && lanes == 8) {
    *dst += acc;
  } else if constexpr (std::is_same_v<E, double> && lanes == 4) {
    *reinterpret_cast<D4*>(dst) += acc;
  } else if constexpr (lanes == 8) {
    *dst += __builtin_convertvector(acc, D8);
  } else {
    static_assert(lanes == 16, "float accumulators of 8 or 16 lanes");
    const F8 lo = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7);
    const F8 hi = __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
    *dst += __builtin_convertvector(lo, D8) + __builtin_convertvector(hi, D8);
  }
}

// Rows per register tile. A 4 x 4 tile keeps 16 accumulators, 4 row vectors and one more in registers (21
// of AVX-512's 32) and needs 8 loads per 16 FMAs; a diagonal tile (the same 4 rows) 4 loads per 10 FMAs.
// AVX2 has 16 registers: 3 x 3 (9 + 3 + 1 = 13), 6 loads per 9 FMAs. Measured on one core of a 2-core AVX2
// EPYC (thread CPU time, min of 7, T = 64, P = 1e6, loaded machine): tiles 2/3/4 at 31/33/25 useful GFLOP/s
// (the 4 x 4 tile spills); sub-blocks of 128..1024 columns within noise. The tile tables are 4 x 4 either way.
// With AVX2 this path now serves float64 only: float32 takes the AVX2 paths further down.
constexpr int kTableTile = 4;
#if defined(__AVX512F__)
constexpr int kTile = 4;
#else
constexpr int kTile = 3;
#endif

// acc[i][j] += G[a0 + i, c] * G[b0 + j, c] over n columns (n a multiple of the vector width), starting
// from and returning to the float accumulators facc[(a0 + i) * rows + b0 + j] (in the working type).
// DIAG: a0 == b0 and only pairs i <= j are computed.
template <typename T, int MA, int MB, bool DIAG>
void gram_tile(const T* g, int64_t ld, int64_t a0, int64_t b0, int64_t c0, int64_t n,
               typename Simd<T>::V* facc, int64_t rows) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  V acc[MA][MB];
#pragma GCC unroll 8
  for (int i = 0; i < MA; ++i)
#pragma GCC unroll 8
    for (int j = DIAG ? i : 0; j < MB; ++j) acc[i][j] = facc[(a0 + i) * rows + b0 + j];
  const T* pa[MA];
  const T* pb[MB];
  for (int i = 0; i < MA; ++i) pa[i] = g + (a0 + i) * ld + c0;
  for (int j = 0; j < MB; ++j) pb[j] = g + (b0 + j) * ld + c0;
  for (int64_t c = 0; c < n; c += W) {
    V a[MA];
#pragma GCC unroll 8
    for (int i = 0; i < MA; ++i) a[i] = load(pa[i] + c);
    if constexpr (DIAG) {
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j)
#pragma GCC unroll 8
        for (int i = 0; i <= j; ++i) acc[i][j] += a[i] * a[j];
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) {
        const V b = load(pb[j] + c);
#pragma GCC unroll 8
        for (int i = 0; i < MA; ++i) acc[i][j] += a[i] * b;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MA; ++i)
#pragma GCC unroll 8
    for (int j = DIAG ? i : 0; j < MB; ++j) facc[(a0 + i) * rows + b0 + j] = acc[i][j];
}

template <typename T>
using TileFn = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, typename Simd<T>::V*, int64_t);

// off_table<T>()[ma - 1][mb - 1]: the kernel of an ma x mb tile (edge groups are smaller); diag_table<T>()
// [m - 1]: the kernel of a diagonal m x m tile (pairs i <= j only).
template <typename T>
const TileFn<T> (&off_table())[kTableTile][kTableTile] {
  static const TileFn<T> table[kTableTile][kTableTile] = {
      {&gram_tile<T, 1, 1, false>, &gram_tile<T, 1, 2, false>, &gram_tile<T, 1, 3, false>, &gram_tile<T, 1, 4, false>},
      {&gram_tile<T, 2, 1, false>, &gram_tile<T, 2, 2, false>, &gram_tile<T, 2, 3, false>, &gram_tile<T, 2, 4, false>},
      {&gram_tile<T, 3, 1, false>, &gram_tile<T, 3, 2, false>, &gram_tile<T, 3, 3, false>, &gram_tile<T, 3, 4, false>},
      {&gram_tile<T, 4, 1, false>, &gram_tile<T, 4, 2, false>, &gram_tile<T, 4, 3, false>, &gram_tile<T, 4, 4, false>},
  };
  return table;
}
template <typename T>
const TileFn<T> (&diag_table())[kTableTile] {
  static const TileFn<T> table[kTableTile] = {&gram_tile<T, 1, 1, true>, &gram_tile<T, 2, 2, true>,
                                         &gram_tile<T, 3, 3, true>, &gram_tile<T, 4, 4, true>};
  return table;
}

// One chunk of the Gram: the column segments segs, accumulated into dacc (rows x rows float64 vectors,
// upper triangle) and tail (rows x rows doubles, upper triangle); facc (rows x rows working-type vectors)
// must be zero on entry and is zero on exit.
//
// Loop order: per sub-block of kSub columns of all T rows (T * 4 KiB for float: L2-resident), every tile
// (ga <= gb) of the T x T grid runs over it, its register accumulators starting from and returning to
// facc; facc is flushed into float64 every kFlushColumns columns, which bounds the float32 chain of every
// K entry. Measured on one core of the dev VM (CPU time, min of 5): the 4 x 4 tile runs at ~140 GFLOP/s
// with its rows in L1 and ~60-70 GFLOP/s streaming them from L2 (T = 16..64), where the L2 -> L1 path
// (8 vector loads per 16 FMAs) is the limit. Tried and slower here: L1-sized sub-blocks of 128 columns with
// software prefetch of the next block (~50), and 8 x 2 tiles (~35). For float32 with T >= 48 the packed
// path below replaces this one.
template <typename T>
void gram_segments(const T* g, int64_t rows, int64_t ld, const std::vector<Run>& segs, D8* dacc,
                   typename Simd<T>::V* facc, double* tail) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::kWidth;
  constexpr int64_t kFlush = Simd<T>::kFlushColumns;
  constexpr int64_t kSub = kFlush / 2;
  const int64_t groups = (rows + kTile - 1) / kTile;
  const auto& diag = diag_table<T>();
  const auto& off = off_table<T>();
  for (const Run& seg : segs) {
    const int64_t vec_end = seg.begin + (seg.end - seg.begin) / W * W;
    for (int64_t f0 = seg.begin; f0 < vec_end; f0 += kFlush) {
      const int64_t f1 = std::min(vec_end, f0 + kFlush);
      for (int64_t s0 = f0; s0 < f1; s0 += kSub) {
        const int64_t n = std::min(f1, s0 + kSub) - s0;
        for (int64_t ga = 0; ga < groups; ++ga) {
          const int64_t a0 = ga * kTile;
          const int ma = static_cast<int>(std::min<int64_t>(kTile, rows - a0));
          diag[ma - 1](g, ld, a0, a0, s0, n, facc, rows);
          for (int64_t gb = ga + 1; gb < groups; ++gb) {
            const int64_t r0 = gb * kTile;
            const int mb = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
            off[ma - 1][mb - 1](g, ld, a0, r0, s0, n, facc, rows);
          }
        }
      }
      for (int64_t a = 0; a < rows; ++a)
        for (int64_t b = a; b < rows; ++b) {
          flush(&dacc[a * rows + b], facc[a * rows + b]);
          facc[a * rows + b] = V{};
        }
    }
    // The last < W columns of the segment: scalar, straight into float64.
    for (int64_t a = 0; a < rows; ++a)
      for (int64_t b = a; b < rows; ++b) {
        double s = 0.0;
        for (int64_t c = vec_end; c < seg.end; ++c) s += double(g[a * ld + c]) * double(g[b * ld + c]);
        tail[a * rows + b] += s;
      }
  }
}

// --- packed path (float32, T >= 48) ----------------------------------------------------------------------
// The dot-product tiles above stream every row from L2 once per tile, 8 vector loads per 16 FMAs, and the
// L2 -> L1 path caps them near half the FMA peak. For many tasks the Gram is compute-bound, so there the
// classic GEMM structure pays: each block of kPackCols columns is transposed once into panels of 16 rows
// (pk[p][k] = the 16 rows of panel p at column k: T x 512 bytes, L1-resident for T <= 64), and a 16 x 16
// micro-kernel keeps one panel's column in a register and broadcasts the other panel's 16 values from L1
// (1 load + 16 FMAs with embedded broadcasts per column). Diagonal panel pairs compute all 16 x 16 pairs,
// of which 136 are needed: useful fraction T(T+1) / (n(n+1) 256) for n = T/16 panels (0.81 at T = 64, 0.77
// at T = 48, 0.53 at T = 40), hence the threshold. Measured on one core of the loaded dev VM (CPU time,
// interleaved, min of 5), useful GFLOP/s packed vs dot tiles: T = 64: 81 vs 61 and 54 vs 44 (P = 1e5,
// two runs); T = 48: 78 vs 65; T = 40: 55 vs 66; T = 16: 47 vs 62. Each lane sums kPackCols = 128
// products in float32 before float64 takes over: the same error bound as the dot tiles.
typedef float F16 __attribute__((vector_size(64)));
typedef float F16L __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kPackCols = 128;

inline bool use_packed(int64_t rows) {
#if !defined(__AVX512F__)
  return false;  // the 16 x 16 micro-kernel holds 16 accumulators of 64 bytes: AVX-512's register file
#endif
  const int64_t n = (rows + 15) / 16;
  return rows >= 48 && 4 * rows * (rows + 1) >= 3 * n * (n + 1) * 256;
}

// In-register transpose of 16 x 16 floats: butterfly stages h = 8, 4, 2, 1, each exchanging the off-diagonal
// h x h blocks of every 2h x 2h block: for rows i and i + h ((i & h) == 0), row i takes its lanes j with
// (j & h) == 0 and row i + h's lanes j - h into the others, row i + h the remaining lanes of both
// (shuffle indices 0-15 pick from a = row i, 16-31 from b = row i + h).
inline void transpose16(F16* r) {
#define MK_PCGRAD_STAGE(H, LO, HI)                    \
  for (int i = 0; i < 16; ++i)                        \
    if (!(i & H)) {                                   \
      const F16 a = r[i], b = r[i + H];               \
      r[i] = __builtin_shufflevector(a, b, LO);       \
      r[i + H] = __builtin_shufflevector(a, b, HI);   \
    }
#define MK_PCGRAD_L8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define MK_PCGRAD_H8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define MK_PCGRAD_L4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define MK_PCGRAD_H4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define MK_PCGRAD_L2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define MK_PCGRAD_H2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define MK_PCGRAD_L1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define MK_PCGRAD_H1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
  MK_PCGRAD_STAGE(8, MK_PCGRAD_L8, MK_PCGRAD_H8)
  MK_PCGRAD_STAGE(4, MK_PCGRAD_L4, MK_PCGRAD_H4)
  MK_PCGRAD_STAGE(2, MK_PCGRAD_L2, MK_PCGRAD_H2)
  MK_PCGRAD_STAGE(1, MK_PCGRAD_L1, MK_PCGRAD_H1)
#undef MK_PCGRAD_STAGE
#undef MK_PCGRAD_L8
#undef MK_PCGRAD_H8
#undef MK_PCGRAD_L4
#undef MK_PCGRAD_H4
#undef MK_PCGRAD_L2
#undef MK_PCGRAD_H2
#undef MK_PCGRAD_L1
#undef MK_PCGRAD_H1
}

// cd[j][0..16) (column j of the 16 x 16 block, float64) += sum_k A[k][0..16) * B[k][j] over n columns.
inline void micro16(const F16* A, const F16* B, int64_t n, D8* cd, int64_t cd_stride) {
  F16 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = F16{};
  for (int64_t k = 0; k < n; ++k) {
    const F16 a = A[k];
    const float* b = reinterpret_cast<const float*>(B + k);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] += a * b[j];
  }
  for (int j = 0; j < 16; ++j) {
    const F8 lo = __builtin_shufflevector(acc[j], acc[j], 0, 1, 2, 3, 4, 5, 6, 7);
    const F8 hi = __builtin_shufflevector(acc[j], acc[j], 8, 9, 10, 11, 12, 13, 14, 15);
    cd[j * cd_stride] += __builtin_convertvector(lo, D8);
    cd[j * cd_stride + 1] += __builtin_convertvector(hi, D8);
  }
}

// One chunk of the Gram by the packed path: cd is the column-major tp x tp float64 block accumulator
// (tp = T rounded up to 16; entry (a, b), a <= b, at cd[b * tp + a]), tail the rows x rows upper triangle
// of the scalar column tails, pk the packing buffer (tp / 16 * kPackCols vectors).
inline void gram_segments_packed(const float* g, int64_t rows, int64_t ld, const std::vector<Run>& segs, F16* pk,
                                 D8* cd, double* tail) {
  const int64_t panels = (rows + 15) / 16, tp = panels * 16;
  F16 blk[16];
  for (const Run& seg : segs) {
    const int64_t vec_end = seg.begin + (seg.end - seg.begin) / 16 * 16;
    for (int64_t c0 = seg.begin; c0 < vec_end; c0 += kPackCols) {
      const int64_t n = std::min(vec_end, c0 + kPackCols) - c0;
      for (int64_t p = 0; p < panels; ++p)
        for (int64_t k0 = 0; k0 < n; k0 += 16) {
          for (int r = 0; r < 16; ++r) {
            const int64_t row = p * 16 + r;
            blk[r] = row < rows ? *reinterpret_cast<const F16L*>(g + row * ld + c0 + k0) : F16{};
          }
          transpose16(blk);
          for (int r = 0; r < 16; ++r) pk[p * kPackCols + k0 + r] = blk[r];
        }
      for (int64_t ip = 0; ip < panels; ++ip)
        for (int64_t jp = ip; jp < panels; ++jp)
          micro16(pk + ip * kPackCols, pk + jp * kPackCols, n, cd + (jp * 16) * (tp / 8) + ip * 2, tp / 8);
    }
    for (int64_t a = 0; a < rows; ++a)
      for (int64_t b = a; b < rows; ++b) {
        double s = 0.0;
        for (int64_t c = vec_end; c < seg.end; ++c) s += double(g[a * ld + c]) * double(g[b * ld + c]);
        tail[a * rows + b] += s;
      }
  }
}

// --- AVX2 + FMA without AVX-512: float32 paths ---------------------------------------------------------
// The generic dot tiles above reach ~31-33 useful GFLOP/s per core on a Zen 3 EPYC (AVX2, 16 ymm registers,
// 2 FMA pipes of latency 4; 102 GFLOP/s FMA peak per core measured at ~3.2 GHz): 3 x 3 tiles stream their
// rows from L2, and the tiles at the triangle's edges have few FMA chains. Two float32 paths replace them:
//   - small T (< kAvx2PackMinRows): the dot form on L1-sized column sub-blocks, with 3 x 4 / 2 x 6 register
//     tiles that load each vector once (gram_segments_dot);
//   - larger T: each block of kAvx2Kc columns is transposed into 16-row panels and a broadcast micro-kernel
//     (2 vectors x 6 rows: 12 accumulators, 8 loads per 12 FMAs) covers the upper triangle
//     (gram_segments_packed).
// Both prefetch the next column block (software, spread over the micro-kernel calls of the current one).
// Each float32 lane sums at most 128 products before float64 takes over (the bound of kFlushColumns and
// kPackCols), and the chunks and the order of every sum depend on S and T only: the result is bitwise the
// same for any thread count.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define MK_PCGRAD_AVX2 1

// Columns per packed block: the float32 chain of every lane of the micro-kernels is <= 128 products.
constexpr int64_t kAvx2Kc = 128;
// T from which the packed path is used (the dot form below it). Useful GFLOP/s per core, dot vs packed
// (thread CPU time, interleaved, min of 9, loaded 2-core EPYC): T = 24: 35 vs 30; T = 32: 49 vs 48 and 58
// vs 52 (P = 3e5, 1e5); T = 34: 49 vs 45; T = 36: 39 vs 46 and 49 vs 40 (P = 1.5e5, 6e4); T = 38: 40 vs
// 50; T = 40: 41 vs 46; T = 48: 46 vs 60; T = 64: 46 vs 63. The dot form's state (T^2 / 2 vectors of
// float32 lanes: 20 KiB at T = 36) and its ever shorter L1 sub-blocks (~16 KiB / 4T columns) lose there.
constexpr int64_t kAvx2PackMinRows = 36;
// Columns per chunk at least (see gram): a chunk costs a few microseconds of set-up and reduction (T x T
// float64 scratch), ~5 % at 4096 columns for T = 16; 16384 measured 52 -> 55 GFLOP/s (T = 16, P = 1e5).
constexpr int64_t kAvx2MinChunk = 16384;

// Software prefetch (prefetcht1) of the next column block, one instruction per 64-byte line of each row,
// handed out in equal portions between the micro-kernel calls of the current block. The hardware
// prefetchers do not run ahead while the core computes from L1, so without it each block's first touch
// waits for DRAM or L3: T = 64, P = 1e6: 50 -> 59 GFLOP/s; T = 32, P = 3e5: 37 -> 45; T = 16, P = 1e6 (dot
// form): 39 -> 48. Slower: prefetching every 2nd / 4th line only (the hardware does not fill in), two
// blocks ahead, or a whole block inside the packing loop (one burst of 512 lines for T = 64). The
// prefetches themselves cost: compute-only time rose 4.3 -> 5.3 ms at T = 32, P = 3e5.
struct Prefetcher {
  const char* row = nullptr;
  int64_t stride = 0, lines = 0, l = 0, rows_left = 0, total = 0;
  // The columns [c, c + cols) of rows 0..rows-1 starting at b (row stride ld floats).
  void start(const float* b, int64_t ld, int64_t rows, int64_t cols) {
    row = reinterpret_cast<const char*>(b);
    stride = ld * int64_t(sizeof(float));
    lines = (cols + 15) / 16;
    l = 0;
    rows_left = rows;
    total = rows * lines;
  }
  void stop() { rows_left = total = 0; }
  void step(int64_t count) {
    while (count > 0 && rows_left > 0) {
      const int64_t k = std::min(count, lines - l);
      const char* p = row + 64 * l;
      for (int64_t i = 0; i < k; ++i) _mm_prefetch(p + 64 * i, _MM_HINT_T1);
      l += k;
      count -= k;
      if (l == lines) {
        l = 0;
        row += stride;
        --rows_left;
      }
    }
  }
};

// Points pf at the first stretch of at most `cols` columns of segs that starts at column c of segs[s] (or
// at the next segment when c is its end).
inline void prefetch_next(Prefetcher& pf, const float* g, int64_t rows, int64_t ld, const std::vector<Run>& segs,
                          size_t s, int64_t c, int64_t cols) {
  if (c < segs[s].end) {
    pf.start(g + c, ld, rows, std::min(cols, segs[s].end - c));
  } else if (s + 1 < segs.size()) {
    pf.start(g + segs[s + 1].begin, ld, rows, std::min(cols, segs[s + 1].end - segs[s + 1].begin));
  } else {
    pf.stop();
  }
}

// ---- packed path ----
// Layout: panels of 16 rows, pk[(p * kAvx2Kc + k) * 16 + i] = G[16 p + i, column k of the block] (rows >= T
// stay zero): one panel column is one 64-byte line, the two vectors of a strip in the micro-kernel, and
// the transposes of a panel store whole lines in order. (A column-major pk[k][T] with 8-row vectors ran the
// T = 64 block at 64 instead of 76-81 GFLOP/s compute-only: lines shared by two panels, written at
// different times.)
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// dst[q * 16 + i] = src[i * ld + q] for i < valid (0 for valid <= i < 8), q < m (a multiple of 8). With
// the 8 row pointers kept in registers: ~15 cycles per 8 x 8 block from L1 (a generic loop with a
// row-validity test per load took ~29).
inline void pack8(const float* src, int64_t ld, int valid, int64_t m, float* dst) {
  if (valid == 8) {
    const float* r0 = src;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
    const float* r4 = r3 + ld;
    const float* r5 = r4 + ld;
    const float* r6 = r5 + ld;
    const float* r7 = r6 + ld;
    for (int64_t q = 0; q < m; q += 8) {
      __m256 r[8] = {_mm256_loadu_ps(r0 + q), _mm256_loadu_ps(r1 + q), _mm256_loadu_ps(r2 + q),
                     _mm256_loadu_ps(r3 + q), _mm256_loadu_ps(r4 + q), _mm256_loadu_ps(r5 + q),
                     _mm256_loadu_ps(r6 + q), _mm256_loadu_ps(r7 + q)};
      transpose8(r);
      float* d = dst + q * 16;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_store_ps(d + i * 16, r[i]);
    }
    return;
  }
  for (int64_t q = 0; q < m; q += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = i < valid ? _mm256_loadu_ps(src + i * ld + q) : _mm256_setzero_ps();
    transpose8(r);
    for (int i = 0; i < 8; ++i) _mm256_store_ps(dst + (q + i) * 16, r[i]);
  }
}

// Packs the columns [c, c + m) of G into the block columns [f, f + m).
inline void pack_span(const float* g, int64_t rows, int64_t ld, int64_t c, int64_t m, float* pk, int64_t f) {
  const int64_t m8 = m / 8 * 8;
  for (int64_t r0 = 0; r0 < rows; r0 += 8)
    pack8(g + r0 * ld + c, ld, int(std::min<int64_t>(8, rows - r0)), m8,
          pk + ((r0 / 16) * kAvx2Kc + f) * 16 + r0 % 16);
  for (int64_t q = m8; q < m; ++q)
    for (int64_t r = 0; r < rows; ++r) pk[((r / 16) * kAvx2Kc + f + q) * 16 + r % 16] = g[r * ld + c + q];
}

// Adds the 8 float lanes of acc to c[0..8) (float64).
inline void flush8(double* c, __m256 acc) {
  _mm256_storeu_pd(c, _mm256_add_pd(_mm256_loadu_pd(c), _mm256_cvtps_pd(_mm256_castps256_ps128(acc))));
  _mm256_storeu_pd(c + 4, _mm256_add_pd(_mm256_loadu_pd(c + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1))));
}

// Over n <= kAvx2Kc packed columns, with pa a strip's panel (rows a0..a0+15) and pb pointing at row b0 of
// a panel: rows a0..a0+7 x rows b0 + j for j < N1, rows a0..a0+15 x rows b0 + j for N1 <= j < N1 + N2;
// c[j * ldc + i] += the sum for rows a0 + i and b0 + j (float64, after the n columns).
// Measured from L1 (% of FMA peak): 2 x 6 and 2 x 5 at 94-97 %, 1 x 8 and 1 x 12 at ~81 % (a broadcast
// per FMA: the load ports); 2 x 4 at ~63 % while GCC folded the a loads into the FMAs (12 loads per 8).
template <int N1, int N2>
inline void micro(const float* pa, const float* pb, int64_t n, double* c, int64_t ldc) {
  __m256 acc1[N1 > 0 ? N1 : 1], acc2[N2 > 0 ? N2 : 1][2];
#pragma GCC unroll 16
  for (int j = 0; j < N1; ++j) acc1[j] = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int j = 0; j < N2; ++j) acc2[j][0] = acc2[j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    __m256 a0 = _mm256_load_ps(pa);
    __m256 a1 = N2 ? _mm256_load_ps(pa + 8) : a0;
    __asm__("" : "+x"(a0), "+x"(a1));  // loaded once (see dot_strip)
#pragma GCC unroll 16
    for (int j = 0; j < N1; ++j) acc1[j] = _mm256_fmadd_ps(a0, _mm256_broadcast_ss(pb + j), acc1[j]);
#pragma GCC unroll 16
    for (int j = 0; j < N2; ++j) {
      const __m256 b = _mm256_broadcast_ss(pb + N1 + j);
      acc2[j][0] = _mm256_fmadd_ps(a0, b, acc2[j][0]);
      acc2[j][1] = _mm256_fmadd_ps(a1, b, acc2[j][1]);
    }
    pa += 16;
    pb += 16;
  }
#pragma GCC unroll 16
  for (int j = 0; j < N1; ++j) flush8(c + j * ldc, acc1[j]);
#pragma GCC unroll 16
  for (int j = 0; j < N2; ++j) {
    flush8(c + (N1 + j) * ldc, acc2[j][0]);
    flush8(c + (N1 + j) * ldc + 8, acc2[j][1]);
  }
}

typedef void (*MicroFn)(const float*, const float*, int64_t, double*, int64_t);
template <int... J>
constexpr std::array<MicroFn, sizeof...(J)> micro_one(std::integer_sequence<int, J...>) {
  return {&micro<J + 1, 0>...};
}
template <int... J>
constexpr std::array<MicroFn, sizeof...(J)> micro_two(std::integer_sequence<int, J...>) {
  return {&micro<0, J + 1>...};
}
// kMicro1[nb - 1]: 8 rows x nb <= 12 rows; kMicro2[nb - 1]: 16 rows x nb <= 6 rows.
inline constexpr auto kMicro1 = micro_one(std::make_integer_sequence<int, 12>{});
inline constexpr auto kMicro2 = micro_two(std::make_integer_sequence<int, 6>{});

// Runs fn(b0, nb) over [b0, b1) in the fewest pieces of at most nb_max, of near-equal widths.
template <typename Fn>
inline void pieces(int64_t b0, int64_t b1, int64_t nb_max, Fn&& fn) {
  const int64_t count = (b1 - b0 + nb_max - 1) / nb_max;
  for (int64_t p = 0; p < count; ++p) {
    const int64_t nb = (b1 - b0 + (count - p) - 1) / (count - p);
    fn(b0, int(nb));
    b0 += nb;
  }
}

// One micro-kernel call of a block: rows a0.. (a strip) x rows b0..
struct Call {
  MicroFn fn;
  int64_t a0, b0;
};

// The calls covering the upper triangle for `rows` rows. Strips of 16 rows; the diagonal 16 x 16 block in
// two calls (rows a0..a0+7 x a0..a0+9, then all 16 x a0+10..a0+15: 24 FMAs per column for its 136 pairs);
// the other panels in 2 x (<= 6) pieces; a last strip of <= 8 rows in 1 x (<= 12) pieces. FMAs per column
// for T = 64: 288 for the 2080 pairs (8 lanes each: 90 % useful). Tried: the diagonal blocks by lane
// rotations (vperm2f128 + vpalignr, 5 FMAs per 8 x 8 triangle instead of 8): 2-5 % slower, the shuffles
// compete with the FMAs.
inline std::vector<Call> plan_packed(int64_t rows) {
  std::vector<Call> calls;
  for (int64_t a0 = 0; a0 < rows; a0 += 16) {
    if (a0 + 8 >= rows) {
      pieces(a0, rows, 12, [&](int64_t b0, int nb) { calls.push_back({kMicro1[nb - 1], a0, b0}); });
      continue;
    }
    calls.push_back({&micro<8, 2>, a0, a0});
    calls.push_back({&micro<0, 6>, a0, a0 + 10});
    for (int64_t p0 = a0 + 16; p0 < rows; p0 += 16)
      pieces(p0, std::min(rows, p0 + 16), 6, [&](int64_t b0, int nb) { calls.push_back({kMicro2[nb - 1], a0, b0}); });
  }
  return calls;
}

// cd[b * tq + a] += the block's sums (n columns) for rows a <= b; pf advanced in equal portions.
inline void gram_block_packed(const float* pk, const std::vector<Call>& calls, int64_t tq, int64_t n, double* cd,
                              Prefetcher& pf) {
  const int64_t quota = (pf.total + int64_t(calls.size()) - 1) / int64_t(calls.size());
  for (const Call& call : calls) {
    pf.step(quota);
    call.fn(pk + (call.a0 / 16) * kAvx2Kc * 16, pk + (call.b0 / 16) * kAvx2Kc * 16 + call.b0 % 16, n,
            cd + call.b0 * tq + call.a0, tq);
  }
}

// One chunk by the packed path: the columns of segs, kAvx2Kc at a time (a block may span segments, so
// masks of short runs still fill whole blocks), accumulated into cd (tq x tq float64, tq = T rounded up
// to 16). pk: (tq / 16) * kAvx2Kc * 16 floats, rows >= T zero.
inline void gram_segments_packed(const float* g, int64_t rows, int64_t ld, const std::vector<Run>& segs,
                                 const std::vector<Call>& calls, float* pk, double* cd) {
  const int64_t tq = (rows + 15) / 16 * 16;
  int64_t filled = 0;
  Prefetcher pf;
  for (size_t s = 0; s < segs.size(); ++s)
    for (int64_t c = segs[s].begin; c < segs[s].end;) {
      const int64_t take = std::min(kAvx2Kc - filled, segs[s].end - c);
      pack_span(g, rows, ld, c, take, pk, filled);
      filled += take;
      c += take;
      if (filled == kAvx2Kc) {
        prefetch_next(pf, g, rows, ld, segs, s, c, kAvx2Kc);
        gram_block_packed(pk, calls, tq, filled, cd, pf);
        filled = 0;
      }
    }
  pf.stop();
  if (filled) gram_block_packed(pk, calls, tq, filled, cd, pf);
}

// ---- dot form (T < kAvx2PackMinRows) ----
// Lanes are 8 consecutive columns; facc[a * T + b] holds the float32 lanes of pair (a, b). A strip of H
// rows a0.. against NB rows b0.. keeps H NB accumulators and loads H + NB vectors per H NB FMAs; DIAG adds
// the strip's own H (H + 1) / 2 pairs. 3 x 4 (7 loads per 12 FMAs) runs at 94-95 % of the FMA peak from L1
// whether the rows are 32-byte aligned or not, 2 x 6 (8 loads) at 95 % aligned but 85 % on rows 16 bytes
// off (a split load every other vector); 4 x 3 spills (17 registers). The asm statements keep each loaded
// vector in a register: GCC otherwise folds the loads into the FMAs (x reloaded per b row: 14 loads per
// 12 FMAs for 2 x 6), which ran at 45 % of the peak.
template <int H, bool DIAG, int NB>
inline void dot_strip(const float* g, int64_t ld, int64_t rows, int64_t a0, int64_t b0, int64_t c0, int64_t n,
                      __m256* facc) {
  constexpr int ND = DIAG ? H * (H + 1) / 2 : 1;
  const float* xp[H];
  const float* yp[NB > 0 ? NB : 1];
#pragma GCC unroll 4
  for (int i = 0; i < H; ++i) xp[i] = g + (a0 + i) * ld + c0;
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) yp[j] = g + (b0 + j) * ld + c0;
  __m256 d[ND], acc[H][NB > 0 ? NB : 1];
  if (DIAG) {
    int p = 0;
#pragma GCC unroll 4
    for (int i = 0; i < H; ++i)
#pragma GCC unroll 4
      for (int j = i; j < H; ++j, ++p) d[p] = facc[(a0 + i) * rows + a0 + j];
  }
#pragma GCC unroll 4
  for (int i = 0; i < H; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = facc[(a0 + i) * rows + b0 + j];
  for (int64_t c = 0; c < n; c += 8) {
    __m256 x[H];
#pragma GCC unroll 4
    for (int i = 0; i < H; ++i) {
      x[i] = _mm256_loadu_ps(xp[i] + c);
      __asm__("" : "+x"(x[i]));
    }
    if (DIAG) {
      int p = 0;
#pragma GCC unroll 4
      for (int i = 0; i < H; ++i)
#pragma GCC unroll 4
        for (int j = i; j < H; ++j, ++p) d[p] = _mm256_fmadd_ps(x[i], x[j], d[p]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      __m256 y = _mm256_loadu_ps(yp[j] + c);
      __asm__("" : "+x"(y));
#pragma GCC unroll 4
      for (int i = 0; i < H; ++i) acc[i][j] = _mm256_fmadd_ps(x[i], y, acc[i][j]);
    }
  }
  if (DIAG) {
    int p = 0;
#pragma GCC unroll 4
    for (int i = 0; i < H; ++i)
#pragma GCC unroll 4
      for (int j = i; j < H; ++j, ++p) facc[(a0 + i) * rows + a0 + j] = d[p];
  }
#pragma GCC unroll 4
  for (int i = 0; i < H; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) facc[(a0 + i) * rows + b0 + j] = acc[i][j];
}

// All pairs among rows a0..a0+R-1 (R <= 4); columns unrolled U times into separate accumulators (added
// up at the end of the call: every lane's sum only gets shorter chains) so small blocks keep more chains.
template <int R, int U>
inline void dot_diag(const float* g, int64_t ld, int64_t rows, int64_t a0, int64_t /*b0*/, int64_t c0, int64_t n,
                     __m256* facc) {
  constexpr int NP = R * (R + 1) / 2;
  const float* xp[R];
  for (int i = 0; i < R; ++i) xp[i] = g + (a0 + i) * ld + c0;
  __m256 acc[U][NP];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 10
    for (int p = 0; p < NP; ++p) acc[u][p] = _mm256_setzero_ps();
  const int64_t nu = n / (8 * U) * (8 * U);
  for (int64_t c = 0; c < nu; c += 8 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      __m256 x[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) x[i] = _mm256_loadu_ps(xp[i] + c + 8 * u);
      int p = 0;
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
        for (int j = i; j < R; ++j, ++p) acc[u][p] = _mm256_fmadd_ps(x[i], x[j], acc[u][p]);
    }
  }
  for (int64_t c = nu; c < n; c += 8) {  // the last < U vectors
    __m256 x[R];
    for (int i = 0; i < R; ++i) x[i] = _mm256_loadu_ps(xp[i] + c);
    int p = 0;
    for (int i = 0; i < R; ++i)
      for (int j = i; j < R; ++j, ++p) acc[0][p] = _mm256_fmadd_ps(x[i], x[j], acc[0][p]);
  }
  int p = 0;
  for (int i = 0; i < R; ++i)
    for (int j = i; j < R; ++j, ++p) {
      __m256 sum = facc[(a0 + i) * rows + a0 + j];
      for (int u = 0; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][p]);
      facc[(a0 + i) * rows + a0 + j] = sum;
    }
}

typedef void (*DotFn)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, __m256*);
struct DotCall {
  DotFn fn;
  int64_t a0, b0;
};

// The dot-form kernels and their cost: cycles per call over 32 column vectors (n = 256), measured from L1
// through the function pointer with rows 16 bytes off 32-byte alignment (min of two runs of 9 x 20000
// calls; the 2- and 3-row tiles below ~8 accumulators are latency-bound at ~4.3 cycles per vector).
// dot_kinds()[h - 2]: strips of h rows; fused[f]: DIAG with f rows b; plain[nb]: nb rows b.
struct DotStripKind {
  int fused_max, plain_max;
  DotFn fused[5];
  int fused_cost[5];
  DotFn plain[7];
  int plain_cost[7];
};
inline const DotStripKind (&dot_kinds())[2] {
  static const DotStripKind kinds[2] = {
      {4,
       6,
       {&dot_strip<2, true, 0>, &dot_strip<2, true, 1>, &dot_strip<2, true, 2>, &dot_strip<2, true, 3>,
        &dot_strip<2, true, 4>},
       {137, 139, 144, 171, 209},
       {nullptr, &dot_strip<2, false, 1>, &dot_strip<2, false, 2>, &dot_strip<2, false, 3>, &dot_strip<2, false, 4>,
        &dot_strip<2, false, 5>, &dot_strip<2, false, 6>},
       {0, 136, 137, 143, 171, 204, 235}},
      {2,
       4,
       {&dot_strip<3, true, 0>, &dot_strip<3, true, 1>, &dot_strip<3, true, 2>, nullptr, nullptr},
       {142, 157, 201, 0, 0},
       {nullptr, &dot_strip<3, false, 1>, &dot_strip<3, false, 2>, &dot_strip<3, false, 3>, &dot_strip<3, false, 4>,
        nullptr, nullptr},
       {0, 137, 142, 179, 219, 0, 0}},
  };
  return kinds;
}
inline constexpr DotFn kDotDiag[5] = {nullptr, &dot_diag<1, 4>, &dot_diag<2, 2>, &dot_diag<3, 2>, &dot_diag<4, 1>};
inline constexpr int kDotDiagCost[5] = {0, 32, 87, 171, 190};

// The calls covering the upper triangle in the dot form: strips of 2 or 3 rows, each a DIAG kernel with
// its first f rows b then plain pieces, and a last all-pairs block of <= 4 rows; the strip heights, f and
// the pieces minimise the summed cost (dynamic programming over the rows).
inline std::vector<DotCall> plan_dot(int64_t rows) {
  const auto& kinds = dot_kinds();
  constexpr int64_t kInf = INT64_MAX / 4;
  // plain[k][w]: the cheapest split of w rows b into plain pieces of strip kind k; plain_first: its first.
  std::vector<int64_t> plain[2], plain_first[2];
  for (int k = 0; k < 2; ++k) {
    plain[k].assign(rows + 1, 0);
    plain_first[k].assign(rows + 1, 0);
    for (int64_t w = 1; w <= rows; ++w) {
      plain[k][w] = kInf;
      for (int nb = 1; nb <= kinds[k].plain_max && nb <= w; ++nb)
        if (kinds[k].plain_cost[nb] + plain[k][w - nb] < plain[k][w]) {
          plain[k][w] = kinds[k].plain_cost[nb] + plain[k][w - nb];
          plain_first[k][w] = nb;
        }
    }
  }
  // total[a0]: the cheapest plan for rows a0..rows-1; choice[a0]: 0 = the last block, else the strip height.
  std::vector<int64_t> total(rows + 1, kInf), choice(rows + 1, 0), fused_f(rows + 1, 0);
  total[rows] = 0;
  for (int64_t a0 = rows - 1; a0 >= 0; --a0) {
    const int64_t left = rows - a0;
    if (left <= 4) {
      total[a0] = kDotDiagCost[left];
      choice[a0] = 0;
    }
    for (int h = 2; h <= 3; ++h) {
      const DotStripKind& kind = kinds[h - 2];
      const int64_t w = left - h;
      if (w < 1) continue;
      for (int64_t f = 0; f <= std::min<int64_t>(kind.fused_max, w); ++f) {
        const int64_t cost = kind.fused_cost[f] + plain[h - 2][w - f] + total[a0 + h];
        if (cost < total[a0]) {
          total[a0] = cost;
          choice[a0] = h;
          fused_f[a0] = f;
        }
      }
    }
  }
  std::vector<DotCall> calls;
  for (int64_t a0 = 0; a0 < rows;) {
    const int64_t h = choice[a0];
    if (h == 0) {
      calls.push_back({kDotDiag[rows - a0], a0, a0});
      break;
    }
    const DotStripKind& kind = kinds[h - 2];
    const int64_t f = fused_f[a0];
    calls.push_back({kind.fused[f], a0, a0 + h});
    for (int64_t b0 = a0 + h + f; b0 < rows; b0 += plain_first[h - 2][rows - b0])
      calls.push_back({kind.plain[plain_first[h - 2][rows - b0]], a0, b0});
    a0 += h;
  }
  return calls;
}

// One chunk by the dot form: per sub-block of ~16 KiB of G (all T rows: L1-resident while every call
// runs over it), facc flushed into dacc (float64) every 1024 columns (128 products per lane); the last
// < 8 columns of a segment straight into tail in float64. Measured (useful GFLOP/s per core, T = 16):
// sub-blocks of 16 / 24 / 32 KiB at 55.6 / 51.6 / 51.8 (P = 1e5) and 44.3 / 41.2 / 41.7 (P = 1e6); from L1
// the T = 16 plan runs at ~72 GFLOP/s.
// Below 9 rows the hardware prefetchers keep up with the few row streams and the software prefetch only
// costs: useful GFLOP/s per core without / with it (P = 1e6): T = 2: 26 / 20, 3: 33 / 21, 5: 42 / 33,
// 8: 30 / 29; T = 11: 26 / 35.
constexpr int64_t kDotPrefetchMinRows = 9;
inline void gram_segments_dot(const float* g, int64_t rows, int64_t ld, const std::vector<Run>& segs,
                              const std::vector<DotCall>& calls, __m256* facc, D8* dacc, double* tail) {
  constexpr int64_t kFlush = 1024;
  const int64_t sub = std::clamp<int64_t>(16384 / (rows * int64_t(sizeof(float))) / 8 * 8, 64, kFlush);
  const int64_t ncalls = int64_t(calls.size());
  Prefetcher pf;
  for (size_t s = 0; s < segs.size(); ++s) {
    const Run& seg = segs[s];
    const int64_t vec_end = seg.begin + (seg.end - seg.begin) / 8 * 8;
    for (int64_t f0 = seg.begin; f0 < vec_end; f0 += kFlush) {
      const int64_t f1 = std::min(vec_end, f0 + kFlush);
      for (int64_t s0 = f0; s0 < f1; s0 += sub) {
        const int64_t n = std::min(f1, s0 + sub) - s0;
        if (rows >= kDotPrefetchMinRows) prefetch_next(pf, g, rows, ld, segs, s, s0 + n, sub);
        const int64_t quota = (pf.total + ncalls - 1) / ncalls;
        for (const DotCall& call : calls) {
          pf.step(quota);
          call.fn(g, ld, rows, call.a0, call.b0, s0, n, facc);
        }
      }
      for (int64_t a = 0; a < rows; ++a)
        for (int64_t b = a; b < rows; ++b) {
          flush(&dacc[a * rows + b], F8(facc[a * rows + b]));
          facc[a * rows + b] = _mm256_setzero_ps();
        }
    }
    for (int64_t a = 0; a < rows; ++a)
      for (int64_t b = a; b < rows; ++b) {
        double sum = 0.0;
        for (int64_t c = vec_end; c < seg.end; ++c) sum += double(g[a * ld + c]) * double(g[b * ld + c]);
        tail[a * rows + b] += sum;
      }
  }
}
#endif  // AVX2 + FMA without AVX-512

// The columns of shared index [lo, hi) (the shared columns numbered 0..S-1 in order) as segments.
inline std::vector<Run> shared_slice(const std::vector<Run>& runs, int64_t lo, int64_t hi) {
  std::vector<Run> out;
  int64_t seen = 0;
  for (const Run& r : runs) {
    const int64_t len = r.end - r.begin;
    const int64_t s = std::max(lo, seen), e = std::min(hi, seen + len);
    if (s < e) out.push_back({r.begin + (s - seen), r.begin + (e - seen)});
    seen += len;
    if (seen >= hi) break;
  }
  return out;
}

// Runs fn(chunk, tid) for chunk = 0..num_chunks-1 on a team of nthreads, handing chunks out one at a time
// (dynamic schedule). Why not the even static split of parallel.h: on a shared machine a team member that
// is descheduled holds its whole share until it runs again, and the call takes a scheduler time slice
// (measured on the 2-core dev VM under load 5: calls of ~0.1 ms took 16-32 ms); with chunks the running
// thread takes over the rest. Results never depend on which thread ran a chunk (see gram and combine).
template <typename Fn>
inline void run_chunks(int nthreads, int64_t num_chunks, Fn&& fn) {
#ifdef _OPENMP
  if (nthreads > 1 && num_chunks > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t c = 0; c < num_chunks; ++c) fn(c, omp_get_thread_num());
    return;
  }
#endif
  for (int64_t c = 0; c < num_chunks; ++c) fn(c, 0);
}

// mine[a, b] += the sum of the 8 float64 lanes of d[a, b] over the upper triangle: a chunk's vector
// accumulators folded into its partial Gram (both dot-tile paths end a chunk this way).
inline void add_lane_sums(const std::vector<D8>& d, int64_t rows, double* mine) {
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = a; b < rows; ++b) {
      const D8 v = d[a * rows + b];
      double sum = 0.0;
      for (int l = 0; l < 8; ++l) sum += v[l];
      mine[a * rows + b] += sum;
    }
}

// K (both triangles) = the chunks' upper-triangle partial Grams added in chunk order.
inline void sum_partials(const std::vector<double>& partial, int64_t num_chunks, int64_t rows, double* K) {
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = a; b < rows; ++b) {
      double sum = 0.0;
      for (int64_t c = 0; c < num_chunks; ++c) sum += partial[c * rows * rows + a * rows + b];
      K[a * rows + b] = sum;
      K[b * rows + a] = sum;
    }
}

// K [rows x rows] (row-major, float64, both triangles) = G_s G_s^T over the columns in runs.
// The shared columns are cut into chunks that depend on S and T only (not on the thread count); each
// chunk's partial Gram is kept and the partials are added in chunk order, so K is bitwise the same for
// any thread count and any assignment of chunks to threads.
template <typename T>
void gram(const T* g, int64_t rows, int64_t ld, const std::vector<Run>& runs, double* K, int num_threads) {
  using V = typename Simd<T>::V;
  int64_t shared = 0;
  for (const Run& r : runs) shared += r.end - r.begin;
  // At least 4096 columns per chunk (the scratch below is reset per chunk), at most 64 chunks and 32 MiB
  // of partial Grams; boundaries on whole cache lines.
  constexpr int64_t kAlign = 64 / sizeof(T);
  int64_t min_chunk = 4096;
#ifdef MK_PCGRAD_AVX2
  if constexpr (std::is_same_v<T, float>) min_chunk = kAvx2MinChunk;
#endif
  const int64_t max_chunks = std::clamp<int64_t>((int64_t(1) << 22) / std::max<int64_t>(1, rows * rows), 1, 64);
  const int64_t num_chunks = std::clamp<int64_t>(shared / min_chunk, 1, max_chunks);
  const int64_t chunk = ((shared + num_chunks - 1) / num_chunks + kAlign - 1) / kAlign * kAlign;
  const int nt = effective_threads(rows * rows, shared, num_threads);
  std::vector<double> partial(num_chunks * rows * rows, 0.0);
  // Per-thread scratch: the float64 vector accumulators (dacc) and the working-type ones (facc) of
  // gram_segments, allocated once per thread and cleared per chunk.
  std::vector<std::vector<D8>> dacc(nt);
  std::vector<std::vector<V>> facc(nt);
  if constexpr (std::is_same_v<T, float>) {
    if (use_packed(rows)) {
      const int64_t tp = (rows + 15) / 16 * 16;
      std::vector<std::vector<F16>> pk(nt);
      run_chunks(nt, num_chunks, [&](int64_t c, int tid) {
        const int64_t lo = std::min(shared, c * chunk), hi = std::min(shared, lo + chunk);
        if (lo >= hi) return;
        std::vector<D8>& d = dacc[tid];
        if (d.empty()) {
          d.assign(tp * tp / 8, D8{});
          pk[tid].assign(tp / 16 * kPackCols, F16{});
        } else {
          std::fill(d.begin(), d.end(), D8{});
        }
        double* mine = partial.data() + c * rows * rows;
        gram_segments_packed(g, rows, ld, shared_slice(runs, lo, hi), pk[tid].data(), d.data(), mine);
        const double* cd = reinterpret_cast<const double*>(d.data());
        for (int64_t a = 0; a < rows; ++a)
          for (int64_t b = a; b < rows; ++b) mine[a * rows + b] += cd[b * tp + a];
      });
      sum_partials(partial, num_chunks, rows, K);
      return;
    }
#ifdef MK_PCGRAD_AVX2
    if (rows >= kAvx2PackMinRows) {
      const int64_t tq = (rows + 15) / 16 * 16;
      const std::vector<Call> calls = plan_packed(rows);
      std::vector<std::vector<F16>> pk(nt);
      run_chunks(nt, num_chunks, [&](int64_t c, int tid) {
        const int64_t lo = std::min(shared, c * chunk), hi = std::min(shared, lo + chunk);
        if (lo >= hi) return;
        std::vector<D8>& d = dacc[tid];
        if (d.empty()) {
          d.assign(tq * tq / 8, D8{});
          pk[tid].assign(tq / 16 * kAvx2Kc, F16{});
        } else {
          std::fill(d.begin(), d.end(), D8{});
        }
        double* cd = reinterpret_cast<double*>(d.data());
        gram_segments_packed(g, rows, ld, shared_slice(runs, lo, hi), calls, reinterpret_cast<float*>(pk[tid].data()),
                             cd);
        double* mine = partial.data() + c * rows * rows;
        for (int64_t a = 0; a < rows; ++a)
          for (int64_t b = a; b < rows; ++b) mine[a * rows + b] = cd[b * tq + a];
      });
      sum_partials(partial, num_chunks, rows, K);
      return;
    }
    const std::vector<DotCall> calls = plan_dot(rows);
    std::vector<std::vector<F8>> fv(nt);
    run_chunks(nt, num_chunks, [&](int64_t c, int tid) {
      const int64_t lo = std::min(shared, c * chunk), hi = std::min(shared, lo + chunk);
      if (lo >= hi) return;
      std::vector<D8>& d = dacc[tid];
      if (d.empty()) {
        d.assign(rows * rows, D8{});
        fv[tid].assign(rows * rows, F8{});
      } else {
        std::fill(d.begin(), d.end(), D8{});
      }
      double* mine = partial.data() + c * rows * rows;
      gram_segments_dot(g, rows, ld, shared_slice(runs, lo, hi), calls, reinterpret_cast<__m256*>(fv[tid].data()),
                        d.data(), mine);
      add_lane_sums(d, rows, mine);
    });
    sum_partials(partial, num_chunks, rows, K);
    return;
#endif
  }
  run_chunks(nt, num_chunks, [&](int64_t c, int tid) {
    const int64_t lo = std::min(shared, c * chunk), hi = std::min(shared, lo + chunk);
    if (lo >= hi) return;
    std::vector<D8>& d = dacc[tid];
    if (d.empty()) {
      d.assign(rows * rows, D8{});
      facc[tid].assign(rows * rows, V{});
    } else {
      std::fill(d.begin(), d.end(), D8{});
    }
    double* mine = partial.data() + c * rows * rows;
    gram_segments<T>(g, rows, ld, shared_slice(runs, lo, hi), d.data(), facc[tid].data(), mine);
    add_lane_sums(d, rows, mine);
  });
  sum_partials(partial, num_chunks, rows, K);
}

// W [rows x rows] from K: W = I; for each i, for j in order[i] (j = i skipped unless include_self):
// d = W[i] . K[:, j]; if d < 0 and K[j, j] + eps > 0: W[i, j] -= d / (K[j, j] + eps).
// d < 0 implies g_j != 0 in exact arithmetic; the denominator test keeps 0/0 out all the same (a g_j whose
// squares underflow). Rows are independent; each is T steps of a T-term dot product.
inline void coefficients(const double* K, int64_t rows, const int64_t* order, bool include_self, double eps,
                         double* Wm) {
  std::fill(Wm, Wm + rows * rows, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double* w = Wm + i * rows;
    w[i] = 1.0;
    for (int64_t s = 0; s < rows; ++s) {
      const int64_t j = order[i * rows + s];
      if (j == i && !include_self) continue;
      double d = 0.0;
      for (int64_t m = 0; m < rows; ++m) d += w[m] * K[m * rows + j];
      const double denominator = K[j * rows + j] + eps;
      if (d < 0.0 && denominator > 0.0) w[j] -= d / denominator;
    }
  }
}

// out[c0 + c] = T(sum_i w[i] G[i, c0 + c]) for c < n, rows summed in groups of 4 (then singly) into acc, the
// first group assigning and the last one storing to out directly.
template <typename T, typename A>
inline void combine_tile(const T* g, int64_t rows, int64_t ld, int64_t c0, int64_t n, const A* w,
                                A* __restrict acc, T* __restrict o) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const T* __restrict r0 = g + i * ld + c0;
    const T* __restrict r1 = r0 + ld;
    const T* __restrict r2 = r1 + ld;
    const T* __restrict r3 = r2 + ld;
    const A w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
    const bool first = i == 0, last = i + 4 == rows;
    if (first && last) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) o[c] = T(w0 * A(r0[c]) + w1 * A(r1[c]) + w2 * A(r2[c]) + w3 * A(r3[c]));
    } else if (first) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] = w0 * A(r0[c]) + w1 * A(r1[c]) + w2 * A(r2[c]) + w3 * A(r3[c]);
    } else if (last) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c)
        o[c] = T(acc[c] + (w0 * A(r0[c]) + w1 * A(r1[c]) + w2 * A(r2[c]) + w3 * A(r3[c])));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] += w0 * A(r0[c]) + w1 * A(r1[c]) + w2 * A(r2[c]) + w3 * A(r3[c]);
    }
  }
  for (; i < rows; ++i) {
    const T* __restrict r0 = g + i * ld + c0;
    const A w0 = w[i];
    const bool first = i == 0, last = i + 1 == rows;
    if (first && last) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) o[c] = T(w0 * A(r0[c]));
    } else if (first) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] = w0 * A(r0[c]);
    } else if (last) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) o[c] = T(acc[c] + w0 * A(r0[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] += w0 * A(r0[c]);
    }
  }
}

// out[c] = sum_i coef[i] G[i, c] on the shared columns (runs), sum_i G[i, c] on the others, accumulated
// in A (float for float32: T terms, error <= gamma_T of sum_i |coef_i G[i, c]|). Returns false if a
// task-specific column's sum is NaN or inf (the shared columns are checked through K's diagonal).
template <typename T, typename A>
bool combine(const T* g, int64_t rows, int64_t cols, int64_t ld, const A* coef, const std::vector<Run>& runs,
             bool all_shared, T* out, int num_threads) {
  // Column tile: the accumulators stay in L1/L2 while 4 rows at a time stream through. Wide tiles (64 KiB of
  // float per row segment) for large P: every tile restarts T row streams, and with G in DRAM at T = 16 the
  // 16 KiB tiles ran ~15% slower (load ~1.5, medians); narrow ones for small P, where the tiles must still
  // split evenly over the threads.
  constexpr int64_t kMaxTileCols = 16384;
  const int64_t kTileCols = cols >= 64 * kMaxTileCols ? kMaxTileCols : 4096;
  const int nt = effective_threads(rows, cols, num_threads);
  // Chunks of whole tiles, at least 4 per thread (see run_chunks); each writes only its own columns.
  const int64_t tiles = (cols + kTileCols - 1) / kTileCols;
  const int64_t num_chunks = std::min<int64_t>(tiles, std::max<int64_t>(1, 8 * int64_t(nt)));
  const int64_t chunk = (tiles + num_chunks - 1) / num_chunks * kTileCols;
  std::vector<A> ones(rows, A(1));
  std::vector<int> bad(num_chunks, 0);
  run_chunks(nt, num_chunks, [&](int64_t k, int) {
    const int64_t begin = std::min(cols, k * chunk), end = std::min(cols, begin + chunk);
    alignas(64) A acc[kMaxTileCols];
    A nonfinite = A(0);  // x - x is 0 for finite x, NaN for NaN/inf: one vectorisable flag
    // The first run ending after `begin`.
    size_t r = std::upper_bound(runs.begin(), runs.end(), begin, [](int64_t c, const Run& run) { return c < run.end; }) -
               runs.begin();
    for (int64_t c0 = begin; c0 < end;) {
      // The next stretch [c0, c1) of one kind: shared (inside run r) or task-specific (before run r).
      bool is_shared;
      int64_t c1;
      if (all_shared) {
        is_shared = true;
        c1 = end;
      } else if (r < runs.size() && runs[r].begin <= c0) {
        is_shared = true;
        c1 = std::min(end, runs[r].end);
      } else {
        is_shared = false;
        c1 = std::min(end, r < runs.size() ? runs[r].begin : end);
      }
      c1 = std::min(c1, c0 + kTileCols);
      const int64_t n = c1 - c0;
      const A* w = is_shared ? coef : ones.data();
      T* __restrict o = out + c0;
      // Straight into out: the first group of rows initialises the accumulators, the last one writes out
      // (T <= 4 is then one read of each row and one store: at T = 4 with G in L3 separate fill and copy
      // passes cost ~30% of the combine).
      combine_tile(g, rows, ld, c0, n, w, acc, o);
      if (!is_shared) {
#pragma omp simd reduction(+ : nonfinite)
        for (int64_t c = 0; c < n; ++c) nonfinite += A(o[c]) - A(o[c]);
      }
      c0 = c1;
      if (!all_shared && r < runs.size() && c0 >= runs[r].end) ++r;
    }
    bad[k] = !(nonfinite == A(0));
  });
  for (int b : bad)
    if (b) return false;
  return true;
}

}  // namespace metakernels::kernels::pcgrad
