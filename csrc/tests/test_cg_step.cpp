// Unit tests of the torch-free cg_step kernel (csrc/kernels/cg_step.h), float and double, against a naive
// double-precision implementation of the same rules written here.
//
// Tolerance (u = eps_T / 2). An updated element y = a + s * b (r - alpha Ap, x + alpha p) is rounded at most
// twice by the kernel (product, sum; once with a fused multiply-add) and once by the reference (computed in
// double, rounded to T), and s = alpha is itself T(rs / pAp), where the two pAp differ by the order of the
// double sums (each within gamma_cols sum |p_i Ap_i| of the exact value, so d_alpha <= (cols eps_double
// sum |p_i Ap_i| / pAp + eps_T) |alpha|, the eps_T for the rounding to T landing on neighbouring values).
// Hence |y - y_ref| <= 3 eps_T (|a| + |s b|) + d_alpha |b|. rr = r.r is
// computed from r values that differ by those bounds: |rr - rr_ref| <= sum_i (2 |r_i| + d_i) d_i
// + cols * eps_double * rr, so beta = T(rr / rs) is within d_rr / rs + eps_T |beta|, and
// p = r + beta p inherits r's bound plus d_beta |p| plus its own 3 eps_T (|r| + |beta p|).
// (pAp may be negative under CgCurvatureRule::kContinue: the bounds hold with |pAp|.)
// Status and iteration counts are compared exactly: the cases keep every decision well away from its
// boundary, except the breakdown case, which sits exactly on it (p.Ap == 0 exactly). Tasks that do not step
// are compared bitwise (the kernel must not touch them). Every case runs under both curvature rules.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "cg_step.h"
#include "harness.h"

namespace mk = metakernels::kernels;
using mk_test::Rng;

namespace {

struct State {
  int64_t tasks = 0, cols = 0;
  std::vector<double> x, r, p, ap;  // values, converted to T by the runner
  std::vector<double> rs, threshold;
  std::vector<int32_t> status;
  std::vector<int64_t> iterations;
};

// Task kinds, by t % 7: 0, 1 plain steps (Ap = D p with D > 0: p.Ap > 0, no cancellation); 2 converges on
// this step (p = r and Ap = 1.5 r: the step cancels r up to rounding, r.r drops from rs to ~eps^2 rs, far below
// the threshold 1e-6 rs); 3 negative curvature (Ap = -D p: p.Ap < 0, a stop under kStop, a step with alpha < 0
// under kContinue); 4 already stopped (status converged); 5 non-finite Ap (a NaN in the first column);
// 6 breakdown (Ap = 0, a direction A maps to zero: p.Ap == 0 exactly, a stop under either rule).
State make_state(int64_t tasks, int64_t cols, uint64_t seed, bool with_specials) {
  Rng rng(seed);
  State s;
  s.tasks = tasks;
  s.cols = cols;
  const auto n = static_cast<size_t>(tasks * cols);
  s.x = rng.vector<double>(tasks * cols, -1.0, 1.0);
  s.r = rng.vector<double>(tasks * cols, -1.0, 1.0);
  s.p = rng.vector<double>(tasks * cols, -1.0, 1.0);
  s.ap.resize(n);
  s.rs.assign(static_cast<size_t>(tasks), 0.0);
  s.threshold.assign(static_cast<size_t>(tasks), 0.0);
  s.status.assign(static_cast<size_t>(tasks), mk::kCgActive);
  s.iterations.assign(static_cast<size_t>(tasks), 3);
  for (int64_t t = 0; t < tasks; ++t) {
    const int kind = with_specials ? static_cast<int>(t % 7) : 0;
    double rs = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(t * cols + c);
      const double diag = rng.uniform(0.5, 2.0);
      if (kind == 2) s.p[i] = s.r[i];
      s.ap[i] = kind == 6 ? 0.0 : kind == 3 ? -diag * s.p[i] : kind == 2 ? 1.5 * s.p[i] : diag * s.p[i];
      rs += s.r[i] * s.r[i];
    }
    if (kind == 5) s.ap[static_cast<size_t>(t * cols)] = std::numeric_limits<double>::quiet_NaN();
    s.rs[static_cast<size_t>(t)] = rs;
    s.threshold[static_cast<size_t>(t)] = kind == 2 ? 1e-6 * rs : 0.0;
    if (kind == 4) s.status[static_cast<size_t>(t)] = mk::kCgConverged;
  }
  return s;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = T(v[i]);
  return out;
}

