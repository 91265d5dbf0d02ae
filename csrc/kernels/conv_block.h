// The epilogue of a conv block (BatchNorm with batch statistics + ReLU + optional 2x2 max-pool) and its
// backward, plus a direct convolution for layers with few taps (Cin * k * k small: a net's input layer).
// Torch-free: the same code serves the PyTorch extension (csrc/cpu/conv_block.cpp) and C++ unit tests.
//
// Layout: one task's conv output z is [N, H, W, C] contiguous (channels last per image), so every inner
// loop runs over C contiguous channels and vectorises; the block output and its gradient are
// [N, Hp, Wp, C] likewise.
//
// Forward, per channel c over the M = N*H*W values of z:
//   mean, var (biased), invstd = 1/sqrt(var + eps), scale = gamma*invstd, offset = beta - mean*scale,
//   y = z*scale + offset,  out = max over the 2x2 window of relu(y)  (or relu(y) without pool)
// Backward: dy is d_out routed to the FIRST maximum of each window in row-major scan order (torch's
// max_pool2d rule) where that maximum is > 0 (ReLU), 0 elsewhere; x_hat = (z - mean)*invstd;
//   S1 = sum dy,  S2 = sum dy*x_hat  (= d_beta, d_gamma),
//   dz = gamma*invstd * (dy - S1/M - x_hat*S2/M).
// Windows whose ReLU outputs are all zero send no gradient anywhere (ReLU's gradient is 0 at y <= 0),
// whichever position torch's pooling picked, so ties among zeros need no special care.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace metakernels::kernels {

// Row kernels are compiled out of line: inlined into the threaded drivers (several row sources and sinks
// per lambda) they ran out of registers and spilled addresses inside the vector loops (perf: the direct
// path's backward took ~2x its isolated cost). One call per row is noise next to a row's work.
#if defined(__GNUC__)
#define MK_ROW_KERNEL __attribute__((noinline))
#else
#define MK_ROW_KERNEL
#endif

// max by value: std::max returns a reference, which stops GCC from vectorising a loop over temporaries.
template <typename T>
inline T max_of(T a, T b) {
  return b > a ? b : a;
}

// Below this many conv-output elements per task an epilogue runs on the calling thread (see kParallelGrain).
constexpr int64_t kEpilogueGrain = kParallelGrain;

// Geometry of one block: conv output N x H x W x C, block output N x Hp x Wp x C.
struct BlockShape {
  int64_t N, H, W, C;
  bool pool;
  int64_t Hp() const { return pool ? H / 2 : H; }
  int64_t Wp() const { return pool ? W / 2 : W; }
  int64_t pixels() const { return N * H * W; }
};

// Lanes of one vector register of the target ISA: the channel block the register-blocked loops below work
// on. Sized to the ISA, not fixed at 64 bytes: on AVX2 (16 ymm registers) a 64-byte block takes two registers
// per accumulator, so the 3x3 weight-gradient tile's 9 accumulators would need 18 (no timing difference was
// measurable on a Zen 3 EPYC: the direct path is bound elsewhere; this keeps the tiles within the register file).
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#else
constexpr int64_t kVectorBytes = 32;
#endif
template <typename T>
constexpr int64_t kLanes = kVectorBytes / int64_t(sizeof(T));

// Sums over a range of rows keep one partial per (position in the row, channel): r[p*C + c] += term. Summing
// along the row into r[c] instead chains a load-add-store through every position of the row (measured: the
// backward's pass 1 then took 2x its pass 2, which does more arithmetic). flush_sums adds the partials into
// the double accumulators (once per image: at most H terms per partial) and clears them.
template <typename T>
inline void flush_sums(T* __restrict r1, T* __restrict r2, int64_t npos, int64_t C, double* __restrict s1,
                       double* __restrict s2) {
  for (int64_t p = 0; p < npos; ++p) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += double(r1[p * C + c]);
      s2[c] += double(r2[p * C + c]);
    }
  }
  std::fill(r1, r1 + npos * C, T(0));
  std::fill(r2, r2 + npos * C, T(0));
}

