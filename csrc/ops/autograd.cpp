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

struct MoeSft : public torch::autograd::Function<MoeSft> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& topk_ids,
                               const at::Tensor& topk_weights, const at::Tensor& gate_up,
                               const at::Tensor& down, const at::Tensor& layout, int64_t intermediate_size,
                               const OptTensor& lora_gate_a,
                               const OptTensor& lora_gate_b, const OptTensor& lora_up_a,
                               const OptTensor& lora_up_b, const OptTensor& lora_down_a,
                               const OptTensor& lora_down_b, double lora_scaling, const OptTensor& gate_up_bias,
                               const OptTensor& down_bias, c10::string_view activation, double activation_alpha,
                               std::optional<double> activation_limit, double up_offset) {
    const auto or_empty = [](const OptTensor& t) { return t.value_or(at::Tensor()); };
    ForwardArgs args{{x, topk_ids, topk_weights, gate_up, down, layout, or_empty(lora_gate_a), or_empty(lora_gate_b),
                      or_empty(lora_up_a), or_empty(lora_up_b), or_empty(lora_down_a), or_empty(lora_down_b),
                      or_empty(gate_up_bias), or_empty(down_bias)},
                     intermediate_size, lora_scaling, std::string(activation), activation_alpha, activation_limit,
                     up_offset};
    if (auto earlier = forward_to_reuse(args)) {
      // A checkpoint's recompute: the node made here is discarded with the recomputed graph.
      ctx->saved_data["forward"] = c10::IValue::make_capsule(earlier);
      ctx->mark_non_differentiable({earlier->gate_up_act, earlier->lora_act});
      return {earlier->y.clone(), earlier->gate_up_act, earlier->lora_act};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, gate_up_act, lora_act] = forward_op().call(
        x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size, lora_gate_a, lora_gate_b, lora_up_a,
        lora_up_b, lora_down_a, lora_down_b, lora_scaling, gate_up_bias, down_bias, activation, activation_alpha,
        activation_limit, up_offset);
    ctx->saved_data["forward"] = c10::IValue::make_capsule(save_forward(std::move(args), y, gate_up_act, lora_act));
    ctx->mark_non_differentiable({gate_up_act, lora_act});
    return {y, gate_up_act, lora_act};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = saved_of(ctx);
    check_saved(*saved);
    const ForwardArgs& a = saved->args;
    const std::vector<at::Tensor>& s = a.tensors;
    const auto grad = backward_op().call(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], a.intermediate_size, optional_of(s[6]), optional_of(s[7]),
        optional_of(s[8]), optional_of(s[9]), optional_of(s[10]), optional_of(s[11]), a.lora_scaling,
        optional_of(s[12]), optional_of(s[13]), a.activation, a.activation_alpha, a.activation_limit, a.up_offset,
        saved->gate_up_act, saved->lora_act);
    // One entry per forward argument; absent LoRA tensors and biases get no gradient.
    const auto if_given = [&](int i, const at::Tensor& g) { return s[i].defined() ? g : at::Tensor(); };
    variable_list result = {std::get<0>(grad),
                            at::Tensor(),
                            std::get<1>(grad),
                            at::Tensor(),
                            at::Tensor(),
                            at::Tensor(),
                            at::Tensor(),
                            if_given(6, std::get<2>(grad)),
                            if_given(7, std::get<3>(grad)),
                            if_given(8, std::get<4>(grad)),
                            if_given(9, std::get<5>(grad)),
                            if_given(10, std::get<6>(grad)),
                            if_given(11, std::get<7>(grad)),
                            at::Tensor(),  // lora_scaling
                            if_given(12, std::get<8>(grad)),
                            if_given(13, std::get<9>(grad)),
                            at::Tensor(),   // activation
                            at::Tensor(),   // activation_alpha
                            at::Tensor(),   // activation_limit
                            at::Tensor()};  // up_offset
    release_after_backward(*saved);
    return result;
  }
};

}  // namespace

ForwardResult moe_sft_forward_autograd(KT_MOE_FORWARD_PARAMS) {
  const variable_list out =
      MoeSft::apply(x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size, lora_gate_a, lora_gate_b,
                    lora_up_a, lora_up_b, lora_down_a, lora_down_b, lora_scaling, gate_up_bias, down_bias, activation,
                    activation_alpha, activation_limit, up_offset);
  return {out[0], out[1], out[2]};
}

}  // namespace kt_ops
