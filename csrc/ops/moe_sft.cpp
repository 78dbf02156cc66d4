// CPU and Meta kernels of kt.moe_sft_forward / kt.moe_sft_backward: validate, convert the
// small inputs (ids, routing weights, LoRA) to the kernel core's types, allocate outputs, run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <stdexcept>

#include "checks.h"
#include "formats.h"
#include "kt/kernels.h"
#include "kt/moe_sft.h"
#include "kt/topology.h"
#include "ops.h"

namespace kt_ops {
namespace {

// The kernel set a call on experts of `format` (with W8A8 numerics or not) takes now: the best
// this CPU has, capped by KT_OPS_MAX_ISA.
const kt::KernelSet& current_kernels(const char* op, kt::WeightFormat format, bool w8a8) {
  KT_CHECK(!w8a8 || !kt::kernel_sets(format, true).empty(), "kt.", op, ": w8a8 needs int8 experts (pack_experts(..., ",
           "format=\"int8\")), got ", kt::format_name(format), " experts");
  kt::Isa isa;
  try {
    isa = kt::select_isa(std::getenv("KT_OPS_MAX_ISA"));
  } catch (const std::invalid_argument& e) {
    KT_CHECK(false, "kt_ops: ", e.what());
  }
  // Every format's sets end in the scalar reference, which runs anywhere (the registry's
  // GoogleTest checks it), and the format was checked before.
  const kt::KernelSet* set = kt::select_kernels(isa, format, w8a8);
  TORCH_INTERNAL_ASSERT(set != nullptr, "no kernels for weight format ", kt::format_name(format));
  return *set;
}

kt::DType act_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? kt::DType::kBF16 : kt::DType::kF32;
}

// Everything the kernel core reads, converted and kept alive for the call.
struct KernelInputs {
  at::Tensor x, ids, weights, gate_up, down;
  at::Tensor gate_up_scale, down_scale;  // formats with scales; undefined otherwise
  at::Tensor lora[6];  // fp32 contiguous, undefined when absent
  at::Tensor gate_up_bias, down_bias;  // fp32 contiguous, undefined when absent
  MoeSizes sizes;
  kt::MoeDims dims;
  kt::MoeWeights w;

  KernelInputs(const char* op, const at::Tensor& x_, const at::Tensor& ids_, const at::Tensor& weights_,
               at::TensorList experts, int64_t intermediate, const LoraTensors& lora_, double scaling,
               const OptTensor& gate_up_bias_, const OptTensor& down_bias_, c10::string_view activation, double alpha,
               std::optional<double> limit, double up_offset) {
    sizes = check_moe_args(op, x_, ids_, weights_, experts, intermediate, lora_, scaling, true);
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
    gate_up = experts[0].contiguous();
    down = experts[1].contiguous();
    w.gate_up = gate_up.data_ptr();
    w.down = down.data_ptr();
    if (format_tensors(sizes.format).scales != kt::WeightScales::kNone) {  // check_moe_args checked their shapes
      gate_up_scale = experts[3].contiguous();
      down_scale = experts[4].contiguous();
      w.gate_up_scale = gate_up_scale.data_ptr();
      w.down_scale = down_scale.data_ptr();
    }
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
      KT_CHECK((p[i] >= 0 && p[i] < dims.experts) || p[i] == kt::kNoExpert, "kt.", op,
               ": topk_ids must be in [0, ", dims.experts, ") (the number of experts) or ", kt::kNoExpert,
               " (no expert), got ", p[i], " at [", i / dims.top_k, ", ", i % dims.top_k, "]");
    }
  }
};

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

