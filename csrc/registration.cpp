// The kt operator library: every schema, and which kernel serves which dispatch key.
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(kt, m) {
  // Name of the kernel path the MoE ops use now on experts of weight format `format`: "amx",
  // "avx512", "avx2" or "scalar" - the best the format has kernels for that this CPU supports,
  // capped by the environment variable KT_OPS_MAX_ISA.
  m.def("isa(str format=\"bf16\", bool w8a8=False) -> str", &kt_ops::isa);

  // The weight formats this build computes with, e.g. ["bf16"].
  m.def("weight_formats() -> str[]", &kt_ops::weight_formats);

  // The machine as the kernels see it: NUMA nodes and the cores the pool pins threads to.
  m.def("topology() -> str", &kt_ops::topology);

  // Expert weights w_gate, w_up [E, I, H] and w_down [E, H, I] (bf16) -> the packed experts of
  // weight format `format` (the formats this build has: kt_ops.weight_formats(); group_size is
  // the quantization group where the format has one, else 0), as the list the MoE ops take:
  //   gate_up [S, E, 2*Is, Hp] (gate and up panels interleaved) and down [S, E, Hp, Is] in the
  //   layout of include/kt/packing.h (ExpertLayout), split along I into S slices, one per NUMA
  //   node (numa_nodes = 0: as many as this machine has), where Hp is H rounded up to 32 and
  //   Is is I / S rounded up to 32;
  //   layout, int64 [6]: what the packed tensors hold (format and true sizes,
  //   kt::encode_layout), which the MoE ops check their other arguments against;
  //   then the format's scales: none for bf16; for int8 (one scale per output channel, codes
  //   round(w / scale) in [-127, 127], scale = max|row| / 127) gate_up_scale float32 [S, E, 2*Is]
  //   (the fused rows' order) and down_scale float32 [S, E, Hp]; for int4 (codes round(w /
  //   scale) in [-7, 7] two per byte, so gate_up and down are uint8 of half the last dimension,
  //   scale = max|group| / 7 in bf16 per group_size elements of a row: 32, 64 or 128, 0 taking
  //   32) gate_up_scale bfloat16 [S, E, 2*Is * Hp/32] and down_scale bfloat16 [S, E, Hp * Is/32],
  //   one per row of each 32-deep packed block (kt/weight_format.h's WeightScales::kPerBlock);
  //   for fp8 (e4m3 codes of w / scale clamped to +-448, their bytes as uint8, scale =
  //   max|block| / 448 per 128 x 128 block of each matrix) gate_up_scale float32 [S, E, 2*Is/16
  //   * Hp/32] and down_scale float32 [S, E, Hp/16 * Is/32], one per packed 16 x 32 block, the
  //   scale of the 128 x 128 block it lies in (WeightScales::kPerTile).
  // numa_nodes is at most 1024.
  m.def("pack_experts(Tensor w_gate, Tensor w_up, Tensor w_down, int numa_nodes=0, str format=\"bf16\", "
        "int group_size=0) -> Tensor[]");

  // pack_experts from a quantized format's codes instead of bf16 weights, packing them as they
  // are (no rounding): w_gate, w_up [E, I, H] and w_down [E, H, I] hold one code per weight
  // (int8 for int8 and int4, whose codes lie in [-8, 7]; the e4m3 bytes as uint8 for fp8), and
  // scales their [gate, up, down] scales in the form kt_ops.reference.quantize_<format>
  // returns: int8 float32 [E, N] per output row, int4 bfloat16 [E, N, K / group_size], fp8
  // float32 [E, ceil(N / 128), ceil(K / 128)] (N x K: I x H for gate and up, H x I for down).
  // The result equals pack_experts of the weights the codes stand for, when pack_experts
  // quantizes them to these codes. NaN codes and scales that are not finite are refused.
  m.def("pack_expert_codes(Tensor w_gate, Tensor w_up, Tensor w_down, Tensor[] scales, str format, "
        "int numa_nodes=0, int group_size=0) -> Tensor[]");

  // Inverse of pack_experts: the bf16 w_gate, w_up [E, I, H] and w_down [E, H, I] held by
  // experts (for a quantized format, the dequantized weights rounded to bf16), which must hold
  // hidden_size H and intermediate_size I (the Meta kernel sizes the outputs from them); with
  // expert_ids, those experts' weights only, in that order ([len(expert_ids), ...]).
  m.def("unpack_experts(Tensor[] experts, int hidden_size, int intermediate_size, int[]? expert_ids=None) -> "
        "(Tensor w_gate, Tensor w_up, Tensor w_down)");

  // Copies packed experts (the list kt.pack_experts made) into `out`, tensors of their dtypes
  // and shapes (shared memory not yet written, say), each NUMA slice of gate_up and down placed
  // on its node before it is written, as kt.pack_experts places them.
  m.def("copy_packed_experts(Tensor[] experts, Tensor(a!)[] out) -> ()");

  // Routed experts forward on `experts` (the list kt.pack_experts made), with optional LoRA per
  // projection: lora is empty (none) or [A_gate, B_gate, A_up, B_up, A_down, B_down] with A
  // [E, r, in] and B [E, out, r], any pair None; intermediate_size must be the I the experts
  // were packed with (it sizes the outputs where layout's values are unknown: Meta).
  // The gate (include/kt/gate.h): z = act(min(g, L)) * (clamp(u, -L, L) + up_offset), act one
  // of "silu" (v * sigmoid(activation_alpha * v)), "gelu" (erf form) or "gelu_tanh", L =
  // activation_limit (None: no clamp). The experts' biases, when given: gate_up_bias [E, 2I]
  // (gate columns then up columns) adds to g and u, down_bias [E, H] to each expert's output
  // before the routing weight.
  // w8a8 (int8 experts only): the base products in int8, as kt_ops.reference's
  // moe_sft_w8a8_reference defines them (x and z quantized per row in the forward; dy and the
  // gate/up gradient, times the weights' channel scales, per row for the input gradients).
  // Returns y [T, H] and what the backward needs: gate_up_act [T, K, 2I] (g then u, dtype of
  // x) and lora_act [T, K, r_g + r_u + r_d] fp32 (x A_g^T, x A_u^T, z A_d^T).
  m.def(
      "moe_sft_forward(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] experts, int intermediate_size, "
      "Tensor?[] lora, float lora_scaling, Tensor? gate_up_bias=None, Tensor? down_bias=None, "
      "str activation=\"silu\", float activation_alpha=1.0, float? activation_limit=None, float up_offset=0.0, "
      "bool w8a8=False) "
      "-> (Tensor y, Tensor gate_up_act, Tensor lora_act)");

  // Gradients of moe_sft_forward's y: for x, topk_weights, each entry of lora and the two
  // biases (each in its input's dtype; an empty tensor where that input was not given).
  m.def(
      "moe_sft_backward(Tensor grad_y, Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] experts, "
      "int intermediate_size, Tensor?[] lora, float lora_scaling, Tensor? gate_up_bias, Tensor? down_bias, "
      "str activation, float activation_alpha, float? activation_limit, float up_offset, bool w8a8, "
      "Tensor gate_up_act, "
      "Tensor lora_act) -> (Tensor grad_x, Tensor grad_topk_weights, Tensor[] grad_lora, Tensor grad_gate_up_bias, "
      "Tensor grad_down_bias)");
}

