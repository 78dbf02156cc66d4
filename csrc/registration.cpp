// The kt operator library: every schema, and which kernel serves which dispatch key.
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(kt, m) {
  // Name of the kernel path the MoE ops use now: "amx", "avx512", "avx2" or "scalar" - the
  // best this CPU supports, capped by the environment variable KT_OPS_MAX_ISA.
  m.def("isa() -> str", &kt_ops::isa);

  // The machine as the kernels see it: NUMA nodes and the cores the pool pins threads to.
  m.def("topology() -> str", &kt_ops::topology);

  // bf16 expert weights w_gate, w_up [E, I, H] and w_down [E, H, I] -> the packed layout of
  // include/kt/packing.h (ExpertLayout), split along I into S slices, one per NUMA node
  // (numa_nodes = 0: as many as this machine has): gate_up [S, E, 2*Is, Hp] (gate and up
  // panels interleaved) and down [S, E, Hp, Is], where Hp is H rounded up to 32 and Is is
  // I / S rounded up to 32; and layout, int64 [6]: what the packed tensors hold (format and
  // true sizes, kt::encode_layout), which the MoE ops check their other arguments against.
  // numa_nodes is at most 1024.
  m.def("pack_experts(Tensor w_gate, Tensor w_up, Tensor w_down, int numa_nodes=0) -> "
        "(Tensor gate_up, Tensor down, Tensor layout)");

  // Inverse of pack_experts: the bf16 w_gate, w_up [E, I, H] and w_down [E, H, I] held by
  // gate_up, down and layout, which must hold hidden_size H and intermediate_size I (the Meta
  // kernel sizes the outputs from them).
  m.def("unpack_experts(Tensor gate_up, Tensor down, Tensor layout, int hidden_size, int intermediate_size) -> "
        "(Tensor w_gate, Tensor w_up, Tensor w_down)");

  // Routed experts forward with optional LoRA per projection (A [E, r, in], B [E, out, r]), on
  // the experts kt.pack_experts made (gate_up, down, layout); intermediate_size must be the I
  // they were packed with (it sizes the outputs where layout's values are unknown: Meta).
  // The gate (include/kt/gate.h): z = act(min(g, L)) * (clamp(u, -L, L) + up_offset), act one
  // of "silu" (v * sigmoid(activation_alpha * v)), "gelu" (erf form) or "gelu_tanh", L =
  // activation_limit (None: no clamp). The experts' biases, when given: gate_up_bias [E, 2I]
  // (gate columns then up columns) adds to g and u, down_bias [E, H] to each expert's output
  // before the routing weight.
  // Returns y [T, H] and what the backward needs: gate_up_act [T, K, 2I] (g then u, dtype of
  // x) and lora_act [T, K, r_g + r_u + r_d] fp32 (x A_g^T, x A_u^T, z A_d^T).
  m.def(
      "moe_sft_forward(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor down, "
      "Tensor layout, int intermediate_size, Tensor? lora_gate_a, Tensor? lora_gate_b, Tensor? lora_up_a, "
      "Tensor? lora_up_b, Tensor? lora_down_a, Tensor? lora_down_b, float lora_scaling, "
      "Tensor? gate_up_bias=None, Tensor? down_bias=None, str activation=\"silu\", float activation_alpha=1.0, "
      "float? activation_limit=None, float up_offset=0.0) "
      "-> (Tensor y, Tensor gate_up_act, Tensor lora_act)");

  // Gradients of moe_sft_forward's y: for x, topk_weights, the six LoRA tensors and the two
  // biases (each in its input's dtype; an empty tensor where that input was not given).
  m.def(
      "moe_sft_backward(Tensor grad_y, Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, "
      "Tensor down, Tensor layout, int intermediate_size, Tensor? lora_gate_a, Tensor? lora_gate_b, Tensor? lora_up_a, "
      "Tensor? lora_up_b, Tensor? lora_down_a, Tensor? lora_down_b, float lora_scaling, "
      "Tensor? gate_up_bias, Tensor? down_bias, str activation, float activation_alpha, float? activation_limit, float up_offset, "
      "Tensor gate_up_act, Tensor lora_act) -> (Tensor grad_x, Tensor grad_topk_weights, "
      "Tensor grad_lora_gate_a, Tensor grad_lora_gate_b, Tensor grad_lora_up_a, Tensor grad_lora_up_b, "
      "Tensor grad_lora_down_a, Tensor grad_lora_down_b, Tensor grad_gate_up_bias, Tensor grad_down_bias)");
}

// CUDA inputs reach the CPU kernels too, whose first device check names the argument.
TORCH_LIBRARY_IMPL(kt, CPU, m) {
  m.impl("pack_experts", &kt_ops::pack_experts_cpu);
  m.impl("unpack_experts", &kt_ops::unpack_experts_cpu);
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_cpu);
  m.impl("moe_sft_backward", &kt_ops::moe_sft_backward_cpu);
}

TORCH_LIBRARY_IMPL(kt, CUDA, m) {
  m.impl("pack_experts", &kt_ops::pack_experts_cpu);
  m.impl("unpack_experts", &kt_ops::unpack_experts_cpu);
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_cpu);
  m.impl("moe_sft_backward", &kt_ops::moe_sft_backward_cpu);
}

TORCH_LIBRARY_IMPL(kt, Meta, m) {
  m.impl("pack_experts", &kt_ops::pack_experts_meta);
  m.impl("unpack_experts", &kt_ops::unpack_experts_meta);
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_meta);
  m.impl("moe_sft_backward", &kt_ops::moe_sft_backward_meta);
}

TORCH_LIBRARY_IMPL(kt, Autograd, m) {
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_autograd);
}
