#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "kt/bf16.h"

namespace kt_test {

inline std::vector<kt::bf16> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<kt::bf16> v(n);
  for (auto& x : v) x = kt::f32_to_bf16(dist(gen));
  return v;
}

}  // namespace kt_test
