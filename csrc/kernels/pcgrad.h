// PCGrad in three stages over a [T, P] batch of task gradients G (row stride ld, unit column stride):
//   1. gram:         K = G_s G_s^T over the shared columns (runs of columns), one blocked pass over G;
//   2. coefficients: W [T, T] from K alone (the projection recurrence), single-threaded, O(T^3);
//   3. combine:      out = c^T G over the shared columns, 1^T G over the others, one pass over G.
// Torch-free: shared by the PyTorch extension (csrc/cpu/pcgrad.cpp) and C++ tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

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
  const int64_t max_chunks = std::clamp<int64_t>((int64_t(1) << 22) / std::max<int64_t>(1, rows * rows), 1, 64);
  const int64_t num_chunks = std::clamp<int64_t>(shared / 4096, 1, max_chunks);
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
    for (int64_t a = 0; a < rows; ++a)
      for (int64_t b = a; b < rows; ++b) {
        const D8 v = d[a * rows + b];
        double sum = 0.0;
        for (int l = 0; l < 8; ++l) sum += v[l];
        mine[a * rows + b] += sum;
      }
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

// out[c] = sum_i coef[i] G[i, c] on the shared columns (runs), sum_i G[i, c] on the others, accumulated
// in A (float for float32: T terms, error <= gamma_T of sum_i |coef_i G[i, c]|). Returns false if a
// task-specific column's sum is NaN or inf (the shared columns are checked through K's diagonal).
template <typename T, typename A>
bool combine(const T* g, int64_t rows, int64_t cols, int64_t ld, const A* coef, const std::vector<Run>& runs,
             bool all_shared, T* out, int num_threads) {
  // Column tile: the accumulators (16 KiB of float) stay in L1 while 4 rows at a time stream through.
  constexpr int64_t kTileCols = 4096;
  const int nt = effective_threads(rows, cols, num_threads);
  // Chunks of whole tiles, at least 4 per thread (see run_chunks); each writes only its own columns.
  const int64_t tiles = (cols + kTileCols - 1) / kTileCols;
  const int64_t num_chunks = std::min<int64_t>(tiles, std::max<int64_t>(1, 8 * int64_t(nt)));
  const int64_t chunk = (tiles + num_chunks - 1) / num_chunks * kTileCols;
  std::vector<A> ones(rows, A(1));
  std::vector<int> bad(num_chunks, 0);
  run_chunks(nt, num_chunks, [&](int64_t k, int) {
    const int64_t begin = std::min(cols, k * chunk), end = std::min(cols, begin + chunk);
    alignas(64) A acc[kTileCols];
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
      std::fill(acc, acc + n, A(0));
      int64_t i = 0;
      for (; i + 4 <= rows; i += 4) {
        const T* __restrict r0 = g + i * ld + c0;
        const T* __restrict r1 = r0 + ld;
        const T* __restrict r2 = r1 + ld;
        const T* __restrict r3 = r2 + ld;
        const A w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) acc[c] += w0 * A(r0[c]) + w1 * A(r1[c]) + w2 * A(r2[c]) + w3 * A(r3[c]);
      }
      for (; i < rows; ++i) {
        const T* __restrict r0 = g + i * ld + c0;
        const A w0 = w[i];
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) acc[c] += w0 * A(r0[c]);
      }
      T* __restrict o = out + c0;
      if (is_shared) {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) o[c] = T(acc[c]);
      } else {
#pragma omp simd reduction(+ : nonfinite)
        for (int64_t c = 0; c < n; ++c) {
          o[c] = T(acc[c]);
          nonfinite += acc[c] - acc[c];
        }
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
