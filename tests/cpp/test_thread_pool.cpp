#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <thread>
#include <stdexcept>
#include <vector>

#include "kt/thread_pool.h"

namespace {

TEST(ThreadPool, RunsEveryTaskExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    std::vector<std::atomic<int>> hits(1000);
    kt::parallel_for(1000, threads, [&](int64_t i) { hits[i].fetch_add(1); });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1) << "threads=" << threads;
  }
}

TEST(ThreadPool, ManyConsecutiveJobs) {
  std::atomic<int64_t> sum{0};
  for (int job = 0; job < 200; ++job) kt::parallel_for(17, 4, [&](int64_t i) { sum += i; });
  EXPECT_EQ(sum.load(), 200 * (16 * 17 / 2));
}

TEST(ThreadPool, RethrowsATaskException) {
  std::atomic<int> ran{0};
  EXPECT_THROW(kt::parallel_for(64, 4,
                                [&](int64_t i) {
                                  ran++;
                                  if (i == 5) throw std::runtime_error("task 5 failed");
                                }),
               std::runtime_error);
  EXPECT_EQ(ran.load(), 64);  // the other tasks still ran
  // The pool is usable afterwards.
  std::atomic<int> after{0};
  kt::parallel_for(10, 4, [&](int64_t) { after++; });
  EXPECT_EQ(after.load(), 10);
}

TEST(ThreadPool, EachSlotRunsOnceOnItsOwnThreadAtTheSameTime) {
  for (int threads : {1, 3, 8}) {
    std::vector<std::thread::id> ran_on(threads);
    std::vector<int> runs(threads, 0);
    std::atomic<int> arrived{0};
    std::atomic<bool> all_met{true};
    kt::run_on_each_slot(threads, [&](int slot) {
      ran_on[slot] = std::this_thread::get_id();
      ++runs[slot];
      // Every slot waits here for all the others: only concurrent slots get through.
      arrived.fetch_add(1);
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (arrived.load() < threads)
        if (std::chrono::steady_clock::now() > give_up) {
          all_met = false;
          break;
        }
    });
    EXPECT_TRUE(all_met.load()) << "threads=" << threads;
    EXPECT_EQ(ran_on[0], std::this_thread::get_id()) << "slot 0 is the caller";
    EXPECT_EQ(std::set<std::thread::id>(ran_on.begin(), ran_on.end()).size(), size_t(threads));
    for (int r : runs) EXPECT_EQ(r, 1);
  }
  // Dynamic jobs still work after one.
  std::atomic<int> after{0};
  kt::parallel_for(10, 4, [&](int64_t) { after++; });
  EXPECT_EQ(after.load(), 10);
}

TEST(ThreadPool, EmptyRangeDoesNothing) {
  kt::parallel_for(0, 4, [](int64_t) { FAIL() << "no task expected"; });
}

TEST(ThreadPool, RangesRunEveryTaskExactlyOnce) {
  // Ranges of unequal size, an empty one among them, more ranges than nodes.
  const std::vector<int64_t> first = {0, 5, 5, 300, 301, 1000};
  for (int threads : {1, 2, 3, 8}) {
    std::vector<std::atomic<int>> hits(1000);
    kt::parallel_for_ranges(first, threads, [&](int64_t i) { hits[i].fetch_add(1); });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1) << "threads=" << threads;
  }
}

TEST(ThreadPool, RangesMayStartPastZero) {
  std::vector<std::atomic<int>> hits(20);
  kt::parallel_for_ranges({10, 15, 20}, 4, [&](int64_t i) { hits[i].fetch_add(1); });
  for (int i = 0; i < 20; ++i) ASSERT_EQ(hits[i].load(), i >= 10 ? 1 : 0) << i;
}

}  // namespace
