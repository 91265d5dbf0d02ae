// The loss of an MLP, its gradient, and Hessian-vector products, for T tasks with their own flat weights.
// Torch-free.
//
// Model (nn.Sequential of Linear layers with an activation after every one but the last):
//   h_0 = x;  z_l = h_{l-1} W_l^T + b_l;  h_l = act(z_l) (l < L);  prediction z_L.
// theta [P] holds, layer by layer, W_l [out, in] row-major then b_l [out] (nn.Sequential's parameter order).
// Losses: mse = mean over N * w_L of (z_L - y)^2 (F.mse_loss); cross_entropy = mean over N of
// logsumexp(z_L[n]) - z_L[n, y_n] (F.cross_entropy).
//
// Gradient (backprop): d_L = dloss/dz_L;  gW_l = d_l^T h_{l-1};  gb_l = sum_n d_l;
//                      dh_{l-1} = d_l W_l;  d_{l-1} = dh_{l-1} * act'(z_{l-1}).
// Hessian-vector product H v for v = (V_l, c_l) (Pearlmutter's R-operator, forward-over-reverse):
//   R-forward:  Rz_l = Rh_{l-1} W_l^T + h_{l-1} V_l^T + c_l,  Rh_l = act'(z_l) * Rz_l,  Rh_0 = 0;
//   loss:       Rd_L = loss''(z_L) Rz_L (mse: 2 Rz / (N w_L); cross entropy: p * (Rz - <p, Rz>) / N per sample);
//   R-backward: R gW_l = Rd_l^T h_{l-1} + d_l^T Rh_{l-1},  R gb_l = sum_n Rd_l,
//               Rdh_{l-1} = Rd_l W_l + d_l V_l,
//               Rd_{l-1} = Rdh_{l-1} * act'(z) + dh_{l-1} * act''(z) * Rz_{l-1},
//   where act''(z) Rz = -2 h Rh for tanh (h = tanh z, Rh = (1 - h^2) Rz) and 0 for relu and identity.
// The op's backward needs g_loss * grad + H g_grad; with E_l = Rd_l + g_loss d_l both come out of the same
// products: out W_l = E_l^T h_{l-1} + d_l^T Rh_{l-1}, out b_l = sum_n E_l.
//
// Layout: activations are sample-major, h [N, w], as the inputs come, so every product vectorises along a
// feature dimension (N is small in few-shot learning: 5-10 samples would fill a third to two thirds of a
// vector). The backward products read W and h by rows in place; the forward products read W^T, which is
// transposed once per layer and call into scratch (in registers, 16 x 16 at a time), or read in place by
// BLAS for the products the GEMM policy sends there.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "parallel.h"
#include "small_gemm.h"

namespace metakernels::kernels {

enum class Loss : int { kMse = 0, kCrossEntropy = 1 };

struct MlpSpec {
  int64_t num_layers = 0;             // L
  const int64_t* widths = nullptr;    // [L + 1]
  int64_t samples = 0;                // N per task
  Activation act = Activation::kRelu;
  Loss loss = Loss::kMse;

  int64_t in(int64_t l) const { return widths[l]; }
  int64_t out(int64_t l) const { return widths[l + 1]; }
  int64_t max_width() const { return *std::max_element(widths, widths + num_layers + 1); }
  int64_t num_params() const {
    int64_t p = 0;
    for (int64_t l = 0; l < num_layers; ++l) p += out(l) * in(l) + out(l);
    return p;
  }
  // Elements of the activations h_1..h_L of one task (the hidden layers' outputs and z_L).
  int64_t activation_elems() const {
    int64_t e = 0;
    for (int64_t l = 1; l <= num_layers; ++l) e += widths[l] * samples;
    return e;
  }
  // Elements of the largest weight matrix.
  int64_t max_weight() const {
    int64_t m = 0;
    for (int64_t l = 0; l < num_layers; ++l) m = std::max(m, in(l) * out(l));
    return m;
  }
  // Multiply-adds of one task's forward pass.
  int64_t forward_macs() const {
    int64_t m = 0;
    for (int64_t l = 0; l < num_layers; ++l) m += samples * in(l) * out(l);
    return m;
  }
};

// Pointers into one task's part of the per-thread scratch.
template <typename T>
struct MlpWorkspace {
  std::vector<T*> h;   // h[l]: h_l [N, w_l], l = 1..L (h[L] = z_L); h[0] is x itself
  std::vector<T*> rh;  // rh[l]: Rh_l [N, w_l], l = 1..L (rh[L] = Rz_L); HVP only (Rh_0 = 0)
  T* d[2] = {nullptr, nullptr};   // d ping-pong [N, max_w]
  T* rd[2] = {nullptr, nullptr};  // Rd ping-pong (HVP)
  T* e = nullptr;                 // E (HVP)
  T* wt = nullptr;                // W^T of the current layer [in, out]
  T* vt = nullptr;                // V^T of the current layer (HVP)

