// The element formats the packed expert weights come in. A format is a way of storing the
// frozen weights (and their scales, for the quantized ones); the kernels that compute with it
// are its entries in the kernel registry (kt/kernels.h).
#pragma once

#include <cstdint>
#include <string>

namespace kt {

// The values are the codes packed experts record (never reused): bf16 weights as they are;
// int8 codes with one fp32 scale per output channel.
enum class WeightFormat : int64_t { kBF16 = 0, kInt8 = 1 };

// The format whose code (the enum's value, as packed experts record it) is `code`; false for
// a code this build does not know.
bool format_of_code(int64_t code, WeightFormat* out);

// How a format stores the packed experts (kt/packing.h): the element of the packed gate_up and
// down tensors and the scales beside them.
enum class WeightStorage { kBF16, kInt8 };
enum class WeightScales {
  kNone,
  // fp32 per output channel: gate_up_scale [S, E, 2*Is] (fused row order), down_scale [S, E, Hp].
  kPerChannel,
};

struct FormatInfo {
  WeightFormat format;
  const char* name;  // as pack_experts takes it: "bf16", "int8"
  WeightStorage storage;
  int64_t bits;  // bits per packed weight element: offsets into the packed tensors scale by it
  WeightScales scales;
};

// The description of `format`, one of weight_formats() (kt/kernels.h).
const FormatInfo& format_info(WeightFormat format);

// "bf16", ...
const char* format_name(WeightFormat format);

// The format named `name`; false when this build has no such format.
bool parse_format(const std::string& name, WeightFormat* out);

// The names of every format this build computes with, for messages: "bf16".
std::string format_names();

}  // namespace kt
