// CPU and Meta kernels of kt.moe_sft_forward / kt.moe_sft_backward: validate, convert the
// small inputs (ids, routing weights, LoRA) to the kernel core's types, allocate outputs, run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <stdexcept>

#include "checks.h"
#include "kt/isa.h"
#include "kt/moe_sft.h"
#include "kt/topology.h"
#include "ops.h"

namespace kt_ops {
namespace {

const kt::Kernels& current_kernels() {
  try {
    return kt::kernels_for(kt::select_isa(std::getenv("KT_OPS_MAX_ISA")));
  } catch (const std::invalid_argument& e) {
    KT_CHECK(false, "kt_ops: ", e.what());
  }
}

kt::DType act_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? kt::DType::kBF16 : kt::DType::kF32;
}

// Everything the kernel core reads, converted and kept alive for the call.
struct KernelInputs {
  at::Tensor x, ids, weights, gate_up, down;
  at::Tensor lora[6];  // fp32 contiguous, undefined when absent
  at::Tensor gate_up_bias, down_bias;  // fp32 contiguous, undefined when absent
  MoeSizes sizes;
  kt::MoeDims dims;
  kt::MoeWeights w;

  KernelInputs(const char* op, const at::Tensor& x_, const at::Tensor& ids_, const at::Tensor& weights_,
               const at::Tensor& gate_up_, const at::Tensor& down_, const at::Tensor& layout, int64_t intermediate,
               const LoraTensors& lora_, double scaling, const OptTensor& gate_up_bias_,
               const OptTensor& down_bias_, c10::string_view activation, double alpha, std::optional<double> limit,
               double up_offset) {
    sizes = check_moe_args(op, x_, ids_, weights_, gate_up_, down_, layout, intermediate, lora_, scaling, true);
    w.gate = check_gate(op, x_, sizes, gate_up_bias_, down_bias_, activation, alpha, limit, up_offset, true);
    if (gate_up_bias_.has_value()) {
      gate_up_bias = gate_up_bias_->to(at::kFloat).contiguous();
      w.gate_up_bias = gate_up_bias.data_ptr<float>();
    }
    if (down_bias_.has_value()) {
      down_bias = down_bias_->to(at::kFloat).contiguous();
      w.down_bias = down_bias.data_ptr<float>();
    }
    const MoeSizes& s = sizes;
    dims = {s.tokens.expect_int(), s.top_k.expect_int(), s.hidden.expect_int(), intermediate,
            s.experts.expect_int()};
    x = x_.contiguous();
    ids = ids_.to(at::kLong).contiguous();
    check_expert_ids(op);
    weights = weights_.to(at::kFloat).contiguous();
    gate_up = gate_up_.contiguous();
    down = down_.contiguous();
    w.gate_up = reinterpret_cast<const kt::bf16*>(gate_up.data_ptr());
    w.down = reinterpret_cast<const kt::bf16*>(down.data_ptr());
    w.slices = gate_up.size(0);
    w.lora_scaling = static_cast<float>(scaling);
    for (int p = 0; p < 3; ++p) {
      if (!lora_[2 * p].has_value()) continue;
      lora[2 * p] = lora_[2 * p]->to(at::kFloat).contiguous();
      lora[2 * p + 1] = lora_[2 * p + 1]->to(at::kFloat).contiguous();
      w.lora[p] = {lora[2 * p].data_ptr<float>(), lora[2 * p + 1].data_ptr<float>(), s.rank[p]};
    }
  }

