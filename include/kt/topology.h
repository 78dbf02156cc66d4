// The machine as the kernel core uses it: NUMA nodes and the cores of each, read through
// hwloc. The thread pool pins its workers to these cores and the expert weights are split
// along the intermediate dimension into one slice per node, each placed on its node.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace kt {

class Topology {
 public:
  // The machine this process runs on, restricted to the CPUs the calling thread may run on
  // (its affinity: a taskset, or a rank's share of the host); or, when
  // `synthetic` is non-null, an hwloc synthetic description such as "pack:2 numa:1 core:4
  // pu:1" (tests of multi-node behaviour on one-node machines). A synthetic topology only
  // shapes the work split: nothing is pinned or bound with it. Throws on a bad description.
  static Topology load(const char* synthetic = nullptr);

  int nodes() const { return static_cast<int>(node_cpus_.size()); }
  int cores() const;
  // One CPU (the OS index of its first hardware thread) per core of NUMA node `node`.
  const std::vector<int>& node_cpus(int node) const { return node_cpus_[node]; }
  bool is_this_system() const { return this_system_; }
  // e.g. "2 NUMA nodes: node 0 cores {0,1,2,3}, node 1 cores {4,5,6,7}"
  std::string describe() const;

  // Where thread slot `slot` of a pool runs: slots go round-robin over the nodes so that any
  // thread count spreads over all of them; slot i is the (i / nodes)-th core of its node.
  int node_of_slot(int slot) const { return slot % nodes(); }
  // Binds the calling thread to the core of `slot`. Returns false (and binds nothing) for a
  // synthetic topology, a slot beyond the cores of its node, or when the OS refuses.
  bool pin_current_thread(int slot) const;
  // Asks the OS to place the pages of [addr, addr + bytes) on NUMA node `node`, before they
  // are first written. A no-op on one node or a synthetic topology; best effort elsewhere
  // (placement is a speed matter, never a correctness one).
  void bind_memory(void* addr, size_t bytes, int node) const;

 private:
  std::shared_ptr<void> handle_;  // hwloc_topology_t, destroyed with the last copy
  std::vector<std::vector<int>> node_cpus_;
  std::vector<unsigned> node_os_index_;
  bool this_system_ = true;
};

// The topology the kernel core uses, loaded once: the synthetic description in the
// environment variable KT_OPS_TOPOLOGY if set, else this machine.
const Topology& machine_topology();

}  // namespace kt
