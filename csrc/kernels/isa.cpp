#include "kt/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <stdexcept>


namespace kt {
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data state

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::kScalar;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12);
  if (!osxsave) return Isa::kScalar;
  const uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xe6) == 0xe6;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::kScalar;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31), amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24),
             amx_int8 = d & (1u << 25);
  __get_cpuid_count(7, 1, &a, &b, &c, &d);
  const bool avx512_bf16 = a & (1u << 5);

  const bool has_avx2 = os_avx && avx2 && fma;
  const bool has_avx512 = has_avx2 && os_avx512 && avx512f && avx512bw && avx512vl && avx512_bf16;
  // Linux hands out the tile state only to processes that ask for it.
  const bool has_amx = has_avx512 && os_amx && amx_tile && amx_bf16 && amx_int8 &&
                       syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  if (has_amx) return Isa::kAmx;
  if (has_avx512) return Isa::kAvx512Bf16;
  if (has_avx2) return Isa::kAvx2;
  return Isa::kScalar;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
  }
  return "unknown";
}

bool parse_isa(const std::string& name, Isa* out) {
  if (name == "amx") *out = Isa::kAmx;
  else if (name == "avx512" || name == "avx512_bf16") *out = Isa::kAvx512Bf16;
  else if (name == "avx2") *out = Isa::kAvx2;
  else if (name == "scalar") *out = Isa::kScalar;
  else return false;
  return true;
}

Isa best_supported_isa() {
  static const Isa best = detect();
  return best;
}

bool isa_supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(best_supported_isa()); }

Isa select_isa(const char* cap) {
  const Isa best = best_supported_isa();
  if (cap == nullptr || *cap == '\0') return best;
  Isa limit;
  if (!parse_isa(cap, &limit))
    throw std::invalid_argument(std::string("KT_OPS_MAX_ISA must be one of amx, avx512, avx2, scalar; got '") +
                                cap + "'");
  return static_cast<int>(limit) < static_cast<int>(best) ? limit : best;
}

}  // namespace kt
