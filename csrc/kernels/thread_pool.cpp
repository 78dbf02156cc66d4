#include "kt/thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace kt {
namespace {

// Workers sleep on a condition variable between jobs; a job is published by bumping
// `generation_`. Worker w takes part in a job when w < participants_.
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

  void run(int64_t n, int num_threads, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    const int helpers = static_cast<int>(std::min<int64_t>(num_threads, n)) - 1;
    if (helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
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
      tasks_ = n;
      next_task_.store(0);
      error_ = nullptr;
      participants_ = helpers;
      busy_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    do_tasks();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void worker_loop(int index, uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= participants_) continue;
      }
      do_tasks();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  void do_tasks() {
    for (int64_t i = next_task_.fetch_add(1); i < tasks_; i = next_task_.fetch_add(1)) {
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
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
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::exception_ptr error_;
};

}  // namespace

void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  Pool::instance().run(n, num_threads, fn);
}

}  // namespace kt