  static int64_t elems(const MlpSpec& s, bool hvp) {
    const int64_t w = s.max_width() * s.samples, acts = s.activation_elems(), weight = s.max_weight();
    return hvp ? 2 * acts + 5 * w + 2 * weight : acts + 2 * w + weight;
  }

  MlpWorkspace(const MlpSpec& s, T* base, bool hvp) : h(s.num_layers + 1, nullptr), rh(s.num_layers + 1, nullptr) {
    const int64_t w = s.max_width() * s.samples, weight = s.max_weight();
    T* p = base;
    for (int64_t l = 1; l <= s.num_layers; ++l) h[l] = p, p += s.widths[l] * s.samples;
    if (hvp)
      for (int64_t l = 1; l <= s.num_layers; ++l) rh[l] = p, p += s.widths[l] * s.samples;
    d[0] = p, p += w;
    d[1] = p, p += w;
    wt = p, p += weight;
    if (hvp) {
      rd[0] = p, p += w;
      rd[1] = p, p += w;
      e = p, p += w;
      vt = p, p += weight;
    }
  }
};

// Offset of layer l's weight in theta (its bias follows the weight).
inline std::vector<int64_t> mlp_weight_offsets(const MlpSpec& s) {
  std::vector<int64_t> off(s.num_layers);
  int64_t p = 0;
  for (int64_t l = 0; l < s.num_layers; ++l) off[l] = p, p += s.out(l) * s.in(l) + s.out(l);
  return off;
}

// C [N, out] = init + H [N, in] . M^T for a weight-shaped M [out, in] (M^T from transposed_operand).
template <typename T, typename Gemm>
inline void forward_product(const Gemm& gemm, const T* m, const T* h, T* c, int64_t in, int64_t out, int64_t n,
                            GemmInit init, const T* bias, T* scratch, bool fill) {
  GemmArgs<T> g;
  g.m = n, g.n = out, g.k = in;
  g.a = h, g.a_rs = in, g.a_cs = 1;
  transposed_operand(gemm, m, in, out, n, scratch, fill, g);
  g.c = c, g.ldc = out;
  g.init = init, g.bias = bias;
  gemm(g);
}

// C [N, in] = init + D [N, out] . M [out, in]: the backward product through the weight-shaped M.
template <typename T, typename Gemm>
inline void backward_product(const Gemm& gemm, const T* m, const T* d, T* c, int64_t in, int64_t out, int64_t n,
                             GemmInit init) {
  GemmArgs<T> g;
  g.m = n, g.n = in, g.k = out;
  g.a = d, g.a_rs = out, g.a_cs = 1;
  g.b = m, g.ldb = in;
  g.c = c, g.ldc = in;
  g.init = init;
  gemm(g);
}

// G [out, in] = init + D^T [out, N] . H [N, in].
template <typename T, typename Gemm>
inline void weight_product(const Gemm& gemm, const T* d, const T* h, T* gw, int64_t in, int64_t out, int64_t n,
                           GemmInit init) {
  GemmArgs<T> g;
  g.m = out, g.n = in, g.k = n;
  g.a = d, g.a_rs = 1, g.a_cs = out;
  g.b = h, g.ldb = in;
  g.c = gw, g.ldc = in;
  g.init = init;
  gemm(g);
}

// gb[o] = sum_n D[n, o].
template <typename T>
inline void column_sums(const T* d, T* gb, int64_t out, int64_t n) {
  std::fill(gb, gb + out, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* row = d + i * out;
    for (int64_t o = 0; o < out; ++o) gb[o] += row[o];
  }
}

// Forward pass of one task (and, with v, the R-forward): fills ws.h[1..L] (and ws.rh[1..L]).
template <typename T, typename Gemm, typename Tanh>
void mlp_forward_task(const MlpSpec& s, const std::vector<int64_t>& off, const T* theta, const T* x, const T* v,
                      MlpWorkspace<T>& ws, const Gemm& gemm, const Tanh& tanh_fn) {
  const int64_t n = s.samples, L = s.num_layers;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = s.in(l), out = s.out(l);
    const T* w = theta + off[l];
    const T* h = l == 0 ? x : ws.h[l];
    forward_product(gemm, w, h, ws.h[l + 1], in, out, n, GemmInit::kColumnBias, w + out * in, ws.wt, true);
    if (l + 1 < L) apply_activation(s.act, ws.h[l + 1], out * n, tanh_fn);
    if (v == nullptr) continue;
    // Rz = h V^T + c (+ Rh W^T, W^T still in ws.wt); Rh = act'(z) Rz
    const T* vw = v + off[l];
    forward_product(gemm, vw, h, ws.rh[l + 1], in, out, n, GemmInit::kColumnBias, vw + out * in, ws.vt, true);
    if (l > 0)
      forward_product(gemm, w, ws.rh[l], ws.rh[l + 1], in, out, n, GemmInit::kAccumulate,
                      static_cast<const T*>(nullptr), ws.wt, false);
    if (l + 1 < L) multiply_by_slope(s.act, ws.rh[l + 1], ws.h[l + 1], out * n);
  }
}

