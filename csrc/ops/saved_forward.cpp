#include "saved_forward.h"

#include "checks.h"

#include <ATen/SavedTensorHooks.h>
#include <ATen/ops/equal.h>
#include <torch/csrc/autograd/graph_task.h>

#include <algorithm>
#include <mutex>
#include <utility>

namespace kt_ops {
namespace {

bool hooks_active() { return !at::SavedTensorDefaultHooks::get_tls_state().stack.empty(); }

// Forwards that may be run again by a checkpoint's recompute; weak, so a graph freed without
// a backward takes its state with it.
std::mutex registry_mutex;
std::vector<c10::weak_intrusive_ptr<SavedForward>>& registry() {
  static std::vector<c10::weak_intrusive_ptr<SavedForward>> forwards;
  return forwards;
}

// True when `now` holds the values `saved` held at version `version`.
bool same_values(const at::Tensor& saved, int64_t version, const at::Tensor& now) {
  if (saved.defined() != now.defined()) return false;
  if (!saved.defined()) return true;
  if (saved.scalar_type() != now.scalar_type() || saved.sizes() != now.sizes() || saved.device() != now.device() ||
      saved._version() != version) {
    return false;
  }
  if (saved.data_ptr() == now.data_ptr() && saved.strides() == now.strides() && now._version() == version) return true;
  return at::equal(saved, now);
}

bool same_forward(const SavedForward& saved, const ForwardArgs& args) {
  const ForwardArgs& a = saved.args;
  if (a.intermediate_size != args.intermediate_size || a.lora_scaling != args.lora_scaling ||
      a.activation != args.activation || a.activation_alpha != args.activation_alpha ||
      a.activation_limit != args.activation_limit || a.up_offset != args.up_offset || a.w8a8 != args.w8a8 ||
      saved.y._version() != saved.y_version) {
    return false;
  }
  const std::vector<const at::Tensor*> before = a.tensors(), now = args.tensors();
  if (before.size() != now.size()) return false;
  // Cheap checks first: shapes, then values.
  for (size_t i = 0; i < before.size(); ++i) {
    const at::Tensor &s = *before[i], &n = *now[i];
    if (s.defined() != n.defined() || (s.defined() && s.sizes() != n.sizes())) return false;
  }
  for (size_t i = 0; i < before.size(); ++i) {
    if (!same_values(*before[i], saved.versions[i], *now[i])) return false;
  }
  return true;
}

}  // namespace

std::vector<const at::Tensor*> ForwardArgs::tensors() const {
  std::vector<const at::Tensor*> out{&x, &topk_ids, &topk_weights};
  for (const at::Tensor& t : experts) out.push_back(&t);
  for (const at::Tensor& t : lora) out.push_back(&t);
  out.push_back(&gate_up_bias);
  out.push_back(&down_bias);
  return out;
}

std::string ForwardArgs::name_of(size_t index) const {
  static const char* const kFirst[] = {"x", "topk_ids", "topk_weights"};
  static const char* const kExperts[] = {"gate_up", "down", "layout"};
  if (index < 3) return kFirst[index];
  index -= 3;
  if (index < experts.size()) return index < 3 ? kExperts[index] : "experts[" + std::to_string(index) + "]";
  index -= experts.size();
  if (index < lora.size()) return kLoraNames[index];
  return index == lora.size() ? "gate_up_bias" : "down_bias";
}

c10::List<std::optional<at::Tensor>> ForwardArgs::lora_list() const {
  c10::List<std::optional<at::Tensor>> out;
  for (const at::Tensor& t : lora) out.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
  return out;
}

void ForwardArgs::clear_tensors() {
  x = topk_ids = topk_weights = gate_up_bias = down_bias = at::Tensor();
  experts.clear();
  lora.clear();
}

c10::intrusive_ptr<SavedForward> save_forward(ForwardArgs args, const at::Tensor& y, const at::Tensor& gate_up_act,
                                              const at::Tensor& lora_act) {
  auto saved = c10::make_intrusive<SavedForward>();
  for (const at::Tensor* t : args.tensors()) saved->versions.push_back(t->defined() ? t->_version() : 0);
  saved->args = std::move(args);
  saved->gate_up_act = gate_up_act;
  saved->lora_act = lora_act;
  if (hooks_active()) {
    saved->y = y;
    saved->y_version = y._version();
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& forwards = registry();
    forwards.erase(std::remove_if(forwards.begin(), forwards.end(), [](const auto& w) { return w.expired(); }),
                   forwards.end());
    forwards.push_back(c10::weak_intrusive_ptr<SavedForward>(saved));
  }
  return saved;
}

c10::intrusive_ptr<SavedForward> forward_to_reuse(const ForwardArgs& args) {
  // A checkpoint's recompute runs inside a backward, under its hooks. (Grad mode says nothing
  // here: a custom function's forward always runs without.)
  if (torch::autograd::get_current_graph_task_id() == -1 || !hooks_active()) {
    return {};
  }
  for (const at::Tensor* t : args.tensors()) {
    // Only CPU values can be compared; traced tensors (torch.compile) hold none.
    if (t->defined() && (!t->device().is_cpu() || t->key_set().has(c10::DispatchKey::Python))) return {};
  }
  std::vector<c10::intrusive_ptr<SavedForward>> candidates;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    for (auto it = registry().rbegin(); it != registry().rend(); ++it) {  // the latest forward first
      if (auto s = it->lock(); s && !s->freed) candidates.push_back(std::move(s));
    }
  }
  for (auto& s : candidates) {
    if (same_forward(*s, args)) return s;
  }
  return {};
}

void check_saved(const SavedForward& saved) {
  KT_CHECK(!saved.freed,
              "kt.moe_sft_backward: what this kt experts call saved for its backward was freed by an earlier "
              "backward; to run backward through the graph again, pass retain_graph=True to the first backward");
  const std::vector<const at::Tensor*> tensors = saved.args.tensors();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = *tensors[i];
    KT_CHECK(!t.defined() || t._version() == saved.versions[i], "kt.moe_sft_backward: ", saved.args.name_of(i),
                " of this kt experts call was modified in place after the forward (version ", t._version(),
                ", saved at ", saved.versions[i], "); its gradients would be wrong. Modify a clone instead");
  }
}

void release_after_backward(SavedForward& saved) {
  if (torch::autograd::get_current_graph_task_keep_graph()) return;
  saved.args.clear_tensors();
  saved.gate_up_act = at::Tensor();
  saved.lora_act = at::Tensor();
  saved.y = at::Tensor();
  saved.freed = true;
}

}  // namespace kt_ops
