// AVX2 + FMA GEMM: fp32 activations, bf16 weights widened in registers. Compiled for AVX2
// by the pragma below and only called when the CPU has it. No standard-library templates
// are instantiated here, so no AVX2 copy of a shared inline function can leak to callers.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "kernel_impls.h"
#include "kt/packing.h"

namespace kt {
namespace {

constexpr int kRows = 4;  // 4 rows x 16 columns = 8 ymm accumulators

void panel_rows(int64_t blocks, const float* a, int64_t lda, const uint16_t* panel, float* c,
                int64_t ldc, bool accumulate) {
  __m256 lo[kRows], hi[kRows];
  for (int r = 0; r < kRows; ++r) {
    lo[r] = accumulate ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
    hi[r] = accumulate ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_setzero_ps();
  }
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* block = panel + b * kBlockElems;
    for (int pair = 0; pair < kBlockDepth / 2; ++pair) {
      // Each 32-bit lane holds (W[n][2j], W[n][2j+1]); shifting / masking widens each half.
      const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + pair * 32));
      const __m256i w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + pair * 32 + 16));
      const __m256 even_lo = _mm256_castsi256_ps(_mm256_slli_epi32(w_lo, 16));
      const __m256 odd_lo = _mm256_castsi256_ps(_mm256_and_si256(w_lo, high_half));
      const __m256 even_hi = _mm256_castsi256_ps(_mm256_slli_epi32(w_hi, 16));
      const __m256 odd_hi = _mm256_castsi256_ps(_mm256_and_si256(w_hi, high_half));
      const int64_t k = b * kBlockDepth + 2 * pair;
      for (int r = 0; r < kRows; ++r) {
        const __m256 a0 = _mm256_broadcast_ss(a + r * lda + k);
        const __m256 a1 = _mm256_broadcast_ss(a + r * lda + k + 1);
        lo[r] = _mm256_fmadd_ps(a1, odd_lo, _mm256_fmadd_ps(a0, even_lo, lo[r]));
        hi[r] = _mm256_fmadd_ps(a1, odd_hi, _mm256_fmadd_ps(a0, even_hi, hi[r]));
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}

}  // namespace

void gemm_avx2_f32(int64_t m, int64_t kp, const float* a, int64_t lda, const uint16_t* w,
                   int64_t panels, float* c, int64_t ldc, bool accumulate) {
  const int64_t blocks = kp / kBlockDepth;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t row = 0; row < m; row += kRows)
      panel_rows(blocks, a + row * lda, lda, w + p * blocks * kBlockElems,
                 c + row * ldc + p * kPanelRows, ldc, accumulate);
}

}  // namespace kt
#pragma GCC pop_options
