// Task-batched Linear + activation and its backward, one task at a time (the caller loops or threads over
// tasks). Torch-free.
//
//   forward:  out[n, o] = act(sum_i x[n, i] W[o, i] + b[o])             x [N, in], W [out, in], out [N, out]
//   backward: dz = grad_out * act'(out);  d_x = dz W;  d_W = dz^T x;  d_b = sum_n dz[n, :]
//
// Every product vectorises along a feature dimension (the sample count N is small in few-shot learning).
// The backward's products read W and x by rows in place; the forward reads W^T, transposed once per task
// into scratch (16 x 16 in registers), or in place when a dimension is 1 or BLAS computes the product (see
// transposed_operand in small_gemm.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "small_gemm.h"

namespace metakernels::kernels {

// Scratch elements one task's forward needs (W^T).
inline int64_t task_linear_forward_scratch(int64_t in, int64_t out) { return in * out; }

// One task's forward. bias may be null.
template <typename T, typename Gemm, typename Tanh>
void task_linear_forward_task(const T* x, const T* w, const T* bias, T* out, int64_t n, int64_t in, int64_t outf,
                              Activation act, T* scratch, const Gemm& gemm, const Tanh& tanh_fn) {
  // out [N, out] = x [N, in] . W^T [in, out] (+ bias per column)
  GemmArgs<T> g;
  g.m = n, g.n = outf, g.k = in;
  g.a = x, g.a_rs = in, g.a_cs = 1;
  transposed_operand(gemm, w, in, outf, n, scratch, true, g);
  g.c = out, g.ldc = outf;
  g.init = bias != nullptr ? GemmInit::kColumnBias : GemmInit::kZero;
  g.bias = bias;
  gemm(g);
  apply_activation(act, out, n * outf, tanh_fn);
}

// Scratch elements one task's backward needs: dz [N, out].
inline int64_t task_linear_backward_scratch(int64_t n, int64_t out) { return n * out; }

// One task's backward. Null outputs are not computed. d_b is accumulated in the working type over N
// (as torch's sum over a dimension of this size does).
template <typename T, typename Gemm>
void task_linear_backward_task(const T* grad_out, const T* x, const T* w, const T* out, T* d_x, T* d_w, T* d_b,
                               int64_t n, int64_t in, int64_t outf, Activation act, T* scratch, const Gemm& gemm) {
  const T* dz = grad_out;
  if (act != Activation::kIdentity) {
    std::copy(grad_out, grad_out + n * outf, scratch);
    multiply_by_slope(act, scratch, out, n * outf);
    dz = scratch;
  }
  if (d_x != nullptr) {
    // d_x [N, in] = dz [N, out] . W [out, in]
    GemmArgs<T> g;
    g.m = n, g.n = in, g.k = outf;
    g.a = dz, g.a_rs = outf, g.a_cs = 1;
    g.b = w, g.ldb = in;
    g.c = d_x, g.ldc = in;
    gemm(g);
  }
  if (d_w != nullptr) {
    // d_W [out, in] = dz^T [out, N] . x [N, in]
    GemmArgs<T> g;
    g.m = outf, g.n = in, g.k = n;
    g.a = dz, g.a_rs = 1, g.a_cs = outf;
    g.b = x, g.ldb = in;
    g.c = d_w, g.ldc = in;
    gemm(g);
  }
  if (d_b != nullptr) {
    std::fill(d_b, d_b + outf, T(0));
    for (int64_t s = 0; s < n; ++s) {
      const T* row = dz + s * outf;
      for (int64_t o = 0; o < outf; ++o) d_b[o] += row[o];
    }
  }
}

// --- drivers over tasks ------------------------------------------------------------------------------

// out [T, N, out] = act(x W^T + b) per task: x [T, N, in], w [T, out, in], bias [T, out] or null.
template <typename T, typename Gemm, typename Tanh>
void task_linear_forward(int64_t tasks, const T* x, const T* w, const T* bias, T* out, int64_t n, int64_t in,
                         int64_t outf, Activation act, int threads, const Gemm& gemm, const Tanh& tanh_fn) {
  const int nt = task_threads(tasks, 2 * n * in * outf, threads);
  for_each_task<T>(tasks, task_linear_forward_scratch(in, outf), nt, [&](int64_t t, T* scratch) {
    task_linear_forward_task(x + t * n * in, w + t * outf * in, bias != nullptr ? bias + t * outf : nullptr,
                             out + t * n * outf, n, in, outf, act, scratch, gemm, tanh_fn);
  });
}

// The backward over tasks; null outputs are skipped. d_x [T, N, in], d_w [T, out, in], d_b [T, out].
template <typename T, typename Gemm>
void task_linear_backward(int64_t tasks, const T* grad_out, const T* x, const T* w, const T* out, T* d_x, T* d_w,
                          T* d_b, int64_t n, int64_t in, int64_t outf, Activation act, int threads,
                          const Gemm& gemm) {
  const int64_t products = (d_x != nullptr) + (d_w != nullptr);
  const int nt = task_threads(tasks, 2 * n * in * outf * std::max<int64_t>(products, 1), threads);
  for_each_task<T>(tasks, task_linear_backward_scratch(n, outf), nt, [&](int64_t t, T* scratch) {
    task_linear_backward_task(grad_out + t * n * outf, x + t * n * in, w + t * outf * in, out + t * n * outf,
                              d_x != nullptr ? d_x + t * n * in : nullptr,
                              d_w != nullptr ? d_w + t * outf * in : nullptr,
                              d_b != nullptr ? d_b + t * outf : nullptr, n, in, outf, act, scratch, gemm);
  });
}

}  // namespace metakernels::kernels