// Per-channel shifted sums of one row of pixels: r1 += z - K, r2 += (z - K)^2 (partials per position, see
// flush_sums; the totals are accumulated in double). K (one sample of the channel) makes
// E[(z-K)^2] - E[z-K]^2 free of the cancellation that E[z^2] - E[z]^2 suffers when |mean| >> std.
template <typename T>
MK_ROW_KERNEL void shifted_sums_row(const T* __restrict z, int64_t W, int64_t C, const T* __restrict shift,
                                    T* __restrict r1, T* __restrict r2) {
  for (int64_t w = 0; w < W; ++w) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T d = z[w * C + c] - shift[c];
      r1[w * C + c] += d;
      r2[w * C + c] += d * d;
    }
  }
}

// mean, invstd and the affine form y = z*scale + offset of each channel from its shifted sums.
template <typename T>
inline void finish_stats(const double* s1, const double* s2, const T* shift, int64_t M, int64_t C,
                         const T* gamma, const T* beta, double eps, T* mean, T* invstd, T* scale, T* offset) {
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / double(M);
    const double var = std::max(0.0, s2[c] / double(M) - d * d);
    const double m = double(shift[c]) + d;
    const double is = 1.0 / std::sqrt(var + eps);
    mean[c] = T(m);
    invstd[c] = T(is);
    // The affine form from the rounded statistics, as torch's batch_norm transform computes it.
    const T sc = gamma ? T(gamma[c] * invstd[c]) : invstd[c];
    scale[c] = sc;
    offset[c] = beta ? T(beta[c] - mean[c] * sc) : T(-mean[c] * sc);
  }
}

// One block-output row from the conv-output rows it pools (z0, z1; z1 unused without pool).
template <typename T>
MK_ROW_KERNEL void forward_row(const T* __restrict z0, const T* __restrict z1, const BlockShape& s,
                        const T* __restrict scale, const T* __restrict offset, T* __restrict out) {
  const int64_t C = s.C;
  if (!s.pool) {
    for (int64_t w = 0; w < s.W; ++w) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[w * C + c] = max_of(T(0), z0[w * C + c] * scale[c] + offset[c]);
    }
    return;
  }
  const int64_t Wp = s.Wp();
  for (int64_t pw = 0; pw < Wp; ++pw) {
    const T* a = z0 + 2 * pw * C;
    const T* b = z1 + 2 * pw * C;
    T* o = out + pw * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T sc = scale[c], of = offset[c];
      const T m = max_of(max_of(a[c] * sc + of, a[C + c] * sc + of), max_of(b[c] * sc + of, b[C + c] * sc + of));
      o[c] = max_of(T(0), m);
    }
  }
}

// The window's routing for one channel: which of the 4 positions (row-major) is the first maximum of y, and
// that maximum. torch's max_pool2d takes a later value when `val > max || isnan(val)`; here a later value wins
// when !(val <= max), one compare instruction. The two differ only when the running maximum is NaN, and a NaN
// anywhere in a channel's conv output makes its mean, hence every y of the channel, NaN: then both pick the
// last position. Branch-free with the index in T, so the channel loops vectorise (a version with std::isnan
// and an out-parameter ran scalar: 5x slower).
template <typename T>
struct WindowMax {
  T idx, m;
};

template <typename T>
inline WindowMax<T> window_argmax(T y0, T y1, T y2, T y3) {
  T m = y0, idx = T(0);
  const bool t1 = !(y1 <= m);
  m = t1 ? y1 : m;
  idx = t1 ? T(1) : idx;
  const bool t2 = !(y2 <= m);
  m = t2 ? y2 : m;
  idx = t2 ? T(2) : idx;
  const bool t3 = !(y3 <= m);
  m = t3 ? y3 : m;
  idx = t3 ? T(3) : idx;
  return {idx, m};
}

// The window's maximum of y and the conv output z at that (first) maximum: what pass 1 needs.
template <typename T>
struct WindowPick {
  T m, z;
};