// CUDA inputs reach the CPU kernels too, whose first device check names the argument.
TORCH_LIBRARY_IMPL(kt, CPU, m) {
  m.impl("pack_experts", &kt_ops::pack_experts_cpu);
  m.impl("pack_expert_codes", &kt_ops::pack_expert_codes_cpu);
  m.impl("unpack_experts", &kt_ops::unpack_experts_cpu);
  m.impl("copy_packed_experts", &kt_ops::copy_packed_experts_cpu);
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_cpu);
  m.impl("moe_sft_backward", &kt_ops::moe_sft_backward_cpu);
}

TORCH_LIBRARY_IMPL(kt, CUDA, m) {
  m.impl("pack_experts", &kt_ops::pack_experts_cpu);
  m.impl("pack_expert_codes", &kt_ops::pack_expert_codes_cpu);
  m.impl("unpack_experts", &kt_ops::unpack_experts_cpu);
  m.impl("copy_packed_experts", &kt_ops::copy_packed_experts_cpu);
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_cpu);
  m.impl("moe_sft_backward", &kt_ops::moe_sft_backward_cpu);
}

TORCH_LIBRARY_IMPL(kt, Meta, m) {
  m.impl("pack_experts", &kt_ops::pack_experts_meta);
  m.impl("pack_expert_codes", &kt_ops::pack_expert_codes_meta);
  m.impl("unpack_experts", &kt_ops::unpack_experts_meta);
  m.impl("copy_packed_experts", &kt_ops::copy_packed_experts_meta);
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_meta);
  m.impl("moe_sft_backward", &kt_ops::moe_sft_backward_meta);
}

TORCH_LIBRARY_IMPL(kt, Autograd, m) {
  m.impl("moe_sft_forward", &kt_ops::moe_sft_forward_autograd);
}
