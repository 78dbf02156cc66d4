// CPU and Meta kernels of kt.copy_packed_experts: packed experts copied into other memory (the
// shared memory a host's ranks map), each NUMA slice's pages on its node as kt.pack_experts
// places them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "checks.h"
#include "kt/thread_pool.h"
#include "kt/topology.h"
#include "ops.h"

namespace kt_ops {
namespace {

void check_copy_args(at::TensorList experts, at::TensorList out, bool require_cpu) {
  constexpr const char* op = "copy_packed_experts";
  kt::WeightFormat format;
  check_experts(op, experts, experts[0], "gate_up", require_cpu, &format);
  KT_CHECK(out.size() == experts.size(), "kt.", op, ": out must hold as many tensors as experts (", experts.size(),
           "), got ", out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    KT_CHECK(out[i].scalar_type() == experts[i].scalar_type() && out[i].sym_sizes() == experts[i].sym_sizes() &&
                 out[i].is_contiguous(),
             "kt.", op, ": out[", i, "] must be a contiguous tensor of the dtype and shape of experts[", i, "] ",
             describe(experts[i]), ", got ", describe(out[i]));
    check_device(op, "out", out[i], "gate_up", experts[0], require_cpu);
  }
}

}  // namespace

void copy_packed_experts_cpu(at::TensorList experts, at::TensorList out) {
  check_copy_args(experts, out, true);
  const kt::Topology& topology = kt::machine_topology();
  const int64_t slices = experts[0].size(0), E = experts[0].size(1);
  std::vector<int64_t> range_first;
  for (int64_t sl = 0; sl <= slices; ++sl) range_first.push_back(sl * E);
  // gate_up and down [S, E, ...]: slice sl's pages go to its node before anything writes them,
  // and its node's threads copy it, an expert at a time. (Layout and scales are small.)
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor src = experts[i].contiguous();
    if (i >= 2) {
      out[i].copy_(src);
      continue;
    }
    const char* from = static_cast<const char*>(src.data_ptr());
    char* to = static_cast<char*>(out[i].data_ptr());
    const int64_t slice_bytes = static_cast<int64_t>(src.nbytes()) / slices, expert_bytes = slice_bytes / E;
    for (int64_t sl = 0; sl < slices; ++sl)
      topology.bind_memory(to + sl * slice_bytes, slice_bytes, static_cast<int>(sl % topology.nodes()));
    kt::parallel_for_ranges(range_first, at::get_num_threads(), [&](int64_t task) {
      std::memcpy(to + task * expert_bytes, from + task * expert_bytes, expert_bytes);
    });
  }
}

void copy_packed_experts_meta(at::TensorList experts, at::TensorList out) { check_copy_args(experts, out, false); }

}  // namespace kt_ops