template <typename T>
inline WindowPick<T> window_pick(T y0, T y1, T y2, T y3, T z0, T z1, T z2, T z3) {
  T m = y0, z = z0;
  const bool t1 = !(y1 <= m);
  m = t1 ? y1 : m;
  z = t1 ? z1 : z;
  const bool t2 = !(y2 <= m);
  m = t2 ? y2 : m;
  z = t2 ? z2 : z;
  const bool t3 = !(y3 <= m);
  m = t3 ? y3 : m;
  z = t3 ? z3 : z;
  return {m, z};
}

// Backward pass 1 over one block-output row: partials (per output position, see flush_sums) of S1 = sum dy
// and S2 = sum dy*x_hat.
template <typename T>
MK_ROW_KERNEL void backward_sums_row(const T* __restrict z0, const T* __restrict z1, const T* __restrict go,
                                     const BlockShape& s, const T* __restrict scale, const T* __restrict offset,
                                     const T* __restrict mean, const T* __restrict invstd, T* __restrict r1,
                                     T* __restrict r2) {
  const int64_t C = s.C;
  if (!s.pool) {
    for (int64_t w = 0; w < s.W; ++w) {
      const T* zp = z0 + w * C;
      const T* g = go + w * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T y = zp[c] * scale[c] + offset[c];
        const T gv = g[c];  // loaded unconditionally: a conditional load is control flow to GCC
        const T dy = y > T(0) ? gv : T(0);
        r1[w * C + c] += dy;
        r2[w * C + c] += dy * ((zp[c] - mean[c]) * invstd[c]);
      }
    }
    return;
  }
  for (int64_t pw = 0; pw < s.Wp(); ++pw) {
    const T* a = z0 + 2 * pw * C;
    const T* b = z1 + 2 * pw * C;
    const T* g = go + pw * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T sc = scale[c], of = offset[c];
      const T za = a[c], zb = a[C + c], zc = b[c], zd = b[C + c];
      const WindowPick<T> wp = window_pick(za * sc + of, zb * sc + of, zc * sc + of, zd * sc + of, za, zb, zc, zd);
      const T gv = g[c];
      const T dy = wp.m > T(0) ? gv : T(0);
      r1[pw * C + c] += dy;
      r2[pw * C + c] += dy * ((wp.z - mean[c]) * invstd[c]);
    }
  }
}

// Per-channel coefficients of dz = k1*dy + b + d*(z - mean):  k1 = gamma*invstd, b = -k1*S1/M,
// d = -k1*invstd*S2/M.
template <typename T>
struct DzCoefficients {
  std::vector<T> k1, b, d;
  DzCoefficients(const double* s1, const double* s2, const T* gamma, const T* invstd, int64_t M, int64_t C)
      : k1(C), b(C), d(C) {
    for (int64_t c = 0; c < C; ++c) {
      const double k = (gamma ? double(gamma[c]) : 1.0) * double(invstd[c]);
      k1[c] = T(k);
      b[c] = T(-k * s1[c] / double(M));
      d[c] = T(-k * double(invstd[c]) * s2[c] / double(M));
    }
  }
};

