// The ops' side of each weight format (kt/weight_format.h): the tensors that carry packed
// experts of that format through the op schemas, in the order kt.pack_experts returns them,
// derived from the format's description in the kernel registry.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

#include "kt/weight_format.h"

namespace kt_ops {

struct FormatTensors {
  kt::WeightFormat format;
  at::ScalarType weights;  // dtype of gate_up and down
  // Weight elements per element of gate_up and down (int4: two per byte), dividing their last
  // dimension: gate_up [S, E, 2*Is, Hp / per_element], down [S, E, Hp, Is / per_element].
  int64_t per_element;
  size_t count;  // gate_up, down, layout, then the format's scales
  kt::WeightScales scales;
  at::ScalarType scale_dtype;  // of gate_up_scale and down_scale, for a format with scales
};

// The tensors of `format`, one of kt::weight_formats().
FormatTensors format_tensors(kt::WeightFormat format);

// The format of packed experts (gate_up, down, layout, scales) judged by their dtypes, for the
// Meta kernels, which see no layout values: by gate_up's dtype, and where two formats store
// the same element (int4 and fp8: uint8), by the scales' dtype; false when no format's weights
// are of gate_up's dtype.
bool format_of_tensors(at::TensorList experts, FormatTensors* out);

}  // namespace kt_ops
