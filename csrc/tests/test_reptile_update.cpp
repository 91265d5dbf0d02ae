// Unit tests of the torch-free reptile_update kernel (csrc/kernels/reptile_update.h), float and double,
// against a naive double-precision loop written here.
//
// Tolerance. out = theta + epsilon * (mean_t fast[t] - theta). The kernel sums the column in double
// (rows - 1 roundings), scales by 1/rows (2 roundings in double), rounds the mean to T and finishes with
// 3 operations in T. Forward-error analysis bounds the error by gamma_k of the absolute-value expression
//     M = |theta| + |epsilon| * (mean_t |fast[t]| + |theta|),
// and the double-precision reference carries an error of the same kind, so
//     tol = (16 * eps_T + (rows + 2) * eps_double) * M + FLT_MIN/DBL_MIN
// (16 * eps_T = 32 units of roundoff, twice the <= 4 + 3 roundings in T plus the reference's in double;
// (rows + 2) * eps_double covers both sums). Every column is computed by one thread in the same order
// whatever the partition, so results for different thread counts must be bitwise equal.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"
#include "reptile_update.h"

namespace mk = metakernels::kernels;
using mk_test::Buffer;
using mk_test::Rng;

namespace {

constexpr double kRelTol = 16.0;
const int kThreadCounts[] = {1, 2, 3};

struct Shape {
  int64_t rows, cols;
};

// As in test_inner_step.cpp: 1x1, small and prime sizes, single rows just below and above
// kParallelGrain, and batches above it whose thread and 2048-column tile boundaries fall in varied
// places; 4099 x 11 is above the grain but too narrow to split; 1 x 5 and 64 x 1031 cover one task and
// many tasks.
const Shape kShapes[] = {{1, 1},     {1, 5},     {2, 1},     {3, 5},     {7, 13},     {31, 257},   {1, 32749},
                         {1, 32771}, {2, 16411}, {17, 2053}, {8, 4099},  {3, 12289},  {4099, 11},  {64, 1031}};

template <typename T>
void check_case(const std::vector<T>& theta, const std::vector<T>& fast, double epsilon_in, int64_t rows,
                int64_t cols) {
  const T epsilon = T(epsilon_in);
  const double eps_t = std::numeric_limits<T>::epsilon();
  const double eps_d = std::numeric_limits<double>::epsilon();

  // naive reference
  std::vector<double> ref(cols), tol(cols);
  for (int64_t c = 0; c < cols; ++c) {
    double sum = 0.0, sum_abs = 0.0;
    for (int64_t t = 0; t < rows; ++t) {
      sum += fast[t * cols + c];
      sum_abs += std::fabs(double(fast[t * cols + c]));
    }
    const double mean = sum / double(rows);
    const double th = theta[c];
    ref[c] = th + double(epsilon) * (mean - th);
    const double mag = std::fabs(th) + std::fabs(double(epsilon)) * (sum_abs / double(rows) + std::fabs(th));
    tol[c] = (kRelTol * eps_t + double(rows + 2) * eps_d) * mag + std::numeric_limits<T>::min();
  }

  const std::vector<T> theta_before = theta, fast_before = fast;
  std::unique_ptr<Buffer<T>> single;
  for (int threads : kThreadCounts) {
    MK_CONTEXT("threads=" + std::to_string(threads) + " (effective " +
               std::to_string(mk::effective_threads(rows, cols, threads)) + ")");
    auto out = std::make_unique<Buffer<T>>(cols);
    mk::reptile_update<T, T>(theta.data(), fast.data(), epsilon, out->data(), rows, cols, threads);
    MK_CHECK(out->guards_intact());
    MK_EXPECT_CLOSE("reptile out", out->data(), ref, tol);
    if (epsilon_in == 0.0) MK_EXPECT_BITWISE("epsilon = 0 leaves theta", out->data(), theta.data(), cols);
    if (single)
      MK_EXPECT_BITWISE("reptile out vs 1 thread", out->data(), single->data(), cols);
    else
      single = std::move(out);
  }
  MK_CHECK(theta == theta_before);
  MK_CHECK(fast == fast_before);
}

template <typename T>
void run_all_cases(uint64_t seed) {
  Rng rng(seed);
  const double epsilons[] = {0.0, 1.0, 0.1, -0.5, 1.75};
  for (const Shape& s : kShapes) {
    const std::vector<T> theta = rng.vector<T>(s.cols, -2.0, 2.0);
    const std::vector<T> fast = rng.vector<T>(s.rows * s.cols, -2.0, 2.0);
    for (double epsilon : epsilons) {
      char eps_str[32];
      std::snprintf(eps_str, sizeof eps_str, "%g", epsilon);
      MK_CONTEXT(std::string(mk_test::type_name<T>()) + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols) +
                 " epsilon=" + eps_str);
      check_case<T>(theta, fast, epsilon, s.rows, s.cols);
    }
  }
}

}  // namespace

MK_TEST(parallel_shapes_get_a_team) {
  int parallel = 0;
  for (const Shape& s : kShapes) {
    const bool should = s.rows * s.cols >= mk::kParallelGrain && s.cols >= 512;
    MK_CHECK_MSG((mk::effective_threads(s.rows, s.cols, 2) == 2) == should,
                 s.rows << "x" << s.cols << " -> " << mk::effective_threads(s.rows, s.cols, 2));
    parallel += should;
  }
  MK_CHECK(parallel >= 4);
}

MK_TEST(reptile_update_float) { run_all_cases<float>(0x5eed0101); }

MK_TEST(reptile_update_double) { run_all_cases<double>(0x5eed0102); }

// Fast weights far from theta and from each other (large cancellation in the mean).
MK_TEST(reptile_update_large_spread) {
  Rng rng(0x5eed0103);
  const int64_t rows = 9, cols = 8209;
  std::vector<double> theta = rng.vector<double>(cols, -1e3, 1e3);
  std::vector<double> fast = rng.vector<double>(rows * cols, -1e6, 1e6);
  MK_CONTEXT("double 9x8209 large spread");
  check_case<double>(theta, fast, 0.75, rows, cols);
}

MK_TEST_MAIN()
