// Unit tests of the torch-free inner_step kernels (csrc/kernels/inner_step.h): forward and backward,
// float and double, against a naive double-precision loop written here.
//
// Tolerance. The kernels compute in A = T (the op-math type of float and double) and every output is a
// short chain of +, -, * (at most 7 roundings) or, for the rate / shared-theta0 gradients, a sum of n such
// products accumulated in double. Standard forward-error analysis bounds the error of such an expression
// by gamma_k * M ~= k * (eps/2) * M, where M is the same expression evaluated with every operand and
// operation replaced by its absolute value (`mag` below), and a recursive sum of n terms adds
// gamma_{n-1}(double) * sum|terms|. The reference is itself evaluated in double and carries the same
// kind of error. Hence
//     tol = (16 * eps_T + n * eps_double) * M + FLT_MIN/DBL_MIN,
// where 16 * eps_T = 32 units of roundoff is twice the worst case of kernel (<= 7 + 1 final rounding) plus
// reference (<= 7) for T = double, and n * eps_double = 2n units covers both the kernel's and the
// reference's summation. The bound holds for any summation order (threads, tiles) and with or without
// FMA contraction (-march=native), so it is independent of the build and of the thread count. The test
// prints how much of it the kernels actually use.
//
// Determinism. Outputs computed per element (out, d_theta, d_grad, per-task d_theta0) and the column
// reductions over rows (per-coordinate d_lr, shared d_theta0) do not depend on the column partition, so
// they must be bitwise equal for every thread count and every subset of requested outputs. The scalar
// and segmented d_lr sum over columns owned by several threads, so across thread counts they are only
// compared within the tolerance (across output subsets at a fixed thread count they are bitwise equal).
// All outputs, d_lr's vectorised reduction included, must also be bitwise independent of the addresses of
// the buffers (inner_step_independent_of_alignment).
//
// Out-of-bounds accesses. Outputs are NaN-filled (an unwritten element fails the comparison) and carry
// guard zones that must survive each call; a METAKERNELS_SANITIZE build drops the guards and allocates
// every buffer exactly, so AddressSanitizer reports any read or write past an input or output.
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
#include "inner_step.h"

namespace mk = metakernels::kernels;
using mk_test::Buffer;
using mk_test::Rng;

