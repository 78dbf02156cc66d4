// Argument checks shared by the CPU and Meta kernels. Every message names the op, the
// argument, what was expected and what came, e.g.
//   kt.moe_sft_forward: topk_ids must be int32 or int64 of shape [T, K], got float32 [4]
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

#include "formats.h"
#include "kt/gate.h"
#include "kt/packing.h"
#include "kt/weight_format.h"

namespace kt_ops {

// Message text is assembled here as std::string and only then handed to TORCH_CHECK. Numbers,
// SymInts and devices are never streamed into a std::ostream across the libc10 boundary: with
// some toolchain / torch-wheel pairs (gcc 13 on Ubuntu 24.04 with torch 2.11) libc10's
// operator<< on our stream crashed in the locale's number facet.
namespace text {
inline std::string of(const std::string& s) { return s; }
inline std::string of(const char* s) { return s; }
inline std::string of(const c10::Device& d) { return d.str(); }
inline std::string of(const c10::SymInt& v) {
  if (auto concrete = v.maybe_as_int()) return std::to_string(*concrete);
  return v.toSymNode()->str();
}
inline std::string of(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string of(T v) {
  return std::to_string(v);
}
}  // namespace text

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += text::of(args)), ...);
  return out;
}

// TORCH_CHECK with the message built by message(): kt ops raise RuntimeError through it.
#define KT_CHECK(cond, ...) TORCH_CHECK(cond, ::kt_ops::message(__VA_ARGS__))

// "bfloat16 [4, 2]" - dtype and (possibly symbolic) shape, as messages show a tensor.
std::string describe(const at::Tensor& t);
std::string dtype_name(at::ScalarType t);

// The sizes every MoE op agrees on, read off and checked against each other, and the packed
// experts' weight format.
struct MoeSizes {
  c10::SymInt tokens, top_k, hidden, experts;
  int64_t intermediate;
  int64_t rank[3];  // LoRA rank of gate, up, down; 0 when absent
  kt::WeightFormat format;
};

using LoraTensors = std::array<std::optional<at::Tensor>, 6>;  // A_g, B_g, A_u, B_u, A_d, B_d

extern const char* const kLoraNames[6];

// The op's `lora` list: empty (no LoRA) or the six tensors, any pair of them None.
LoraTensors lora_of(const char* op, const c10::List<std::optional<at::Tensor>>& lora);

// The packed experts of a call, by role: the tensors kt.pack_experts returned.
struct PackedTensors {
  at::Tensor gate_up, down, layout;
  kt::ExpertLayout sizes;  // what layout holds (on the CPU; zeros on Meta, which sees no values)
};

// Validates the `experts` list of an op (what kt.pack_experts returned): its length for a
// format this build has, the layout tensor's dtype and shape and, on the CPU, the format its
// values name (on Meta, the format is the one of gate_up's dtype); every tensor's device
// (check_device, against `ref`). Returns the tensors by role and the format; the callers check
// the shapes, which depend on their other arguments.
PackedTensors check_experts(const char* op, at::TensorList experts, const at::Tensor& ref, const char* ref_name,
                            bool require_cpu, kt::WeightFormat* format);

// The lengths of gate_up_scale's and down_scale's last dimension in format f (WeightScales),
// for slices of padded width `width` and padded hidden size hp.
std::array<c10::SymInt, 2> scale_lengths(const FormatTensors& f, const c10::SymInt& width, const c10::SymInt& hp);

// For formats with scales: experts[3] (gate_up_scale) and experts[4] (down_scale) against the
// packed shapes. Nothing for a format without.
void check_scales(const char* op, at::TensorList experts, const FormatTensors& f, const c10::SymInt& slices,
                  const c10::SymInt& experts_count, const c10::SymInt& width, const c10::SymInt& hidden);

// Validates dtypes, ranks, shapes and devices of the MoE op arguments. `require_cpu` is set
// by the CPU kernel, which also checks the packed experts' layout tensor against the other
// arguments (its values are data: the Meta kernel sees only its shape and asks that every
// tensor shares x's device).
MoeSizes check_moe_args(const char* op, const at::Tensor& x, const at::Tensor& topk_ids,
                        const at::Tensor& topk_weights, at::TensorList experts, int64_t intermediate_size,
                        const LoraTensors& lora, double lora_scaling, bool require_cpu);

// Validates the gate and bias arguments of the MoE ops (their schema in csrc/registration.cpp)
// against the sizes `s`: the activation's name and parameters, the optional gate/up bias
// [E, 2I] and down bias [E, H]. Returns the gate.
kt::Gate check_gate(const char* op, const at::Tensor& x, const MoeSizes& s, const std::optional<at::Tensor>& gate_up_bias,
                    const std::optional<at::Tensor>& down_bias, c10::string_view activation, double alpha,
                    std::optional<double> limit, double up_offset, bool require_cpu);

// Every size an op takes is at most this (2^40, beyond any model or batch), so that padding
// and offset arithmetic on sizes that pass cannot overflow.
constexpr int64_t kMaxSize = int64_t{1} << 40;

// Raises unless `size` (when concrete) is in [0, kMaxSize]; `what` names it in the message.
void check_size(const char* op, const std::string& what, const c10::SymInt& size);

// Raises unless a tensor of shape `dims` (when all are concrete) has fewer than 2^62
// elements; `what` names the tensor.
void check_numel(const char* op, const std::string& what, std::initializer_list<c10::SymInt> dims);

// Device rule for every tensor argument: on the CPU for the CPU kernel, else on the device
// of the reference argument `ref_name` (the Meta kernel: shape inference only).
void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref, bool require_cpu);

}  // namespace kt_ops
