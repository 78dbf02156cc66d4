#include "checks.h"

#include <cmath>

#include "formats.h"
#include "kt/packing.h"

namespace kt_ops {

const char* const kLoraNames[6] = {"lora_gate_a", "lora_gate_b", "lora_up_a",
                                   "lora_up_b",   "lora_down_a", "lora_down_b"};

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string describe(const at::Tensor& t) {
  std::string s = dtype_name(t.scalar_type()) + " [";
  const auto sizes = t.sym_sizes();
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + text::of(sizes[i]);
  return s + "]";
}

void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref, bool require_cpu) {
  if (require_cpu) {
    KT_CHECK(t.device().is_cpu(), "kt.", op, ": ", name,
                " must be a CPU tensor (kt_ops runs the experts on the CPU), got a tensor on ",
                t.device());
  } else {
    KT_CHECK(t.device() == ref.device(), "kt.", op, ": ", name, " must be on ", ref_name,
                "'s device (", ref.device(), "), got a tensor on ", t.device(),
                "; the kt ops compute on CPU tensors");
  }
}

void check_size(const char* op, const std::string& what, const c10::SymInt& size) {
  const auto v = size.maybe_as_int();
  KT_CHECK(!v || (*v >= 0 && *v <= kMaxSize), "kt.", op, ": ", what, " must be at most 2^40, got ", size);
}

void check_numel(const char* op, const std::string& what, std::initializer_list<c10::SymInt> dims) {
  int64_t total = 1;
  std::string shape;
  bool fits = true;
  for (const c10::SymInt& d : dims) {
    const auto v = d.maybe_as_int();
    if (!v) return;
    shape += (shape.empty() ? "" : ", ") + std::to_string(*v);
    fits = fits && *v >= 0 && !__builtin_mul_overflow(total, *v, &total) && total < (int64_t{1} << 62);
  }
  KT_CHECK(fits, "kt.", op, ": ", what, " would be of shape [", shape, "], 2^62 elements or more");
}

namespace {


bool is_activation_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kFloat; }

// The packed experts' own account of their sizes against the call's: the padded shapes checked
// before admit other sizes (H = 60 on experts packed for H = 64, I = 40 on I = 64).
void check_layout(const char* op, const PackedTensors& p, const MoeSizes& s) {
  const kt::ExpertLayout& packed = p.sizes;
  KT_CHECK(s.intermediate == packed.intermediate, "kt.", op,
           ": intermediate_size must be the I the experts were packed with (", packed.intermediate, "), got ",
           s.intermediate);
  KT_CHECK(s.hidden == packed.hidden, "kt.", op, ": x must have the hidden size the experts were packed with (H = ",
           packed.hidden, "), got ", s.hidden);
  KT_CHECK(p.gate_up.size(0) == packed.slices && p.gate_up.size(1) == packed.experts, "kt.", op,
           ": gate_up must hold the ", packed.experts, " experts in ", packed.slices,
           " slices that layout describes, got ", describe(p.gate_up));
}

}  // namespace

std::array<c10::SymInt, 2> scale_lengths(const FormatTensors& f, const c10::SymInt& width, const c10::SymInt& hp) {
  return {kt::scales_of_rows(f.scales, 2 * width, hp), kt::scales_of_rows(f.scales, hp, width)};
}

void check_scales(const char* op, at::TensorList experts, const FormatTensors& f, const c10::SymInt& slices,
                  const c10::SymInt& experts_count, const c10::SymInt& width, const c10::SymInt& hidden) {
  if (f.scales == kt::WeightScales::kNone) return;
  const at::Tensor &gs = experts[3], &ds = experts[4];
  const auto [gate_up_len, down_len] = scale_lengths(f, width, kt::padded_size(hidden));
  const std::string dtype = dtype_name(f.scale_dtype);
  KT_CHECK(gs.scalar_type() == f.scale_dtype && gs.dim() == 3 && gs.sym_size(0) == slices &&
               gs.sym_size(1) == experts_count && gs.sym_size(2) == gate_up_len,
           "kt.", op, ": gate_up_scale (experts[3]) must be the ", dtype, " [", slices, ", ", experts_count, ", ",
           gate_up_len, "] tensor made by kt.pack_experts with gate_up, got ", describe(gs));
  KT_CHECK(ds.scalar_type() == f.scale_dtype && ds.dim() == 3 && ds.sym_size(0) == slices &&
               ds.sym_size(1) == experts_count && ds.sym_size(2) == down_len,
           "kt.", op, ": down_scale (experts[4]) must be the ", dtype, " [", slices, ", ", experts_count, ", ",
           down_len, "] tensor made by kt.pack_experts with down, got ", describe(ds));
}

