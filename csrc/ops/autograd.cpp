// Autograd-key kernel of kt.moe_sft_forward. Forward and backward both go through the
// dispatcher, so torch.compile / AOTAutograd trace them as kt.moe_sft_forward and
// kt.moe_sft_backward nodes. What the backward needs is kept as a SavedForward
// (saved_forward.h says why not in saved-tensor slots).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include "ops.h"
#include "saved_forward.h"

namespace kt_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kt::moe_sft_forward", "")
                             .typed<ForwardResult(KT_MOE_FORWARD_PARAMS)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kt::moe_sft_backward", "")
                             .typed<BackwardResult(const at::Tensor&, KT_MOE_FORWARD_PARAMS,
                                                   const at::Tensor&, const at::Tensor&)>();
  return op;
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

c10::intrusive_ptr<SavedForward> saved_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<SavedForward>(ctx->saved_data["forward"].toCapsule());
}

// The given LoRA tensors, in list order: the variables autograd tracks for the lora list (a
// list entry of None is no variable).
std::vector<at::Tensor> given_lora(const OptTensorList& lora) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < lora.size(); ++i)
    if (const OptTensor t = lora.get(i); t.has_value()) out.push_back(*t);
  return out;
}

// Autograd sees the function's arguments flattened: x, topk_ids, topk_weights, one variable
// per experts tensor, intermediate_size, one per given LoRA tensor (`lora_given`), then the
// rest; its backward returns one entry per flattened argument.
struct MoeSft : public torch::autograd::Function<MoeSft> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& topk_ids,
                               const at::Tensor& topk_weights, at::TensorList experts, int64_t intermediate_size,
                               at::TensorList lora_given, const OptTensorList& lora, double lora_scaling,
                               const OptTensor& gate_up_bias, const OptTensor& down_bias, c10::string_view activation,
                               double activation_alpha, std::optional<double> activation_limit, double up_offset,
                               bool w8a8) {
    ForwardArgs args;
    args.x = x, args.topk_ids = topk_ids, args.topk_weights = topk_weights;
    args.experts = experts.vec();
    for (size_t i = 0; i < lora.size(); ++i) args.lora.push_back(lora.get(i).value_or(at::Tensor()));
    args.gate_up_bias = gate_up_bias.value_or(at::Tensor());
    args.down_bias = down_bias.value_or(at::Tensor());
    args.intermediate_size = intermediate_size;
    args.lora_scaling = lora_scaling;
    args.activation = std::string(activation);
    args.activation_alpha = activation_alpha;
    args.activation_limit = activation_limit;
    args.up_offset = up_offset;
    args.w8a8 = w8a8;
    if (auto earlier = forward_to_reuse(args)) {
      // A checkpoint's recompute: the node made here is discarded with the recomputed graph.
      ctx->saved_data["forward"] = c10::IValue::make_capsule(earlier);
      ctx->mark_non_differentiable({earlier->gate_up_act, earlier->lora_act});
      return {earlier->y.clone(), earlier->gate_up_act, earlier->lora_act};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, gate_up_act, lora_act] =
        forward_op().call(x, topk_ids, topk_weights, experts, intermediate_size, lora, lora_scaling, gate_up_bias,
                          down_bias, activation, activation_alpha, activation_limit, up_offset, w8a8);
    ctx->saved_data["forward"] = c10::IValue::make_capsule(save_forward(std::move(args), y, gate_up_act, lora_act));
    ctx->mark_non_differentiable({gate_up_act, lora_act});
    return {y, gate_up_act, lora_act};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = saved_of(ctx);
    check_saved(*saved);
    const ForwardArgs& a = saved->args;
    auto [grad_x, grad_weights, grad_lora, grad_gate_up_bias, grad_down_bias] = backward_op().call(
        grads[0], a.x, a.topk_ids, a.topk_weights, a.experts, a.intermediate_size, a.lora_list(), a.lora_scaling,
        optional_of(a.gate_up_bias), optional_of(a.down_bias), a.activation, a.activation_alpha, a.activation_limit,
        a.up_offset, a.w8a8, saved->gate_up_act, saved->lora_act);
    variable_list result = {grad_x, at::Tensor(), grad_weights};
    result.insert(result.end(), a.experts.size(), at::Tensor());  // the frozen experts
    result.push_back(at::Tensor());                                // intermediate_size
    for (size_t i = 0; i < a.lora.size(); ++i)
      if (a.lora[i].defined()) result.push_back(grad_lora[i]);
    result.push_back(at::Tensor());  // lora (the list itself; its tensors are lora_given)
    result.push_back(at::Tensor());  // lora_scaling
    result.push_back(a.gate_up_bias.defined() ? grad_gate_up_bias : at::Tensor());
    result.push_back(a.down_bias.defined() ? grad_down_bias : at::Tensor());
    result.insert(result.end(), 5, at::Tensor());  // activation, its alpha and limit, up_offset, w8a8
    release_after_backward(*saved);
    return result;
  }
};

}  // namespace

ForwardResult moe_sft_forward_autograd(KT_MOE_FORWARD_PARAMS) {
  const std::vector<at::Tensor> lora_given = given_lora(lora);
  const variable_list out =
      MoeSft::apply(x, topk_ids, topk_weights, experts, intermediate_size, at::TensorList(lora_given), lora,
                    lora_scaling, gate_up_bias, down_bias, activation, activation_alpha, activation_limit, up_offset,
                    w8a8);
  return {out[0], out[1], out[2]};
}

}  // namespace kt_ops
