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

// Address of element `offset` of `base` (dtype dt).
inline const void* element_at(const void* base, DType dt, int64_t offset) {
  return static_cast<const char*>(base) + offset * (dt == DType::kF32 ? 4 : 2);
}

// n values from element `offset` of `base` (dtype dt) as fp32. Whole rows at a time, so the
// dtype is decided once and the conversion loop vectorises.
inline void load_f32(const void* base, DType dt, int64_t offset, int64_t n, float* out) {
  if (dt == DType::kF32) {
    std::memcpy(out, static_cast<const float*>(base) + offset, sizeof(float) * n);
    return;
  }
  const bf16* p = static_cast<const bf16*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
}

inline void store_f32(void* base, DType dt, int64_t offset, int64_t n, const float* in) {
  if (dt == DType::kF32) {
    std::memcpy(static_cast<float*>(base) + offset, in, sizeof(float) * n);
    return;
  }
  bf16* p = static_cast<bf16*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(in[i]);
}

}  // namespace kt
