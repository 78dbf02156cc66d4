#pragma once

#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kt/bf16.h"
#include "kt/kernels.h"

namespace kt_test {

inline std::vector<kt::bf16> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<kt::bf16> v(n);
  for (auto& x : v) x = kt::f32_to_bf16(dist(gen));
  return v;
}

// One kernel set of the registry, as a test parameter.
struct KernelSetParam {
  const kt::KernelSet* set;
};

// Every set of every format.
inline std::vector<KernelSetParam> all_kernel_sets() {
  std::vector<KernelSetParam> out;
  for (kt::WeightFormat format : kt::weight_formats())
    for (const kt::KernelSet* set : kt::kernel_sets(format)) out.push_back({set});
  return out;
}

// "bf16_amx": the set's format and path, as test names take them.
inline std::string set_name(const KernelSetParam& p) {
  return std::string(kt::format_name(p.set->format)) + "_" + p.set->name;
}

inline void PrintTo(const KernelSetParam& p, std::ostream* os) { *os << set_name(p); }

// The scalar reference of the set's format: the last of its sets.
inline const kt::KernelSet& reference_of(const kt::KernelSet& set) { return *kt::kernel_sets(set.format).back(); }

}  // namespace kt_test