  // Ids index the expert weights: an id out of range would read outside them.
  void check_expert_ids(const char* op) const {
    const int64_t* p = ids.data_ptr<int64_t>();
    const int64_t n = ids.numel();
    for (int64_t i = 0; i < n; ++i) {
      KT_CHECK(p[i] >= 0 && p[i] < dims.experts, "kt.", op, ": topk_ids must be in [0, ",
                  dims.experts, ") (the number of experts), got ", p[i], " at [", i / dims.top_k,
                  ", ", i % dims.top_k, "]");
    }
  }
};

LoraTensors lora_args(const OptTensor& ga, const OptTensor& gb, const OptTensor& ua,
                      const OptTensor& ub, const OptTensor& da, const OptTensor& db) {
  return {ga, gb, ua, ub, da, db};
}

ForwardResult allocate_forward(const at::Tensor& x, const MoeSizes& s) {
  const int64_t lora_width = s.rank[0] + s.rank[1] + s.rank[2];
  return {at::empty_symint({s.tokens, s.hidden}, x.options()),
          at::empty_symint({s.tokens, s.top_k, c10::SymInt(2 * s.intermediate)}, x.options()),
          at::empty_symint({s.tokens, s.top_k, c10::SymInt(lora_width)}, x.options().dtype(at::kFloat))};
}

void check_saved(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const MoeSizes& s,
                 const at::Tensor& gate_up_act, const at::Tensor& lora_act, bool require_cpu) {
  KT_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.sym_sizes() == x.sym_sizes(), "kt.",
              op, ": grad_y must match x (", describe(x), "), got ", describe(grad_y));
  const c10::SymInt two_i(2 * s.intermediate), width(s.rank[0] + s.rank[1] + s.rank[2]);
  KT_CHECK(gate_up_act.scalar_type() == x.scalar_type() && gate_up_act.dim() == 3 &&
                  gate_up_act.sym_size(0) == s.tokens && gate_up_act.sym_size(1) == s.top_k &&
                  gate_up_act.sym_size(2) == two_i,
              "kt.", op, ": gate_up_act must be the ", dtype_name(x.scalar_type()), " [", s.tokens,
              ", ", s.top_k, ", ", two_i, "] tensor returned by kt.moe_sft_forward, got ",
              describe(gate_up_act));
  KT_CHECK(lora_act.scalar_type() == at::kFloat && lora_act.dim() == 3 &&
                  lora_act.sym_size(0) == s.tokens && lora_act.sym_size(1) == s.top_k &&
                  lora_act.sym_size(2) == width,
              "kt.", op, ": lora_act must be the float32 [", s.tokens, ", ", s.top_k, ", ", width,
              "] tensor returned by kt.moe_sft_forward, got ", describe(lora_act));
  check_device(op, "grad_y", grad_y, "x", x, require_cpu);
  check_device(op, "gate_up_act", gate_up_act, "x", x, require_cpu);
  check_device(op, "lora_act", lora_act, "x", x, require_cpu);
}

BackwardResult allocate_backward(const at::Tensor& x, const at::Tensor& topk_weights, const LoraTensors& lora,
                                 const OptTensor& gate_up_bias, const OptTensor& down_bias) {
  BackwardResult out;
  std::get<0>(out) = at::empty_symint(x.sym_sizes(), x.options());
  std::get<1>(out) = at::empty_symint(topk_weights.sym_sizes(), topk_weights.options());
  const OptTensor inputs[8] = {lora[0], lora[1], lora[2], lora[3], lora[4], lora[5], gate_up_bias, down_bias};
  at::Tensor* grads[8] = {&std::get<2>(out), &std::get<3>(out), &std::get<4>(out), &std::get<5>(out),
                          &std::get<6>(out), &std::get<7>(out), &std::get<8>(out), &std::get<9>(out)};
  for (int i = 0; i < 8; ++i)
    *grads[i] = inputs[i].has_value() ? at::empty_symint(inputs[i]->sym_sizes(), inputs[i]->options())
                                      : at::empty({0}, x.options().dtype(at::kFloat));
  return out;
}

}  // namespace

std::string isa() {
  return kt::isa_name(current_kernels().isa);
}

std::string topology() {
  return kt::machine_topology().describe();
}

ForwardResult moe_sft_forward_cpu(KT_MOE_FORWARD_PARAMS) {
  constexpr const char* op = "moe_sft_forward";
  const LoraTensors lora = lora_args(lora_gate_a, lora_gate_b, lora_up_a, lora_up_b, lora_down_a, lora_down_b);
  const kt::Kernels& kernels = current_kernels();
  KernelInputs in(op, x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size, lora, lora_scaling,
                  gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset);
  const MoeSizes& s = in.sizes;
  ForwardResult out = allocate_forward(x, s);
  kt::MoeForwardArgs args{};
  args.dims = in.dims;
  args.x = in.x.data_ptr();
  args.act_dtype = act_dtype(x);
  args.ids = in.ids.data_ptr<int64_t>();
  args.weights = in.weights.data_ptr<float>();
  args.w = in.w;
  args.y = std::get<0>(out).data_ptr();
  args.gate_up_act = std::get<1>(out).data_ptr();
  args.lora_act = std::get<2>(out).data_ptr<float>();
  kt::moe_sft_forward(kernels, at::get_num_threads(), args);
  return out;
}

ForwardResult moe_sft_forward_meta(KT_MOE_FORWARD_PARAMS) {
  const LoraTensors lora = lora_args(lora_gate_a, lora_gate_b, lora_up_a, lora_up_b, lora_down_a, lora_down_b);
  constexpr const char* op = "moe_sft_forward";
  const MoeSizes s = check_moe_args(op, x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size, lora,
                                    lora_scaling, false);
  check_gate(op, x, s, gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset, false);
  return allocate_forward(x, s);
}