LoraTensors lora_of(const char* op, const c10::List<std::optional<at::Tensor>>& lora) {
  KT_CHECK(lora.size() == 0 || lora.size() == 6, "kt.", op,
           ": lora must be empty (no LoRA) or the six tensors [A_gate, B_gate, A_up, B_up, A_down, B_down] (a pair "
           "may be None), got ", lora.size(), " entries");
  LoraTensors out;
  for (size_t i = 0; i < lora.size(); ++i) out[i] = lora.get(i);
  return out;
}

PackedTensors check_experts(const char* op, at::TensorList experts, const at::Tensor& ref, const char* ref_name,
                            bool require_cpu, kt::WeightFormat* format) {
  KT_CHECK(experts.size() >= 3, "kt.", op,
           ": experts must be the tensors kt.pack_experts returned (gate_up, down, layout, then the format's "
           "scales), got ", experts.size(), " tensors");
  PackedTensors p{experts[0], experts[1], experts[2], {}};
  KT_CHECK(p.layout.scalar_type() == at::kLong && p.layout.dim() == 1 && p.layout.sym_size(0) == kt::kLayoutFields,
           "kt.", op, ": layout must be the int64 [", kt::kLayoutFields,
           "] tensor made by kt.pack_experts with gate_up and down, got ", describe(p.layout));
  const char* const names[3] = {"gate_up", "down", "layout"};
  for (size_t i = 0; i < experts.size(); ++i)
    check_device(op, i < 3 ? names[i] : "a scale tensor of experts", experts[i], ref_name, ref, require_cpu);
  FormatTensors f{};
  if (require_cpu) {
    int64_t code = -1;
    KT_CHECK(kt::decode_layout(p.layout.contiguous().data_ptr<int64_t>(), &p.sizes, &code), "kt.", op,
             ": layout must be the tensor made by kt.pack_experts with gate_up and down; this one holds other "
             "values");
    kt::WeightFormat named;
    KT_CHECK(kt::format_of_code(code, &named), "kt.", op, ": layout names weight format ", code,
             ", which this build of kt_ops cannot compute (it has: ", kt::format_names(), ")");
    f = format_tensors(named);
  } else {
    KT_CHECK(format_of_tensors(experts, &f), "kt.", op,
             ": gate_up must be the [S, E, 2*Is, Hp] tensor made by kt.pack_experts, in a weight format this build has (",
             kt::format_names(), "), got ", describe(p.gate_up));
  }
  KT_CHECK(experts.size() == f.count, "kt.", op, ": experts must be the ", f.count,
           " tensors kt.pack_experts returns for format ", kt::format_name(f.format), ", got ", experts.size());
  *format = f.format;
  return p;
}

