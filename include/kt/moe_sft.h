// Routed-experts forward and backward for supervised fine-tuning with LoRA on every expert's
// gate/up/down projections. Raw pointers only; callers validate shapes first.
//
// Per routed pair (token t, slot j, expert e = ids[t,j], weight w = weights[t,j]),
// with s = lora scaling and PEFT's layout A [r, in], B [out, r]:
//   g = x Wg^T + bg + s (x Ag^T) Bg^T,  u = x Wu^T + bu + s (x Au^T) Bu^T,  z = gate(g, u)
//   h = z Wd^T + bd + s (z Ad^T) Bd^T,  y_t = sum_j w h
// where gate is kt/gate.h's (silu(g) * u unless the experts say otherwise) and the biases
// bg, bu, bd are zero unless given. A pair of id kNoExpert adds nothing (its saved
// activations are zero and its weight's gradient is zero).
#pragma once

#include <cstdint>

#include "kt/bf16.h"
#include "kt/gate.h"
#include "kt/kernels.h"

namespace kt {

// The expert id of a routing slot that names no expert here (the caller computes that slot
// elsewhere, or it is empty).
constexpr int64_t kNoExpert = -1;

struct MoeDims {
  int64_t tokens;        // T
  int64_t top_k;         // K
  int64_t hidden;        // H
  int64_t intermediate;  // I
  int64_t experts;       // E
};

// LoRA of one projection, fp32, PEFT layout: a [E, rank, in], b [E, out, rank].
// rank == 0 means the projection has no LoRA (a and b are then ignored).
struct LoraWeights {
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t rank = 0;
};

enum Projection { kGate = 0, kUp = 1, kDown = 2 };

struct MoeWeights {
  // The packed experts in the kernel set's weight format (ExpertLayout): gate_up [S, E, 2*Is,
  // Hp], down [S, E, Hp, Is]; for the quantized formats their scales, as kt/weight_format.h's
  // WeightScales lays them out (null for bf16).
  const void* gate_up;
  const void* down;
  const void* gate_up_scale = nullptr;
  const void* down_scale = nullptr;
  int64_t slices;       // S, intermediate slices (one per NUMA node)
  LoraWeights lora[3];  // indexed by Projection
  float lora_scaling;
  Gate gate;
  const float* gate_up_bias = nullptr;  // [E, 2I] fp32, gate columns then up columns; null: none
  const float* down_bias = nullptr;     // [E, H] fp32; null: none

  // The case the vectorised epilogues of the bf16 paths compute.
  bool plain_swiglu() const { return gate.is_plain_silu() && gate_up_bias == nullptr; }
};

struct MoeForwardArgs {
  MoeDims dims;
  const void* x;         // [T, H], act_dtype
  DType act_dtype;       // dtype of x, y and gate_up_act
  const int64_t* ids;    // [T, K], each in [0, E) or kNoExpert
  const float* weights;  // [T, K]
  MoeWeights w;
  void* y;               // out [T, H], act_dtype
  void* gate_up_act;     // out [T, K, 2I], act_dtype: g then u, saved for the backward
  float* lora_act;       // out [T, K, r_g + r_u + r_d]: x A_g^T | x A_u^T | z A_d^T
};

struct MoeBackwardArgs {
  MoeDims dims;
  const void* grad_y;    // [T, H], act_dtype
  const void* x;         // [T, H], act_dtype
  DType act_dtype;
  const int64_t* ids;
  const float* weights;
  MoeWeights w;
  const void* gate_up_act;  // [T, K, 2I], act_dtype (from the forward)
  const float* lora_act;    // [T, K, r_g + r_u + r_d] (from the forward)
  void* grad_x;             // out [T, H], act_dtype
  float* grad_weights;      // out [T, K]
  float* grad_lora_a[3];    // out [E, rank, in] per projection with rank > 0
  float* grad_lora_b[3];    // out [E, out, rank] per projection with rank > 0
  float* grad_gate_up_bias = nullptr;  // out [E, 2I] (gate then up) when not null and w has the bias
  float* grad_down_bias = nullptr;     // out [E, H] when not null and w has the bias
};

void moe_sft_forward(const KernelSet& k, int num_threads, const MoeForwardArgs& args);
void moe_sft_backward(const KernelSet& k, int num_threads, const MoeBackwardArgs& args);

}  // namespace kt
