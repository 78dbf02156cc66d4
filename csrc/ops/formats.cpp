#include "formats.h"

#include "kt/kernels.h"

namespace kt_ops {

FormatTensors format_tensors(kt::WeightFormat format) {
  const kt::FormatInfo& info = kt::format_info(format);
  at::ScalarType weights = at::kBFloat16;
  switch (info.storage) {
    case kt::WeightStorage::kBF16: weights = at::kBFloat16; break;
    case kt::WeightStorage::kInt8: weights = at::kChar; break;
    case kt::WeightStorage::kInt4: weights = at::kByte; break;
    // uint8 as int4's, not float8_e4m3fn: opcheck's schema check cannot run ops on float8
    // tensors, and the Meta kernels tell the two apart by their scales' dtype.
    case kt::WeightStorage::kFp8E4M3: weights = at::kByte; break;
  }
  const bool scaled = info.scales != kt::WeightScales::kNone;
  return {format,
          weights,
          8 * static_cast<int64_t>(c10::elementSize(weights)) / info.bits,
          scaled ? size_t(5) : size_t(3),
          info.scales,
          info.scales == kt::WeightScales::kPerBlock ? at::kBFloat16 : at::kFloat};
}

bool format_of_tensors(at::TensorList experts, FormatTensors* out) {
  // A format whose weights and scales both match; else one whose weights do (the caller's
  // count check then names what is missing).
  for (const bool scales_too : {true, false})
    for (kt::WeightFormat format : kt::weight_formats()) {
      const FormatTensors f = format_tensors(format);
      if (f.weights != experts[0].scalar_type()) continue;
      const bool scales_match = f.scales == kt::WeightScales::kNone
                                    ? experts.size() == f.count
                                    : experts.size() > 3 && experts[3].scalar_type() == f.scale_dtype;
      if (scales_too && !scales_match) continue;
      *out = f;
      return true;
    }
  return false;
}

}  // namespace kt_ops