struct Expected {
  std::vector<double> x, r, p, x_tol, r_tol, p_tol, rs, rs_tol;
  std::vector<int32_t> status;
  std::vector<int64_t> iterations;
  std::vector<bool> touched;  // r may change (a step was attempted)
};

// The rules of cg_step in double on the T-rounded inputs, with the tolerances derived above.
template <typename T>
Expected reference(const std::vector<T>& x, const std::vector<T>& r, const std::vector<T>& p,
                   const std::vector<T>& ap, const State& s, mk::CgCurvatureRule rule) {
  const double eps = std::numeric_limits<T>::epsilon();
  const double eps_d = std::numeric_limits<double>::epsilon();
  const double tiny = std::numeric_limits<T>::min();
  Expected e;
  const size_t n = x.size();
  e.x.assign(x.begin(), x.end());
  e.r.assign(r.begin(), r.end());
  e.p.assign(p.begin(), p.end());
  e.x_tol.assign(n, 0.0);
  e.r_tol.assign(n, 0.0);
  e.p_tol.assign(n, 0.0);
  e.rs = s.rs;
  e.rs_tol.assign(static_cast<size_t>(s.tasks), 0.0);
  e.status = s.status;
  e.iterations = s.iterations;
  e.touched.assign(static_cast<size_t>(s.tasks), false);
  for (int64_t t = 0; t < s.tasks; ++t) {
    const size_t tt = static_cast<size_t>(t);
    if (s.status[tt] != mk::kCgActive) continue;
    const double rs = s.rs[tt];
    if (!std::isfinite(rs)) { e.status[tt] = mk::kCgNonfinite; continue; }
    if (rs <= s.threshold[tt]) { e.status[tt] = mk::kCgConverged; continue; }
    double pap = 0.0, pap_abs = 0.0;
    for (int64_t c = 0; c < s.cols; ++c) {
      const double term = double(p[tt * s.cols + c]) * double(ap[tt * s.cols + c]);
      pap += term;
      pap_abs += std::fabs(term);
    }
    if (!std::isfinite(pap)) { e.status[tt] = mk::kCgNonfinite; continue; }
    // kStop: A is not positive definite along p; kContinue (plain CG): only alpha = rs / 0 is undefined.
    const bool stops = rule == mk::CgCurvatureRule::kStop ? !(pap > 0.0) : pap == 0.0;
    if (stops) { e.status[tt] = mk::kCgNegativeCurvature; continue; }
    const T alpha = T(rs / pap);
    if (!std::isfinite(alpha)) { e.status[tt] = mk::kCgNonfinite; continue; }
    e.touched[tt] = true;
    // alpha's error: both sums within gamma_cols of sum |terms| (either side), then one rounding to T.
    const double dalpha = (s.cols * eps_d * pap_abs / std::fabs(pap) + eps) * std::fabs(double(alpha));
    double rr = 0.0, drr = 0.0;
    for (int64_t c = 0; c < s.cols; ++c) {
      const size_t i = static_cast<size_t>(t * s.cols + c);
      const double a_ap = std::fabs(double(alpha) * double(ap[i]));
      e.r[i] = double(T(double(r[i]) - double(alpha) * double(ap[i])));
      e.r_tol[i] = 3 * eps * (std::fabs(double(r[i])) + a_ap) + dalpha * std::fabs(double(ap[i])) + tiny;
      rr += e.r[i] * e.r[i];
      drr += (2 * std::fabs(e.r[i]) + e.r_tol[i]) * e.r_tol[i];
    }
    drr += s.cols * eps_d * rr;
    if (!std::isfinite(rr)) { e.status[tt] = mk::kCgNonfinite; continue; }
    const T beta = T(rr / rs);
    const double dbeta = drr / rs + eps * std::fabs(double(beta));
    const bool converged = rr <= s.threshold[tt];
    const bool turn = std::isfinite(beta);
    for (int64_t c = 0; c < s.cols; ++c) {
      const size_t i = static_cast<size_t>(t * s.cols + c);
      const double a_p = std::fabs(double(alpha) * double(p[i]));
      e.x[i] = double(T(double(x[i]) + double(alpha) * double(p[i])));
      e.x_tol[i] = 3 * eps * (std::fabs(double(x[i])) + a_p) + dalpha * std::fabs(double(p[i])) + tiny;
      if (turn) {
        const double b_p = std::fabs(double(beta) * double(p[i]));
        e.p[i] = double(T(e.r[i] + double(beta) * double(p[i])));
        e.p_tol[i] = e.r_tol[i] + dbeta * std::fabs(double(p[i])) + 3 * eps * (std::fabs(e.r[i]) + b_p) + tiny;
      }
    }
    e.rs[tt] = rr;
    e.rs_tol[tt] = drr;
    e.iterations[tt] += 1;
    e.status[tt] = converged ? mk::kCgConverged : turn ? mk::kCgActive : mk::kCgNonfinite;
  }
  return e;
}

