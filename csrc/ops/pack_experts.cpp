// CPU and Meta kernels of kt.pack_experts / kt.pack_expert_codes / kt.unpack_experts, and the
// formats this build has.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "formats.h"
#include "kt/kernels.h"
#include "kt/packing.h"
#include "kt/thread_pool.h"
#include "kt/topology.h"
#include "ops.h"

namespace kt_ops {
namespace {

struct ExpertShape {
  c10::SymInt experts, intermediate, hidden;
};

// The three weight tensors of pack_experts (bf16 weights) or pack_expert_codes (codes of
// dtype `dtype`): w_gate, w_up [E, I, H] and w_down [E, H, I] on one device.
ExpertShape check_pack_args(const char* op, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                            at::ScalarType dtype, bool require_cpu) {
  const std::string name = dtype_name(dtype);
  KT_CHECK(w_gate.scalar_type() == dtype && w_gate.dim() == 3, "kt.", op, ": w_gate must be ", name,
           " of shape [E, I, H], got ", describe(w_gate));
  const ExpertShape s{w_gate.sym_size(0), w_gate.sym_size(1), w_gate.sym_size(2)};
  KT_CHECK(s.intermediate > 0 && s.hidden > 0, "kt.", op, ": w_gate must have non-empty I and H, got ",
           describe(w_gate));
  check_size(op, "the expert count (w_gate's dim 0)", s.experts);
  check_size(op, "the intermediate size (w_gate's dim 1)", s.intermediate);
  check_size(op, "the hidden size (w_gate's dim 2)", s.hidden);
  KT_CHECK(w_up.scalar_type() == dtype && w_up.sym_sizes() == w_gate.sym_sizes(), "kt.", op, ": w_up must be ", name,
           " of the shape of w_gate [", s.experts, ", ", s.intermediate, ", ", s.hidden, "], got ", describe(w_up));
  KT_CHECK(w_down.scalar_type() == dtype && w_down.dim() == 3 && w_down.sym_size(0) == s.experts &&
               w_down.sym_size(1) == s.hidden && w_down.sym_size(2) == s.intermediate,
           "kt.", op, ": w_down must be ", name, " of shape [E, H, I] = [", s.experts, ", ", s.hidden, ", ",
           s.intermediate, "], got ", describe(w_down));
  check_device(op, "w_gate", w_gate, "w_gate", w_gate, require_cpu);
  check_device(op, "w_up", w_up, "w_gate", w_gate, require_cpu);
  check_device(op, "w_down", w_down, "w_gate", w_gate, require_cpu);
  return s;
}


// More slices than any machine has NUMA nodes.
constexpr int64_t kMaxNumaNodes = 1024;

// Slices of the intermediate dimension: one per NUMA node unless the caller asks otherwise.
// The count depends on I, which shape inference may only see symbolically: it is read as a
// concrete value (guarding on it), as the layout of the weights needs.
int64_t slice_count(const char* op, const ExpertShape& s, int64_t numa_nodes) {
  KT_CHECK(numa_nodes >= 0 && numa_nodes <= kMaxNumaNodes, "kt.", op, ": numa_nodes must be in [0, ",
           kMaxNumaNodes, "] (0: one slice per NUMA node), got ", numa_nodes);
  const int64_t nodes = numa_nodes ? numa_nodes : kt::machine_topology().nodes();
  return kt::slices_for(s.intermediate.guard_int(__FILE__, __LINE__), nodes);
}

struct RequestedFormat {
  kt::WeightFormat format;
  int64_t group;  // the quantization group, for a format that has one; else 0
};

// The format pack_experts (or pack_expert_codes) is asked for, and its group size (0: the format's default) checked
// against it and against the sizes it groups.
RequestedFormat requested_format(const char* op, c10::string_view format, int64_t group_size, const ExpertShape& s) {
  const std::string name(format.data(), format.size());
  kt::WeightFormat f;
  KT_CHECK(kt::parse_format(name, &f), "kt.", op, ": format must be one of ",
           kt::format_names(), " (the weight formats this build has), got \"", name, "\"");
  const kt::FormatInfo& info = kt::format_info(f);
  if (info.default_group == 0) {
    KT_CHECK(group_size == 0, "kt.", op, ": format ", name,
             " has no quantization groups: group_size must be 0, got ", group_size);
    return {f, 0};
  }
  const int64_t group = group_size == 0 ? info.default_group : group_size;
  KT_CHECK(kt::is_group_size(group), "kt.", op, ": format ", name,
           " takes group_size 32, 64 or 128 (0: ", info.default_group, "), got ", group_size);
  const int64_t H = s.hidden.guard_int(__FILE__, __LINE__), I = s.intermediate.guard_int(__FILE__, __LINE__);
  KT_CHECK(H % group == 0 && I % group == 0, "kt.", op, ": format ", name, " groups of ", group,
           " must divide the hidden size H = ", H, " and the intermediate size I = ", I,
           " (each row is quantized group by group along its reduction)");
  return {f, group};
}

// gate_up, down and layout (then the format's scales) for experts of shape `s`.
std::vector<at::Tensor> allocate(const ExpertShape& s, int64_t slices, const FormatTensors& format,
                                 const at::TensorOptions& opts) {
  const c10::SymInt width = kt::padded_slice_width(s.intermediate, slices), hp = kt::padded_size(s.hidden);
  check_numel("pack_experts", "gate_up", {slices, s.experts, 2 * width, hp});
  const at::TensorOptions weights = opts.dtype(format.weights);
  std::vector<at::Tensor> out{at::empty_symint({slices, s.experts, 2 * width, hp / format.per_element}, weights),
                              at::empty_symint({slices, s.experts, hp, width / format.per_element}, weights),
                              at::empty({kt::kLayoutFields}, opts.dtype(at::kLong))};
  if (format.scales != kt::WeightScales::kNone) {
    const auto [gate_up_len, down_len] = scale_lengths(format, width, hp);
    out.push_back(at::empty_symint({slices, s.experts, gate_up_len}, opts.dtype(format.scale_dtype)));
    out.push_back(at::empty_symint({slices, s.experts, down_len}, opts.dtype(format.scale_dtype)));
  }
  return out;
}

}  // namespace

std::vector<std::string> weight_formats() {
  std::vector<std::string> names;
  for (kt::WeightFormat f : kt::weight_formats())
    names.push_back(kt::format_name(f));
  return names;
}

namespace {

// The packed experts of format f for shape s in `slices` slices, filled expert slice by expert
// slice by pack(layout, e, sl, gate_up, down, gate_up_scale, down_scale) (null scales for a
// format without) on the op's threads.
template <typename PackSlice>
std::vector<at::Tensor> pack_layer(const ExpertShape& s, int64_t slices, kt::WeightFormat f,
                                   const at::TensorOptions& opts, const PackSlice& pack) {
  std::vector<at::Tensor> packed = allocate(s, slices, format_tensors(f), opts);
  const kt::ExpertLayout layout{s.experts.expect_int(), s.hidden.expect_int(), s.intermediate.expect_int(), slices};
  char* gu_out = static_cast<char*>(packed[0].data_ptr());
  char* d_out = static_cast<char*>(packed[1].data_ptr());
  const kt::FormatInfo& info = kt::format_info(f);
  void* gu_scale = info.scales != kt::WeightScales::kNone ? packed[3].data_ptr() : nullptr;
  void* d_scale = info.scales != kt::WeightScales::kNone ? packed[4].data_ptr() : nullptr;
  // Slice sl's pages go to its node before anything touches them; its node's threads pack it.
  // (Scales are small and stay where they fall.)
  const kt::Topology& topology = kt::machine_topology();
  const int64_t E = layout.experts, bits = info.bits;
  std::vector<int64_t> range_first;
  for (int64_t sl = 0; sl < slices; ++sl) {
    const int node = static_cast<int>(sl % topology.nodes());
    topology.bind_memory(gu_out + layout.gate_up_offset(sl, 0) * bits / 8, layout.gate_up_elems() / slices * bits / 8,
                         node);
    topology.bind_memory(d_out + layout.down_offset(sl, 0) * bits / 8, layout.down_elems() / slices * bits / 8, node);
    range_first.push_back(sl * E);
  }
  range_first.push_back(slices * E);
  kt::parallel_for_ranges(range_first, at::get_num_threads(), [&](int64_t task) {
    pack(layout, task % E, task / E, gu_out, d_out, gu_scale, d_scale);
  });
  kt::encode_layout(layout, f, packed[2].data_ptr<int64_t>());
  return packed;
}

// The scales pack_expert_codes takes: three tensors in the format's CodeScales form
// (kt/weight_format.h), gate and up of the [E, I, H] matrices, down of the [E, H, I] one.
void check_code_scales(at::TensorList scales, const RequestedFormat& f, const ExpertShape& s, const at::Tensor& ref,
                       bool require_cpu) {
  constexpr const char* op = "pack_expert_codes";
  const kt::CodeScales form = kt::format_info(f.format).code_scales;
  KT_CHECK(scales.size() == 3, "kt.", op, ": scales must be the three scale tensors [gate, up, down] of format ",
           kt::format_name(f.format), ", got ", scales.size(), " tensors");
  const at::ScalarType dtype = form == kt::CodeScales::kPerGroup ? at::kBFloat16 : at::kFloat;
  const char* const names[3] = {"scales[0] (gate)", "scales[1] (up)", "scales[2] (down)"};
  for (int m = 0; m < 3; ++m) {
    // Rows and reduction of the matrix the scales belong to.
    const c10::SymInt& n = m < 2 ? s.intermediate : s.hidden;
    const c10::SymInt& k = m < 2 ? s.hidden : s.intermediate;
    std::vector<c10::SymInt> want{s.experts};
    const char* meaning = "";
    switch (form) {
      case kt::CodeScales::kPerRow: want.push_back(n); meaning = "one per output row"; break;
      case kt::CodeScales::kPerGroup: want.insert(want.end(), {n, k / f.group}); meaning = "one per group of a row"; break;
      case kt::CodeScales::kPer128Block:
        want.insert(want.end(), {(n + kt::kFp8Block - 1) / kt::kFp8Block, (k + kt::kFp8Block - 1) / kt::kFp8Block});
        meaning = "one per 128 x 128 block";
        break;
      case kt::CodeScales::kNone: break;
    }
    std::string shape = "[";
    for (size_t i = 0; i < want.size(); ++i) shape += (i ? ", " : "") + text::of(want[i]);
    shape += "]";
    KT_CHECK(scales[m].scalar_type() == dtype && scales[m].sym_sizes() == c10::SymIntArrayRef(want), "kt.", op, ": ",
             names[m], " must be ", dtype_name(dtype), " ", shape, " (", meaning, ", as kt_ops.reference.quantize_",
             kt::format_name(f.format), " returns them), got ", describe(scales[m]));
    check_device(op, names[m], scales[m], "w_gate", ref, require_cpu);
  }
}

// The codes' dtype of a format with codes: one int8 per int8 or int4 code, the e4m3 bytes as
// uint8 for fp8.
at::ScalarType code_dtype(kt::WeightFormat f) {
  return kt::format_info(f).storage == kt::WeightStorage::kFp8E4M3 ? at::kByte : at::kChar;
}

// Values the kernels cannot read: int4 codes outside [-8, 7], the NaN codes of e4m3, scales
// that are not finite.
void check_code_values(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                       at::TensorList scales, kt::WeightFormat f) {
  constexpr const char* op = "pack_expert_codes";
  const char* const names[3] = {"w_gate", "w_up", "w_down"};
  const at::Tensor codes[3] = {w_gate, w_up, w_down};
  for (int m = 0; m < 3; ++m) {
    if (f == kt::WeightFormat::kInt4 && codes[m].numel() > 0) {
      const auto [lo, hi] = at::aminmax(codes[m]);
      KT_CHECK(lo.item<int8_t>() >= -8 && hi.item<int8_t>() <= 7, "kt.", op, ": ", names[m],
               " must hold int4 codes in [-8, 7], got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
    if (f == kt::WeightFormat::kFp8)
      KT_CHECK(!at::bitwise_and(codes[m], 0x7f).eq(0x7f).any().item<bool>(), "kt.", op, ": ", names[m],
               " holds the e4m3 NaN code (0x7f or 0xff); fp8 expert weights must be finite");
    KT_CHECK(at::isfinite(scales[m]).all().item<bool>(), "kt.", op, ": scales[", m,
             "] must be finite, got a NaN or infinite scale");
  }
}

struct CodeArgs {
  ExpertShape shape;
  RequestedFormat format;
};

// Every argument of pack_expert_codes but the values: the format (which must have codes), then
// the codes in its code dtype, the group size, and the scales.
CodeArgs check_code_args(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                         at::TensorList scales, c10::string_view format, int64_t group_size, bool require_cpu) {
  constexpr const char* op = "pack_expert_codes";
  const std::string name(format.data(), format.size());
  kt::WeightFormat f;
  KT_CHECK(kt::parse_format(name, &f), "kt.", op, ": format must be one of ", kt::format_names(),
           " (the weight formats this build has), got \"", name, "\"");
  KT_CHECK(kt::format_info(f).pack_codes_slice != nullptr, "kt.", op, ": format ", name,
           " has no codes (kt.pack_experts packs bf16 weights as they are)");
  const ExpertShape s = check_pack_args(op, w_gate, w_up, w_down, code_dtype(f), require_cpu);
  const RequestedFormat requested = requested_format(op, format, group_size, s);
  check_code_scales(scales, requested, s, w_gate, require_cpu);
  return {s, requested};
}

}  // namespace

std::vector<at::Tensor> pack_experts_cpu(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                                         int64_t numa_nodes, c10::string_view format, int64_t group_size) {
  constexpr const char* op = "pack_experts";
  const ExpertShape s = check_pack_args(op, w_gate, w_up, w_down, at::kBFloat16, /*require_cpu=*/true);
  const auto [f, group] = requested_format(op, format, group_size, s);
  const at::Tensor g = w_gate.contiguous(), u = w_up.contiguous(), d = w_down.contiguous();
  const auto* gp = reinterpret_cast<const kt::bf16*>(g.data_ptr());
  const auto* up = reinterpret_cast<const kt::bf16*>(u.data_ptr());
  const auto* dp = reinterpret_cast<const kt::bf16*>(d.data_ptr());
  const kt::FormatInfo& info = kt::format_info(f);
  return pack_layer(s, slice_count(op, s, numa_nodes), f, w_gate.options(),
                    [&, group = group](const kt::ExpertLayout& layout, int64_t e, int64_t sl, void* gate_up,
                                       void* down, void* gu_scale, void* d_scale) {
                      info.pack_slice(layout, gp, up, dp, e, sl, group, gate_up, down, gu_scale, d_scale);
                    });
}

std::vector<at::Tensor> pack_experts_meta(const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                                          int64_t numa_nodes, c10::string_view format, int64_t group_size) {
  constexpr const char* op = "pack_experts";
  const ExpertShape s = check_pack_args(op, w_gate, w_up, w_down, at::kBFloat16, /*require_cpu=*/false);
  const kt::WeightFormat f = requested_format(op, format, group_size, s).format;
  return allocate(s, slice_count(op, s, numa_nodes), format_tensors(f), w_gate.options());
}

std::vector<at::Tensor> pack_expert_codes_cpu(const at::Tensor& w_gate, const at::Tensor& w_up,
                                              const at::Tensor& w_down, at::TensorList scales, c10::string_view format,
                                              int64_t numa_nodes, int64_t group_size) {
  constexpr const char* op = "pack_expert_codes";
  const auto [s, f] = check_code_args(w_gate, w_up, w_down, scales, format, group_size, /*require_cpu=*/true);
  const at::Tensor g = w_gate.contiguous(), u = w_up.contiguous(), d = w_down.contiguous();
  const at::Tensor gs = scales[0].contiguous(), us = scales[1].contiguous(), ds = scales[2].contiguous();
  check_code_values(g, u, d, {gs, us, ds}, f.format);
  const kt::FormatInfo& info = kt::format_info(f.format);
  return pack_layer(s, slice_count(op, s, numa_nodes), f.format, w_gate.options(),
                    [&](const kt::ExpertLayout& layout, int64_t e, int64_t sl, void* gate_up, void* down,
                        void* gu_scale, void* d_scale) {
                      info.pack_codes_slice(layout, g.data_ptr(), u.data_ptr(), d.data_ptr(), gs.data_ptr(),
                                            us.data_ptr(), ds.data_ptr(), e, sl, f.group, gate_up, down, gu_scale,
                                            d_scale);
                    });
}

std::vector<at::Tensor> pack_expert_codes_meta(const at::Tensor& w_gate, const at::Tensor& w_up,
                                               const at::Tensor& w_down, at::TensorList scales,
                                               c10::string_view format, int64_t numa_nodes, int64_t group_size) {
  const auto [s, f] = check_code_args(w_gate, w_up, w_down, scales, format, group_size, /*require_cpu=*/false);
  return allocate(s, slice_count("pack_expert_codes", s, numa_nodes), format_tensors(f.format), w_gate.options());
}

namespace {

// The sizes unpack_experts' outputs take, checked against the packed tensors' shapes (and, on
// the CPU, against the values of layout).
ExpertShape check_unpack_args(at::TensorList experts, int64_t hidden, int64_t intermediate,
                              at::OptionalIntArrayRef expert_ids, bool require_cpu, kt::WeightFormat* format_out) {
  constexpr const char* op = "unpack_experts";
  KT_CHECK(hidden > 0 && intermediate > 0, "kt.", op, ": hidden_size and intermediate_size must be positive, got ",
           hidden, " and ", intermediate);
  check_size(op, "hidden_size", hidden);
  check_size(op, "intermediate_size", intermediate);
  // Never empty: the dispatcher finds no kernel for a call without tensors.
  TORCH_INTERNAL_ASSERT(!experts.empty());
  kt::WeightFormat format;
  const PackedTensors p = check_experts(op, experts, experts[0], "gate_up", require_cpu, &format);
  const at::Tensor &gate_up = p.gate_up, &down = p.down;
  const FormatTensors f = format_tensors(format);
  const std::string weights = dtype_name(f.weights);
  KT_CHECK(gate_up.scalar_type() == f.weights && gate_up.dim() == 4 && gate_up.sym_size(0) > 0,
           "kt.", op, ": gate_up must be the ", weights, " [S, E, 2*Is, Hp] tensor made by kt.pack_experts, got ",
           describe(gate_up));
  const c10::SymInt slices = gate_up.sym_size(0), experts_count = gate_up.sym_size(1);
  const c10::SymInt width = kt::padded_slice_width(c10::SymInt(intermediate), slices),
                    hp = kt::padded_size(c10::SymInt(hidden));
  KT_CHECK(gate_up.sym_size(2) == 2 * width && gate_up.sym_size(3) == hp / f.per_element, "kt.", op,
           ": gate_up must be packed for H = ",
           hidden, " and I = ", intermediate, ", got ", describe(gate_up));
  KT_CHECK(down.scalar_type() == gate_up.scalar_type() && down.dim() == 4 && down.sym_size(0) == slices &&
               down.sym_size(1) == experts_count && down.sym_size(2) == hp && down.sym_size(3) == width / f.per_element,
           "kt.", op, ": down must be the ", weights, " tensor made by kt.pack_experts with gate_up, got ",
           describe(down));
  check_scales(op, experts, f, slices, experts_count, width, hidden);
  *format_out = format;
  if (expert_ids.has_value()) {
    for (size_t i = 0; i < expert_ids->size(); ++i) {
      const int64_t e = (*expert_ids)[i];
      KT_CHECK(e >= 0 && experts_count > e, "kt.", op, ": expert_ids must be in [0, ", experts_count,
               ") (the packed experts), got ", e, " at [", i, "]");
    }
  }
  if (require_cpu) {
    const kt::ExpertLayout& packed = p.sizes;
    KT_CHECK(packed.hidden == hidden && packed.intermediate == intermediate && packed.experts == gate_up.size(1) &&
                 packed.slices == gate_up.size(0),
             "kt.", op, ": layout describes ", packed.experts, " experts of H = ", packed.hidden, " and I = ",
             packed.intermediate, " in ", packed.slices, " slices; the call gives H = ", hidden, ", I = ", intermediate,
             " and gate_up ", describe(gate_up));
  }
  const c10::SymInt count = expert_ids.has_value() ? c10::SymInt(static_cast<int64_t>(expert_ids->size())) : experts_count;
  return {count, c10::SymInt(intermediate), c10::SymInt(hidden)};
}

UnpackResult allocate_unpacked(const ExpertShape& s, const at::TensorOptions& opts) {
  return {at::empty_symint({s.experts, s.intermediate, s.hidden}, opts),
          at::empty_symint({s.experts, s.intermediate, s.hidden}, opts),
          at::empty_symint({s.experts, s.hidden, s.intermediate}, opts)};
}

}  // namespace

UnpackResult unpack_experts_cpu(at::TensorList experts, int64_t hidden_size, int64_t intermediate_size,
                                at::OptionalIntArrayRef expert_ids) {
  kt::WeightFormat format;
  const ExpertShape s = check_unpack_args(experts, hidden_size, intermediate_size, expert_ids, true, &format);
  const bool scaled = format_tensors(format).scales != kt::WeightScales::kNone;
  const at::Tensor gu_scale = scaled ? experts[3].contiguous() : at::Tensor(),
                   d_scale = scaled ? experts[4].contiguous() : at::Tensor();
  auto [w_gate, w_up, w_down] = allocate_unpacked(s, experts[0].options().dtype(at::kBFloat16));
  const at::Tensor gu = experts[0].contiguous(), dn = experts[1].contiguous();
  const int64_t slices = gu.size(0), E = gu.size(1);
  const kt::ExpertLayout layout_{E, hidden_size, intermediate_size, slices};
  auto* g_out = reinterpret_cast<kt::bf16*>(w_gate.data_ptr());
  auto* u_out = reinterpret_cast<kt::bf16*>(w_up.data_ptr());
  auto* d_out = reinterpret_cast<kt::bf16*>(w_down.data_ptr());
  const int64_t count = w_gate.size(0), I = intermediate_size, H = hidden_size;
  std::vector<int64_t> range_first{0, slices * count};
  kt::parallel_for_ranges(range_first, at::get_num_threads(), [&](int64_t task) {
    const int64_t out = task % count, sl = task / count, e = expert_ids.has_value() ? (*expert_ids)[out] : out;
    kt::format_info(format).unpack_slice(layout_, gu.data_ptr(), dn.data_ptr(),
                                         scaled ? gu_scale.data_ptr() : nullptr, scaled ? d_scale.data_ptr() : nullptr,
                                         e, sl, g_out + out * I * H, u_out + out * I * H, d_out + out * H * I);
  });
  return {w_gate, w_up, w_down};
}

UnpackResult unpack_experts_meta(at::TensorList experts, int64_t hidden_size, int64_t intermediate_size,
                                 at::OptionalIntArrayRef expert_ids) {
  kt::WeightFormat format;
  return allocate_unpacked(check_unpack_args(experts, hidden_size, intermediate_size, expert_ids, false, &format),
                           experts[0].options().dtype(at::kBFloat16));
}

}  // namespace kt_ops
