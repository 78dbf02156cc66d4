// AVX-512 conversions of packed panels (packing.h): the transposed panels the backward streams,
// the quantized formats' (int8, int4, fp8) decode to bf16, and int8's per-channel scaling. Compiled for AVX-512-BF16 by the
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

// 32 int8 codes as 32 bf16 in one register: the codes times their rows' scales (codes 0-15
// times lo, 16-31 times hi), rounded to bf16 as f32_to_bf16 does (but for products below
// fp32's normal range, which vcvtne2ps2bf16 flushes to zero: only rows of max |w| < 1e-36 have
// them). With scales of 1 the codes convert exactly (|q| <= 127 needs 7 significant bits).
inline __m512i codes_to_bf16x32(__m256i q, __m512 lo_scale, __m512 hi_scale) {
  const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), lo_scale);
  const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), hi_scale);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // lo fills words 0-15
}

// 32 int4 codes (16 bytes, element 2i in the low half of byte i) as 32 sign-extended int8.
inline __m256i int4_codes(const uint8_t* p) {
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i pairs = _mm256_or_si256(_mm256_and_si256(bytes, _mm256_set1_epi16(0x0f)),
                                        _mm256_slli_epi16(_mm256_srli_epi16(bytes, 4), 8));
  const __m256i eight = _mm256_set1_epi8(8);
  return _mm256_sub_epi8(_mm256_xor_si256(pairs, eight), eight);
}

// 16 fp8 e4m3 codes (kt/fp8.h) as the fp16 bits of the codes' values times 2^-8: an e4m3
// code's exponent and mantissa bits shifted into an fp16's exponent and mantissa fields are
// that, subnormals included (both formats' subnormals keep the exponent field 0). Sign-extended
// to 16 bits and shifted left by 7, a code has its sign in bits 15 and 14 and its exponent and
// mantissa in bits 13-7; bit 14 (the top of fp16's exponent) is cleared. 256-bit integer steps,
// which run on more ports than 512-bit ones.
inline __m256i fp8_to_fp16_bits(const uint8_t* p) {
  const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(static_cast<short>(0xbf80)));
}

// 32 fp8 codes times `scale_times_256` / 256 (the 2^-8 above goes into the scale, exactly), as
// 32 bf16 rounded as f32_to_bf16 does (but for products below fp32's normal range, as
// codes_to_bf16x32). The NaN codes, which no packed weights hold, read as 480.
inline __m512i fp8_to_bf16x32(const uint8_t* p, __m512 scale_times_256) {
  const __m512 lo = _mm512_mul_ps(_mm512_cvtph_ps(fp8_to_fp16_bits(p)), scale_times_256);
  const __m512 hi = _mm512_mul_ps(_mm512_cvtph_ps(fp8_to_fp16_bits(p + 16)), scale_times_256);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// 16 bf16 as 16 fp32.
inline __m512 bf16x16_to_ps(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// A block row's element 2n + (k % 2) is of the block's row n: the scale vectors of a block are
// its 16 rows' scales, each twice (lo for rows 0-7, hi for rows 8-15).
struct PairScales {
  __m512 lo, hi;
  explicit PairScales(__m512 rows)
      : lo(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), rows)),
        hi(_mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15),
                                 rows)) {}
};

// The packed matrices the transposition reads, each as 32 elements at a time in bf16 (the
// dequantized weights) and the scales of block `block` of panel `panel`.
struct Bf16Source {
  const uint16_t* packed;
  __m512i load(int64_t elem, const PairScales&) const { return _mm512_loadu_si512(packed + elem); }
  PairScales scales(int64_t, int64_t) const { return PairScales(_mm512_set1_ps(1.f)); }
};
struct Int8Source {  // per-channel fp32 scales, one per row of the matrix
  const int8_t* packed;
  const float* row_scales;
  __m512i load(int64_t elem, const PairScales& s) const {
    return codes_to_bf16x32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + elem)), s.lo, s.hi);
  }
  PairScales scales(int64_t panel, int64_t) const {
    return PairScales(row_scales ? _mm512_loadu_ps(row_scales + panel * kPanelRows) : _mm512_set1_ps(1.f));
  }
};
struct Int4Source {  // bf16 scales per row of each block, `blocks` blocks per panel
  const uint8_t* packed;
  const uint16_t* block_scales;
  int64_t blocks;
  __m512i load(int64_t elem, const PairScales& s) const { return codes_to_bf16x32(int4_codes(packed + elem / 2), s.lo, s.hi); }
  PairScales scales(int64_t panel, int64_t block) const {
    return PairScales(bf16x16_to_ps(block_scales + (panel * blocks + block) * kPanelRows));
  }
};

struct CodesSource {  // int8 codes as themselves, sign-extended to 16 bits
  const int8_t* packed;
  __m512i load(int64_t elem, const PairScales&) const {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + elem)));
  }
  PairScales scales(int64_t, int64_t) const { return PairScales(_mm512_setzero_ps()); }
};