template <typename T>
void run_case(const State& s, mk::CgCurvatureRule rule, int threads, int64_t block_bytes, bool whole_tasks = true) {
  MK_CONTEXT(std::string(mk_test::type_name<T>()) + " tasks=" + std::to_string(s.tasks) + " cols=" +
             std::to_string(s.cols) + " threads=" + std::to_string(threads) + " block_bytes=" +
             std::to_string(block_bytes) + (whole_tasks ? "" : " split") +
             (rule == mk::CgCurvatureRule::kStop ? " stop" : " continue"));
  std::vector<T> x = cast<T>(s.x), r = cast<T>(s.r), p = cast<T>(s.p), ap = cast<T>(s.ap);
  const std::vector<T> x0 = x, r0 = r, p0 = p, ap0 = ap;
  std::vector<double> rs = s.rs;
  std::vector<int32_t> status = s.status;
  std::vector<int64_t> iterations = s.iterations;
  const Expected e = reference<T>(x0, r0, p0, ap0, s, rule);
  mk::cg_step<T>(x.data(), r.data(), p.data(), ap.data(), rs.data(), status.data(), iterations.data(),
                 s.threshold.data(), rule, s.tasks, s.cols, threads, block_bytes, whole_tasks);
  MK_EXPECT_BITWISE("Ap (read only)", ap.data(), ap0.data(), static_cast<int64_t>(ap.size()));
  for (int64_t t = 0; t < s.tasks; ++t) {
    const size_t tt = static_cast<size_t>(t);
    MK_CONTEXT("task " + std::to_string(t));
    MK_CHECK_MSG(status[tt] == e.status[tt], "status " << status[tt] << ", expected " << e.status[tt]);
    MK_CHECK_MSG(iterations[tt] == e.iterations[tt], "iterations " << iterations[tt] << ", expected "
                                                                   << e.iterations[tt]);
    const size_t at = tt * static_cast<size_t>(s.cols);
    const auto slice = [&](const std::vector<double>& v) {
      return std::vector<double>(v.begin() + at, v.begin() + at + s.cols);
    };
    if (!e.touched[tt]) {
      MK_EXPECT_BITWISE("x (no step)", x.data() + at, x0.data() + at, s.cols);
      MK_EXPECT_BITWISE("r (no step)", r.data() + at, r0.data() + at, s.cols);
      MK_EXPECT_BITWISE("p (no step)", p.data() + at, p0.data() + at, s.cols);
      MK_EXPECT_BITWISE("rs (no step)", &rs[tt], &s.rs[tt], 1);
      continue;
    }
    MK_EXPECT_CLOSE("x", x.data() + at, slice(e.x), slice(e.x_tol));
    MK_EXPECT_CLOSE("r", r.data() + at, slice(e.r), slice(e.r_tol));
    MK_EXPECT_CLOSE("p", p.data() + at, slice(e.p), slice(e.p_tol));
    MK_CHECK_MSG(std::fabs(rs[tt] - e.rs[tt]) <= e.rs_tol[tt], "rs " << rs[tt] << ", expected " << e.rs[tt]);
  }
}

