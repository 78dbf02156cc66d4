// AVX-512 conversions of packed panels (packing.h): the transposed panels the backward streams,
// and the int8 formats' decode to bf16 and per-channel scaling. Compiled for AVX-512-BF16 by the
// pragma below and only called when the CPU has it.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
// gcc 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm*_undefined_*().
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernel_impls.h"
#include "kt/packing.h"

namespace kt {
namespace {

// 32 consecutive packed elements as 32 bf16 in one register: bf16 as they are; int8 codes
// times their rows' scales (elements 0-15 times lo, 16-31 times hi), rounded to bf16 as
// f32_to_bf16 does (but for products below fp32's normal range, which vcvtne2ps2bf16 flushes
// to zero: only rows of max |w| < 1e-36 have them). With scales of 1 the codes convert exactly (|q| <= 127 needs 7
// significant bits, bf16 has 8).
inline __m512i load_bf16x32(const uint16_t* p, __m512, __m512) { return _mm512_loadu_si512(p); }
inline __m512i load_bf16x32(const int8_t* p, __m512 lo_scale, __m512 hi_scale) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), lo_scale);
  const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), hi_scale);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // lo fills words 0-15
}

// pack_transposed_panels with 512-bit moves. In 32-bit view a source block row holds, per
// column n, the pair (W[n][k], W[n][k+1]); an output row holds, per k, (W[n][k], W[n+1][k]).
// For each half-block (16 n by the 16 k of one output panel): within every 64-bit group of
// a source row, swap words 1 and 2; then transpose the 8x8 matrix of 64-bit groups across
// the 8 source rows. Output row i, group j = source row j, group i. A block row's element
// 2n + (k % 2) is of the panel's row n: its scale vectors are the panel's 16 scales, each twice.
template <typename T>
void transpose_panels(const T* packed, const float* row_scales, int64_t np, int64_t kp, int64_t first_panel,
                      int64_t panel_count, uint16_t* dst) {
  const int64_t src_blocks = kp / kBlockDepth, dst_blocks = np / kBlockDepth;
  alignas(64) static const uint16_t swap_words[32] = {0,  2,  1,  3,  4,  6,  5,  7,  8,  10, 9,
                                                      11, 12, 14, 13, 15, 16, 18, 17, 19, 20, 22,
                                                      21, 23, 24, 26, 25, 27, 28, 30, 29, 31};
  const __m512i swap = _mm512_load_si512(swap_words);
  const __m512i pairs_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i pairs_hi = _mm512_add_epi32(pairs_lo, _mm512_set1_epi32(8));
  // Source panels outermost: each one's blocks for this range of k are one contiguous run,
  // so the reads form two sequential streams. With output panels outermost they were 512-byte
  // pieces of every source panel in turn, more streams than the prefetchers follow.
  for (int64_t nb = 0; nb < dst_blocks; ++nb) {
    for (int64_t half = 0; half < 2; ++half) {
      const T* panel = packed + (2 * nb + half) * src_blocks * kBlockElems;
      __m512 lo_scale = _mm512_set1_ps(1.f), hi_scale = lo_scale;
      if (row_scales) {
        const __m512 s = _mm512_loadu_ps(row_scales + (2 * nb + half) * kPanelRows);
        lo_scale = _mm512_permutexvar_ps(pairs_lo, s);
        hi_scale = _mm512_permutexvar_ps(pairs_hi, s);
      }
      for (int64_t q = 0; q < panel_count; ++q) {
        const int64_t k0 = (first_panel + q) * kPanelRows;
        const T* src = panel + (k0 / kBlockDepth) * kBlockElems + ((k0 % kBlockDepth) / kPanelRows) * 8 * 32;
        __m512i r[8], t[8], u[4];
        for (int j = 0; j < 8; ++j) r[j] = _mm512_permutexvar_epi16(swap, load_bf16x32(src + j * 32, lo_scale, hi_scale));
        for (int j = 0; j < 8; j += 2) {
          t[j] = _mm512_unpacklo_epi64(r[j], r[j + 1]);
          t[j + 1] = _mm512_unpackhi_epi64(r[j], r[j + 1]);
        }
        uint16_t* o = dst + (q * dst_blocks + nb) * kBlockElems + half * 8 * 32;
        for (int odd = 0; odd < 2; ++odd) {  // even output rows from t0,2,4,6; odd from t1,3,5,7
          u[0] = _mm512_shuffle_i64x2(t[odd], t[2 + odd], 0x44);
          u[1] = _mm512_shuffle_i64x2(t[odd], t[2 + odd], 0xEE);
          u[2] = _mm512_shuffle_i64x2(t[4 + odd], t[6 + odd], 0x44);
          u[3] = _mm512_shuffle_i64x2(t[4 + odd], t[6 + odd], 0xEE);
          _mm512_storeu_si512(o + (0 + odd) * 32, _mm512_shuffle_i64x2(u[0], u[2], 0x88));
          _mm512_storeu_si512(o + (2 + odd) * 32, _mm512_shuffle_i64x2(u[0], u[2], 0xDD));
          _mm512_storeu_si512(o + (4 + odd) * 32, _mm512_shuffle_i64x2(u[1], u[3], 0x88));
          _mm512_storeu_si512(o + (6 + odd) * 32, _mm512_shuffle_i64x2(u[1], u[3], 0xDD));
        }
      }
    }
  }
}

}  // namespace

void pack_transposed_panels_avx512(const uint16_t* packed, const float* row_scales, int64_t np, int64_t kp,
                                   int64_t first_panel, int64_t panel_count, uint16_t* dst) {
  transpose_panels(packed, row_scales, np, kp, first_panel, panel_count, dst);
}

void pack_transposed_panels_avx512(const int8_t* packed, const float* row_scales, int64_t np, int64_t kp,
                                   int64_t first_panel, int64_t panel_count, uint16_t* dst) {
  transpose_panels(packed, row_scales, np, kp, first_panel, panel_count, dst);
}

// The codes 4 KiB ahead are prefetched: the int8 weight GEMM decodes a panel in 4 KiB pieces
// (256 deep) with products in between, and the hardware prefetchers stop at each 4 KiB page.
void decode_panels_avx512(const int8_t* packed, int64_t kp, int64_t panels, uint16_t* dst) {
  const int64_t n = panels * kPanelRows * kp;  // a multiple of 512
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(packed + i + 4096), _MM_HINT_T0);
    _mm512_storeu_si512(dst + i, load_bf16x32(packed + i, one, one));
    _mm512_storeu_si512(dst + i + 32, load_bf16x32(packed + i + 32, one, one));
  }
}

void scale_columns_avx512(int64_t m, int64_t cols, const float* scales, float* c, int64_t ldc) {
  for (int64_t row = 0; row < m; ++row)
    for (int64_t col = 0; col < cols; col += 16) {
      float* p = c + row * ldc + col;
      _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(scales + col)));
    }
}

}  // namespace kt
#pragma GCC pop_options