MoeSizes check_moe_args(const char* op, const at::Tensor& x, const at::Tensor& topk_ids,
                        const at::Tensor& topk_weights, at::TensorList experts, int64_t intermediate_size,
                        const LoraTensors& lora, double lora_scaling, bool require_cpu) {
  KT_CHECK(is_activation_dtype(x.scalar_type()) && x.dim() == 2, "kt.", op,
              ": x must be bfloat16 or float32 of shape [T, H], got ", describe(x));
  KT_CHECK((topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong) &&
                  topk_ids.dim() == 2,
              "kt.", op, ": topk_ids must be int32 or int64 of shape [T, K], got ", describe(topk_ids));
  KT_CHECK(topk_ids.sym_size(0) == x.sym_size(0), "kt.", op,
              ": topk_ids must have one row per token of x (T = ", x.sym_size(0), "), got ",
              describe(topk_ids));
  KT_CHECK(is_activation_dtype(topk_weights.scalar_type()) && topk_weights.dim() == 2 &&
                  topk_weights.sym_sizes() == topk_ids.sym_sizes(),
              "kt.", op, ": topk_weights must be float32 or bfloat16 of the shape of topk_ids ",
              describe(topk_ids), ", got ", describe(topk_weights));
  KT_CHECK(intermediate_size > 0, "kt.", op, ": intermediate_size must be positive, got ",
              intermediate_size);
  check_size(op, "intermediate_size", intermediate_size);
  check_size(op, "the token count of x", x.sym_size(0));
  check_size(op, "the hidden size of x", x.sym_size(1));
  check_size(op, "top-k (topk_ids' dim 1)", topk_ids.sym_size(1));
  KT_CHECK(std::isfinite(lora_scaling), "kt.", op, ": lora_scaling must be finite, got ",
              lora_scaling);
  check_device(op, "x", x, "x", x, require_cpu);
  check_device(op, "topk_ids", topk_ids, "x", x, require_cpu);
  check_device(op, "topk_weights", topk_weights, "x", x, require_cpu);
  kt::WeightFormat format;
  const PackedTensors p = check_experts(op, experts, x, "x", require_cpu, &format);
  const at::Tensor &gate_up = p.gate_up, &down = p.down;
  const FormatTensors f = format_tensors(format);
  const std::string weights = dtype_name(f.weights);

  MoeSizes s{x.sym_size(0), topk_ids.sym_size(1), x.sym_size(1), 0, intermediate_size, {0, 0, 0}, format};
  const c10::SymInt I(intermediate_size);
  KT_CHECK(gate_up.scalar_type() == f.weights && gate_up.dim() == 4 && gate_up.sym_size(0) > 0,
           "kt.", op, ": gate_up must be the ", weights, " [S, E, 2*Is, Hp] tensor made by kt.pack_experts, got ",
           describe(gate_up));
  const c10::SymInt slices = gate_up.sym_size(0), width = kt::padded_slice_width(I, slices);
  s.experts = gate_up.sym_size(1);
  const c10::SymInt hp = kt::padded_size(s.hidden);
  KT_CHECK(gate_up.sym_size(2) == 2 * width && gate_up.sym_size(3) == hp / f.per_element, "kt.", op,
              ": gate_up must be packed for H = ", s.hidden, " and I = ", I, " (shape [", slices, ", E, ",
              2 * width, ", ", hp / f.per_element, "]), got ", describe(gate_up));
  KT_CHECK(down.scalar_type() == gate_up.scalar_type() && down.dim() == 4 && down.sym_size(0) == slices &&
                  down.sym_size(1) == s.experts && down.sym_size(2) == hp && down.sym_size(3) == width / f.per_element,
              "kt.", op, ": down must be the ", weights, " tensor made by kt.pack_experts with gate_up for E = ",
              s.experts, ", H = ", s.hidden, ", I = ", I, " (shape [", slices, ", ", s.experts, ", ", hp, ", ",
              width / f.per_element, "]), got ", describe(down));
  check_scales(op, experts, f, slices, s.experts, width, s.hidden);
  check_numel(op, "gate_up_act", {s.tokens, s.top_k, 2 * I});

  const c10::SymInt in_dims[3] = {s.hidden, s.hidden, I}, out_dims[3] = {I, I, s.hidden};
  for (int p = 0; p < 3; ++p) {
    const auto &a = lora[2 * p], &b = lora[2 * p + 1];
    const char *a_name = kLoraNames[2 * p], *b_name = kLoraNames[2 * p + 1];
    KT_CHECK(a.has_value() == b.has_value(), "kt.", op, ": ", a_name, " and ", b_name,
                " must be given together, got only ", a.has_value() ? a_name : b_name);
    if (!a.has_value()) continue;
    KT_CHECK(is_activation_dtype(a->scalar_type()) && a->dim() == 3 &&
                    a->sym_size(0) == s.experts && a->sym_size(2) == in_dims[p] &&
                    a->sym_size(1) > 0,
                "kt.", op, ": ", a_name, " must be float32 or bfloat16 of shape [E, r, in] = [",
                s.experts, ", r, ", in_dims[p], "], got ", describe(*a));
    const c10::SymInt r = a->sym_size(1);
    KT_CHECK(is_activation_dtype(b->scalar_type()) && b->dim() == 3 &&
                    b->sym_size(0) == s.experts && b->sym_size(1) == out_dims[p] &&
                    b->sym_size(2) == r,
                "kt.", op, ": ", b_name, " must be float32 or bfloat16 of shape [E, out, r] = [",
                s.experts, ", ", out_dims[p], ", ", r, "], got ", describe(*b));
    check_size(op, std::string("the rank of ") + a_name, r);
    s.rank[p] = r.guard_int(__FILE__, __LINE__);
  }
  check_numel(op, "lora_act", {s.tokens, s.top_k, s.rank[0] + s.rank[1] + s.rank[2]});

  for (int i = 0; i < 6; ++i)
    if (lora[i].has_value()) check_device(op, kLoraNames[i], *lora[i], "x", x, require_cpu);
  if (require_cpu) check_layout(op, p, s);
  return s;
}

