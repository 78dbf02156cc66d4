// bf16 <-> fp32 conversion shared by every kernel path. bf16 values are carried as raw
// uint16_t so the kernel core needs no torch or compiler-specific bf16 type.
#pragma once

#include <cstdint>
#include <cstring>

namespace kt {

using bf16 = uint16_t;

inline float bf16_to_f32(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, like torch's float -> bfloat16 conversion; NaN stays a quiet NaN.
inline bf16 f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

// Element type tag for activations crossing the kernel boundary.
enum class DType { kBF16, kF32 };

inline float load_as_f32(const void* base, DType dt, int64_t i) {
  return dt == DType::kBF16 ? bf16_to_f32(static_cast<const bf16*>(base)[i])
                            : static_cast<const float*>(base)[i];
}

inline void store_from_f32(void* base, DType dt, int64_t i, float v) {
  if (dt == DType::kBF16)
    static_cast<bf16*>(base)[i] = f32_to_bf16(v);
  else
    static_cast<float*>(base)[i] = v;
}

}  // namespace kt
