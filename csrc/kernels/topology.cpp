#include "kt/topology.h"

#include <hwloc.h>

#include <cstdlib>
#include <stdexcept>

namespace kt {
namespace {

hwloc_topology_t topo(const std::shared_ptr<void>& handle) {
  return static_cast<hwloc_topology_t>(handle.get());
}

}  // namespace

Topology Topology::load(const char* synthetic) {
  hwloc_topology_t t;
  if (hwloc_topology_init(&t) != 0) throw std::runtime_error("kt_ops: hwloc_topology_init failed");
  Topology out;
  out.handle_ = std::shared_ptr<void>(t, [](void* p) { hwloc_topology_destroy(static_cast<hwloc_topology_t>(p)); });
  if (synthetic && hwloc_topology_set_synthetic(t, synthetic) != 0)
    throw std::invalid_argument(std::string("kt_ops: KT_OPS_TOPOLOGY is not a valid hwloc synthetic topology: \"") +
                                synthetic + "\" (example: \"pack:2 numa:1 core:4 pu:1\")");
  if (hwloc_topology_load(t) != 0) throw std::runtime_error("kt_ops: hwloc_topology_load failed");
  out.this_system_ = hwloc_topology_is_thissystem(t);
  // The CPUs the loading thread may run on (its affinity: a taskset, or a rank's share of a
  // host); hwloc itself narrows the machine only by cgroup. Every CPU of a synthetic topology.
  std::shared_ptr<hwloc_bitmap_s> allowed(hwloc_bitmap_alloc_full(), hwloc_bitmap_free);
  if (out.this_system_ && hwloc_get_cpubind(t, allowed.get(), HWLOC_CPUBIND_THREAD) != 0)
    hwloc_bitmap_fill(allowed.get());
  std::shared_ptr<hwloc_bitmap_s> unit_allowed(hwloc_bitmap_alloc(), hwloc_bitmap_free);

  // NUMA nodes without CPUs (memory-only nodes) get no threads and no weight slice.
  const int n_nodes = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
  for (int i = 0; i < n_nodes; ++i) {
    const hwloc_obj_t node = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, i);
    if (!node->cpuset || hwloc_bitmap_iszero(node->cpuset)) continue;
    // Cores when the machine reports them, else hardware threads.
    hwloc_obj_type_t unit = HWLOC_OBJ_CORE;
    if (hwloc_get_nbobjs_inside_cpuset_by_type(t, node->cpuset, unit) <= 0) unit = HWLOC_OBJ_PU;
    std::vector<int> cpus;
    const int n_units = hwloc_get_nbobjs_inside_cpuset_by_type(t, node->cpuset, unit);
    for (int j = 0; j < n_units; ++j) {
      hwloc_bitmap_and(unit_allowed.get(), hwloc_get_obj_inside_cpuset_by_type(t, node->cpuset, unit, j)->cpuset,
                       allowed.get());
      if (!hwloc_bitmap_iszero(unit_allowed.get())) cpus.push_back(hwloc_bitmap_first(unit_allowed.get()));
    }
    if (cpus.empty()) continue;
    out.node_cpus_.push_back(std::move(cpus));
    out.node_os_index_.push_back(node->os_index);
  }
  if (out.node_cpus_.empty()) {  // no NUMA information at all: one node of every PU
    std::vector<int> cpus;
    const int n_pus = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PU);
    for (int j = 0; j < n_pus; ++j) {
      const hwloc_obj_t pu = hwloc_get_obj_by_type(t, HWLOC_OBJ_PU, j);
      if (hwloc_bitmap_isset(allowed.get(), pu->os_index)) cpus.push_back(pu->os_index);
    }
    out.node_cpus_.push_back(cpus.empty() ? std::vector<int>{0} : cpus);
    out.node_os_index_.push_back(0);
  }
  return out;
}

int Topology::cores() const {
  int n = 0;
  for (const auto& c : node_cpus_) n += static_cast<int>(c.size());
  return n;
}

std::string Topology::describe() const {
  std::string s = std::to_string(nodes()) + (nodes() == 1 ? " NUMA node:" : " NUMA nodes:");
  for (int n = 0; n < nodes(); ++n) {
    s += (n ? ", node " : " node ") + std::to_string(n) + " cores {";
    for (size_t i = 0; i < node_cpus_[n].size(); ++i) s += (i ? "," : "") + std::to_string(node_cpus_[n][i]);
    s += "}";
  }
  return this_system_ ? s : s + " (synthetic)";
}

bool Topology::pin_current_thread(int slot) const {
  if (!this_system_) return false;
  const std::vector<int>& cpus = node_cpus_[node_of_slot(slot)];
  const size_t index = static_cast<size_t>(slot / nodes());
  if (index >= cpus.size()) return false;
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  hwloc_bitmap_only(set, cpus[index]);
  const bool ok = hwloc_set_cpubind(topo(handle_), set, HWLOC_CPUBIND_THREAD) == 0;
  hwloc_bitmap_free(set);
  return ok;
}

void Topology::bind_memory(void* addr, size_t bytes, int node) const {
  if (!this_system_ || nodes() == 1 || bytes == 0) return;
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  hwloc_bitmap_only(set, node_os_index_[node % nodes()]);
  hwloc_set_area_membind(topo(handle_), addr, bytes, set, HWLOC_MEMBIND_BIND, HWLOC_MEMBIND_BYNODESET);
  hwloc_bitmap_free(set);
}

const Topology& machine_topology() {
  static const Topology topology = Topology::load(std::getenv("KT_OPS_TOPOLOGY"));
  return topology;
}

}  // namespace kt
