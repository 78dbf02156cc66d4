// The per-ISA kernels behind the registry's sets (kt/kernels.h), each ISA's in its own
// translation unit compiled for that ISA. Only the registry (kernel_sets.cpp) and the kernels'
// own files see these names; everything else calls through a KernelSet.
#pragma once

#include <cstdint>

#include "kt/kernels.h"

namespace kt {

// Portable reference (gemm_scalar.cpp): fp32 activations against bf16 or fp32 panels.
void gemm_scalar_f32(int64_t m, int64_t kp, const float* a, int64_t lda, const uint16_t* w, int64_t panels, float* c,
                     int64_t ldc, bool accumulate);
void gemm_scalar_f32_f32w(int64_t m, int64_t kp, const float* a, int64_t lda, const float* w, int64_t panels,
                          float* c, int64_t ldc, bool accumulate);
void rank_update_scalar(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda, const RankRows& b,
                        float* c, int64_t ldc);
void sigmoid_scalar(int64_t n, const float* x, float* out);
// fp32 activations: z and the fused gradient row are float.
void swiglu_forward_scalar(int64_t valid, int64_t cols, const float* acc, void* z, void* saved, DType saved_dtype,
                           int64_t g_at, int64_t u_at);
float swiglu_backward_scalar(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at, const float* q,
                             float w, void* z, void* fused);
// c[row, col] *= scales[col] for row < m, col < cols (a multiple of 16): per-channel scales.
void scale_columns_scalar(int64_t m, int64_t cols, const float* scales, float* c, int64_t ldc);
// The W8A8 kernels (kt/kernels.h's W8A8Kernels); the scalar path's transposition of codes is
// packing.h's pack_transposed_codes.
void quantize_rows_scalar(int64_t m, int64_t cols, const void* a, DType a_dtype, int64_t lda, const float* col_scales,
                          int8_t* q, int64_t ldq, float* row_scales);
void int8_gemm_scalar(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
                      const float* w_scales, int64_t panels, float* c, int64_t ldc);

// AVX2 + FMA (gemm_avx2.cpp): fp32 activations against bf16 panels.
void gemm_avx2_f32(int64_t m, int64_t kp, const float* a, int64_t lda, const uint16_t* w, int64_t panels, float* c,
                   int64_t ldc, bool accumulate);

// AVX-512-BF16 (gemm_avx512.cpp): bf16 activations; the vector epilogues are the AMX path's too.
void gemm_avx512_bf16(int64_t m, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* w, int64_t panels,
                      float* c, int64_t ldc, bool accumulate);

// AVX-512-BF16 panel conversions (panels_avx512.cpp): pack_transposed_panels, decode_panels and
// their int4 and fp8 twins (packing.h), and scale_columns_scalar's vector twin.
void pack_transposed_panels_avx512(const uint16_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                   int64_t panel_count, uint16_t* dst);
void pack_transposed_panels_int8_avx512(const int8_t* packed, const float* row_scales, int64_t np, int64_t kp,
                                        int64_t first_panel, int64_t panel_count, uint16_t* dst);
void pack_transposed_panels_int4_avx512(const uint8_t* packed, const uint16_t* block_scales, int64_t np, int64_t kp,
                                        int64_t first_panel, int64_t panel_count, uint16_t* dst);
void pack_transposed_panels_fp8_avx512(const uint8_t* packed, const float* tile_scales, int64_t np, int64_t kp,
                                       int64_t first_panel, int64_t panel_count, uint16_t* dst);
void decode_panels_avx512(const int8_t* packed, int64_t kp, int64_t panels, uint16_t* dst);
void decode_panels_fp8_avx512(const uint8_t* packed, const float* tile_scales, int64_t kp, int64_t panels,
                              uint16_t* dst);
void decode_panels_int4_avx512(const uint8_t* packed, const uint16_t* block_scales, int64_t kp, int64_t panels,
                               uint16_t* dst);
void scale_columns_avx512(int64_t m, int64_t cols, const float* scales, float* c, int64_t ldc);
void pack_transposed_codes_avx512(const int8_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                  int64_t panel_count, int8_t* dst);
void quantize_rows_avx512(int64_t m, int64_t cols, const void* a, DType a_dtype, int64_t lda, const float* col_scales,
                          int8_t* q, int64_t ldq, float* row_scales);
// int8_gemm with vpmaddwd on sign-extended codes (AVX-512BW: no VNNI needed).
void int8_gemm_avx512(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
                      const float* w_scales, int64_t panels, float* c, int64_t ldc);

void rank_update_avx512(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda, const RankRows& b,
                        float* c, int64_t ldc);
void sigmoid_avx512(int64_t n, const float* x, float* out);
void swiglu_forward_avx512(int64_t valid, int64_t cols, const float* acc, void* z, void* saved, DType saved_dtype,
                           int64_t g_at, int64_t u_at);
float swiglu_backward_avx512(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at, const float* q,
                             float w, void* z, void* fused);

// AMX-BF16 (gemm_amx.cpp): bf16 activations.
void gemm_amx_bf16(int64_t m, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* w, int64_t panels, float* c,
                   int64_t ldc, bool accumulate);
// AMX-INT8 (same file): int8_gemm with TDPBSSD.
void int8_gemm_amx(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
                   const float* w_scales, int64_t panels, float* c, int64_t ldc);

}  // namespace kt