// The loss of one task from z_L [N, w_L], and d = dloss/dz_L. Sums in double.
template <typename T>
T loss_and_output_grad(const MlpSpec& s, const T* z, const T* target, const int64_t* labels, T* d) {
  const int64_t n = s.samples, k = s.widths[s.num_layers];
  if (s.loss == Loss::kMse) {
    const T scale = T(2) / T(n * k);
    double sum = 0.0;
    for (int64_t j = 0; j < n * k; ++j) {
      const T diff = z[j] - target[j];
      sum += double(diff) * double(diff);
      d[j] = scale * diff;
    }
    return T(sum / double(n * k));
  }
  double sum = 0.0;
  const T inv_n = T(1) / T(n);
  for (int64_t i = 0; i < n; ++i) {
    const T* zi = z + i * k;
    T* di = d + i * k;
    const T mx = *std::max_element(zi, zi + k);
    T se = T(0);
    for (int64_t o = 0; o < k; ++o) {
      di[o] = std::exp(zi[o] - mx);
      se += di[o];
    }
    const int64_t y = labels[i];
    sum += double(mx) + std::log(double(se)) - double(zi[y]);
    for (int64_t o = 0; o < k; ++o) di[o] = (di[o] / se - (o == y ? T(1) : T(0))) * inv_n;
  }
  return T(sum / double(n));
}

// Rd_L = loss''(z_L) Rz_L, given d_L (cross entropy recovers the softmax p from it: p = N d + onehot).
template <typename T>
void loss_hessian_product(const MlpSpec& s, const T* d, const int64_t* labels, const T* rz, T* rd) {
  const int64_t n = s.samples, k = s.widths[s.num_layers];
  if (s.loss == Loss::kMse) {
    const T scale = T(2) / T(n * k);
    for (int64_t j = 0; j < k * n; ++j) rd[j] = scale * rz[j];
    return;
  }
  const T inv_n = T(1) / T(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = labels[i];
    const T* di = d + i * k;
    const T* rzi = rz + i * k;
    T* rdi = rd + i * k;
    T dot = T(0);
    for (int64_t o = 0; o < k; ++o) {
      rdi[o] = di[o] * T(n) + (o == y ? T(1) : T(0));  // p, for now
      dot += rdi[o] * rzi[o];
    }
    for (int64_t o = 0; o < k; ++o) rdi[o] = rdi[o] * (rzi[o] - dot) * inv_n;
  }
}

// Loss and gradient of one task.
template <typename T, typename Gemm, typename Tanh>
void mlp_loss_grad_task(const MlpSpec& s, const std::vector<int64_t>& off, const T* theta, const T* x,
                        const T* target, const int64_t* labels, T* loss, T* grad, MlpWorkspace<T>& ws,
                        const Gemm& gemm, const Tanh& tanh_fn) {
  const int64_t n = s.samples, L = s.num_layers;
  mlp_forward_task(s, off, theta, x, static_cast<const T*>(nullptr), ws, gemm, tanh_fn);
  T* d = ws.d[0];
  T* next = ws.d[1];
  *loss = loss_and_output_grad(s, ws.h[L], target, labels, d);
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t in = s.in(l), out = s.out(l);
    const T* h = l == 0 ? x : ws.h[l];
    T* gw = grad + off[l];
    weight_product(gemm, d, h, gw, in, out, n, GemmInit::kZero);
    column_sums(d, gw + out * in, out, n);
    if (l > 0) {
      backward_product(gemm, theta + off[l], d, next, in, out, n, GemmInit::kZero);
      multiply_by_slope(s.act, next, ws.h[l], in * n);
      std::swap(d, next);
    }
  }
}

