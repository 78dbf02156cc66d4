// What a kt.moe_sft_forward call keeps for its backward, and finding it again when activation
// checkpointing runs the same forward a second time.
//
// The state lives beside the autograd node, not in its saved-tensor slots. Non-reentrant
// activation checkpointing drops whatever passes through saved-tensor hooks and, in the
// backward, runs the layer again to rebuild it. The experts' forward is the costly part of a
// layer, and what it keeps is in CPU memory already, so checkpointing must neither drop its
// state nor run it again. Kept outside the hooks, the state is never dropped; and when a
// layer's forward runs again inside a backward with the very inputs of a forward whose backward
// is still to come, that forward's outputs are handed out instead of computed again (only the
// hooks' pass needs them, to rebuild what the layer's other ops keep).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

namespace kt_ops {

// The arguments of one forward call, as its backward takes them again.
struct ForwardArgs {
  at::Tensor x, topk_ids, topk_weights;
  std::vector<at::Tensor> experts;     // what kt.pack_experts returned
  std::vector<at::Tensor> lora;        // the op's lora list: empty or six, undefined where None
  at::Tensor gate_up_bias, down_bias;  // undefined where absent
  int64_t intermediate_size = 0;
  double lora_scaling = 1.0;
  std::string activation;
  double activation_alpha = 1.0;
  std::optional<double> activation_limit;
  double up_offset = 0.0;
  bool w8a8 = false;

  // Every tensor argument, in a fixed order, and the name messages give it.
  std::vector<const at::Tensor*> tensors() const;
  std::string name_of(size_t index) const;
  // The lora list as the op schema takes it.
  c10::List<std::optional<at::Tensor>> lora_list() const;
  void clear_tensors();
};

struct SavedForward : torch::CustomClassHolder {
  ForwardArgs args;
  std::vector<int64_t> versions;  // of args.tensors() when saved: an in-place change since is an error
  at::Tensor gate_up_act, lora_act;
  // The output and its version, kept only where a recompute may come (saved-tensor hooks were
  // active): handed out again while unchanged.
  at::Tensor y;
  int64_t y_version = 0;
  std::atomic<bool> freed{false};  // by a backward that kept no graph
};

// The state of a forward that has just computed y: registered for reuse when a recompute may
// come.
c10::intrusive_ptr<SavedForward> save_forward(ForwardArgs args, const at::Tensor& y, const at::Tensor& gate_up_act,
                                              const at::Tensor& lora_act);

// While a checkpointed layer runs again inside a backward: the state of a forward of the same
// arguments (equal values) whose backward is still to come, if there is one.
c10::intrusive_ptr<SavedForward> forward_to_reuse(const ForwardArgs& args);

// Raises unless the state is there and its tensors are as they were saved.
void check_saved(const SavedForward& saved);

// Frees the state's tensors unless the running backward keeps its graph.
void release_after_backward(SavedForward& saved);

}  // namespace kt_ops
