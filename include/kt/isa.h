// Run-time ISA selection. The build never assumes the host CPU: each ISA's kernels live in
// their own translation unit compiled for that ISA, and the best one the CPU (and the
// KT_OPS_MAX_ISA cap) allows is picked when an op runs.
#pragma once

#include <cstdint>
#include <string>

#include "kt/bf16.h"

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

// The long rows of a rank update, read in place: row p is rows[p] (dtype `dtype`), and its
// column col is element (col / 16) * chunk_stride + col % 16 - chunk_stride 16 for a dense
// row, 32 for the gate or the up half of a fused gate/up row (interleaved 16-column panels).
struct RankRows {
  const void* const* rows;
  DType dtype;
  int64_t chunk_stride;
};

// fp32 C[j, col] += sum_p A[p, j] * B_p[col] for j < rows, col < n, p < depth, p ascending: a
// block of rank-1 updates, the LoRA-gradient reductions over routed pairs. A[p, j] =
// a[p * lda + j], C[j, col] = c[j * ldc + col], B_p is row p of b.
using RankUpdateFn = void (*)(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda,
                              const RankRows& b, float* c, int64_t ldc);

// pack_transposed_panels (packing.h) for one ISA.
using PackTransposedFn = void (*)(const uint16_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                  int64_t panel_count, uint16_t* dst);

// out[i] = 1 / (1 + exp(-x[i])) for i < n (SiLU and its gradient).
using SigmoidFn = void (*)(int64_t n, const float* x, float* out);

// The forward's gate/up epilogue for one routed pair, on the bf16-activation paths. `acc` holds
// `cols` (a multiple of 16) intermediate columns as interleaved 16-column gate and up panels
// (packing.h's gate_up_column). Writes z = silu(g) * u as bf16 to z[0, cols) (zero past
// `valid`), and g and u to the saved activations: elements [g_at, g_at + valid) and
// [u_at, u_at + valid) of `saved` (dtype saved_dtype). Same values as the scalar epilogue.
using GateUpEpilogueFn = void (*)(int64_t valid, int64_t cols, const float* acc, uint16_t* z, void* saved,
                                  DType saved_dtype, int64_t g_at, int64_t u_at);

// The backward's silu step for one routed pair, on the bf16-activation paths: from the saved
// g = saved[at, at + I) and u = saved[at + I, at + 2I) (dtype saved_dtype), the gradient q of
// z and the routing weight w, writes z = silu(g) * u to z[0, I) and the fused gradient row
// (dg = w q u sg (1 + g (1 - sg)), du = w q silu(g), as interleaved 16-column panels,
// zero past I) to fused[0, 2 ip) as bf16; returns z . q (the routing weight's gradient).
using SiluGradFn = float (*)(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at,
                             const float* q, float w, uint16_t* z, uint16_t* fused);

// A GEMM against packed weights (see packing.h):
//   C[m, 16*p + c] (+)= sum_k A[m, k] * W[16*p + c, k]   for m < M, p < panels, c < 16
// A is M x kp (row stride lda, columns past the real depth zero), the panels are
// consecutive in `w`, C is fp32 with row stride ldc. M must be a multiple of 16.
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
  RankUpdateFn rank_update;
  SigmoidFn sigmoid;
  PackTransposedFn pack_transposed;
  GateUpEpilogueFn gate_up_epilogue;  // null when bf16_activations is false
  SiluGradFn silu_grad;               // null when bf16_activations is false
};

const Kernels& kernels_for(Isa isa);

// Per-ISA GEMMs, each defined in its own translation unit.
void gemm_scalar_bf16(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                      float*, int64_t, bool);
void gemm_scalar_f32(int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*,
                     int64_t, bool);
void rank_update_scalar(int64_t, int64_t, int64_t, const float*, int64_t, const RankRows&, float*, int64_t);
void pack_transposed_panels_avx512(const uint16_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                   int64_t panel_count, uint16_t* dst);
void sigmoid_scalar(int64_t n, const float* x, float* out);
void sigmoid_avx512(int64_t n, const float* x, float* out);
void gate_up_epilogue_avx512(int64_t valid, int64_t cols, const float* acc, uint16_t* z, void* saved,
                             DType saved_dtype, int64_t g_at, int64_t u_at);
float silu_grad_avx512(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at, const float* q,
                       float w, uint16_t* z, uint16_t* fused);
void rank_update_avx512(int64_t, int64_t, int64_t, const float*, int64_t, const RankRows&, float*, int64_t);
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
