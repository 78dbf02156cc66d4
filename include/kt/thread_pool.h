// A persistent worker pool for the kernel core. Work is a count of independent tasks; a
// task's result never depends on which thread ran it, so results are identical for any
// thread count (the kernels give each output element exactly one owner).
#pragma once

#include <cstdint>
#include <functional>

namespace kt {

// Runs fn(i) for every i in [0, n) on up to num_threads threads (the caller included) and
// returns when all are done. Calls from several threads at once are serialised. The first
// exception a task throws is rethrown here after the rest have finished.
void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn);

}  // namespace kt
