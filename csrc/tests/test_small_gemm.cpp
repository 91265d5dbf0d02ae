// Unit tests of the register-blocked small GEMM (csrc/kernels/small_gemm.h) that the layer ops
// (task_linear, mlp_loss_grad) are built on, float and double, against a naive double-precision loop.
// Every ISA path the header has (AVX-512, AVX2 + FMA, scalar) is the one compiled here with -march=native,
// so a machine of each kind tests its own path: row counts around the register tile height (6 with AVX2,
// 8 with AVX-512) and column counts around one and two vector widths exercise the tile remainders and the
// masked tails, strided (transposed) A covers the operand-without-copy case, and every init mode is checked.
//
// Tolerance: each C entry is a k-term dot product plus an init term; the kernel accumulates in T, so the
// forward error is at most gamma_(k+1) * sum_p |A(i,p) B(p,j)| + |init| (Higham, Thm 3.5), plus the
// reference's own error in double. We check |got - ref| <= 2 (k + 2) eps_T * M + tiny.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"
#include "small_gemm.h"

namespace mk = metakernels::kernels;
using mk_test::Buffer;
using mk_test::Rng;

namespace {

template <typename T>
void check_gemm(int64_t m, int64_t n, int64_t k, bool transposed_a, mk::GemmInit init, Rng& rng) {
  MK_CONTEXT(std::string(mk_test::type_name<T>()) + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
             " k=" + std::to_string(k) + (transposed_a ? " A^T" : " A") + " init=" + std::to_string(int(init)));
  // A is stored as [m, k] (or [k, m] when read transposed), B [k, n] with a padded leading dimension.
  const std::vector<T> a = rng.vector<T>(m * k, -1.0, 1.0);
  const int64_t ldb = n + 3;
  const std::vector<T> b = rng.vector<T>(k * ldb, -1.0, 1.0);
  const std::vector<T> bias = rng.vector<T>(std::max(m, n), -1.0, 1.0);
  const int64_t ldc = n + 5;
  std::vector<T> c0 = rng.vector<T>(m * ldc, -1.0, 1.0);
  Buffer<T> c(m * ldc);
  for (int64_t i = 0; i < m * ldc; ++i) c.data()[i] = c0[i];

  mk::GemmArgs<T> g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a.data();
  g.a_rs = transposed_a ? 1 : k;
  g.a_cs = transposed_a ? m : 1;
  g.b = b.data();
  g.ldb = ldb;
  g.c = c.data();
  g.ldc = ldc;
  g.init = init;
  g.bias = bias.data();
  mk::small_gemm(g);

  const double eps = std::numeric_limits<T>::epsilon();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const double got = c.data()[i * ldc + j];
      if (j >= n) {  // padding columns must be untouched
        MK_CHECK_MSG(got == double(c0[i * ldc + j]), "column " + std::to_string(j) + " of the padding was written");
        continue;
      }
      double init_v = 0.0;
      if (init == mk::GemmInit::kAccumulate) init_v = c0[i * ldc + j];
      if (init == mk::GemmInit::kRowBias) init_v = bias[i];
      if (init == mk::GemmInit::kColumnBias) init_v = bias[j];
      double ref = init_v, mag = std::fabs(init_v);
      for (int64_t p = 0; p < k; ++p) {
        const double av = transposed_a ? a[p * m + i] : a[i * k + p];
        ref += av * double(b[p * ldb + j]);
        mag += std::fabs(av * double(b[p * ldb + j]));
      }
      const double tol = 2.0 * double(k + 2) * eps * mag + 1e-30;
      MK_CHECK_MSG(std::fabs(got - ref) <= tol, "C[" + std::to_string(i) + ", " + std::to_string(j) + "] = " +
                                                   std::to_string(got) + ", reference " + std::to_string(ref));
    }
  MK_CHECK(c.guards_intact());
}

template <typename T>
void sweep() {
  Rng rng(1234);
  const int64_t ms[] = {1, 2, 5, 6, 7, 8, 9, 13, 40};
  const int64_t ns[] = {1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 40};
  const int64_t ks[] = {1, 10, 41};
  const mk::GemmInit inits[] = {mk::GemmInit::kZero, mk::GemmInit::kAccumulate, mk::GemmInit::kRowBias,
                                mk::GemmInit::kColumnBias};
  for (int64_t m : ms)
    for (int64_t n : ns)
      for (int64_t k : ks)
        for (bool tr : {false, true})
          for (mk::GemmInit init : inits) check_gemm<T>(m, n, k, tr, init, rng);
}

MK_TEST(small_gemm_float) { sweep<float>(); }
MK_TEST(small_gemm_double) { sweep<double>(); }

}  // namespace
MK_TEST_MAIN()