struct Shape {
  int64_t tasks, cols;
};

// 1 x 1, small and prime sizes, a 16-lane remainder in every position, many tasks of few columns, and batches
// above kParallelGrain (so there is a team): as many tasks as threads or a multiple (all whole), more tasks
// than a multiple (whole tasks, then the rest split: 5 and 7 tasks with 2 or 3 threads), fewer (all split).
const Shape kShapes[] = {{1, 1}, {1, 17}, {6, 1}, {6, 5}, {7, 31}, {12, 257}, {6, 6151}, {13, 2053}, {2, 40009},
                         {300, 7}, {1, 70001}, {5, 8009}, {7, 5003}};
const int kThreads[] = {1, 2, 3};
const mk::CgCurvatureRule kRules[] = {mk::CgCurvatureRule::kStop, mk::CgCurvatureRule::kContinue};

template <typename T>
void all_cases() {
  uint64_t seed = 1;
  for (const Shape& shape : kShapes) {
    const State s = make_state(shape.tasks, shape.cols, seed++, true);
    for (mk::CgCurvatureRule rule : kRules) {
      for (int threads : kThreads) {
        run_case<T>(s, rule, threads, mk::kCgBlockBytes);
        // Split tasks only (no whole-task schedule), in blocks of one task and of three: every block boundary
        // and its barriers exercised. (With the defaults, batches of >= threads tasks run mostly whole.)
        run_case<T>(s, rule, threads, 1, false);
        run_case<T>(s, rule, threads, 3 * 4 * shape.cols * static_cast<int64_t>(sizeof(T)), false);
      }
    }
  }
}

MK_TEST(cg_step_float) { all_cases<float>(); }
MK_TEST(cg_step_double) { all_cases<double>(); }

// Stopped tasks are not touched, and with every task stopped the call reads nothing (checked by passing
// null vectors: any access would crash).
MK_TEST(cg_step_all_stopped_is_a_no_op) {
  double rs[3] = {1.0, 0.0, 5.0};
  const double threshold[3] = {0.0, 0.0, 10.0};
  int32_t status[3] = {mk::kCgNegativeCurvature, mk::kCgActive, mk::kCgActive};
  int64_t iterations[3] = {4, 5, 6};
  mk::cg_step<float>(nullptr, nullptr, nullptr, nullptr, rs, status, iterations, threshold, mk::CgCurvatureRule::kStop,
                     3, 1000, 2);
  MK_CHECK(status[0] == mk::kCgNegativeCurvature);
  MK_CHECK(status[1] == mk::kCgConverged);  // rs = 0 <= 0
  MK_CHECK(status[2] == mk::kCgConverged);  // rs = 5 <= 10
  MK_CHECK(iterations[0] == 4 && iterations[1] == 5 && iterations[2] == 6);
}

// A non-finite rs stops the task before the step.
MK_TEST(cg_step_nonfinite_rs) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    State s = make_state(2, 9, 7, false);
    s.rs[1] = bad;
    for (mk::CgCurvatureRule rule : kRules) run_case<double>(s, rule, 1, mk::kCgBlockBytes);
  }
}

