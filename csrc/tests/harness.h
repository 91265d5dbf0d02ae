// A tiny self-contained test harness for the torch-free kernel tests (no GoogleTest: nothing may be
// fetched at build time). Tests register with MK_TEST(name); main() runs them all and returns non-zero
// when any check failed, which is what ctest looks at.
//
// Array comparisons report the first few offending elements with their index, the value the kernel
// produced, the reference value and the tolerance, prefixed by the case under test (MK_CONTEXT).
#pragma once

#include <chrono>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mk_test {

// ---------------------------------------------------------------------------------------------------
// registry and bookkeeping

using TestFn = void (*)();

inline std::vector<std::pair<const char*, TestFn>>& registry() {
  static std::vector<std::pair<const char*, TestFn>> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, TestFn fn) { registry().emplace_back(name, fn); }
};

struct State {
  int64_t checks = 0;
  int64_t failures = 0;
  int64_t printed = 0;  // failure messages printed so far (capped so one bug does not flood the log)
  // Largest |got - ref| / tol over all passing elements, per element size (4: float, 8: double): how
  // much of the tolerance the kernels actually use.
  double worst_ratio[2] = {0.0, 0.0};
  std::vector<std::string> context;
};

inline State& state() {
  static State s;
  return s;
}

constexpr int64_t kMaxPrintedFailures = 40;

inline std::string context_string() {
  std::string out;
  for (const std::string& c : state().context) {
    if (!out.empty()) out += " | ";
    out += c;
  }
  return out;
}

// Describes the case under test for the failure messages of the enclosing scope.
class ScopedContext {
 public:
  explicit ScopedContext(std::string text) { state().context.push_back(std::move(text)); }
  ~ScopedContext() { state().context.pop_back(); }
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;
};

#define MK_CONCAT_INNER(a, b) a##b
#define MK_CONCAT(a, b) MK_CONCAT_INNER(a, b)
#define MK_CONTEXT(text) ::mk_test::ScopedContext MK_CONCAT(mk_context_, __LINE__)(text)

inline void report_failure(const char* file, int line, const std::string& message) {
  State& s = state();
  ++s.failures;
  if (s.printed < kMaxPrintedFailures) {
    ++s.printed;
    std::fprintf(stderr, "FAIL %s:%d: %s\n    case: %s\n", file, line, message.c_str(), context_string().c_str());
  } else if (s.printed == kMaxPrintedFailures) {
    ++s.printed;
    std::fprintf(stderr, "(further failure messages suppressed)\n");
  }
}

#define MK_CHECK(cond)                                                              \
  do {                                                                              \
    ++::mk_test::state().checks;                                                    \
    if (!(cond)) ::mk_test::report_failure(__FILE__, __LINE__, "check failed: " #cond); \
  } while (0)

#define MK_CHECK_MSG(cond, msg)                                                     \
  do {                                                                              \
    ++::mk_test::state().checks;                                                    \
    if (!(cond)) {                                                                  \
      std::ostringstream mk_os_;                                                    \
      mk_os_ << "check failed: " #cond ": " << msg;                                 \
      ::mk_test::report_failure(__FILE__, __LINE__, mk_os_.str());                  \
    }                                                                               \
  } while (0)

#define MK_TEST(name)                                                      \
  static void name();                                                      \
  static ::mk_test::Registrar MK_CONCAT(mk_registrar_, name)(#name, name); \
  static void name()

inline int run_all(int argc, char** argv) {
  // Optional argument: run only the tests whose name contains it.
  const char* filter = argc > 1 ? argv[1] : nullptr;
#ifdef _OPENMP
  std::printf("OpenMP: enabled (_OPENMP = %d)\n", _OPENMP);
#else
  std::printf("OpenMP: DISABLED (multi-thread paths run inline)\n");
#endif
  int failed_tests = 0, ran = 0;
  for (const auto& [name, fn] : registry()) {
    if (filter != nullptr && std::strstr(name, filter) == nullptr) continue;
    ++ran;
    const int64_t failures_before = state().failures;
    const int64_t checks_before = state().checks;
    std::printf("[ RUN      ] %s\n", name);
    std::fflush(stdout);
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const int64_t checks = state().checks - checks_before;
    const int64_t failures = state().failures - failures_before;
    if (failures == 0) {
      std::printf("[       OK ] %s (%lld checks, %.0f ms)\n", name, static_cast<long long>(checks), ms);
    } else {
      ++failed_tests;
      std::printf("[  FAILED  ] %s (%lld of %lld checks failed, %.0f ms)\n", name, static_cast<long long>(failures),
                  static_cast<long long>(checks), ms);
    }
    std::fflush(stdout);
  }
  std::printf("%d test(s) run, %d failed; %lld checks, %lld failed\n", ran, failed_tests,
              static_cast<long long>(state().checks), static_cast<long long>(state().failures));
  std::printf("largest |error| / tolerance among passing elements: float %.3g, double %.3g\n",
              state().worst_ratio[0], state().worst_ratio[1]);
  if (ran == 0) {
    std::printf("no test matched the filter\n");
    return 1;
  }
  return failed_tests == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------------
// data helpers

template <typename T>
inline const char* type_name() {
  return std::is_same<T, float>::value ? "float" : std::is_same<T, double>::value ? "double" : "?";
}

// Deterministic random numbers (a fixed seed per test keeps failures reproducible).
class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen_); }
  template <typename T>
  std::vector<T> vector(int64_t n, double lo, double hi) {
    std::vector<T> v(static_cast<size_t>(n));
    for (T& x : v) x = T(uniform(lo, hi));
    return v;
  }

 private:
  std::mt19937_64 gen_;
};