struct Fp8Source {  // fp32 scales per block (tile), `blocks` blocks per panel
  const uint8_t* packed;
  const float* tile_scales;
  int64_t blocks;
  __m512i load(int64_t elem, const PairScales& s) const {
    return fp8_to_bf16x32(packed + elem, s.lo);
  }
  PairScales scales(int64_t panel, int64_t block) const {
    return PairScales(_mm512_set1_ps(tile_scales[panel * blocks + block] * 256.f));
  }
};

// 32 elements of 16 bits to an output panel: as they are, or narrowed back to the int8 codes.
inline void store32(uint16_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
inline void store32(int8_t* p, __m512i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi16_epi8(v));
}

// pack_transposed_panels with 512-bit moves. In 32-bit view a source block row holds, per
// column n, the pair (W[n][k], W[n][k+1]); an output row holds, per k, (W[n][k], W[n+1][k]).
// For each half-block (16 n by the 16 k of one output panel): within every 64-bit group of
// a source row, swap words 1 and 2; then transpose the 8x8 matrix of 64-bit groups across
// the 8 source rows. Output row i, group j = source row j, group i.
template <typename Source, typename Out>
void transpose_panels(const Source& source, int64_t np, int64_t kp, int64_t first_panel, int64_t panel_count,
                      Out* dst) {
  const int64_t src_blocks = kp / kBlockDepth, dst_blocks = np / kBlockDepth;
  alignas(64) static const uint16_t swap_words[32] = {0,  2,  1,  3,  4,  6,  5,  7,  8,  10, 9,
                                                      11, 12, 14, 13, 15, 16, 18, 17, 19, 20, 22,
                                                      21, 23, 24, 26, 25, 27, 28, 30, 29, 31};
  const __m512i swap = _mm512_load_si512(swap_words);
  // Source panels outermost: each one's blocks for this range of k are one contiguous run,
  // so the reads form two sequential streams. With output panels outermost they were 512-byte
  // pieces of every source panel in turn, more streams than the prefetchers follow.
  for (int64_t nb = 0; nb < dst_blocks; ++nb) {
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t panel = 2 * nb + half;
      for (int64_t q = 0; q < panel_count; ++q) {
        const int64_t k0 = (first_panel + q) * kPanelRows, block = k0 / kBlockDepth;
        const int64_t src = (panel * src_blocks + block) * kBlockElems + ((k0 % kBlockDepth) / kPanelRows) * 8 * 32;
        const PairScales scales = source.scales(panel, block);
        __m512i r[8], t[8], u[4];
        for (int j = 0; j < 8; ++j) r[j] = _mm512_permutexvar_epi16(swap, source.load(src + j * 32, scales));
        for (int j = 0; j < 8; j += 2) {
          t[j] = _mm512_unpacklo_epi64(r[j], r[j + 1]);
          t[j + 1] = _mm512_unpackhi_epi64(r[j], r[j + 1]);
        }
        Out* o = dst + (q * dst_blocks + nb) * kBlockElems + half * 8 * 32;
        for (int odd = 0; odd < 2; ++odd) {  // even output rows from t0,2,4,6; odd from t1,3,5,7
          u[0] = _mm512_shuffle_i64x2(t[odd], t[2 + odd], 0x44);
          u[1] = _mm512_shuffle_i64x2(t[odd], t[2 + odd], 0xEE);
          u[2] = _mm512_shuffle_i64x2(t[4 + odd], t[6 + odd], 0x44);
          u[3] = _mm512_shuffle_i64x2(t[4 + odd], t[6 + odd], 0xEE);
          store32(o + (0 + odd) * 32, _mm512_shuffle_i64x2(u[0], u[2], 0x88));
          store32(o + (2 + odd) * 32, _mm512_shuffle_i64x2(u[0], u[2], 0xDD));
          store32(o + (4 + odd) * 32, _mm512_shuffle_i64x2(u[1], u[3], 0x88));
          store32(o + (6 + odd) * 32, _mm512_shuffle_i64x2(u[1], u[3], 0xDD));
        }
      }
    }
  }
}

}  // namespace

void pack_transposed_panels_avx512(const uint16_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                   int64_t panel_count, uint16_t* dst) {
  transpose_panels(Bf16Source{packed}, np, kp, first_panel, panel_count, dst);
}

void pack_transposed_panels_int8_avx512(const int8_t* packed, const float* row_scales, int64_t np, int64_t kp,
                                        int64_t first_panel, int64_t panel_count, uint16_t* dst) {
  transpose_panels(Int8Source{packed, row_scales}, np, kp, first_panel, panel_count, dst);
}

