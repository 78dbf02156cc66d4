#include "formats.h"

#include "kt/kernels.h"

namespace kt_ops {

FormatTensors format_tensors(kt::WeightFormat format) {
  const kt::FormatInfo& info = kt::format_info(format);
  const bool channel_scales = info.scales == kt::WeightScales::kPerChannel;
  const at::ScalarType weights = info.storage == kt::WeightStorage::kBF16 ? at::kBFloat16 : at::kChar;
  return {format, weights, channel_scales ? size_t(5) : size_t(3), channel_scales};
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
