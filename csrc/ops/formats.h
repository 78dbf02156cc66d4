// The ops' side of each weight format (kt/weight_format.h): the tensors that carry packed
// experts of that format through the op schemas, in the order kt.pack_experts returns them.
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

// The entry of `format`; null for a format this build has no tensors for.
const FormatTensors* format_tensors(kt::WeightFormat format);

// The format whose weights are of dtype `weights` (the Meta kernels see no layout values);
// null when none is.
const FormatTensors* format_of_weights(at::ScalarType weights);

}  // namespace kt_ops
