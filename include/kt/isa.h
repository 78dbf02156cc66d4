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

// A GEMM against packed weights (see packing.h):
//   C[m, 16*p + c] (+)= sum_k A[m, k] * W[16*p + c, k]   for m < M, p < panels, c < 16
// A is M x kp (row stride lda, columns past the real depth zero), the panels are
// consecutive in `w`, C is fp32 with row stride ldc. M must be a multiple of 16.
// y[i] += a * x[i] for i < n (fp32): the LoRA-gradient reductions.
using AxpyFn = void (*)(int64_t n, float a, const float* x, float* y);

template <typename Act>
using GemmFn = void (*)(int64_t m, int64_t kp, const Act* a, int64_t lda, const uint16_t* w,
                        int64_t panels, float* c, int64_t ldc, bool accumulate);

struct Kernels {
  Isa isa;
  // The GEMMs of one ISA take activations either as bf16 (AMX, AVX-512-BF16: activations
  // are rounded to bf16 on the way in) or as fp32 (AVX2, scalar: exact fp32 activations).
  bool bf16_activations;
  GemmFn<uint16_t> gemm_bf16;  // null when bf16_activations is false
  GemmFn<float> gemm_f32;      // null when bf16_activations is true
  AxpyFn axpy;
};

const Kernels& kernels_for(Isa isa);

// Per-ISA GEMMs, each defined in its own translation unit.
void gemm_scalar_bf16(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                      float*, int64_t, bool);
void gemm_scalar_f32(int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*,
                     int64_t, bool);
void axpy_scalar(int64_t n, float a, const float* x, float* y);
void axpy_avx2(int64_t n, float a, const float* x, float* y);
void axpy_avx512(int64_t n, float a, const float* x, float* y);
// fp32 weights in the same packed layout (LoRA on the fp32 paths).
void gemm_scalar_f32_f32w(int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                          int64_t, bool);
void gemm_avx2_f32(int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*,
                   int64_t, bool);
void gemm_avx512_bf16(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                      float*, int64_t, bool);
void gemm_amx_bf16(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*,
                   int64_t, bool);

}  // namespace kt
