// Argument checks shared by the CPU and Meta kernels. Every message names the op, the
// argument, what was expected and what came, e.g.
//   kt.moe_sft_forward: topk_ids must be int32 or int64 of shape [T, K], got float32 [4]
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace kt_ops {

// "bfloat16 [4, 2]" - dtype and (possibly symbolic) shape, as messages show a tensor.
std::string describe(const at::Tensor& t);
std::string dtype_name(at::ScalarType t);

// The sizes every MoE op agrees on, read off and checked against each other.
struct MoeSizes {
  c10::SymInt tokens, top_k, hidden, experts;
  int64_t intermediate;
  int64_t rank[3];  // LoRA rank of gate, up, down; 0 when absent
};

using LoraTensors = std::array<std::optional<at::Tensor>, 6>;  // A_g, B_g, A_u, B_u, A_d, B_d

extern const char* const kLoraNames[6];

// Validates dtypes, ranks, shapes and devices of the MoE op arguments. `require_cpu` is set
// by the CPU kernel; the Meta kernel only asks that every tensor shares x's device.
MoeSizes check_moe_args(const char* op, const at::Tensor& x, const at::Tensor& topk_ids,
                        const at::Tensor& topk_weights, const at::Tensor& gate_up,
                        const at::Tensor& down, int64_t intermediate_size,
                        const LoraTensors& lora, double lora_scaling, bool require_cpu);

// Device rule for every tensor argument: on the CPU for the CPU kernel, else on the device
// of the reference argument `ref_name` (the Meta kernel: shape inference only).
void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref, bool require_cpu);

}  // namespace kt_ops
