// Kernels of the torch.ops.kt operators, registered in csrc/registration.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace kt_ops {

using OptTensor = std::optional<at::Tensor>;
using OptTensorList = c10::List<std::optional<at::Tensor>>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// grad x, grad topk_weights, the LoRA gradients (six), the two bias gradients.
using BackwardResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

std::string isa(c10::string_view format, bool w8a8);

std::string topology();

std::vector<std::string> weight_formats();

// gate_up, down, layout, then the format's scales (none for bf16).
std::vector<at::Tensor> pack_experts_cpu(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                                         int64_t numa_nodes, c10::string_view format, int64_t group_size);
std::vector<at::Tensor> pack_experts_meta(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                                          int64_t numa_nodes, c10::string_view format, int64_t group_size);

// The same from a quantized format's codes and scales, as kt_ops.reference.quantize_<format>
// returns them (and quantized checkpoints ship them).
std::vector<at::Tensor> pack_expert_codes_cpu(const at::Tensor& w_gate, const at::Tensor& w_up,
                                              const at::Tensor& w_down, at::TensorList scales, c10::string_view format,
                                              int64_t numa_nodes, int64_t group_size);
std::vector<at::Tensor> pack_expert_codes_meta(const at::Tensor& w_gate, const at::Tensor& w_up,
                                               const at::Tensor& w_down, at::TensorList scales,
                                               c10::string_view format, int64_t numa_nodes, int64_t group_size);

using UnpackResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // w_gate, w_up, w_down

UnpackResult unpack_experts_cpu(at::TensorList experts, int64_t hidden_size, int64_t intermediate_size,
                                at::OptionalIntArrayRef expert_ids);
UnpackResult unpack_experts_meta(at::TensorList experts, int64_t hidden_size, int64_t intermediate_size,
                                 at::OptionalIntArrayRef expert_ids);

void copy_packed_experts_cpu(at::TensorList experts, at::TensorList out);
void copy_packed_experts_meta(at::TensorList experts, at::TensorList out);

// The arguments kt.moe_sft_forward takes and kt.moe_sft_backward takes after grad_y.
#define KT_MOE_FORWARD_PARAMS                                                                              \
  const at::Tensor &x, const at::Tensor &topk_ids, const at::Tensor &topk_weights, at::TensorList experts, \
      int64_t intermediate_size, const OptTensorList &lora, double lora_scaling, const OptTensor &gate_up_bias, \
      const OptTensor &down_bias, c10::string_view activation, double activation_alpha,                   \
      std::optional<double> activation_limit, double up_offset, bool w8a8

ForwardResult moe_sft_forward_cpu(KT_MOE_FORWARD_PARAMS);
ForwardResult moe_sft_forward_meta(KT_MOE_FORWARD_PARAMS);
ForwardResult moe_sft_forward_autograd(KT_MOE_FORWARD_PARAMS);

BackwardResult moe_sft_backward_cpu(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                    const at::Tensor& gate_up_act, const at::Tensor& lora_act);
BackwardResult moe_sft_backward_meta(const at::Tensor& grad_y, KT_MOE_FORWARD_PARAMS,
                                     const at::Tensor& gate_up_act, const at::Tensor& lora_act);

}  // namespace kt_ops