// alpha overflows T (rs / pAp > FLT_MAX): no step. r - alpha Ap overflows T: the step is rejected, x, rs and
// iterations keep their values (r is spent).
MK_TEST(cg_step_overflow) {
  {
    MK_CONTEXT("alpha overflow");
    float x[1] = {1.0f}, r[1] = {1.0f}, p[1] = {1.0f}, ap[1] = {1e-30f};
    double rs[1] = {1e10}, threshold[1] = {0.0};
    int32_t status[1] = {mk::kCgActive};
    int64_t iterations[1] = {0};
    mk::cg_step<float>(x, r, p, ap, rs, status, iterations, threshold, mk::CgCurvatureRule::kStop, 1, 1, 1);
    MK_CHECK(status[0] == mk::kCgNonfinite && x[0] == 1.0f && r[0] == 1.0f && p[0] == 1.0f && rs[0] == 1e10);
  }
  {
    MK_CONTEXT("residual overflow");
    float x[2] = {1.0f, 2.0f}, r[2] = {1.0f, 1.0f}, p[2] = {1.0f, 0.0f}, ap[2] = {1e-30f, 1e30f};
    double rs[1] = {1e7}, threshold[1] = {0.0};
    int32_t status[1] = {mk::kCgActive};
    int64_t iterations[1] = {2};
    mk::cg_step<float>(x, r, p, ap, rs, status, iterations, threshold, mk::CgCurvatureRule::kStop, 1, 2, 1);
    MK_CHECK(status[0] == mk::kCgNonfinite);
    MK_CHECK(x[0] == 1.0f && x[1] == 2.0f && p[0] == 1.0f && p[1] == 0.0f);
    MK_CHECK(rs[0] == 1e7 && iterations[0] == 2);
  }
}

// Threads and blocks change only the order of the double sums: results agree to the bounds above (checked
// in all_cases); here a full CG solve of a diagonal system converges in as many iterations as it has
// distinct eigenvalues, whatever the thread count.
MK_TEST(cg_step_solves_diagonal_systems) {
  for (int threads : kThreads) {
    const int64_t tasks = 3, cols = 50000;
    std::vector<double> x(tasks * cols, 0.0), r(tasks * cols), p, ap(tasks * cols);
    std::vector<double> diag(tasks * cols), rs(tasks, 0.0), threshold(tasks);
    std::vector<int32_t> status(tasks, mk::kCgActive);
    std::vector<int64_t> iterations(tasks, 0);
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t c = 0; c < cols; ++c) {
        const size_t i = static_cast<size_t>(t * cols + c);
        diag[i] = 1.0 + double((c * 7 + t) % (t + 2));  // t + 2 distinct eigenvalues
        r[i] = std::sin(double(c + 1) * (t + 1));
        rs[static_cast<size_t>(t)] += r[i] * r[i];
      }
      threshold[static_cast<size_t>(t)] = 1e-24 * rs[static_cast<size_t>(t)];
    }
    const std::vector<double> b = r;
    p = r;
    for (int it = 0; it < 6; ++it) {
      for (size_t i = 0; i < ap.size(); ++i) ap[i] = diag[i] * p[i];
      mk::cg_step<double>(x.data(), r.data(), p.data(), ap.data(), rs.data(), status.data(), iterations.data(),
                          threshold.data(), mk::CgCurvatureRule::kStop, tasks, cols, threads, 1 << 16, threads != 2);
    }
    for (int64_t t = 0; t < tasks; ++t) {
      MK_CONTEXT("threads " + std::to_string(threads) + " task " + std::to_string(t));
      MK_CHECK_MSG(status[t] == mk::kCgConverged, "status " << status[t]);
      MK_CHECK_MSG(iterations[t] == t + 2, "iterations " << iterations[t]);
      double err = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        const size_t i = static_cast<size_t>(t * cols + c);
        err = std::max(err, std::fabs(x[i] - b[i] / diag[i]));
      }
      MK_CHECK_MSG(err <= 1e-12, "max |x - b / d| = " << err);
    }
  }
}

