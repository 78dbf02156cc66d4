#include "kt/thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "kt/topology.h"

namespace kt {
namespace {

bool pinning_enabled() {
  const char* v = std::getenv("KT_OPS_PIN_THREADS");
  return !(v && std::strcmp(v, "0") == 0);
}

// Workers sleep on a condition variable between jobs; a job is published by bumping
// `generation_`. Worker w runs as thread slot w + 1 and takes part in a job when
// w < participants_.
class Pool {
 public:
  static Pool& instance() {
    // Never destroyed: detached workers may still be parked at process exit.
    static Pool* pool = [] {
      auto* p = new Pool();
      pthread_atfork(nullptr, nullptr, [] { Pool::instance().reset_after_fork(); });
      return p;
    }();
    return *pool;
  }

  // Tasks claimed dynamically, each range's threads first (parallel_for_ranges), or, with
  // `one_per_slot`, task s run by slot s (run_on_each_slot: range_first is {0, threads}).
  void run(const std::vector<int64_t>& range_first, int num_threads, const std::function<void(int64_t)>& fn,
           bool one_per_slot = false) {
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    nodes_ = machine_topology().nodes();  // loads it (or throws) before any worker starts
    const int64_t n = range_first.back() - range_first.front();
    const int helpers = static_cast<int>(std::min<int64_t>(num_threads, n)) - 1;
    if (helpers <= 0) {
      for (int64_t i = range_first.front(); i < range_first.back(); ++i) fn(i);
      return;
    }
    while (workers_ < helpers) {
      // The worker starts from the current generation so it cannot miss the job below.
      std::thread([this, index = workers_, gen = generation_] { worker_loop(index, gen); }).detach();
      ++workers_;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      ranges_ = static_cast<int>(range_first.size()) - 1;
      if (ranges_ > capacity_) {
        next_.reset(new std::atomic<int64_t>[ranges_]);
        end_.reset(new int64_t[ranges_]);
        capacity_ = ranges_;
      }
      for (int r = 0; r < ranges_; ++r) {
        next_[r].store(range_first[r]);
        end_[r] = range_first[r + 1];
      }
      error_ = nullptr;
      one_per_slot_ = one_per_slot;
      participants_ = helpers;
      busy_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    do_tasks(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void worker_loop(int index, uint64_t seen) {
    if (pinning_enabled()) machine_topology().pin_current_thread(index + 1);
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= participants_) continue;
      }
      do_tasks(index + 1);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  // Drains the slot's own range first, then the others in order.
  void do_tasks(int slot) {
    if (one_per_slot_) return run_task(slot);
    const int home = slot % nodes_ % ranges_;  // the slot's node (Topology::node_of_slot)
    for (int step = 0; step < ranges_; ++step) {
      const int r = (home + step) % ranges_;
      for (int64_t i = next_[r].fetch_add(1); i < end_[r]; i = next_[r].fetch_add(1)) run_task(i);
    }
  }

  void run_task(int64_t i) {
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  // A forked child has only the forking thread: forget the parent's workers.
  void reset_after_fork() {
    new (&job_mutex_) std::mutex();
    new (&mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    new (&done_) std::condition_variable();
    workers_ = 0;
    busy_ = 0;
  }

  std::mutex job_mutex_, mutex_;
  std::condition_variable wake_, done_;
  int workers_ = 0, participants_ = 0, busy_ = 0;
  uint64_t generation_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int nodes_ = 1, ranges_ = 0, capacity_ = 0;
  bool one_per_slot_ = false;
  std::unique_ptr<std::atomic<int64_t>[]> next_;
  std::unique_ptr<int64_t[]> end_;
  std::exception_ptr error_;
};

}  // namespace

void run_on_each_slot(int num_threads, const std::function<void(int)>& fn) {
  if (num_threads <= 0) return;
  Pool::instance().run({0, num_threads}, num_threads, [&](int64_t slot) { fn(static_cast<int>(slot)); }, true);
}

void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  Pool::instance().run({0, n}, num_threads, fn);
}

void parallel_for_ranges(const std::vector<int64_t>& range_first, int num_threads,
                         const std::function<void(int64_t)>& fn) {
  if (range_first.size() < 2 || range_first.back() <= range_first.front()) return;
  Pool::instance().run(range_first, num_threads, fn);
}

}  // namespace kt
