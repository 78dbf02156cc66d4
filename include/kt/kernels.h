// The kernel registry: for every weight format, the complete sets of kernels that compute
// with it, one per ISA, ordered best first and ending in the portable scalar reference. An
// op call takes the first set its CPU (and the KT_OPS_MAX_ISA cap) can run. A set has every
// entry filled, so the driver (kt/moe_sft.h) calls through it without asking which ISA it
// is on; adding a format is its kernels plus its sets here.
#pragma once

#include <cstdint>
#include <vector>

#include "kt/bf16.h"
#include "kt/isa.h"
#include "kt/weight_format.h"

namespace kt {

// The long rows of a rank update, read in place: row p is rows[p] (dtype `dtype`), and its
// column col is element (col / 16) * chunk_stride + col % 16 - chunk_stride 16 for a dense
// row, 32 for the gate or the up half of a fused gate/up row (interleaved 16-column panels).
struct RankRows {
  const void* const* rows;
  DType dtype;
  int64_t chunk_stride;
};

// A GEMM against panels in the packed layout (packing.h):
//   C[m, 16*p + c] (+)= sum_k A[m, k] * W[16*p + c, k]   for m < M, p < panels, c < 16
// A is M x kp in the set's activation type (row stride lda, columns past the real depth
// zero), the panels are consecutive in `w`, C is fp32 with row stride ldc. M must be a
// multiple of 16.
using GemmFn = void (*)(int64_t m, int64_t kp, const void* a, int64_t lda, const void* w, int64_t panels, float* c,
                        int64_t ldc, bool accumulate);

// fp32 C[j, col] += sum_p A[p, j] * B_p[col] for j < rows, col < n, p < depth, p ascending: a
// block of rank-1 updates, the LoRA-gradient reductions over routed pairs. A[p, j] =
// a[p * lda + j], C[j, col] = c[j * ldc + col], B_p is row p of b.
using RankUpdateFn = void (*)(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda,
                              const RankRows& b, float* c, int64_t ldc);

// C = A W^T against the format's packed weights W (the dequantized weights of the format's
// codes and `scales`, laid out as kt/weight_format.h's WeightScales says; null for bf16):
// C[m, 16*p + c] = sum_k A[m, k] * W[16*p + c, k], A as for GemmFn, C overwritten.
using WeightGemmFn = void (*)(int64_t m, int64_t kp, const void* a, int64_t lda, const void* w, const void* scales,
                              int64_t panels, float* c, int64_t ldc);

// pack_transposed_panels (packing.h) of the set's packed weights, as bf16 panels for the set's
// panel GEMM (the transposed product dX = dY W): the dequantized weights of the codes and
// `scales` as for WeightGemmFn.
using PackTransposedFn = void (*)(const void* packed, const void* scales, int64_t np, int64_t kp,
                                  int64_t first_panel, int64_t panel_count, uint16_t* dst);

// out[i] = 1 / (1 + exp(-x[i])) for i < n (SiLU and its gradient).
using SigmoidFn = void (*)(int64_t n, const float* x, float* out);

// The forward's SwiGLU epilogue for one routed pair. `acc` holds `cols` (a multiple of 16)
// intermediate columns as interleaved 16-column gate and up panels (packing.h's
// gate_up_column). Writes z = silu(g) * u in the set's activation type to z[0, cols) (zero
// past `valid`), and g and u to the saved activations: elements [g_at, g_at + valid) and
// [u_at, u_at + valid) of `saved` (dtype saved_dtype). silu(g) is g times the set's sigmoid.
using SwigluForwardFn = void (*)(int64_t valid, int64_t cols, const float* acc, void* z, void* saved,
                                 DType saved_dtype, int64_t g_at, int64_t u_at);

// The backward's SwiGLU step for one routed pair: from the saved g = saved[at, at + I) and
// u = saved[at + I, at + 2I) (dtype saved_dtype), the gradient q of z and the routing weight
// w, writes z = silu(g) * u to z[0, I) and the fused gradient row (dg = w q u sg (1 + g (1 -
// sg)), du = w q silu(g), as interleaved 16-column panels, zero past I) to fused[0, 2 ip), both
// in the set's activation type; returns z . q (the routing weight's gradient).
using SwigluBackwardFn = float (*)(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at,
                                   const float* q, float w, void* z, void* fused);

struct KernelSet {
  const char* name;  // the path's name, kt.isa() reports it: "amx", "avx512", "avx2", "scalar"
  Isa isa;           // the least ISA it runs on
  WeightFormat format;
  // What the GEMMs take as activations: kBF16 (AMX, AVX-512-BF16: rounded to bf16 on the way
  // in) or kF32 (AVX2, scalar: exact fp32). Every activation buffer of the driver is of it.
  DType activations;
  WeightGemmFn weight_gemm;  // against the packed expert weights
  GemmFn panel_gemm;         // against bf16 panels (pack_transposed's)
  GemmFn operand_gemm;       // against operands packed per call in the activation type (LoRA)
  PackTransposedFn pack_transposed;
  RankUpdateFn rank_update;
  SigmoidFn sigmoid;
  SwigluForwardFn swiglu_forward;
  SwigluBackwardFn swiglu_backward;
};

// Every format this build has: each has kernel sets ending in the scalar reference.
const std::vector<WeightFormat>& weight_formats();

// The sets of `format`, best first; the last is the scalar reference. Empty for a code that is
// no format.
const std::vector<const KernelSet*>& kernel_sets(WeightFormat format);

// The first set of `format` that runs on `isa`: the path an op takes; null when there is none.
const KernelSet* select_kernels(Isa isa, WeightFormat format);

}  // namespace kt
