// What the layer ops (task_linear, mlp_loss_grad) share on the torch side: the GEMM policy that sends large
// products to BLAS, the vectorised tanh, and the parsing of their string options.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#if defined(__AVX512F__)
#include <sleef.h>
#endif

#include <string>

#include "../kernels/small_gemm.h"
#include "common.h"

namespace metakernels {

// Products of at least this many multiply-adds go to BLAS (MKL through at::mm), smaller ones to the
// register-blocked kernel of csrc/kernels/small_gemm.h. Measured on the dev VM (one thread, float32, noisy:
// other jobs on both cores), small kernel against at::mm on from_blob views, forward product x W^T
// (the small kernel's time includes transposing W) and weight product d^T x:
//   N = 5,  128 x 128 (82k MACs): forward 5.5 vs 5.2 us, weight 3.3 vs 4.7 us
//   N = 10, 128 x 128 (164k):     forward 10.2 vs 8.4 us, weight 4.7 vs 6.1 us
//   N = 5,  256 x 256 (328k):     forward 22.5 vs 11.9 us, weight 13.4 vs 11.0 us
//   N = 10, 40 x 40 (16k):        forward 1.0 vs 3.4 us, weight 0.7 vs 2.6 us
// i.e. ~2-3 us of fixed cost in the ATen call (tensor wrappers, dispatch, MKL's packing) against the small
// kernel's lower rate on large operands (its B panel leaves L1) and the transpose. The crossover is near
// 100k MACs for the forward products and 300k for the weight products; one threshold serves both (a product
// the policy calls large may read a transposed B, so the layout decision and the kernel must agree).
constexpr int64_t kBlasMacs = int64_t{1} << 17;

struct BlasGemm {
  bool large(int64_t m, int64_t n, int64_t k) const { return m * n * k >= kBlasMacs; }

  template <typename T>
  void operator()(const kernels::GemmArgs<T>& g) const {
    if (!large(g.m, g.n, g.k)) {
      kernels::small_gemm(g);
      return;
    }
    // Views of the operands in place; at::mm passes the strides to BLAS as transpose flags and leading
    // dimensions (every operand here has a unit stride in one dimension). Called from OpenMP worker
    // threads when the tasks are split over threads: ATen then runs the product on that thread.
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const at::Tensor a = at::from_blob(const_cast<T*>(g.a), {g.m, g.k}, {g.a_rs, g.a_cs}, opts);
    const at::Tensor b = at::from_blob(const_cast<T*>(g.b), {g.k, g.n}, {g.ldb, g.b_cs}, opts);
    at::Tensor c = at::from_blob(g.c, {g.m, g.n}, {g.ldc, 1}, opts);
    switch (g.init) {
      case kernels::GemmInit::kZero:
        at::mm_out(c, a, b);
        return;
      case kernels::GemmInit::kAccumulate:
        c.addmm_(a, b);
        return;
      case kernels::GemmInit::kRowBias:
        c.copy_(at::from_blob(const_cast<T*>(g.bias), {g.m, 1}, opts).expand({g.m, g.n}));
        c.addmm_(a, b);
        return;
      case kernels::GemmInit::kColumnBias:
        c.copy_(at::from_blob(const_cast<T*>(g.bias), {1, g.n}, opts).expand({g.m, g.n}));
        c.addmm_(a, b);
        return;
    }
  }
};

// tanh with SLEEF's 1-ulp vector functions, which libtorch exports (results within 1 ulp of torch.tanh's);
// std::tanh one element at a time is 8x slower in float32 (3.4x in float64; 400 elements, dev VM), where a
// tanh layer's activations would cost as much as its product.
struct VectorTanh {
  void operator()(float* x, int64_t n) const {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, Sleef_tanhf16_u10(_mm512_loadu_ps(x + i)));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
      _mm512_mask_storeu_ps(x + i, m, Sleef_tanhf16_u10(_mm512_maskz_loadu_ps(m, x + i)));
      i = n;
    }
#endif
    for (; i < n; ++i) x[i] = std::tanh(x[i]);
  }
  void operator()(double* x, int64_t n) const {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(x + i, Sleef_tanhd8_u10(_mm512_loadu_pd(x + i)));
    if (i < n) {
      const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1u);
      _mm512_mask_storeu_pd(x + i, m, Sleef_tanhd8_u10(_mm512_maskz_loadu_pd(m, x + i)));
      i = n;
    }
#endif
    for (; i < n; ++i) x[i] = std::tanh(x[i]);
  }
};

inline kernels::Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "relu") return kernels::Activation::kRelu;
  if (name == "tanh") return kernels::Activation::kTanh;
  if (name == "identity") return kernels::Activation::kIdentity;
  TORCH_CHECK_VALUE(false, "metakernels.", op, ": activation must be one of 'identity', 'relu', 'tanh', got '",
                    std::string(name), "'");
}

// The layer ops compute in float32 or float64 only.
inline void check_layer_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "metakernels.", op, ": ", name,
                   " must be a float32 or float64 tensor, got dtype ", t.scalar_type());
}

}  // namespace metakernels
