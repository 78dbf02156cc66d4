// Autograd-key kernel of kt.moe_sft_forward. Forward and backward both go through the
// dispatcher, so torch.compile / AOTAutograd trace them as kt.moe_sft_forward and
// kt.moe_sft_backward nodes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include "ops.h"

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
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, gate_up_act, lora_act] = forward_op().call(
        x, topk_ids, topk_weights, gate_up, down, layout, intermediate_size, lora_gate_a, lora_gate_b, lora_up_a,
        lora_up_b, lora_down_a, lora_down_b, lora_scaling, gate_up_bias, down_bias, activation, activation_alpha,
        activation_limit, up_offset);
    const auto saved_or_empty = [](const OptTensor& t) { return t.value_or(at::Tensor()); };
    ctx->save_for_backward({x, topk_ids, topk_weights, gate_up, down, layout, saved_or_empty(lora_gate_a),
                            saved_or_empty(lora_gate_b), saved_or_empty(lora_up_a),
                            saved_or_empty(lora_up_b), saved_or_empty(lora_down_a),
                            saved_or_empty(lora_down_b), gate_up_act, lora_act, saved_or_empty(gate_up_bias),
                            saved_or_empty(down_bias)});
    ctx->saved_data["intermediate_size"] = intermediate_size;
    ctx->saved_data["lora_scaling"] = lora_scaling;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["activation_alpha"] = activation_alpha;
    ctx->saved_data["activation_limit"] = activation_limit.has_value() ? c10::IValue(*activation_limit) : c10::IValue();
    ctx->saved_data["up_offset"] = up_offset;
    ctx->mark_non_differentiable({gate_up_act, lora_act});
    return {y, gate_up_act, lora_act};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const c10::IValue& limit = ctx->saved_data["activation_limit"];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const auto grad = backward_op().call(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["intermediate_size"].toInt(),
        optional_of(s[6]), optional_of(s[7]), optional_of(s[8]), optional_of(s[9]), optional_of(s[10]),
        optional_of(s[11]), ctx->saved_data["lora_scaling"].toDouble(), optional_of(s[14]), optional_of(s[15]), activation,
        ctx->saved_data["activation_alpha"].toDouble(),
        limit.isNone() ? std::nullopt : std::optional<double>(limit.toDouble()),
        ctx->saved_data["up_offset"].toDouble(), s[12], s[13]);
    // One entry per forward argument; absent LoRA tensors get no gradient.
    const auto lora_grad = [&](int i, const at::Tensor& g) { return s[6 + i].defined() ? g : at::Tensor(); };
    return {std::get<0>(grad),
            at::Tensor(),
            std::get<1>(grad),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            lora_grad(0, std::get<2>(grad)),
            lora_grad(1, std::get<3>(grad)),
            lora_grad(2, std::get<4>(grad)),
            lora_grad(3, std::get<5>(grad)),
            lora_grad(4, std::get<6>(grad)),
            lora_grad(5, std::get<7>(grad)),
            at::Tensor(),   // lora_scaling
            s[14].defined() ? std::get<8>(grad) : at::Tensor(),
            s[15].defined() ? std::get<9>(grad) : at::Tensor(),
            at::Tensor(),   // activation
            at::Tensor(),   // activation_alpha
            at::Tensor(),   // activation_limit
            at::Tensor()};  // up_offset
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
