// Unit tests of the column partitioning in csrc/kernels/parallel.h that every [T, P] kernel relies on.
#include <cstdint>
#include <vector>

#include "harness.h"
#include "parallel.h"

namespace mk = metakernels::kernels;

MK_TEST(effective_threads_rules) {
  // Below the grain: inline, whatever was asked.
  MK_CHECK(mk::effective_threads(1, 1, 8) == 1);
  MK_CHECK(mk::effective_threads(1, mk::kParallelGrain - 1, 8) == 1);
  MK_CHECK(mk::effective_threads(127, 258, 8) == 1);  // 32766 elements
  // At the grain: as many threads as asked, capped at one per 256 columns.
  MK_CHECK(mk::effective_threads(1, mk::kParallelGrain, 8) == 8);
  MK_CHECK(mk::effective_threads(1, mk::kParallelGrain, 2) == 2);
  MK_CHECK(mk::effective_threads(64, 512, 8) == 2);
  MK_CHECK(mk::effective_threads(128, 256, 8) == 1);
  MK_CHECK(mk::effective_threads(4099, 11, 8) == 1);
  // Nonsense requests fall back to one thread.
  MK_CHECK(mk::effective_threads(1000, 1000, 0) == 1);
  MK_CHECK(mk::effective_threads(1000, 1000, -3) == 1);
}

MK_TEST(column_range_partitions_columns) {
  for (int64_t cols : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{255}, int64_t{2048}, int64_t{4099},
                       int64_t{32771}}) {
    for (int nt = 1; nt <= 9; ++nt) {
      int64_t expected_begin = 0;
      for (int tid = 0; tid < nt; ++tid) {
        int64_t b = -1, e = -1;
        mk::column_range(cols, tid, nt, &b, &e);
        // Contiguous, in thread order, within [0, cols), possibly empty for the last threads.
        MK_CHECK_MSG(b == expected_begin && b <= e && e <= cols,
                     "cols=" << cols << " nt=" << nt << " tid=" << tid << " -> [" << b << ", " << e << ")");
        expected_begin = e;
      }
      MK_CHECK_MSG(expected_begin == cols, "cols=" << cols << " nt=" << nt << " covers " << expected_begin);
    }
  }
}

MK_TEST(run_team_runs_every_thread_once) {
  for (int nt : {1, 2, 3}) {
    std::vector<int> calls(nt, 0);
    std::vector<int> team_sizes(nt, 0);
    mk::run_team(nt, [&](int tid, int team) {
      if (tid >= 0 && tid < nt) {
        calls[tid] += 1;  // each tid writes its own slot
        team_sizes[tid] = team;
      }
    });
#ifdef _OPENMP
    for (int tid = 0; tid < nt; ++tid) {
      MK_CHECK_MSG(calls[tid] == 1, "nt=" << nt << " tid=" << tid << " called " << calls[tid] << " times");
      MK_CHECK_MSG(team_sizes[tid] == nt, "nt=" << nt << " team " << team_sizes[tid]);
    }
#else
    MK_CHECK(calls[0] == 1 && team_sizes[0] == 1);
#endif
  }
}

MK_TEST_MAIN()