// Backward pass 2 over the conv-output rows of one block-output row: dz for every position.
// dz0/dz1 are the rows of z0/z1 (z1/dz1 unused without pool). Positions no window covers (the last row
// and column of an odd-sized map) get dy = 0.
template <typename T>
MK_ROW_KERNEL void backward_dz_row(const T* __restrict z0, const T* __restrict z1, const T* __restrict go,
                            const BlockShape& s, const T* __restrict scale, const T* __restrict offset,
                            const T* __restrict mean, const DzCoefficients<T>& k, T* __restrict dz0,
                            T* __restrict dz1) {
  const int64_t C = s.C;
  const T* __restrict k1 = k.k1.data();
  const T* __restrict kb = k.b.data();
  const T* __restrict kd = k.d.data();
  if (!s.pool) {
    for (int64_t w = 0; w < s.W; ++w) {
      const T* zp = z0 + w * C;
      const T* g = go + w * C;
      T* o = dz0 + w * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T y = zp[c] * scale[c] + offset[c];
        const T gv = g[c];
        const T dy = y > T(0) ? gv : T(0);
        o[c] = k1[c] * dy + kb[c] + kd[c] * (zp[c] - mean[c]);
      }
    }
    return;
  }
  const int64_t Wp = s.Wp();
  for (int64_t pw = 0; pw < Wp; ++pw) {
    const T* a = z0 + 2 * pw * C;
    const T* b = z1 + 2 * pw * C;
    const T* g = go + pw * C;
    T* oa = dz0 + 2 * pw * C;
    T* ob = dz1 + 2 * pw * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T sc = scale[c], of = offset[c];
      const T za = a[c], zb = a[C + c], zc = b[c], zd = b[C + c];
      const WindowMax<T> wm = window_argmax(za * sc + of, zb * sc + of, zc * sc + of, zd * sc + of);
      const T gv = g[c];  // loaded unconditionally: without AVX-512 masked loads GCC left this loop scalar (4x)
      const T g1 = wm.m > T(0) ? gv : T(0);
      const T mc = mean[c], kk = k1[c], bb = kb[c], dd = kd[c];
      const T kg = kk * g1;
      oa[c] = (wm.idx == T(0) ? kg : T(0)) + bb + dd * (za - mc);
      oa[C + c] = (wm.idx == T(1) ? kg : T(0)) + bb + dd * (zb - mc);
      ob[c] = (wm.idx == T(2) ? kg : T(0)) + bb + dd * (zc - mc);
      ob[C + c] = (wm.idx == T(3) ? kg : T(0)) + bb + dd * (zd - mc);
    }
  }
  if (s.W % 2 == 1) {  // the column no window covers
    for (T* o : {dz0, dz1}) {
      const T* zp = (o == dz0 ? z0 : z1) + (s.W - 1) * C;
      T* op = o + (s.W - 1) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) op[c] = kb[c] + kd[c] * (zp[c] - mean[c]);
    }
  }
}

