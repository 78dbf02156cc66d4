// AVX-512-BF16 GEMM: one packed block row is exactly one vdpbf16ps operand (16 columns x
// one pair of reduction steps); each activation pair is broadcast as a 32-bit lane.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>

#include <cstring>

#include "kt/isa.h"
#include "kt/packing.h"

namespace kt {
namespace {

constexpr int kRows = 8;  // 8 rows x up to 2 panels = 16 zmm accumulators

template <int Panels>
void tile(int64_t blocks, const uint16_t* a, int64_t lda, const uint16_t* w, float* c,
          int64_t ldc, bool accumulate) {
  __m512 acc[kRows][Panels];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < Panels; ++p)
      acc[r][p] = accumulate ? _mm512_loadu_ps(c + r * ldc + p * kPanelRows) : _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int pair = 0; pair < kBlockDepth / 2; ++pair) {
      __m512i wv[Panels];
      for (int p = 0; p < Panels; ++p)
        wv[p] = _mm512_loadu_si512(w + (p * blocks + b) * kBlockElems + pair * 32);
      const int64_t k = b * kBlockDepth + 2 * pair;
      for (int r = 0; r < kRows; ++r) {
        int32_t a_pair;
        std::memcpy(&a_pair, a + r * lda + k, sizeof a_pair);
        const __m512i av = _mm512_set1_epi32(a_pair);
        for (int p = 0; p < Panels; ++p)
          acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)av, (__m512bh)wv[p]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < Panels; ++p) _mm512_storeu_ps(c + r * ldc + p * kPanelRows, acc[r][p]);
}

}  // namespace

void gemm_avx512_bf16(int64_t m, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* w,
                      int64_t panels, float* c, int64_t ldc, bool accumulate) {
  const int64_t blocks = kp / kBlockDepth;
  for (int64_t p = 0; p < panels; p += 2) {
    const uint16_t* wp = w + p * blocks * kBlockElems;
    for (int64_t row = 0; row < m; row += kRows) {
      if (p + 2 <= panels)
        tile<2>(blocks, a + row * lda, lda, wp, c + row * ldc + p * kPanelRows, ldc, accumulate);
      else
        tile<1>(blocks, a + row * lda, lda, wp, c + row * ldc + p * kPanelRows, ldc, accumulate);
    }
  }
}

void axpy_avx512(int64_t n, float a, const float* x, float* y) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
  _mm512_mask_storeu_ps(y + i, tail, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(tail, x + i), _mm512_maskz_loadu_ps(tail, y + i)));
}

}  // namespace kt
#pragma GCC pop_options