namespace {

constexpr double kRelTol = 16.0;  // units of eps_T, see above
const int kThreadCounts[] = {1, 2, 3};

struct Shape {
  int64_t rows, cols;
};

// 1x1, small and prime sizes, wide rows just below and above kParallelGrain (32768) with 1 row, and
// batches above kParallelGrain whose column counts put thread boundaries (for 2 and 3 threads) and
// 2048-column tile boundaries at varied places: 8 x 4099 gives a 2-column tile at the end of thread 0's
// range and a 1-column tile at the end of thread 1's. 4099 x 11 is above the grain but too narrow to
// split (fewer than 2 * 256 columns).
const Shape kShapes[] = {{1, 1},    {1, 2},     {2, 1},     {3, 5},      {7, 13},     {31, 257},  {1, 32749},
                         {1, 32771}, {2, 16411}, {17, 2053}, {8, 4099},   {3, 12289},  {4099, 11}};

std::string str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Segment offset tables [S + 1] for P columns: starting at 0, ending at P, non-decreasing (repeated
// offsets are empty segments), as the extension validates them.
std::vector<std::pair<std::string, std::vector<int64_t>>> segment_tables(int64_t P, Rng& rng) {
  auto table = [P](std::vector<int64_t> cuts) {
    for (int64_t& c : cuts) c = std::clamp<int64_t>(c, 0, P);
    std::sort(cuts.begin(), cuts.end());
    cuts.insert(cuts.begin(), 0);
    cuts.push_back(P);
    return cuts;
  };
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.emplace_back("one segment", table({}));
  out.emplace_back("empty segments at both ends", table({0, 0, P}));
  {
    // Segments crossing every tile boundary and every 2- and 3-thread boundary by a few columns, empty
    // segments sitting exactly on a tile boundary, a thread boundary and in the middle.
    std::vector<int64_t> cuts = {1, P - 1, P / 2, P / 2, 2 * mk::kColumnTile, 2 * mk::kColumnTile};
    for (int64_t b = mk::kColumnTile; b < P; b += mk::kColumnTile) {
      cuts.push_back(b - 1);
      cuts.push_back(b + 1);
    }
    for (int nt : {2, 3}) {
      const int64_t chunk = (P + nt - 1) / nt;
      for (int tid = 1; tid < nt; ++tid) {
        cuts.push_back(tid * chunk - 2);
        cuts.push_back(tid * chunk + 3);
      }
    }
    const int64_t chunk2 = (P + 1) / 2;
    cuts.push_back(chunk2);
    cuts.push_back(chunk2);
    out.emplace_back("boundary-crossing", table(cuts));
  }
  // One long segment spanning several tiles and both thread boundaries, with an empty one before it.
  out.emplace_back("coarse", table({P / 5, P / 5, 3 * P / 4}));
  {
    std::vector<int64_t> cuts;
    const int64_t k = rng.integer(0, std::min<int64_t>(P, 40));
    for (int64_t i = 0; i < k; ++i) cuts.push_back(rng.integer(0, P));
    if (!cuts.empty()) cuts.push_back(cuts.front());  // at least one empty segment
    out.emplace_back("random", table(cuts));
  }
  {
    // Single-column segments: every column for small P, else runs around the first tile boundary and
    // the 2-thread boundary.
    std::vector<int64_t> cuts;
    if (P <= 300) {
      for (int64_t c = 1; c < P; ++c) cuts.push_back(c);
    } else {
      const int64_t chunk2 = (P + 1) / 2;
      for (int64_t c = -6; c <= 6; ++c) {
        cuts.push_back(mk::kColumnTile + c);
        cuts.push_back(chunk2 + c);
      }
    }
    out.emplace_back("unit segments", table(cuts));
  }
  return out;
}

template <typename T>
struct LrCase {
  std::string name;
  mk::LrMode mode = mk::LrMode::kScalar;
  std::vector<T> values;        // [1], [P] or [S]
  std::vector<int64_t> offsets; // [S + 1] when segmented

  mk::LrSpec<T> spec() const {
    mk::LrSpec<T> s;
    s.mode = mode;
    s.values = values.data();
    s.offsets = mode == mk::LrMode::kSegmented ? offsets.data() : nullptr;
    // as csrc/cpu/inner_step.cpp fills it: 1 for a scalar rate, else the number of rates
    s.num_segments = mode == mk::LrMode::kScalar ? 1 : static_cast<int64_t>(values.size());
    return s;
  }
};

template <typename T>
std::vector<LrCase<T>> lr_cases(int64_t P, Rng& rng) {
  std::vector<LrCase<T>> cases;
  cases.push_back({"scalar 0.37", mk::LrMode::kScalar, {T(0.37)}, {}});
  cases.push_back({"scalar -0.61", mk::LrMode::kScalar, {T(-0.61)}, {}});
  cases.push_back({"per-coordinate", mk::LrMode::kPerCoordinate, rng.vector<T>(P, -1.0, 1.0), {}});
  for (auto& [name, offsets] : segment_tables(P, rng)) {
    const int64_t S = static_cast<int64_t>(offsets.size()) - 1;
    cases.push_back({"segmented (" + name + ", S=" + std::to_string(S) + ")", mk::LrMode::kSegmented,
                     rng.vector<T>(S, -1.0, 1.0), offsets});
  }
  return cases;
}

enum class Theta0 { kNone, kShared, kPerTask };

const char* theta0_name(Theta0 k) {
  return k == Theta0::kNone ? "theta0=none" : k == Theta0::kShared ? "theta0=shared[P]" : "theta0=per-task[T,P]";
}

template <typename T>
struct Problem {
  int64_t rows = 0, cols = 0;
  const LrCase<T>* lr = nullptr;
  Theta0 theta0_kind = Theta0::kNone;
  T prox = 0, wd = 0;
  std::vector<T> theta, grad, theta0, grad_out;

  int64_t size() const { return rows * cols; }
  const T* theta0_ptr() const { return theta0_kind == Theta0::kNone ? nullptr : theta0.data(); }
  bool per_task() const { return theta0_kind == Theta0::kPerTask; }
  // Size of d_theta0; with no theta0 the test still passes a [P] buffer, which must stay untouched.
  int64_t theta0_size() const { return theta0_kind == Theta0::kPerTask ? size() : cols; }
};

// Expected values and per-element tolerances of every output.
struct Expected {
  std::vector<double> out, out_tol, d_theta, d_theta_tol, d_grad, d_grad_tol, d_lr, d_lr_tol, d_theta0, d_theta0_tol;
};

template <typename T>
Expected reference(const Problem<T>& p) {
  const double eps_t = std::numeric_limits<T>::epsilon();
  const double eps_d = std::numeric_limits<double>::epsilon();
  const double floor = std::numeric_limits<T>::min();
  auto tol = [&](double mag, double terms) { return (kRelTol * eps_t + terms * eps_d) * mag + floor; };

  const int64_t n = p.size(), P = p.cols;
  const LrCase<T>& lr = *p.lr;
  const double prox = p.prox, wd = p.wd;
  const bool has_t0 = p.theta0_kind != Theta0::kNone;

  // Rate index of each column, found the naive way.
  std::vector<int64_t> rate_index(P, -1);
  for (int64_t c = 0; c < P; ++c) {
    if (lr.mode == mk::LrMode::kScalar) rate_index[c] = 0;
    if (lr.mode == mk::LrMode::kPerCoordinate) rate_index[c] = c;
  }
  if (lr.mode == mk::LrMode::kSegmented)
    for (size_t s = 0; s + 1 < lr.offsets.size(); ++s)
      for (int64_t c = lr.offsets[s]; c < lr.offsets[s + 1]; ++c) rate_index[c] = static_cast<int64_t>(s);

  Expected e;
  e.out.resize(n);
  e.out_tol.resize(n);
  e.d_theta.resize(n);
  e.d_theta_tol.resize(n);
  e.d_grad.resize(n);
  e.d_grad_tol.resize(n);
  const size_t nlr = lr.values.size();
  e.d_lr.assign(nlr, 0.0);
  std::vector<double> lr_mag(nlr, 0.0), lr_terms(nlr, 0.0);
  const int64_t n0 = p.theta0_size();
  e.d_theta0.assign(n0, 0.0);
  std::vector<double> t0_mag(n0, 0.0), t0_terms(n0, 0.0);

  for (int64_t t = 0; t < p.rows; ++t) {
    for (int64_t c = 0; c < P; ++c) {
      const int64_t i = t * P + c;
      const int64_t k = rate_index[c];
      const double L = lr.values[k];
      const double th = p.theta[i], g = p.grad[i], go = p.grad_out[i];
      const double t0 = has_t0 ? double(p.theta0[p.per_task() ? i : c]) : 0.0;
      const double u = g + (has_t0 ? prox * (th - t0) : 0.0) + wd * th;
      const double u_mag = std::fabs(g) + std::fabs(prox) * (std::fabs(th) + std::fabs(t0)) + std::fabs(wd * th);

      e.out[i] = th - L * u;
      e.out_tol[i] = tol(std::fabs(th) + std::fabs(L) * u_mag, 1);
      e.d_theta[i] = go * (1.0 - L * (prox + wd));
      e.d_theta_tol[i] = tol(std::fabs(go) * (1.0 + std::fabs(L) * (std::fabs(prox) + std::fabs(wd))), 1);
      e.d_grad[i] = -L * go;
      e.d_grad_tol[i] = tol(std::fabs(L * go), 1);
      e.d_lr[k] -= go * u;
      lr_mag[k] += std::fabs(go) * u_mag;
      lr_terms[k] += 1;
      if (has_t0) {
        const int64_t j = p.per_task() ? i : c;
        e.d_theta0[j] += prox * L * go;
        t0_mag[j] += std::fabs(prox * L * go);
        t0_terms[j] += 1;
      }
    }
  }
  e.d_lr_tol.resize(nlr);
  for (size_t k = 0; k < nlr; ++k) e.d_lr_tol[k] = tol(lr_mag[k], lr_terms[k]);
  e.d_theta0_tol.resize(n0);
  for (int64_t j = 0; j < n0; ++j) e.d_theta0_tol[j] = tol(t0_mag[j], t0_terms[j]);
  return e;
}

// The four backward outputs of one call; absent ones are not requested.
template <typename T>
struct Grads {
  std::unique_ptr<Buffer<T>> d_theta, d_grad, d_lr, d_theta0;

  Grads(const Problem<T>& p, unsigned mask) {
    if (mask & 1) d_theta = std::make_unique<Buffer<T>>(p.size());
    if (mask & 2) d_grad = std::make_unique<Buffer<T>>(p.size());
    if (mask & 4) d_lr = std::make_unique<Buffer<T>>(static_cast<int64_t>(p.lr->values.size()));
    if (mask & 8) d_theta0 = std::make_unique<Buffer<T>>(p.theta0_size());
  }
  mk::InnerStepGrads<T> pointers() {
    mk::InnerStepGrads<T> g;
    g.d_theta = d_theta ? d_theta->data() : nullptr;
    g.d_grad = d_grad ? d_grad->data() : nullptr;
    g.d_lr = d_lr ? d_lr->data() : nullptr;
    g.d_theta0 = d_theta0 ? d_theta0->data() : nullptr;
    return g;
  }
  bool guards_intact() const {
    for (const auto* b : {d_theta.get(), d_grad.get(), d_lr.get(), d_theta0.get()})
      if (b != nullptr && !b->guards_intact()) return false;
    return true;
  }
};

template <typename T>
void run_backward(const Problem<T>& p, int threads, Grads<T>& g) {
  mk::inner_step_backward<T, T>(p.grad_out.data(), p.theta.data(), p.grad.data(), p.theta0_ptr(), p.per_task(),
                                p.lr->spec(), p.prox, p.wd, g.pointers(), p.rows, p.cols, threads);
}

// check_subsets: also run the backward for every proper subset of requested outputs (their code paths
// do not depend on the values of prox and wd, so the callers do it for one (prox, wd) pair per case).
template <typename T>
void check_problem(const Problem<T>& p, bool check_subsets) {
  const Expected e = reference(p);
  const int64_t n = p.size();
  const bool has_t0 = p.theta0_kind != Theta0::kNone;
  const bool per_coordinate = p.lr->mode == mk::LrMode::kPerCoordinate;
  const Buffer<T> untouched(p.theta0_size());  // what an unwritten (NaN-poisoned) buffer looks like
  const std::vector<T> theta_before = p.theta;

  std::unique_ptr<Buffer<T>> out_single;  // threads = 1 results, for the bitwise comparisons
  std::unique_ptr<Grads<T>> grads_single;

  for (int threads : kThreadCounts) {
    MK_CONTEXT("threads=" + std::to_string(threads) + " (effective " +
               std::to_string(mk::effective_threads(p.rows, p.cols, threads)) + ")");

    // forward, out of place
    auto out = std::make_unique<Buffer<T>>(n);
    mk::inner_step_forward<T, T>(p.theta.data(), p.grad.data(), p.theta0_ptr(), p.per_task(), p.lr->spec(), p.prox,
                                 p.wd, out->data(), p.rows, p.cols, threads);
    MK_CHECK(out->guards_intact());
    MK_EXPECT_CLOSE("forward out", out->data(), e.out, e.out_tol);
    if (out_single) MK_EXPECT_BITWISE("forward out vs 1 thread", out->data(), out_single->data(), n);

    // forward, in place (out aliases theta, as inner_step_out allows)
    {
      Buffer<T> inplace(n);
      std::copy(p.theta.begin(), p.theta.end(), inplace.data());
      mk::inner_step_forward<T, T>(inplace.data(), p.grad.data(), p.theta0_ptr(), p.per_task(), p.lr->spec(), p.prox,
                                   p.wd, inplace.data(), p.rows, p.cols, threads);
      MK_CHECK(inplace.guards_intact());
      MK_EXPECT_BITWISE("in-place forward vs out of place", inplace.data(), out->data(), n);
    }

    // backward with every output requested (d_theta0 is passed even without theta0: it must stay untouched)
    auto full = std::make_unique<Grads<T>>(p, 15u);
    run_backward(p, threads, *full);
    MK_CHECK(full->guards_intact());
    MK_EXPECT_CLOSE("d_theta", full->d_theta->data(), e.d_theta, e.d_theta_tol);
    MK_EXPECT_CLOSE("d_grad", full->d_grad->data(), e.d_grad, e.d_grad_tol);
    MK_EXPECT_CLOSE("d_lr", full->d_lr->data(), e.d_lr, e.d_lr_tol);
    if (has_t0)
      MK_EXPECT_CLOSE("d_theta0", full->d_theta0->data(), e.d_theta0, e.d_theta0_tol);
    else
      MK_EXPECT_BITWISE("d_theta0 without theta0 (untouched)", full->d_theta0->data(), untouched.data(),
                        untouched.size());
    if (grads_single) {
      MK_EXPECT_BITWISE("d_theta vs 1 thread", full->d_theta->data(), grads_single->d_theta->data(), n);
      MK_EXPECT_BITWISE("d_grad vs 1 thread", full->d_grad->data(), grads_single->d_grad->data(), n);
      MK_EXPECT_BITWISE("d_theta0 vs 1 thread", full->d_theta0->data(), grads_single->d_theta0->data(),
                        p.theta0_size());
      if (per_coordinate)
        MK_EXPECT_BITWISE("per-coordinate d_lr vs 1 thread", full->d_lr->data(), grads_single->d_lr->data(), p.cols);
    }

    // every proper subset of requested outputs: the requested ones equal the full call's bitwise (with 1
    // and 2 threads; 3 threads only adds an uneven partition, which the full call above covers)
    for (unsigned mask = 0; check_subsets && threads <= 2 && mask < 15u; ++mask) {
      MK_CONTEXT("output mask d_theta=" + std::to_string(mask & 1) + " d_grad=" + std::to_string((mask >> 1) & 1) +
                 " d_lr=" + std::to_string((mask >> 2) & 1) + " d_theta0=" + std::to_string((mask >> 3) & 1));
      Grads<T> sub(p, mask);
      run_backward(p, threads, sub);
      MK_CHECK(sub.guards_intact());
      if (sub.d_theta) MK_EXPECT_BITWISE("d_theta (subset)", sub.d_theta->data(), full->d_theta->data(), n);
      if (sub.d_grad) MK_EXPECT_BITWISE("d_grad (subset)", sub.d_grad->data(), full->d_grad->data(), n);
      if (sub.d_lr)
        MK_EXPECT_BITWISE("d_lr (subset)", sub.d_lr->data(), full->d_lr->data(), sub.d_lr->size());
      if (sub.d_theta0)
        MK_EXPECT_BITWISE("d_theta0 (subset)", sub.d_theta0->data(), full->d_theta0->data(), p.theta0_size());
    }

    if (!out_single) {
      out_single = std::move(out);
      grads_single = std::move(full);
    }
  }
  MK_CHECK(p.theta == theta_before);
}

template <typename T>
void run_all_cases(uint64_t seed, const Shape* shapes, size_t num_shapes) {
  Rng rng(seed);
  // prox != 0 needs a theta0 (the extension rejects it otherwise), so those pairs run with theta0 only.
  const std::pair<double, double> prox_wd[] = {{0.0, 0.0}, {0.3, 0.0}, {0.0, 0.05}, {-0.25, 0.1}};
  for (size_t si = 0; si < num_shapes; ++si) {
    const Shape shape = shapes[si];
    const std::vector<LrCase<T>> lrs = lr_cases<T>(shape.cols, rng);
    Problem<T> p;
    p.rows = shape.rows;
    p.cols = shape.cols;
    p.theta = rng.vector<T>(p.size(), -2.0, 2.0);
    p.grad = rng.vector<T>(p.size(), -2.0, 2.0);
    p.grad_out = rng.vector<T>(p.size(), -2.0, 2.0);
    const std::vector<T> theta0_shared = rng.vector<T>(p.cols, -2.0, 2.0);
    const std::vector<T> theta0_task = rng.vector<T>(p.size(), -2.0, 2.0);
    for (const LrCase<T>& lr : lrs) {
      p.lr = &lr;
      for (Theta0 kind : {Theta0::kNone, Theta0::kShared, Theta0::kPerTask}) {
        p.theta0_kind = kind;
        p.theta0 = kind == Theta0::kShared ? theta0_shared : kind == Theta0::kPerTask ? theta0_task : std::vector<T>{};
        for (const auto& [prox, wd] : prox_wd) {
          if (kind == Theta0::kNone && prox != 0.0) continue;
          p.prox = T(prox);
          p.wd = T(wd);
          MK_CONTEXT(std::string(mk_test::type_name<T>()) + " " + std::to_string(p.rows) + "x" +
                     std::to_string(p.cols) + " lr=" + lr.name + " " + theta0_name(kind) + " prox=" + str(prox) +
                     " wd=" + str(wd));
          // subsets with the last valid (prox, wd) pair, where both are non-zero when theta0 is given
          check_problem(p, /*check_subsets=*/kind == Theta0::kNone ? wd != 0.0 : prox != 0.0 && wd != 0.0);
        }
      }
    }
  }
}

}  // namespace

// The shapes that are meant to exercise the threaded paths do get a team.
MK_TEST(parallel_shapes_get_a_team) {
  int parallel = 0;
  for (const Shape& s : kShapes) {
    const bool should = s.rows * s.cols >= mk::kParallelGrain && s.cols >= 512;
    MK_CHECK_MSG((mk::effective_threads(s.rows, s.cols, 2) == 2) == should,
                 s.rows << "x" << s.cols << " -> " << mk::effective_threads(s.rows, s.cols, 2));
    MK_CHECK_MSG((mk::effective_threads(s.rows, s.cols, 3) == 3) == should,
                 s.rows << "x" << s.cols << " -> " << mk::effective_threads(s.rows, s.cols, 3));
    parallel += should;
  }
  MK_CHECK(parallel >= 4);
}

MK_TEST(inner_step_float) { run_all_cases<float>(0x5eed0001, kShapes, std::size(kShapes)); }

MK_TEST(inner_step_double) { run_all_cases<double>(0x5eed0002, kShapes, std::size(kShapes)); }

// Rates, prox and weight decay large enough that the contraction 1 - L * (prox + wd) changes sign and
// the updates are far from the identity; negative rates throughout.
MK_TEST(inner_step_large_and_negative_coefficients) {
  const Shape shapes[] = {{5, 3}, {17, 2053}};
  Rng rng(0x5eed0003);
  for (const Shape& s : shapes) {
    Problem<double> p;
    p.rows = s.rows;
    p.cols = s.cols;
    p.theta = rng.vector<double>(p.size(), -50.0, 50.0);
    p.grad = rng.vector<double>(p.size(), -1e3, 1e3);
    p.grad_out = rng.vector<double>(p.size(), -10.0, 10.0);
    p.theta0 = rng.vector<double>(p.cols, -50.0, 50.0);
    p.theta0_kind = Theta0::kShared;
    LrCase<double> lr{"per-coordinate negative", mk::LrMode::kPerCoordinate, rng.vector<double>(p.cols, -8.0, -0.5), {}};
    p.lr = &lr;
    p.prox = 3.5;
    p.wd = -0.75;
    MK_CONTEXT("double " + std::to_string(p.rows) + "x" + std::to_string(p.cols) + " large coefficients");
    check_problem(p, /*check_subsets=*/true);
  }
}

// The same inputs at different addresses (shifted by 0..7 elements, so vector loops peel or split at
// different places) give bitwise the same outputs, d_lr's vectorised double reduction included: results
// must not depend on where the caller's tensors happen to live.
template <typename T>
void check_alignment_independence(uint64_t seed) {
  Rng rng(seed);
  const Shape shapes[] = {{17, 2053}};  // above kParallelGrain: 1 thread and a team of 2
  for (const Shape& s : shapes) {
    const std::vector<LrCase<T>> lrs = lr_cases<T>(s.cols, rng);
    const int64_t n = s.rows * s.cols;
    const std::vector<T> inputs = rng.vector<T>(5 * n, -2.0, 2.0);  // go, theta, grad, theta0 [T, P], theta0 [P]
    for (const LrCase<T>& lr : lrs) {
      for (Theta0 kind : {Theta0::kNone, Theta0::kShared, Theta0::kPerTask}) {
        const T prox = kind == Theta0::kNone ? T(0) : T(0.3), wd = T(0.05);
        const int64_t n0 = kind == Theta0::kPerTask ? n : s.cols;
        for (int threads : {1, 2}) {
          MK_CONTEXT(std::string(mk_test::type_name<T>()) + " " + std::to_string(s.rows) + "x" +
                     std::to_string(s.cols) + " lr=" + lr.name + " " + theta0_name(kind) +
                     " threads=" + std::to_string(threads));
          std::vector<T> first_out;
          for (int shift = 0; shift < 8; ++shift) {
            std::vector<T> buf(5 * n + 8);
            std::copy(inputs.begin(), inputs.end(), buf.begin() + shift);
            const T* go = buf.data() + shift;
            const T* th = go + n;
            const T* gr = th + n;
            const T* t0 = kind == Theta0::kNone ? nullptr : kind == Theta0::kPerTask ? gr + n : gr + 2 * n;
            // outputs packed into one shifted buffer too: out, d_theta, d_grad, d_theta0, d_lr
            const int64_t nlr = static_cast<int64_t>(lr.values.size());
            std::vector<T> outs(4 * n + n0 + nlr + 8, mk_test::poison<T>());
            T* out = outs.data() + shift;
            mk::InnerStepGrads<T> g;
            g.d_theta = out + n;
            g.d_grad = out + 2 * n;
            g.d_theta0 = kind == Theta0::kNone ? nullptr : out + 3 * n;
            g.d_lr = out + 3 * n + n0;
            mk::inner_step_forward<T, T>(th, gr, t0, kind == Theta0::kPerTask, lr.spec(), prox, wd, out, s.rows, s.cols,
                                         threads);
            mk::inner_step_backward<T, T>(go, th, gr, t0, kind == Theta0::kPerTask, lr.spec(), prox, wd, g, s.rows,
                                          s.cols, threads);
            std::vector<T> got(out, out + 3 * n + n0 + nlr);
            if (shift == 0) {
              first_out = got;
            } else {
              MK_CONTEXT("shift=" + std::to_string(shift));
              MK_EXPECT_BITWISE("out, d_theta, d_grad, d_theta0, d_lr at another alignment", got.data(),
                                first_out.data(), static_cast<int64_t>(got.size()));
            }
          }
        }
      }
    }
  }
}

MK_TEST(inner_step_independent_of_alignment) {
  check_alignment_independence<float>(0x5eed0004);
  check_alignment_independence<double>(0x5eed0005);
}

MK_TEST_MAIN()
