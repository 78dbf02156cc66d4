// The LoRA gradients of the experts' backward (lora_grads.cpp).
#pragma once

#include "kt/kernels.h"
#include "kt/moe_sft.h"
#include "lora_operands.h"
#include "routing.h"
#include "workspace.h"

namespace kt {

// Per (expert, {gate and up | down}): every LoRA gradient of `args`, summed over the expert's
// pairs in pair order; experts without tokens get zeros. Reads the backward's dy B_d,
// [dg B_g | du B_u], z and fused dg | du rows from `ws`.
template <typename Act>
void lora_gradients(const KernelSet& k, int threads, const MoeBackwardArgs& args, const CallShape& c,
                    const LoraShape& l, const Routing& route, const BackwardWorkspace<Act>& ws);

}  // namespace kt
