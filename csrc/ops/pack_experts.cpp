#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "kt/packing.h"
#include "kt/thread_pool.h"
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

std::tuple<at::Tensor, at::Tensor> allocate(const ExpertShape& s, const at::TensorOptions& opts) {
  const auto ip = padded(s.intermediate), hp = padded(s.hidden);
  return {at::empty_symint({s.experts, 2 * ip, hp}, opts), at::empty_symint({s.experts, hp, ip}, opts)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_experts_cpu(const at::Tensor& w_gate, const at::Tensor& w_up,
                                                    const at::Tensor& w_down) {
  const ExpertShape s = check_pack_args(w_gate, w_up, w_down, /*require_cpu=*/true);
  auto [gate_up, down] = allocate(s, w_gate.options());
  const at::Tensor g = w_gate.contiguous(), u = w_up.contiguous(), dn = w_down.contiguous();
  const int64_t E = s.experts.expect_int(), I = s.intermediate.expect_int(), H = s.hidden.expect_int();
  const int64_t ip = kt::round_up(I, kt::kPadTo), hp = kt::round_up(H, kt::kPadTo);
  const auto* gp = reinterpret_cast<const kt::bf16*>(g.data_ptr());
  const auto* up = reinterpret_cast<const kt::bf16*>(u.data_ptr());
  const auto* dp = reinterpret_cast<const kt::bf16*>(dn.data_ptr());
  auto* gu_out = reinterpret_cast<kt::bf16*>(gate_up.data_ptr());
  auto* d_out = reinterpret_cast<kt::bf16*>(down.data_ptr());
  kt::parallel_for(E, at::get_num_threads(), [&](int64_t e) {
    kt::pack_gate_up(gp + e * I * H, up + e * I * H, I, H, gu_out + e * 2 * ip * hp);
    kt::pack_weight(dp + e * H * I, H, I, I, d_out + e * hp * ip);
  });
  return {gate_up, down};
}

std::tuple<at::Tensor, at::Tensor> pack_experts_meta(const at::Tensor& w_gate, const at::Tensor& w_up,
                                                     const at::Tensor& w_down) {
  return allocate(check_pack_args(w_gate, w_up, w_down, /*require_cpu=*/false), w_gate.options());
}

}  // namespace kt_ops
