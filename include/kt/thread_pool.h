// A persistent worker pool for the kernel core. Work is a count of independent tasks; a
// task's result never depends on which thread ran it, so results are identical for any
// thread count (the kernels give each output element exactly one owner).
//
// Workers are pinned to cores of machine_topology(), spread round-robin over the NUMA nodes
// (KT_OPS_PIN_THREADS=0 leaves them unpinned). The calling thread takes part as slot 0 and is
// never re-pinned: it belongs to the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace kt {

// Runs fn(i) for every i in [0, n) on up to num_threads threads (the caller included) and
// returns when all are done. Calls from several threads at once are serialised. The first
// exception a task throws is rethrown here after the rest have finished.
void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn);

// The same over tasks [0, range_first.back()) grouped into ranges, range r being
// [range_first[r], range_first[r + 1]): range r holds the work whose data lives on NUMA node
// r. Threads of node r take tasks of range r first, then help with the other ranges, so a
// node that finishes early does not sit idle.
void parallel_for_ranges(const std::vector<int64_t>& range_first, int num_threads,
                         const std::function<void(int64_t)>& fn);

// Runs fn(slot) exactly once on each of the first num_threads thread slots (slot 0 is the
// caller, slot s > 0 the worker pinned to the s-th core of machine_topology()), each on its
// own thread, and returns when all are done. For work that must be one share per thread,
// such as benchmarks that time every thread from a common start: with parallel_for a thread
// that wakes first may claim two shares. Serialised with parallel_for; rethrows likewise.
void run_on_each_slot(int num_threads, const std::function<void(int)>& fn);

}  // namespace kt