// One LoRA gradient per entry of the op's lora list (`lora_entries`, 0 or 6).
BackwardResult allocate_backward(const at::Tensor& x, const at::Tensor& topk_weights, const LoraTensors& lora,
                                 size_t lora_entries, const OptTensor& gate_up_bias, const OptTensor& down_bias) {
  // An input's gradient has its shape and dtype; an input not given gets an empty tensor.
  const auto like = [&](const OptTensor& input) {
    return input.has_value() ? at::empty_symint(input->sym_sizes(), input->options())
                             : at::empty({0}, x.options().dtype(at::kFloat));
  };
  std::vector<at::Tensor> grad_lora;
  for (size_t i = 0; i < lora_entries; ++i) grad_lora.push_back(like(lora[i]));
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(topk_weights.sym_sizes(), topk_weights.options()),
          std::move(grad_lora), like(gate_up_bias), like(down_bias)};
}

}  // namespace

std::string isa(c10::string_view format, bool w8a8) {
  const std::string name(format.data(), format.size());
  kt::WeightFormat f;
  KT_CHECK(kt::parse_format(name, &f), "kt.isa: format must be one of ", kt::format_names(), ", got \"", name, "\"");
  return current_kernels("isa", f, w8a8).name;
}

std::string topology() {
  return kt::machine_topology().describe();
}

ForwardResult moe_sft_forward_cpu(KT_MOE_FORWARD_PARAMS) {
  constexpr const char* op = "moe_sft_forward";
  KernelInputs in(op, x, topk_ids, topk_weights, experts, intermediate_size, lora_of(op, lora), lora_scaling,
                  gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset);
  const MoeSizes& s = in.sizes;
  const kt::KernelSet& kernels = current_kernels(op, s.format, w8a8);
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
  constexpr const char* op = "moe_sft_forward";
  const MoeSizes s = check_moe_args(op, x, topk_ids, topk_weights, experts, intermediate_size, lora_of(op, lora),
                                    lora_scaling, false);
  check_gate(op, x, s, gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset, false);
  current_kernels(op, s.format, w8a8);
  return allocate_forward(x, s);
}

BackwardResult moe_sft_backward_cpu(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                    const at::Tensor& gate_up_act, const at::Tensor& lora_act) {
  constexpr const char* op = "moe_sft_backward";
  const LoraTensors lora_in = lora_of(op, lora);
  KernelInputs in(op, x, topk_ids, topk_weights, experts, intermediate_size, lora_in, lora_scaling, gate_up_bias,
                  down_bias, activation, activation_alpha, activation_limit, up_offset);
  const MoeSizes& s = in.sizes;
  const kt::KernelSet& kernels = current_kernels(op, s.format, w8a8);
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

  // Each gradient in its input's dtype; an empty tensor where the input was not given (the
  // lora list may be empty: no LoRA).
  const auto in_dtype_of = [&](const OptTensor& input, const at::Tensor& grad) {
    return input.has_value() ? grad.to(input->scalar_type()) : at::empty({0}, x.options().dtype(at::kFloat));
  };
  std::vector<at::Tensor> lora_grads;
  for (size_t i = 0; i < lora.size(); ++i) lora_grads.push_back(in_dtype_of(lora_in[i], grad_lora[i]));
  return {grad_x, grad_w.to(topk_weights.scalar_type()), std::move(lora_grads),
          in_dtype_of(gate_up_bias, grad_gate_up_bias), in_dtype_of(down_bias, grad_down_bias)};
}

BackwardResult moe_sft_backward_meta(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                     const at::Tensor& gate_up_act, const at::Tensor& lora_act) {
  constexpr const char* op = "moe_sft_backward";
  const LoraTensors lora_in = lora_of(op, lora);
  const MoeSizes s = check_moe_args(op, x, topk_ids, topk_weights, experts, intermediate_size, lora_in, lora_scaling,
                                    false);
  check_gate(op, x, s, gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset, false);
  current_kernels(op, s.format, w8a8);
  check_saved(op, grad_y, x, s, gate_up_act, lora_act, false);
  return allocate_backward(x, topk_weights, lora_in, lora.size(), gate_up_bias, down_bias);
}

}  // namespace kt_ops
