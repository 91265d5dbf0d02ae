// Unit tests of the PCGrad Gram stage (csrc/kernels/pcgrad.h): K = G_s G_s^T over the shared columns,
// float and double, against a naive double-precision Gram over all entries. The ISA path is the one
// compiled here with -march=native: on AVX2 without AVX-512, float32 takes the dot form (T < 36) or the
// packed 16-row panels (T >= 36); with AVX-512 the register tiles and the 16 x 16 packed path (T >= 48).
// Row counts around the tile and panel edges (3, 8, 16, 36, 48) and column counts around the vector width,
// the 128-column blocks and the 1024-column flushes exercise every remainder; runs of shared columns
// (masks), row strides ld > P, and bitwise determinism across thread counts are checked too.
//
// Tolerance: every kernel path sums each entry's products in float32 chains of at most 128 products per
// lane (kFlushColumns, kPackCols, kAvx2Kc, the dot form's 1024-column flush), then adds the chains in
// float64. With n = 128 the float32 part errs by at most gamma_n(u32) sum_c |g_a,c g_b,c| (Higham, Thm
// 3.1/3.5; +2 for the widening and the float64 adds, as tests/test_pcgrad.py), the float64 part and the
// reference's own float64 sum by at most gamma_(S+2)(u64) of the same magnitude each.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"
#include "pcgrad.h"

namespace pg = metakernels::kernels::pcgrad;
using mk_test::Rng;

namespace {

double gamma_n(double n, double u) { return n * u / (1.0 - n * u); }

// G [rows, ld] with the columns outside runs (and the padding columns P..ld-1) set to NaN: a kernel that
// reads a column it must not use produces a NaN entry and fails.
template <typename T>
std::vector<T> make_g(int64_t rows, int64_t ld, const std::vector<pg::Run>& runs, Rng& rng) {
  std::vector<T> g(static_cast<size_t>(rows * ld), std::numeric_limits<T>::quiet_NaN());
  for (int64_t r = 0; r < rows; ++r)
    for (const pg::Run& run : runs)
      for (int64_t c = run.begin; c < run.end; ++c) g[r * ld + c] = T(rng.uniform(-1.0, 1.0));
  return g;
}

template <typename T>
void check_gram(int64_t rows, int64_t cols, int64_t ld, const std::vector<pg::Run>& runs, Rng& rng,
                const std::string& what) {
  MK_CONTEXT(std::string(mk_test::type_name<T>()) + " T=" + std::to_string(rows) + " P=" + std::to_string(cols) +
             " ld=" + std::to_string(ld) + " " + what);
  const std::vector<T> g = make_g<T>(rows, ld, runs, rng);
  int64_t shared = 0;
  for (const pg::Run& r : runs) shared += r.end - r.begin;
  std::vector<double> ref(rows * rows), tol(rows * rows);
  const double u = std::numeric_limits<T>::epsilon() / 2, u64 = std::numeric_limits<double>::epsilon() / 2;
  const double rel = gamma_n(128 + 2, u) + 2 * gamma_n(double(shared + 2), u64);
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = 0; b < rows; ++b) {
      double sum = 0.0, mag = 0.0;
      for (const pg::Run& r : runs)
        for (int64_t c = r.begin; c < r.end; ++c) {
          const double p = double(g[a * ld + c]) * double(g[b * ld + c]);
          sum += p;
          mag += std::fabs(p);
        }
      ref[a * rows + b] = sum;
      tol[a * rows + b] = rel * mag + std::numeric_limits<double>::min();
    }
  mk_test::Buffer<double> k1(rows * rows);
  pg::gram<T>(g.data(), rows, ld, runs, k1.data(), 1);
  MK_EXPECT_CLOSE("K (1 thread)", k1.data(), ref, tol);
  MK_CHECK(k1.guards_intact());
  bool symmetric = true;
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = 0; b < a; ++b) symmetric = symmetric && k1.data()[a * rows + b] == k1.data()[b * rows + a];
  MK_CHECK_MSG(symmetric, "K is not exactly symmetric");
  // Bitwise the same for any thread count (chunks fixed by S and T, partials added in chunk order).
  for (int threads : {2, 3}) {
    mk_test::Buffer<double> kt(rows * rows);
    pg::gram<T>(g.data(), rows, ld, runs, kt.data(), threads);
    MK_EXPECT_BITWISE(("K (" + std::to_string(threads) + " threads vs 1)").c_str(), kt.data(), k1.data(),
                      rows * rows);
  }
}

// Random runs over [0, cols): lengths 1..max_len (many below the vector width), gaps 1..37.
std::vector<pg::Run> random_runs(int64_t cols, int64_t max_len, Rng& rng) {
  std::vector<pg::Run> runs;
  for (int64_t c = rng.integer(0, 5); c < cols;) {
    const int64_t end = std::min(cols, c + rng.integer(1, max_len));
    runs.push_back({c, end});
    c = end + rng.integer(1, 37);
  }
  return runs;
}

template <typename T>
void sweep(const std::vector<int64_t>& row_counts, const std::vector<int64_t>& col_counts, int64_t max_work) {
  Rng rng(20240611);
  for (int64_t rows : row_counts)
    for (int64_t cols : col_counts) {
      if (rows * rows * cols > max_work) continue;
      check_gram<T>(rows, cols, cols, {{0, cols}}, rng, "all shared");
      check_gram<T>(rows, cols, cols + 5, {{0, cols}}, rng, "all shared, ld = P + 5");
      if (cols >= 16) {
        check_gram<T>(rows, cols, cols + 3, random_runs(cols, 300, rng), rng, "runs <= 300");
        check_gram<T>(rows, cols, cols, random_runs(cols, 6, rng), rng, "runs <= 6");
      }
    }
}

const std::vector<int64_t> kRows = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 33,
                                    35, 36, 37, 47, 48, 49, 63, 64, 65};
const std::vector<int64_t> kCols = {1, 7, 8, 9, 127, 128, 129, 1000, 1031, 4099, 20011};

MK_TEST(gram_float_shapes) { sweep<float>(kRows, kCols, int64_t(1) << 25); }
MK_TEST(gram_double_shapes) {
  sweep<double>({1, 2, 3, 5, 8, 9, 17, 33, 49}, {1, 7, 9, 129, 1031, 4099}, int64_t(1) << 23);
}

// Several chunks per call (at least 16384 columns each on the AVX2 float path): the bitwise comparison
// across thread counts in check_gram then really spreads chunks over threads.
MK_TEST(gram_float_many_chunks) {
  Rng rng(7);
  for (int64_t rows : {3, 16, 40}) {
    const int64_t cols = 150001;
    check_gram<float>(rows, cols, cols + 1, {{0, cols}}, rng, "many chunks");
    check_gram<float>(rows, cols, cols, random_runs(cols, 2000, rng), rng, "many chunks, runs");
  }
}

// No shared column: K = 0.
MK_TEST(gram_no_shared_columns) {
  const std::vector<float> g(4 * 10, 1.0f);
  mk_test::Buffer<double> k(16);
  pg::gram<float>(g.data(), 4, 10, {}, k.data(), 2);
  bool zero = true;
  for (int64_t i = 0; i < 16; ++i) zero = zero && k.data()[i] == 0.0;
  MK_CHECK_MSG(zero, "K of no shared columns is not 0");
}

}  // namespace
MK_TEST_MAIN()