void pack_transposed_panels_int4_avx512(const uint8_t* packed, const uint16_t* block_scales, int64_t np, int64_t kp,
                                        int64_t first_panel, int64_t panel_count, uint16_t* dst) {
  transpose_panels(Int4Source{packed, block_scales, kp / kBlockDepth}, np, kp, first_panel, panel_count, dst);
}

void pack_transposed_panels_fp8_avx512(const uint8_t* packed, const float* tile_scales, int64_t np, int64_t kp,
                                       int64_t first_panel, int64_t panel_count, uint16_t* dst) {
  transpose_panels(Fp8Source{packed, tile_scales, kp / kBlockDepth}, np, kp, first_panel, panel_count, dst);
}

void pack_transposed_codes_avx512(const int8_t* packed, int64_t np, int64_t kp, int64_t first_panel,
                                  int64_t panel_count, int8_t* dst) {
  transpose_panels(CodesSource{packed}, np, kp, first_panel, panel_count, dst);
}

// The codes 4 KiB ahead are prefetched: the weight GEMMs of the quantized formats decode a
// panel in pieces of 256 reduction steps (4 KiB of int8) with products in between, and the
// hardware prefetchers stop at each 4 KiB page.
void decode_panels_avx512(const int8_t* packed, int64_t kp, int64_t panels, uint16_t* dst) {
  const int64_t n = panels * kPanelRows * kp;  // a multiple of 512
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(packed + i + 4096), _MM_HINT_T0);
    for (int64_t j = i; j < i + 64; j += 32)
      _mm512_storeu_si512(dst + j, codes_to_bf16x32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + j)),
                                                    one, one));
  }
}

void decode_panels_int4_avx512(const uint8_t* packed, const uint16_t* block_scales, int64_t kp, int64_t panels,
                               uint16_t* dst) {
  const int64_t blocks = panels * kp / kBlockDepth;  // consecutive over the panels, as their scales
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = packed + b * kBlockElems / 2;
    for (int line = 0; line < 4; ++line)  // the block 2 KiB ahead: 256 steps of int4
      _mm_prefetch(reinterpret_cast<const char*>(codes + 2048 + 64 * line), _MM_HINT_T0);
    const PairScales scales(bf16x16_to_ps(block_scales + b * kPanelRows));
    for (int row = 0; row < kBlockDepth / 2; ++row)
      _mm512_storeu_si512(dst + b * kBlockElems + row * 32, codes_to_bf16x32(int4_codes(codes + row * 16), scales.lo, scales.hi));
  }
}

void decode_panels_fp8_avx512(const uint8_t* packed, const float* tile_scales, int64_t kp, int64_t panels,
                              uint16_t* dst) {
  const int64_t tiles = panels * kp / kBlockDepth;  // consecutive over the panels, as their scales
  for (int64_t t = 0; t < tiles; ++t) {
    const uint8_t* codes = packed + t * kBlockElems;
    for (int line = 0; line < 8; ++line)  // the tile 4 KiB ahead: 256 steps of fp8, as for int8
      _mm_prefetch(reinterpret_cast<const char*>(codes + 4096 + 64 * line), _MM_HINT_T0);
    const __m512 scale = _mm512_set1_ps(tile_scales[t] * 256.f);
    for (int row = 0; row < kBlockDepth / 2; ++row)
      _mm512_storeu_si512(dst + t * kBlockElems + row * 32, fp8_to_bf16x32(codes + row * 32, scale));
  }
}

// quantize_rows_scalar's arithmetic 16 columns at a time: the same products, maximum and
// rounding (vcvtps2dq rounds to nearest even), so the codes and scales are equal.
void quantize_rows_avx512(int64_t m, int64_t cols, const void* a, DType a_dtype, int64_t lda, const float* col_scales,
                          int8_t* q, int64_t ldq, float* row_scales) {
  const int64_t padded = round_up(cols, 64);
  const auto load = [&](int64_t r, int64_t c, __mmask16 mask) {
    __m512 v = a_dtype == DType::kF32
                   ? _mm512_maskz_loadu_ps(mask, static_cast<const float*>(a) + r * lda + c)
                   : _mm512_castsi512_ps(_mm512_slli_epi32(
                         _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(a) + r * lda + c)),
                         16));
    if (col_scales) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, col_scales + c));
    return v;
  };
  const auto mask_at = [&](int64_t c) {
    return cols - c >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (cols - c)) - 1);
  };
  for (int64_t r = 0; r < m; ++r) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load(r, c, mask_at(c))));
    const float top = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    int8_t* out = q + r * ldq;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 mask = mask_at(c);
      const __m512i code = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load(r, c, mask), inv)), lo), hi);
      _mm_mask_storeu_epi8(out + c, mask, _mm512_cvtepi32_epi8(code));
    }
    for (int64_t c = cols; c < padded; ++c) out[c] = 0;
    row_scales[r] = top > 0.f ? top / 127.f : 0.f;
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