BackwardResult moe_sft_backward_cpu(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                    const at::Tensor& gate_up_act, const at::Tensor& lora_act) {
  constexpr const char* op = "moe_sft_backward";
  const LoraTensors lora = lora_args(lora_gate_a, lora_gate_b, lora_up_a, lora_up_b, lora_down_a, lora_down_b);
  const kt::Kernels& kernels = current_kernels();
  KernelInputs in(op, x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size, lora, lora_scaling,
                  gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset);
  const MoeSizes& s = in.sizes;
  check_saved(op, grad_y, x, s, gate_up_act, lora_act, true);
  const at::Tensor dy = grad_y.contiguous(), gu_act = gate_up_act.contiguous(), l_act = lora_act.contiguous();

  // The kernel core writes fp32 gradients for the routing weights and LoRA; cast at the end.
  at::Tensor grad_x = at::empty_like(in.x);
  at::Tensor grad_w = at::empty({s.tokens.expect_int(), s.top_k.expect_int()}, x.options().dtype(at::kFloat));
  at::Tensor grad_lora[6];
  kt::MoeBackwardArgs args{};
  for (int p = 0; p < 3; ++p) {
    if (!in.lora[2 * p].defined()) continue;
    grad_lora[2 * p] = at::empty_like(in.lora[2 * p]);
    grad_lora[2 * p + 1] = at::empty_like(in.lora[2 * p + 1]);
    args.grad_lora_a[p] = grad_lora[2 * p].data_ptr<float>();
    args.grad_lora_b[p] = grad_lora[2 * p + 1].data_ptr<float>();
  }
  args.dims = in.dims;
  args.grad_y = dy.data_ptr();
  args.x = in.x.data_ptr();
  args.act_dtype = act_dtype(x);
  args.ids = in.ids.data_ptr<int64_t>();
  args.weights = in.weights.data_ptr<float>();
  args.w = in.w;
  args.gate_up_act = gu_act.data_ptr();
  args.lora_act = l_act.data_ptr<float>();
  args.grad_x = grad_x.data_ptr();
  args.grad_weights = grad_w.data_ptr<float>();
  at::Tensor grad_gate_up_bias, grad_down_bias;
  if (in.gate_up_bias.defined()) {
    grad_gate_up_bias = at::empty_like(in.gate_up_bias);
    args.grad_gate_up_bias = grad_gate_up_bias.data_ptr<float>();
  }
  if (in.down_bias.defined()) {
    grad_down_bias = at::empty_like(in.down_bias);
    args.grad_down_bias = grad_down_bias.data_ptr<float>();
  }
  kt::moe_sft_backward(kernels, at::get_num_threads(), args);

  BackwardResult out;
  std::get<0>(out) = grad_x;
  std::get<1>(out) = grad_w.to(topk_weights.scalar_type());
  at::Tensor* lora_out[6] = {&std::get<2>(out), &std::get<3>(out), &std::get<4>(out),
                             &std::get<5>(out), &std::get<6>(out), &std::get<7>(out)};
  for (int i = 0; i < 6; ++i)
    *lora_out[i] = lora[i].has_value() ? grad_lora[i].to(lora[i]->scalar_type())
                                       : at::empty({0}, x.options().dtype(at::kFloat));
  const auto bias_grad = [&](const OptTensor& bias, const at::Tensor& grad) {
    return bias.has_value() ? grad.to(bias->scalar_type()) : at::empty({0}, x.options().dtype(at::kFloat));
  };
  std::get<8>(out) = bias_grad(gate_up_bias, grad_gate_up_bias);
  std::get<9>(out) = bias_grad(down_bias, grad_down_bias);
  return out;
}

BackwardResult moe_sft_backward_meta(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                     const at::Tensor& gate_up_act, const at::Tensor& lora_act) {
  constexpr const char* op = "moe_sft_backward";
  const LoraTensors lora = lora_args(lora_gate_a, lora_gate_b, lora_up_a, lora_up_b, lora_down_a, lora_down_b);
  const MoeSizes s = check_moe_args(op, x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size,
                                    lora, lora_scaling, false);
  check_gate(op, x, s, gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset, false);
  check_saved(op, grad_y, x, s, gate_up_act, lora_act, false);
  return allocate_backward(x, topk_weights, lora, gate_up_bias, down_bias);
}

}  // namespace kt_ops