// out = g_loss * grad + H v for one task (grad and H of this task's loss in its theta).
template <typename T, typename Gemm, typename Tanh>
void mlp_hvp_task(const MlpSpec& s, const std::vector<int64_t>& off, const T* theta, const T* x, const T* target,
                  const int64_t* labels, const T* v, T g_loss, T* result, MlpWorkspace<T>& ws, const Gemm& gemm,
                  const Tanh& tanh_fn) {
  const int64_t n = s.samples, L = s.num_layers;
  mlp_forward_task(s, off, theta, x, v, ws, gemm, tanh_fn);
  T* d = ws.d[0];
  T* rd = ws.rd[0];
  T* dh = ws.d[1];
  T* rdh = ws.rd[1];
  loss_and_output_grad(s, ws.h[L], target, labels, d);
  loss_hessian_product(s, d, labels, ws.rh[L], rd);
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t in = s.in(l), out = s.out(l);
    const T* w = theta + off[l];
    const T* vw = v + off[l];
    T* rw = result + off[l];
    for (int64_t j = 0; j < out * n; ++j) ws.e[j] = rd[j] + g_loss * d[j];  // E = Rd + g_loss d
    weight_product(gemm, ws.e, l == 0 ? x : ws.h[l], rw, in, out, n, GemmInit::kZero);
    if (l > 0) weight_product(gemm, d, ws.rh[l], rw, in, out, n, GemmInit::kAccumulate);
    column_sums(ws.e, rw + out * in, out, n);
    if (l == 0) break;
    backward_product(gemm, w, d, dh, in, out, n, GemmInit::kZero);
    backward_product(gemm, w, rd, rdh, in, out, n, GemmInit::kZero);
    backward_product(gemm, vw, d, rdh, in, out, n, GemmInit::kAccumulate);
    const T* h = ws.h[l];
    const T* rh = ws.rh[l];
    const int64_t m = in * n;
    switch (s.act) {
      case Activation::kIdentity:
        break;
      case Activation::kRelu:
        for (int64_t j = 0; j < m; ++j) {
          const bool on = h[j] > T(0);
          rdh[j] = on ? rdh[j] : T(0);
          dh[j] = on ? dh[j] : T(0);
        }
        break;
      case Activation::kTanh:
        for (int64_t j = 0; j < m; ++j) {
          const T slope = T(1) - h[j] * h[j];
          rdh[j] = rdh[j] * slope - T(2) * dh[j] * h[j] * rh[j];
          dh[j] = dh[j] * slope;
        }
        break;
    }
    std::swap(d, dh);
    std::swap(rd, rdh);
  }
}

// --- drivers over tasks ------------------------------------------------------------------------------

// loss [T], grad [T, P] for T tasks: theta [T, P], x [T, N, w_0], target [T, N, w_L] (mse) or labels [T, N].
template <typename T, typename Gemm, typename Tanh>
void mlp_loss_grad(const MlpSpec& s, int64_t tasks, const T* theta, const T* x, const T* target,
                   const int64_t* labels, T* loss, T* grad, int threads, const Gemm& gemm, const Tanh& tanh_fn) {
  const std::vector<int64_t> off = mlp_weight_offsets(s);
  const int64_t P = s.num_params(), n = s.samples, w0 = s.widths[0], wl = s.widths[s.num_layers];
  const int64_t elems = MlpWorkspace<T>::elems(s, false);
  const int nt = task_threads(tasks, 6 * s.forward_macs(), threads);
  for_each_task_range<T>(tasks, elems, nt, [&](int64_t begin, int64_t end, T* scratch) {
    MlpWorkspace<T> ws(s, scratch, false);
    for (int64_t t = begin; t < end; ++t)
      mlp_loss_grad_task(s, off, theta + t * P, x + t * n * w0, target ? target + t * n * wl : nullptr,
                         labels ? labels + t * n : nullptr, loss + t, grad + t * P, ws, gemm, tanh_fn);
  });
}

// result [T, P] = g_loss[t] * grad_t + H_t v_t; g_loss may be null (zero).
template <typename T, typename Gemm, typename Tanh>
void mlp_hvp(const MlpSpec& s, int64_t tasks, const T* theta, const T* x, const T* target, const int64_t* labels,
             const T* v, const T* g_loss, T* result, int threads, const Gemm& gemm, const Tanh& tanh_fn) {
  const std::vector<int64_t> off = mlp_weight_offsets(s);
  const int64_t P = s.num_params(), n = s.samples, w0 = s.widths[0], wl = s.widths[s.num_layers];
  const int64_t elems = MlpWorkspace<T>::elems(s, true);
  const int nt = task_threads(tasks, 16 * s.forward_macs(), threads);
  for_each_task_range<T>(tasks, elems, nt, [&](int64_t begin, int64_t end, T* scratch) {
    MlpWorkspace<T> ws(s, scratch, true);
    for (int64_t t = begin; t < end; ++t)
      mlp_hvp_task(s, off, theta + t * P, x + t * n * w0, target ? target + t * n * wl : nullptr,
                   labels ? labels + t * n : nullptr, v + t * P, g_loss ? g_loss[t] : T(0), result + t * P, ws,
                   gemm, tanh_fn);
  });
}

}  // namespace metakernels::kernels
