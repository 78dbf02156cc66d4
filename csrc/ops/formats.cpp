#include "formats.h"

namespace kt_ops {
namespace {

constexpr FormatTensors kFormats[] = {
    {kt::WeightFormat::kBF16, at::kBFloat16, 3, false},
    {kt::WeightFormat::kInt8, at::kChar, 5, true},
};

}  // namespace

const FormatTensors* format_tensors(kt::WeightFormat format) {
  for (const FormatTensors& f : kFormats)
    if (f.format == format) return &f;
  return nullptr;
}

const FormatTensors* format_of_weights(at::ScalarType weights) {
  for (const FormatTensors& f : kFormats)
    if (f.weights == weights) return &f;
  return nullptr;
}

}  // namespace kt_ops
