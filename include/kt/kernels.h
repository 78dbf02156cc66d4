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

// W8A8 (int8 experts only): the int8 products of the forward and of the input gradients, as
// kt_ops.reference.moe_sft_w8a8_reference defines them. Rows of activations are quantized
// per row (quantize_rows), multiplied by the int8 codes with exact int32 sums (int8_gemm),
// and the sums scaled back in fp32.
//
// quantize_rows: for r < m, v = a[r, c] * col_scales[c] (fp32; col_scales null: 1) over
// c < cols, amax = max |v|, q[r, c] = clamp(round_even(v * (127 / amax)), -127, 127) and
// row_scales[r] = amax / 127 (both 0 for a row of zeros); q[r, c] = 0 for c in [cols,
// round_up(cols, 64)), which the AMX tiles read 64 at a time. a has dtype a_dtype.
using QuantizeRowsFn = void (*)(int64_t m, int64_t cols, const void* a, DType a_dtype, int64_t lda,
                                const float* col_scales, int8_t* q, int64_t ldq, float* row_scales);

// C[m, 16*p + c] = float(sum_k A[m, k] * W[16*p + c, k]) * a_scales[m] * w_scales[16*p + c]
// (w_scales null: 1), left to right, for m < M (a multiple of 16), p < panels: int8 A (row
// stride lda) against int8 codes in the packed layout (packing.h), depth kp, C overwritten.
// A is read up to round_up(kp, 64) columns; the products past kp are zero.
using Int8GemmFn = void (*)(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales,
                            const int8_t* w, const float* w_scales, int64_t panels, float* c, int64_t ldc);

// pack_transposed_panels (packing.h) of int8 codes, as codes: the panels of W^T for the input
// gradient's int8 product.
using PackTransposedCodesFn = void (*)(const int8_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                       int64_t panel_count, int8_t* dst);

struct W8A8Kernels {
  QuantizeRowsFn quantize_rows;
  Int8GemmFn int8_gemm;
  PackTransposedCodesFn pack_transposed_codes;
};

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
  // Null for weight-only numerics; the W8A8 sets of int8 (kernel_sets(kInt8, true)) have it.
  const W8A8Kernels* w8a8 = nullptr;
};

// Every format this build has: each has kernel sets ending in the scalar reference.
const std::vector<WeightFormat>& weight_formats();

// The sets of `format`, best first; the last is the scalar reference. Empty for a code that is
// no format. With w8a8, the sets that quantize the activations too (only int8 has them; empty
// for the other formats).
const std::vector<const KernelSet*>& kernel_sets(WeightFormat format, bool w8a8 = false);

// The first set of `format` (and numerics) that runs on `isa`: the path an op takes; null
// when there is none.
const KernelSet* select_kernels(Isa isa, WeightFormat format, bool w8a8 = false);

}  // namespace kt
