// Timing of PCGrad's two passes straight on the torch-free kernel headers (csrc/kernels/pcgrad.h), to see where
// the time of metakernels.pcgrad goes without torch's dispatch, allocation or page faults in the way.
//
//   pcgrad_stages T P [threads] [reps]
//
// Prints, for a [T, P] float32 batch (touched before timing; medians of reps):
//   - the whole Gram pass (gram) and the combine pass (combine) with `threads` OpenMP threads, as GFLOP/s
//     (useful: T (T + 1) P, the symmetric Gram with its diagonal, what the roofline charges) and GB/s;
//   - the Gram's one-thread rate on one region of the columns read over and over (in L2 / L3: the compute
//     ceiling of the path this T takes, dot form below kAvx2PackMinRows rows, packed above) and streamed
//     once from memory, so a gap between the two shows what the memory side costs.
// Build: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build --target pcgrad_stages
// (or g++ -O3 -march=native -fopenmp -fno-trapping-math -std=c++17 -Icsrc/kernels benchmarks/cpp/pcgrad_stages.cpp).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "pcgrad.h"

namespace pc = metakernels::kernels::pcgrad;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename Fn>
double median_s(int reps, Fn&& fn) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_s();
    fn();
    t.push_back(now_s() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

#ifdef MK_PCGRAD_AVX2
// One thread: the Gram of the columns [0, region) repeated `calls` times, through the path the extension
// takes for this T (the per-chunk set-up of pc::gram left out).
double region_rate(const float* g, int64_t rows, int64_t ld, int64_t region, int64_t calls) {
  const std::vector<pc::Run> segs{{0, region}};
  const double t0 = now_s();
  if (rows >= pc::kAvx2PackMinRows) {
    const int64_t tq = (rows + 15) / 16 * 16;
    const auto plan = pc::plan_packed(rows);
    std::vector<pc::F16> pk(tq / 16 * pc::kAvx2Kc);
    std::vector<double> cd(tq * tq);
    for (int64_t c = 0; c < calls; ++c)
      pc::gram_segments_packed(g, rows, ld, segs, plan, reinterpret_cast<float*>(pk.data()), cd.data());
  } else {
    const auto plan = pc::plan_dot(rows);
    std::vector<pc::F8> facc(rows * rows);
    std::vector<pc::D8> dacc(rows * rows);
    std::vector<double> tail(rows * rows);
    for (int64_t c = 0; c < calls; ++c)
      pc::gram_segments_dot(g, rows, ld, segs, plan, reinterpret_cast<__m256*>(facc.data()), dacc.data(),
                            tail.data());
  }
  return double(rows) * double(rows + 1) * double(region) * double(calls) / (now_s() - t0) / 1e9;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s T P [threads] [reps]\n", argv[0]);
    return 2;
  }
  const int64_t T = std::atoll(argv[1]), P = std::atoll(argv[2]);
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 9;
  if (T < 1 || P < 64 || threads < 1 || reps < 1) {
    std::fprintf(stderr, "T >= 1, P >= 64, threads >= 1 and reps >= 1, got %lld %lld %d %d\n", (long long)T,
                 (long long)P, threads, reps);
    return 2;
  }
  std::vector<float> g(size_t(T) * size_t(P));
  for (size_t i = 0; i < g.size(); ++i) g[i] = float(int64_t(i * 7919) % 1000) * 1e-3f - 0.5f;
  std::vector<float> out(P);
  std::vector<float> coef(T);
  for (int64_t i = 0; i < T; ++i) coef[i] = 1.0f / float(i + 1);
  std::vector<double> K(T * T);
  const std::vector<pc::Run> all{{0, P}};
  const double flops = double(T) * double(T + 1) * double(P), bytes = 4.0 * double(T) * double(P);

  const double tg = median_s(reps, [&] { pc::gram<float>(g.data(), T, P, all, K.data(), threads); });
  const double tc = median_s(reps, [&] {
    pc::combine<float, float>(g.data(), T, P, P, coef.data(), all, true, out.data(), threads);
  });
  std::printf("T=%lld P=%lld threads=%d: gram %.3f ms (%.1f useful GFLOP/s, %.1f GB/s), combine %.3f ms (%.1f GB/s)\n",
              (long long)T, (long long)P, threads, tg * 1e3, flops / tg / 1e9, bytes / tg / 1e9, tc * 1e3,
              (bytes + 4.0 * double(P)) / tc / 1e9);
#ifdef MK_PCGRAD_AVX2
  const char* path = T >= pc::kAvx2PackMinRows ? "packed" : "dot form";
  for (int64_t region : {int64_t(2048), int64_t(16384)}) {
    if (region > P) break;
    const int64_t calls = std::max<int64_t>(1, int64_t(4e8 / (double(T) * double(T + 1) * double(region))));
    std::printf("  1 thread, %s, %lld columns (%.0f KiB) re-read %lld times: %.1f useful GFLOP/s\n", path,
                (long long)region, 4.0 * double(T * region) / 1024, (long long)calls,
                region_rate(g.data(), T, P, region, calls));
  }
  std::printf("  1 thread, %s, all %lld columns streamed once: %.1f useful GFLOP/s\n", path, (long long)P,
              region_rate(g.data(), T, P, P, 1));
#endif
  return 0;
}
