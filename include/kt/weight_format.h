// The element formats the packed expert weights come in. A format is a way of storing the
// frozen weights (and their scales, for the quantized ones); the kernels that compute with it
// are its entries in the kernel registry (kt/kernels.h).
#pragma once

#include <cstdint>
#include <string>

namespace kt {

struct ExpertLayout;  // kt/packing.h

// The values are the codes packed experts record (never reused): bf16 weights as they are;
// int8 codes with one fp32 scale per output channel; int4 codes, two per byte, with one bf16
// scale per group of the reduction; fp8 e4m3 codes with one fp32 scale per 128 x 128 block
// of each weight matrix (as DeepSeek-V3, Kimi-K2 and Qwen3-FP8 publish them).
enum class WeightFormat : int64_t { kBF16 = 0, kInt8 = 1, kInt4 = 2, kFp8 = 3 };

// The format whose code (the enum's value, as packed experts record it) is `code`; false for
// a code this build does not know.
bool format_of_code(int64_t code, WeightFormat* out);

// How a format stores the packed experts (kt/packing.h): the element of the packed gate_up and
// down tensors and the scales beside them.
enum class WeightStorage {
  kBF16,
  kInt8,
  kInt4,  // codes in [-8, 7], two per byte: element 2i in the low half of byte i, 2i + 1 in the high
  kFp8E4M3,  // one e4m3 byte per weight (kt/fp8.h)
};
enum class WeightScales {
  kNone,
  // fp32 per output channel: gate_up_scale [S, E, 2*Is] (fused row order), down_scale [S, E, Hp].
  kPerChannel,
  // bf16 per row of each packed block (one output channel by 32 reduction steps), in the packed
  // order (panel, block, then the panel's 16 rows): gate_up_scale [S, E, 2*Is * Hp/32],
  // down_scale [S, E, Hp * Is/32]. A quantization group of 64 or 128 is 2 or 4 blocks of one
  // scale each.
  kPerBlock,
  // fp32 per packed block (16 output channels by 32 reduction steps: one AMX tile), in the
  // packed order (panel, then block): gate_up_scale [S, E, 2*Is/16 * Hp/32], down_scale
  // [S, E, Hp/16 * Is/32]. A 128 x 128 block scale of a checkpoint is 32 tiles of one scale.
  kPerTile,
};

// Packs expert e's slice s of w_gate, w_up [E, I, H] and w_down [E, H, I] (bf16) into the
// format's gate_up, down and scales (null for a format without), quantizing in groups of
// `group` where the format has groups; and the inverse, the dequantized bf16 weights of expert
// e's slice s written into that expert's own w_gate, w_up [I, H] and w_down [H, I].
using PackSliceFn = void (*)(const ExpertLayout& layout, const uint16_t* w_gate, const uint16_t* w_up,
                             const uint16_t* w_down, int64_t e, int64_t s, int64_t group, void* gate_up, void* down,
                             void* gate_up_scale, void* down_scale);
using UnpackSliceFn = void (*)(const ExpertLayout& layout, const void* gate_up, const void* down,
                               const void* gate_up_scale, const void* down_scale, int64_t e, int64_t s,
                               uint16_t* w_gate, uint16_t* w_up, uint16_t* w_down);

// How kt_ops/reference.py's quantize_<format> returns the scales of a weight W [..., N, K], the
// form quantized checkpoints ship (kt.pack_expert_codes takes codes and scales in it).
enum class CodeScales {
  kNone,
  kPerRow,       // fp32 [..., N]
  kPerGroup,     // bf16 [..., N, K / group]
  kPer128Block,  // fp32 [..., ceil(N / 128), ceil(K / 128)]
};

// Packs expert e's slice s from the format's codes of w_gate, w_up [E, I, H] and w_down
// [E, H, I] (one per element: int8 for int8 and int4, the e4m3 bytes for fp8) and their
// scales (in the format's CodeScales form, each [E, ...]), in groups of `group` where the
// format has groups.
using PackCodesSliceFn = void (*)(const ExpertLayout& layout, const void* gate_codes, const void* up_codes,
                                  const void* down_codes, const void* gate_scales, const void* up_scales,
                                  const void* down_scales, int64_t e, int64_t s, int64_t group, void* gate_up,
                                  void* down, void* gate_up_scale, void* down_scale);

struct FormatInfo {
  WeightFormat format;
  const char* name;  // as pack_experts takes it: "bf16", "int8", "int4", "fp8"
  WeightStorage storage;
  int64_t bits;  // bits per packed weight element: offsets into the packed tensors scale by it
  WeightScales scales;
  int64_t default_group;  // the quantization group pack_experts takes for group_size 0; 0: no groups
  PackSliceFn pack_slice;
  UnpackSliceFn unpack_slice;
  CodeScales code_scales;
  PackCodesSliceFn pack_codes_slice;  // null for bf16, which has no codes
};

// The scales of the first `rows` rows (a multiple of 16) of a packed matrix of depth kp: their
// count, and so the index of row `rows`' first scale. And the bytes of one scale.
template <typename Int>
Int scales_of_rows(WeightScales scales, const Int& rows, const Int& kp) {
  switch (scales) {
    case WeightScales::kPerChannel: return rows;
    case WeightScales::kPerBlock: return rows * (kp / 32);
    case WeightScales::kPerTile: return rows / 16 * (kp / 32);
    case WeightScales::kNone: break;
  }
  return rows * 0;
}
inline int64_t scale_bytes(WeightScales scales) { return scales == WeightScales::kPerBlock ? 2 : 4; }

// The quantization groups of the formats that have them: 32, 64 or 128 reduction elements.
inline bool is_group_size(int64_t g) { return g == 32 || g == 64 || g == 128; }

// The description of `format`, one of weight_formats() (kt/kernels.h).
const FormatInfo& format_info(WeightFormat format);

// "bf16", ...
const char* format_name(WeightFormat format);

// The format named `name`; false when this build has no such format.
bool parse_format(const std::string& name, WeightFormat* out);

// The names of every format this build computes with, for messages: "bf16".
std::string format_names();

}  // namespace kt
