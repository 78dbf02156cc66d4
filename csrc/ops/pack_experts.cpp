#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "kt/packing.h"
#include "kt/thread_pool.h"
#include "kt/topology.h"
#include "ops.h"

namespace kt_ops {
namespace {

struct ExpertShape {
  c10::SymInt experts, intermediate, hidden;
};

ExpertShape check_pack_args(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                            bool require_cpu) {
  constexpr const char* op = "pack_experts";
  KT_CHECK(w_gate.scalar_type() == at::kBFloat16 && w_gate.dim() == 3, "kt.", op,
              ": w_gate must be bfloat16 of shape [E, I, H], got ", describe(w_gate));
  const ExpertShape s{w_gate.sym_size(0), w_gate.sym_size(1), w_gate.sym_size(2)};
  KT_CHECK(s.intermediate > 0 && s.hidden > 0, "kt.", op,
              ": w_gate must have non-empty I and H, got ", describe(w_gate));
  check_size(op, "the expert count (w_gate's dim 0)", s.experts);
  check_size(op, "the intermediate size (w_gate's dim 1)", s.intermediate);
  check_size(op, "the hidden size (w_gate's dim 2)", s.hidden);
  KT_CHECK(w_up.scalar_type() == at::kBFloat16 && w_up.sym_sizes() == w_gate.sym_sizes(), "kt.",
              op, ": w_up must be bfloat16 of the shape of w_gate [", s.experts, ", ", s.intermediate,
              ", ", s.hidden, "], got ", describe(w_up));
  KT_CHECK(w_down.scalar_type() == at::kBFloat16 && w_down.dim() == 3 &&
                  w_down.sym_size(0) == s.experts && w_down.sym_size(1) == s.hidden &&
                  w_down.sym_size(2) == s.intermediate,
              "kt.", op, ": w_down must be bfloat16 of shape [E, H, I] = [", s.experts, ", ", s.hidden,
              ", ", s.intermediate, "], got ", describe(w_down));
  check_device(op, "w_gate", w_gate, "w_gate", w_gate, require_cpu);
  check_device(op, "w_up", w_up, "w_gate", w_gate, require_cpu);
  check_device(op, "w_down", w_down, "w_gate", w_gate, require_cpu);
  return s;
}

c10::SymInt padded(const c10::SymInt& v) { return (v + 31) / 32 * 32; }

// More slices than any machine has NUMA nodes.
constexpr int64_t kMaxNumaNodes = 1024;

// Slices of the intermediate dimension: one per NUMA node unless the caller asks otherwise.
// The count depends on I, which shape inference may only see symbolically: it is read as a
// concrete value (guarding on it), as the layout of the weights needs.
int64_t slice_count(const ExpertShape& s, int64_t numa_nodes) {
  KT_CHECK(numa_nodes >= 0 && numa_nodes <= kMaxNumaNodes, "kt.pack_experts: numa_nodes must be in [0, ",
           kMaxNumaNodes, "] (0: one slice per NUMA node), got ", numa_nodes);
  const int64_t nodes = numa_nodes ? numa_nodes : kt::machine_topology().nodes();
  return kt::slices_for(s.intermediate.guard_int(__FILE__, __LINE__), nodes);
}

PackResult allocate(const ExpertShape& s, int64_t slices, const at::TensorOptions& opts) {
  const c10::SymInt width = padded((s.intermediate + slices - 1) / slices), hp = padded(s.hidden);
  check_numel("pack_experts", "gate_up", {slices, s.experts, 2 * width, hp});
  return {at::empty_symint({slices, s.experts, 2 * width, hp}, opts),
          at::empty_symint({slices, s.experts, hp, width}, opts),
          at::empty({kt::kLayoutFields}, opts.dtype(at::kLong))};
}

}  // namespace

PackResult pack_experts_cpu(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                            int64_t numa_nodes) {
  const ExpertShape s = check_pack_args(w_gate, w_up, w_down, /*require_cpu=*/true);
  const int64_t slices = slice_count(s, numa_nodes);
  auto [gate_up, down, layout_fields] = allocate(s, slices, w_gate.options());
  const at::Tensor g = w_gate.contiguous(), u = w_up.contiguous(), dn = w_down.contiguous();
  const kt::ExpertLayout layout{s.experts.expect_int(), s.hidden.expect_int(), s.intermediate.expect_int(), slices};
  const auto* gp = reinterpret_cast<const kt::bf16*>(g.data_ptr());
  const auto* up = reinterpret_cast<const kt::bf16*>(u.data_ptr());
  const auto* dp = reinterpret_cast<const kt::bf16*>(dn.data_ptr());
  auto* gu_out = reinterpret_cast<kt::bf16*>(gate_up.data_ptr());
  auto* d_out = reinterpret_cast<kt::bf16*>(down.data_ptr());
  // Slice sl's pages go to its node before anything touches them; its node's threads pack it.
  const kt::Topology& topology = kt::machine_topology();
  const int64_t E = layout.experts;
  std::vector<int64_t> range_first;
  for (int64_t sl = 0; sl < slices; ++sl) {
    const int node = static_cast<int>(sl % topology.nodes());
    topology.bind_memory(gu_out + layout.gate_up_offset(sl, 0), sizeof(kt::bf16) * layout.gate_up_elems() / slices, node);
    topology.bind_memory(d_out + layout.down_offset(sl, 0), sizeof(kt::bf16) * layout.down_elems() / slices, node);
    range_first.push_back(sl * E);
  }
  range_first.push_back(slices * E);
  kt::parallel_for_ranges(range_first, at::get_num_threads(), [&](int64_t task) {
    kt::pack_expert_slice(layout, gp, up, dp, task % E, task / E, gu_out, d_out);
  });
  kt::encode_layout(layout, kt::WeightFormat::kBF16, layout_fields.data_ptr<int64_t>());
  return {gate_up, down, layout_fields};
}

PackResult pack_experts_meta(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                             int64_t numa_nodes) {
  const ExpertShape s = check_pack_args(w_gate, w_up, w_down, /*require_cpu=*/false);
  return allocate(s, slice_count(s, numa_nodes), w_gate.options());
}

}  // namespace kt_ops
