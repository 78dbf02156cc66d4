// Kernels of the torch.ops.kt operators, registered in csrc/registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

namespace kt_ops {

using OptTensor = std::optional<at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// grad x, grad topk_weights, six LoRA gradients, two bias gradients.
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::string isa();

std::string topology();

using PackResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // gate_up, down, layout

PackResult pack_experts_cpu(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                            int64_t numa_nodes);
PackResult pack_experts_meta(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                             int64_t numa_nodes);

using UnpackResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // w_gate, w_up, w_down

UnpackResult unpack_experts_cpu(const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& layout,
                                int64_t hidden_size, int64_t intermediate_size);
UnpackResult unpack_experts_meta(const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& layout,
                                 int64_t hidden_size, int64_t intermediate_size);

#define KT_MOE_FORWARD_PARAMS                                                                   \
  const at::Tensor &x, const at::Tensor &topk_ids, const at::Tensor &topk_weights,              \
      const at::Tensor &gate_up, const at::Tensor &down, const at::Tensor &layout,              \
      int64_t intermediate_size,                                                                \
      const OptTensor &lora_gate_a, const OptTensor &lora_gate_b, const OptTensor &lora_up_a,   \
      const OptTensor &lora_up_b, const OptTensor &lora_down_a, const OptTensor &lora_down_b,   \
      double lora_scaling, const OptTensor &gate_up_bias, const OptTensor &down_bias,           \
      c10::string_view activation, double activation_alpha,                                     \
      std::optional<double> activation_limit, double up_offset

ForwardResult moe_sft_forward_cpu(KT_MOE_FORWARD_PARAMS);
ForwardResult moe_sft_forward_meta(KT_MOE_FORWARD_PARAMS);
ForwardResult moe_sft_forward_autograd(KT_MOE_FORWARD_PARAMS);

BackwardResult moe_sft_backward_cpu(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                    const at::Tensor& gate_up_act, const at::Tensor& lora_act);
BackwardResult moe_sft_backward_meta(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                     const at::Tensor& gate_up_act, const at::Tensor& lora_act);

}  // namespace kt_ops