// Plain CG (kContinue) on indefinite diagonal systems: the residuals stay orthogonal, so with t + 2 distinct
// eigenvalues of both signs (1, -2, 3, -4, ...) it converges in t + 2 iterations as on a definite system, to
// b / d. Under kStop the same systems stop on the first direction of non-positive curvature, before the
// solution. p.Ap stays far from 0 on these systems (checked: no task breaks down).
MK_TEST(cg_step_continue_solves_indefinite_diagonal_systems) {
  for (mk::CgCurvatureRule rule : kRules) {
    for (int threads : kThreads) {
      const int64_t tasks = 3, cols = 50000;
      std::vector<double> x(tasks * cols, 0.0), r(tasks * cols), p, ap(tasks * cols);
      std::vector<double> diag(tasks * cols), rs(tasks, 0.0), threshold(tasks);
      std::vector<int32_t> status(tasks, mk::kCgActive);
      std::vector<int64_t> iterations(tasks, 0);
      for (int64_t t = 0; t < tasks; ++t) {
        for (int64_t c = 0; c < cols; ++c) {
          const size_t i = static_cast<size_t>(t * cols + c);
          const int64_t k = (c * 7 + t) % (t + 2);        // t + 2 distinct eigenvalues
          diag[i] = double(k + 1) * (k % 2 ? -1.0 : 1.0);  // 1, -2, 3, -4
          r[i] = std::sin(double(c + 1) * (t + 1));
          rs[static_cast<size_t>(t)] += r[i] * r[i];
        }
        threshold[static_cast<size_t>(t)] = 1e-24 * rs[static_cast<size_t>(t)];
      }
      const std::vector<double> b = r;
      p = r;
      for (int it = 0; it < 6; ++it) {
        for (size_t i = 0; i < ap.size(); ++i) ap[i] = diag[i] * p[i];
        mk::cg_step<double>(x.data(), r.data(), p.data(), ap.data(), rs.data(), status.data(), iterations.data(),
                            threshold.data(), rule, tasks, cols, threads, 1 << 16, threads != 2);
      }
      for (int64_t t = 0; t < tasks; ++t) {
        MK_CONTEXT(std::string(rule == mk::CgCurvatureRule::kStop ? "stop" : "continue") + " threads " +
                   std::to_string(threads) + " task " + std::to_string(t));
        double err = 0.0;
        bool finite = true;
        for (int64_t c = 0; c < cols; ++c) {
          const size_t i = static_cast<size_t>(t * cols + c);
          finite = finite && std::isfinite(x[i]);
          err = std::max(err, std::fabs(x[i] - b[i] / diag[i]));
        }
        MK_CHECK(finite);
        if (rule == mk::CgCurvatureRule::kContinue) {
          MK_CHECK_MSG(status[t] == mk::kCgConverged, "status " << status[t]);
          MK_CHECK_MSG(iterations[t] == t + 2, "iterations " << iterations[t]);
          MK_CHECK_MSG(err <= 1e-12, "max |x - b / d| = " << err);
        } else {
          MK_CHECK_MSG(status[t] == mk::kCgNegativeCurvature, "status " << status[t]);
          MK_CHECK_MSG(iterations[t] < t + 2, "iterations " << iterations[t]);
          MK_CHECK_MSG(err > 1e-3, "max |x - b / d| = " << err << ": stopped, it cannot have solved the system");
        }
      }
    }
  }
}

// Plain CG's negative alpha obeys the non-finite rules: alpha = rs / pAp overflowing T to -inf is no step.
MK_TEST(cg_step_continue_negative_alpha_overflow) {
  float x[1] = {1.0f}, r[1] = {1.0f}, p[1] = {1.0f}, ap[1] = {-1e-30f};
  double rs[1] = {1e10}, threshold[1] = {0.0};
  int32_t status[1] = {mk::kCgActive};
  int64_t iterations[1] = {0};
  mk::cg_step<float>(x, r, p, ap, rs, status, iterations, threshold, mk::CgCurvatureRule::kContinue, 1, 1, 1);
  MK_CHECK(status[0] == mk::kCgNonfinite && x[0] == 1.0f && r[0] == 1.0f && p[0] == 1.0f && rs[0] == 1e10);
}

}  // namespace

MK_TEST_MAIN()
