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
  size_t count;            // gate_up, down, layout, then the format's scales
  // With per-output-channel scales: gate_up_scale float32 [S, E, 2*Is] (fused row order) and
  // down_scale float32 [S, E, Hp] follow layout.
  bool channel_scales;
};

// The tensors of `format`, one of kt::weight_formats().
FormatTensors format_tensors(kt::WeightFormat format);

// The format whose weights are of dtype `weights` (the Meta kernels see no layout values);
// false when none is.
bool format_of_weights(at::ScalarType weights, FormatTensors* out);

}  // namespace kt_ops
