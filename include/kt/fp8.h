// fp8 e4m3 (the "fn" variant: no infinities, NaN only at S.1111.111), as the fp8 checkpoints
// of DeepSeek-V3, Kimi-K2 and Qwen3-FP8 store their weights: 1 sign bit, 4 exponent bits with
// bias 7, 3 mantissa bits; largest finite magnitude 448, smallest 2^-9 (a subnormal).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace kt {

constexpr float kFp8Max = 448.f;

// The value of e4m3 code `code`, exactly.
inline float fp8_to_f32(uint8_t code) {
  const int exponent = (code >> 3) & 0xf, mantissa = code & 7;
  if (exponent == 0xf && mantissa == 7) return std::numeric_limits<float>::quiet_NaN();
  // Normal: 1.m * 2^(e - 7) = (8 + m) * 2^(e - 10); subnormal (e = 0): 0.m * 2^-6 = m * 2^-9.
  const float magnitude = exponent ? std::ldexp(static_cast<float>(8 + mantissa), exponent - 10)
                                   : std::ldexp(static_cast<float>(mantissa), -9);
  return code & 0x80 ? -magnitude : magnitude;
}

// True for the two NaN codes, which no weight may hold (the kernels decode codes without
// asking, and would read them as 480).
inline bool fp8_is_nan(uint8_t code) { return (code & 0x7f) == 0x7f; }

// The e4m3 code nearest x (ties to even), x clamped to [-448, 448] first: kt_ops quantizes
// with scales that put a block's largest magnitude at 448, and a quotient a rounding above it
// must not become NaN. NaN stays NaN.
inline uint8_t f32_to_fp8(float x) {
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const float a = std::fmin(std::fabs(x), kFp8Max);
  // Codes count up with the magnitude: below 2^-6 they are multiples of 2^-9 (code = the
  // multiple, 8 being 2^-6 itself); from 2^(E) with E >= -6, 8 codes per binade, each step
  // 2^(E-3). A mantissa that rounds up to 16 is the next binade's first code.
  if (a < 0x1p-6f) return sign | static_cast<uint8_t>(std::nearbyint(a * 512.f));
  int e2;
  std::frexp(a, &e2);  // a = f * 2^e2, f in [0.5, 1): the binade is 2^(e2 - 1)
  const int binade = e2 - 1;
  const int steps = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - binade)));  // in [8, 16]
  return sign | static_cast<uint8_t>(((binade + 7) << 3) + steps - 8);
}

}  // namespace kt
