// Run-time ISA selection. The build never assumes the host CPU: each ISA's kernels live in
// their own translation unit compiled for that ISA, and the best one the CPU (and the
// KT_OPS_MAX_ISA cap) allows is picked when an op runs.
#pragma once

#include <cstdint>
#include <string>

namespace kt {

// Ordered from least to most capable; the order is what the cap compares.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2, kAmx = 3 };

const char* isa_name(Isa isa);

// Parses "scalar", "avx2", "avx512" (or "avx512_bf16"), "amx". Returns false for anything else.
bool parse_isa(const std::string& name, Isa* out);

// Best ISA this CPU and OS support (AMX only once the kernel granted tile data permission).
Isa best_supported_isa();

bool isa_supported(Isa isa);

// The ISA in use: the best supported one, capped by `cap` when it is non-empty.
// Throws std::invalid_argument naming the valid values when `cap` is not one of them.
Isa select_isa(const char* cap);

}  // namespace kt