kt::Gate check_gate(const char* op, const at::Tensor& x, const MoeSizes& s, const std::optional<at::Tensor>& gate_up_bias,
                    const std::optional<at::Tensor>& down_bias, c10::string_view activation, double alpha,
                    std::optional<double> limit, double up_offset, bool require_cpu) {
  kt::Gate gate;
  const std::string name(activation.data(), activation.size());
  if (name == "silu") {
    gate.activation = kt::GateActivation::kSilu;
  } else if (name == "gelu") {
    gate.activation = kt::GateActivation::kGelu;
  } else if (name == "gelu_tanh") {
    gate.activation = kt::GateActivation::kGeluTanh;
  } else {
    KT_CHECK(false, "kt.", op, ": activation must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"", name, "\"");
  }
  KT_CHECK(std::isfinite(alpha) && alpha > 0, "kt.", op, ": activation_alpha must be finite and positive, got ",
           alpha);
  KT_CHECK(alpha == 1.0 || gate.activation == kt::GateActivation::kSilu, "kt.", op,
           ": activation_alpha scales the sigmoid of silu; it must be 1 for ", name, ", got ", alpha);
  if (limit.has_value()) {
    KT_CHECK(*limit > 0, "kt.", op, ": activation_limit must be positive (or None: no clamp), got ", *limit);
    gate.limit = static_cast<float>(*limit);
  }
  KT_CHECK(std::isfinite(up_offset), "kt.", op, ": up_offset must be finite, got ", up_offset);
  gate.alpha = static_cast<float>(alpha);
  gate.up_offset = static_cast<float>(up_offset);
  if (gate_up_bias.has_value()) {
    const at::Tensor& b = *gate_up_bias;
    const c10::SymInt two_i(2 * s.intermediate);
    KT_CHECK(is_activation_dtype(b.scalar_type()) && b.dim() == 2 && b.sym_size(0) == s.experts &&
                 b.sym_size(1) == two_i,
             "kt.", op, ": gate_up_bias must be float32 or bfloat16 of shape [E, 2I] = [", s.experts, ", ", two_i,
             "] (gate columns, then up columns), got ", describe(b));
    check_device(op, "gate_up_bias", b, "x", x, require_cpu);
  }
  if (down_bias.has_value()) {
    const at::Tensor& b = *down_bias;
    KT_CHECK(is_activation_dtype(b.scalar_type()) && b.dim() == 2 && b.sym_size(0) == s.experts &&
                 b.sym_size(1) == s.hidden,
             "kt.", op, ": down_bias must be float32 or bfloat16 of shape [E, H] = [", s.experts, ", ", s.hidden,
             "], got ", describe(b));
    check_device(op, "down_bias", b, "x", x, require_cpu);
  }
  return gate;
}

}  // namespace kt_ops