template <typename T>
inline T poison() {
  return std::numeric_limits<T>::quiet_NaN();
}

// An output buffer of n elements, filled with NaN so an element the kernel fails to write shows up as a
// mismatch. Outside sanitizer builds it carries guard zones on both sides with a fixed byte pattern that
// must survive the kernel call (catches out-of-bounds writes); in sanitizer builds the allocation is
// exact so AddressSanitizer sees any out-of-bounds access, reads included.
template <typename T>
class Buffer {
 public:
#ifdef MK_TEST_SANITIZE
  static constexpr int64_t kGuard = 0;
#else
  static constexpr int64_t kGuard = 64;
#endif
  static constexpr unsigned char kGuardByte = 0xA5;

  explicit Buffer(int64_t n) : n_(n), storage_(static_cast<size_t>(n + 2 * kGuard)) {
    std::memset(static_cast<void*>(storage_.data()), kGuardByte, storage_.size() * sizeof(T));
    for (int64_t i = 0; i < n_; ++i) data()[i] = poison<T>();
  }
  T* data() { return storage_.data() + kGuard; }
  const T* data() const { return storage_.data() + kGuard; }
  int64_t size() const { return n_; }
  bool guards_intact() const {
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(storage_.data());
    const size_t guard_bytes = static_cast<size_t>(kGuard) * sizeof(T);
    const size_t tail = static_cast<size_t>(kGuard + n_) * sizeof(T);
    for (size_t i = 0; i < guard_bytes; ++i)
      if (bytes[i] != kGuardByte || bytes[tail + i] != kGuardByte) return false;
    return true;
  }

 private:
  int64_t n_;
  std::vector<T> storage_;
};

// ---------------------------------------------------------------------------------------------------
// comparisons

// |got[i] - ref[i]| <= tol[i] for all i, where tol comes from the error bound the caller derived
// (see the test files). NaN in `got` never passes.
template <typename T>
inline bool expect_close(const char* file, int line, const char* what, const T* got, const std::vector<double>& ref,
                         const std::vector<double>& tol) {
  ++state().checks;
  int64_t bad = 0;
  double worst_ratio = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(err <= tol[i])) ++bad;  // NaN fails here
    else worst_ratio = std::max(worst_ratio, err / tol[i]);  // tol > 0: the callers add a positive floor
  }
  double& worst = state().worst_ratio[sizeof(T) == 4 ? 0 : 1];
  worst = std::max(worst, worst_ratio);
  if (bad > 0) {
    std::ostringstream details;
    details.precision(17);
    int64_t shown = 0;
    for (size_t i = 0; i < ref.size() && shown < 3; ++i) {
      const double g = static_cast<double>(got[i]);
      const double err = std::fabs(g - ref[i]);
      if (err <= tol[i]) continue;
      ++shown;
      details << "\n      [" << i << "] got " << g << ", expected " << ref[i] << " (|diff| " << err << " > tol "
              << tol[i] << ")";
    }
    std::ostringstream msg;
    msg << what << ": " << bad << " of " << ref.size() << " elements outside tolerance" << details.str();
    report_failure(file, line, msg.str());
  }
  return bad == 0;
}

// Byte-for-byte equality of two arrays of n elements.
template <typename T>
inline bool expect_bitwise(const char* file, int line, const char* what, const T* a, const T* b, int64_t n) {
  ++state().checks;
  if (std::memcmp(a, b, static_cast<size_t>(n) * sizeof(T)) == 0) return true;
  int64_t bad = 0;
  std::ostringstream details;
  details.precision(17);
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i, b + i, sizeof(T)) != 0) {
      if (bad < 3) details << "\n      [" << i << "] " << double(a[i]) << " vs " << double(b[i]);
      ++bad;
    }
  }
  std::ostringstream msg;
  msg << what << ": " << bad << " of " << n << " elements differ bitwise" << details.str();
  report_failure(file, line, msg.str());
  return false;
}

#define MK_EXPECT_CLOSE(what, got, ref, tol) ::mk_test::expect_close(__FILE__, __LINE__, what, got, ref, tol)
#define MK_EXPECT_BITWISE(what, a, b, n) ::mk_test::expect_bitwise(__FILE__, __LINE__, what, a, b, n)

}  // namespace mk_test

#define MK_TEST_MAIN() \
  int main(int argc, char** argv) { return ::mk_test::run_all(argc, argv); }