// dz of a conv-output row that no window covers (the last row of an odd-height map under pool).
template <typename T>
MK_ROW_KERNEL void backward_dz_uncovered_row(const T* __restrict z, int64_t W, int64_t C, const T* __restrict mean,
                                      const DzCoefficients<T>& k, T* __restrict dz) {
  for (int64_t w = 0; w < W; ++w) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dz[w * C + c] = k.b[c] + k.d[c] * (z[w * C + c] - mean[c]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Direct convolution for few taps. x is one task's zero-padded input [N, Cin, Hpad, Wpad] (contiguous),
// wt its weight as [Cin*k*k][Cout] (tap-major), z rows [W][Cout].

struct DirectConv {
  int64_t Cin, Hpad, Wpad, k, stride;
  int64_t taps() const { return Cin * k * k; }
};

// z[ow][c] for ow in [ow0, ow0 + OWB), c in [c0, c0 + kLanes): OWB accumulator vectors live in registers
// across all taps (the plain loop below would load and store each of them once per tap).
// KC > 0 fixes the kernel size and S1 a unit stride at compile time, so the tap loops unroll into straight FMAs
// with constant offsets (the runtime-k, runtime-stride loop spent ~3 instructions of address arithmetic per FMA).
template <typename T, int OWB, int KC, bool S1>
inline void direct_conv_tile(const T* __restrict img, const DirectConv& d, const T* __restrict wt, int64_t oh,
                             int64_t ow0, int64_t c0, int64_t C, T* __restrict zrow) {
  constexpr int64_t V = kLanes<T>;
  const int64_t k = KC > 0 ? KC : d.k;
  const int64_t stride = S1 ? 1 : d.stride;
  T acc[OWB][V];
#pragma GCC unroll 16
  for (int j = 0; j < OWB; ++j)
#pragma omp simd
    for (int64_t l = 0; l < V; ++l) acc[j][l] = T(0);
  for (int64_t ci = 0; ci < d.Cin; ++ci)
#pragma GCC unroll 4
    for (int64_t kh = 0; kh < k; ++kh) {
      const T* xr = img + (ci * d.Hpad + oh * stride + kh) * d.Wpad + ow0 * stride;
#pragma GCC unroll 4
      for (int64_t kw = 0; kw < k; ++kw) {
        const T* wr = wt + ((ci * k + kh) * k + kw) * C + c0;
#pragma GCC unroll 16
        for (int j = 0; j < OWB; ++j) {
          const T xv = xr[j * stride + kw];
#pragma omp simd
          for (int64_t l = 0; l < V; ++l) acc[j][l] += xv * wr[l];
        }
      }
    }
#pragma GCC unroll 16
  for (int j = 0; j < OWB; ++j)
#pragma omp simd
    for (int64_t l = 0; l < V; ++l) zrow[(ow0 + j) * C + c0 + l] = acc[j][l];
}

// One row's full channel tiles: 8-column tiles, then tails in halving tiles (a 1-column tile is one FMA
// dependency chain: latency-bound).
template <typename T, int KC, bool S1>
inline void direct_conv_tiles(const T* __restrict img, const DirectConv& d, const T* __restrict wt, int64_t oh,
                              int64_t W, int64_t c_tiled, int64_t C, T* __restrict zrow) {
  for (int64_t c0 = 0; c0 < c_tiled; c0 += kLanes<T>) {
    int64_t ow = 0;
    for (; ow + 8 <= W; ow += 8) direct_conv_tile<T, 8, KC, S1>(img, d, wt, oh, ow, c0, C, zrow);
    if (ow + 4 <= W) direct_conv_tile<T, 4, KC, S1>(img, d, wt, oh, ow, c0, C, zrow), ow += 4;
    if (ow + 2 <= W) direct_conv_tile<T, 2, KC, S1>(img, d, wt, oh, ow, c0, C, zrow), ow += 2;
    if (ow < W) direct_conv_tile<T, 1, KC, S1>(img, d, wt, oh, ow, c0, C, zrow);
  }
}

// z row oh of image `img` (img points at that image's padded input).
template <typename T>
MK_ROW_KERNEL void direct_conv_row(const T* __restrict img, const DirectConv& d, const T* __restrict wt, int64_t oh,
                            int64_t W, int64_t C, T* __restrict zrow) {
  constexpr int64_t V = kLanes<T>;
  const int64_t c_tiled = C / V * V;
  if (d.k == 3 && d.stride == 1) direct_conv_tiles<T, 3, true>(img, d, wt, oh, W, c_tiled, C, zrow);
  else if (d.k == 3) direct_conv_tiles<T, 3, false>(img, d, wt, oh, W, c_tiled, C, zrow);
  else if (d.stride == 1) direct_conv_tiles<T, 0, true>(img, d, wt, oh, W, c_tiled, C, zrow);
  else direct_conv_tiles<T, 0, false>(img, d, wt, oh, W, c_tiled, C, zrow);
  if (c_tiled == C) return;
  for (int64_t ow = 0; ow < W; ++ow) std::fill(zrow + ow * C + c_tiled, zrow + (ow + 1) * C, T(0));
  for (int64_t ci = 0; ci < d.Cin; ++ci) {
    for (int64_t kh = 0; kh < d.k; ++kh) {
      const T* xr = img + (ci * d.Hpad + oh * d.stride + kh) * d.Wpad;
      for (int64_t kw = 0; kw < d.k; ++kw) {
        const T* wr = wt + ((ci * d.k + kh) * d.k + kw) * C;
        for (int64_t ow = 0; ow < W; ++ow) {
          const T xv = xr[ow * d.stride + kw];
          T* zp = zrow + ow * C;
#pragma omp simd
          for (int64_t c = c_tiled; c < C; ++c) zp[c] += xv * wr[c];
        }
      }
    }
  }
}

// The k x k taps of one input channel for channels [c0, c0 + kLanes): K*K accumulator vectors in registers
// across the row's positions.
template <typename T, int K>
inline void direct_dw_tile(const T* __restrict img, const DirectConv& d, const T* __restrict dzrow, int64_t oh,
                           int64_t W, int64_t ci, int64_t c0, int64_t C, T* __restrict dw) {
  constexpr int64_t V = kLanes<T>;
  T acc[K * K][V];
  T* base = dw + ci * K * K * C + c0;
#pragma GCC unroll 16
  for (int j = 0; j < K * K; ++j)
#pragma omp simd
    for (int64_t l = 0; l < V; ++l) acc[j][l] = base[j * C + l];
  const T* x0 = img + (ci * d.Hpad + oh * d.stride) * d.Wpad;
  for (int64_t ow = 0; ow < W; ++ow) {
    const T* g = dzrow + ow * C + c0;
#pragma GCC unroll 16
    for (int kh = 0; kh < K; ++kh)
#pragma GCC unroll 16
      for (int kw = 0; kw < K; ++kw) {
        const T xv = x0[kh * d.Wpad + ow * d.stride + kw];
#pragma omp simd
        for (int64_t l = 0; l < V; ++l) acc[kh * K + kw][l] += xv * g[l];
      }
  }
#pragma GCC unroll 16
  for (int j = 0; j < K * K; ++j)
#pragma omp simd
    for (int64_t l = 0; l < V; ++l) base[j * C + l] = acc[j][l];
}

// dw[tap][c] += sum over the row's positions of x[tap at position] * dz[position][c].
template <typename T>
MK_ROW_KERNEL void direct_dw_row(const T* __restrict img, const DirectConv& d, const T* __restrict dzrow, int64_t oh,
                          int64_t W, int64_t C, T* __restrict dw) {
  constexpr int64_t V = kLanes<T>;
  int64_t c_tiled = 0;
  if (d.k <= 3) {
    c_tiled = C / V * V;
    for (int64_t c0 = 0; c0 < c_tiled; c0 += V)
      for (int64_t ci = 0; ci < d.Cin; ++ci) {
        if (d.k == 3) direct_dw_tile<T, 3>(img, d, dzrow, oh, W, ci, c0, C, dw);
        else if (d.k == 2) direct_dw_tile<T, 2>(img, d, dzrow, oh, W, ci, c0, C, dw);
        else direct_dw_tile<T, 1>(img, d, dzrow, oh, W, ci, c0, C, dw);
      }
  }
  if (c_tiled == C) return;
  for (int64_t ci = 0; ci < d.Cin; ++ci) {
    for (int64_t kh = 0; kh < d.k; ++kh) {
      const T* xr = img + (ci * d.Hpad + oh * d.stride + kh) * d.Wpad;
      for (int64_t kw = 0; kw < d.k; ++kw) {
        T* wr = dw + ((ci * d.k + kh) * d.k + kw) * C;
        for (int64_t ow = 0; ow < W; ++ow) {
          const T xv = xr[ow * d.stride + kw];
          const T* g = dzrow + ow * C;
#pragma omp simd
          for (int64_t c = c_tiled; c < C; ++c) wr[c] += xv * g[c];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Drivers. Each splits images across the team; per-thread double partials are summed in thread order
// after the team joins, so results do not depend on scheduling.

inline int epilogue_threads(int64_t elements, int64_t images, int requested) {
  if (requested < 1 || elements < kEpilogueGrain) return 1;
  return static_cast<int>(std::min<int64_t>(requested, images));
}

// Source of conv-output rows: stored rows of z, or rows recomputed by the direct convolution into a
// per-thread buffer.
template <typename T>
struct StoredRows {
  const T* z;  // [N, H, W, C]
  const BlockShape* s;
  const T* row(int64_t n, int64_t h, T* /*buffer*/) const { return z + ((n * s->H + h) * s->W) * s->C; }
};

template <typename T>
struct DirectRows {
  const T* x;  // [N, Cin, Hpad, Wpad]
  const T* wt;
  DirectConv d;
  const BlockShape* s;
  const T* row(int64_t n, int64_t h, T* buffer) const {
    direct_conv_row(x + n * d.Cin * d.Hpad * d.Wpad, d, wt, h, s->W, s->C, buffer);
    return buffer;
  }
};

// Forward of one task: statistics then the normalised, activated, pooled output [N, Hp, Wp, C].
// copy_to (optional, stored rows only): receives a copy of z, made while z's rows are in cache.
template <typename T, typename Rows>
void block_forward(const Rows& rows, const BlockShape& s, const T* gamma, const T* beta, double eps, T* out,
                   T* mean, T* invstd, T* copy_to, int requested_threads) {
  const int64_t C = s.C, W = s.W;
  const int nt = epilogue_threads(s.pixels() * C, s.N, requested_threads);
  std::vector<T> shift(C);
  {
    std::vector<T> buf(W * C);
    const T* r0 = rows.row(0, 0, buf.data());
    std::copy(r0, r0 + C, shift.begin());
  }
  std::vector<double> partial(size_t(nt) * 2 * C, 0.0);
  run_team(nt, [&](int tid, int nth) {
    int64_t n0, n1;
    column_range(s.N, tid, nth, &n0, &n1);
    std::vector<T> buf(W * C), r1(W * C, T(0)), r2(W * C, T(0));
    double* s1 = partial.data() + size_t(tid) * 2 * C;
    double* s2 = s1 + C;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t h = 0; h < s.H; ++h) {
        const T* zr = rows.row(n, h, buf.data());
        shifted_sums_row(zr, W, C, shift.data(), r1.data(), r2.data());
        if (copy_to) std::memcpy(copy_to + ((n * s.H + h) * W) * C, zr, sizeof(T) * W * C);
      }
      flush_sums(r1.data(), r2.data(), W, C, s1, s2);
    }
  });
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += partial[size_t(t) * 2 * C + c];
      s2[c] += partial[size_t(t) * 2 * C + C + c];
    }
  std::vector<T> scale(C), offset(C);
  finish_stats(s1.data(), s2.data(), shift.data(), s.pixels(), C, gamma, beta, eps, mean, invstd, scale.data(),
               offset.data());
  const int64_t Hp = s.Hp(), Wp = s.Wp();
  run_team(nt, [&](int tid, int nth) {
    int64_t n0, n1;
    column_range(s.N, tid, nth, &n0, &n1);
    std::vector<T> buf0(W * C), buf1(W * C);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t ph = 0; ph < Hp; ++ph) {
        const T* z0 = rows.row(n, s.pool ? 2 * ph : ph, buf0.data());
        const T* z1 = s.pool ? rows.row(n, 2 * ph + 1, buf1.data()) : z0;
        forward_row(z0, z1, s, scale.data(), offset.data(), out + ((n * Hp + ph) * Wp) * C);
      }
  });
}

// Where backward pass 2 sends dz: into a full [N, H, W, C] buffer (for a conv backward through torch), or
// into the direct convolution's weight gradient without storing it.
template <typename T>
struct DzToBuffer {
  T* dz;
  const BlockShape* s;
  T* row(int64_t n, int64_t h, T* /*buffer*/) const { return dz + ((n * s->H + h) * s->W) * s->C; }
  void done(int64_t, int64_t, const T*, T*) const {}
};

template <typename T>
struct DzToDirectWeight {
  const T* x;  // [N, Cin, Hpad, Wpad]
  DirectConv d;
  const BlockShape* s;
  T* row(int64_t, int64_t, T* buffer) const { return buffer; }
  void done(int64_t n, int64_t h, const T* dzrow, T* dw) const {
    direct_dw_row(x + n * d.Cin * d.Hpad * d.Wpad, d, dzrow, h, s->W, s->C, dw);
  }
};

// Backward of one task. go: block-output gradient [N, Hp, Wp, C]. d_gamma/d_beta optional. With
// want_dz false only pass 1 runs (the affine gradients). dw (optional, [taps][C]) receives the direct
// convolution's weight gradient when sink is a DzToDirectWeight.
template <typename T, typename Rows, typename Sink>
void block_backward(const Rows& rows, const Sink& sink, const BlockShape& s, const T* go, const T* gamma,
                    const T* beta, const T* mean, const T* invstd, T* d_gamma, T* d_beta, bool want_dz, T* dw,
                    int64_t taps, int requested_threads) {
  const int64_t C = s.C, W = s.W, Hp = s.Hp(), Wp = s.Wp();
  const int nt = epilogue_threads(s.pixels() * C, s.N, requested_threads);
  std::vector<T> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = gamma ? T(gamma[c] * invstd[c]) : invstd[c];
    offset[c] = beta ? T(beta[c] - mean[c] * scale[c]) : T(-mean[c] * scale[c]);
  }
  std::vector<double> partial(size_t(nt) * 2 * C, 0.0);
  run_team(nt, [&](int tid, int nth) {
    int64_t n0, n1;
    column_range(s.N, tid, nth, &n0, &n1);
    std::vector<T> buf0(W * C), buf1(W * C), r1(Wp * C, T(0)), r2(Wp * C, T(0));
    double* s1 = partial.data() + size_t(tid) * 2 * C;
    double* s2 = s1 + C;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t ph = 0; ph < Hp; ++ph) {
        const T* z0 = rows.row(n, s.pool ? 2 * ph : ph, buf0.data());
        const T* z1 = s.pool ? rows.row(n, 2 * ph + 1, buf1.data()) : z0;
        backward_sums_row(z0, z1, go + ((n * Hp + ph) * Wp) * C, s, scale.data(), offset.data(), mean, invstd,
                          r1.data(), r2.data());
      }
      flush_sums(r1.data(), r2.data(), Wp, C, s1, s2);
    }
  });
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += partial[size_t(t) * 2 * C + c];
      s2[c] += partial[size_t(t) * 2 * C + C + c];
    }
  for (int64_t c = 0; c < C; ++c) {
    if (d_gamma) d_gamma[c] = T(s2[c]);
    if (d_beta) d_beta[c] = T(s1[c]);
  }
  if (!want_dz) return;
  const DzCoefficients<T> k(s1.data(), s2.data(), gamma, invstd, s.pixels(), C);
  std::vector<double> dw_partial(dw ? size_t(nt) * taps * C : 0, 0.0);
  run_team(nt, [&](int tid, int nth) {
    int64_t n0, n1;
    column_range(s.N, tid, nth, &n0, &n1);
    std::vector<T> buf0(W * C), buf1(W * C), dzb0(W * C), dzb1(W * C);
    // The weight gradient is summed per image in T (a few thousand terms at most for the layers this path
    // serves), then in double across images.
    std::vector<T> dw_img(dw ? taps * C : 0);
    double* dw_acc = dw ? dw_partial.data() + size_t(tid) * taps * C : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(dw_img.begin(), dw_img.end(), T(0));
      for (int64_t ph = 0; ph < Hp; ++ph) {
        const int64_t h0 = s.pool ? 2 * ph : ph;
        const T* z0 = rows.row(n, h0, buf0.data());
        const T* z1 = s.pool ? rows.row(n, h0 + 1, buf1.data()) : z0;
        T* d0 = sink.row(n, h0, dzb0.data());
        T* d1 = s.pool ? sink.row(n, h0 + 1, dzb1.data()) : d0;
        backward_dz_row(z0, z1, go + ((n * Hp + ph) * Wp) * C, s, scale.data(), offset.data(), mean, k, d0, d1);
        sink.done(n, h0, d0, dw_img.data());
        if (s.pool) sink.done(n, h0 + 1, d1, dw_img.data());
      }
      for (int64_t h = s.pool ? 2 * Hp : Hp; h < s.H; ++h) {  // uncovered last row of an odd map
        const T* z0 = rows.row(n, h, buf0.data());
        T* d0 = sink.row(n, h, dzb0.data());
        backward_dz_uncovered_row(z0, W, C, mean, k, d0);
        sink.done(n, h, d0, dw_img.data());
      }
      if (dw_acc)
        for (int64_t i = 0; i < taps * C; ++i) dw_acc[i] += double(dw_img[i]);
    }
  });
  if (dw) {
    for (int64_t i = 0; i < taps * C; ++i) {
      double acc = 0.0;
      for (int t = 0; t < nt; ++t) acc += dw_partial[size_t(t) * taps * C + i];
      dw[i] = T(acc);
    }
  }
}

}  // namespace metakernels::kernels
