#include "formats.h"

#include "kt/kernels.h"

namespace kt_ops {

FormatTensors format_tensors(kt::WeightFormat format) {
  const kt::FormatInfo& info = kt::format_info(format);
  const at::ScalarType weights = info.storage == kt::WeightStorage::kBF16  ? at::kBFloat16
                                 : info.storage == kt::WeightStorage::kInt8 ? at::kChar
                                                                            : at::kByte;
  const bool scaled = info.scales != kt::WeightScales::kNone;
  return {format,
          weights,
          8 * static_cast<int64_t>(c10::elementSize(weights)) / info.bits,
          scaled ? size_t(5) : size_t(3),
          info.scales,
          info.scales == kt::WeightScales::kPerBlock ? at::kBFloat16 : at::kFloat};
}

bool format_of_weights(at::ScalarType weights, FormatTensors* out) {
  for (kt::WeightFormat f : kt::weight_formats()) {
    if (format_tensors(f).weights == weights) {
      *out = format_tensors(f);
      return true;
    }
  }
  return false;
}

}  // namespace kt_ops
