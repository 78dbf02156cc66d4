// AVX-512-BF16 GEMM: one packed block row is exactly one vdpbf16ps operand (16 columns x
// one pair of reduction steps); each activation pair is broadcast as a 32-bit lane.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
// gcc 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm*_undefined_*().
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstring>

#include "kernel_impls.h"
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

namespace {

// int8_gemm's block: kRows rows by Panels panels of int32 sums. A block row of codes (16
// columns by one pair of reduction steps) sign-extended to 16 bits is one vpmaddwd operand
// against the activations' pair broadcast as a 32-bit lane; the sums are exact.
template <int Panels>
void int8_tile(int64_t blocks, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
               const float* w_scales, float* c, int64_t ldc) {
  __m512i acc[kRows][Panels];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int pair = 0; pair < kBlockDepth / 2; ++pair) {
      __m512i wv[Panels];
      for (int p = 0; p < Panels; ++p)
        wv[p] = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (p * blocks + b) * kBlockElems + pair * 32)));
      const int64_t k = b * kBlockDepth + 2 * pair;
      for (int r = 0; r < kRows; ++r) {
        const int8_t* ar = a + r * lda + k;
        const uint32_t a_pair = static_cast<uint16_t>(int16_t{ar[0]}) | static_cast<uint32_t>(static_cast<uint16_t>(int16_t{ar[1]})) << 16;
        const __m512i av = _mm512_set1_epi32(static_cast<int32_t>(a_pair));
        for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_add_epi32(acc[r][p], _mm512_madd_epi16(av, wv[p]));
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m512 as = _mm512_set1_ps(a_scales[r]);
    for (int p = 0; p < Panels; ++p) {
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][p]), as);
      if (w_scales) v = _mm512_mul_ps(v, _mm512_loadu_ps(w_scales + p * kPanelRows));
      _mm512_storeu_ps(c + r * ldc + p * kPanelRows, v);
    }
  }
}

}  // namespace

void int8_gemm_avx512(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
                      const float* w_scales, int64_t panels, float* c, int64_t ldc) {
  const int64_t blocks = kp / kBlockDepth;
  for (int64_t p = 0; p < panels; p += 2) {
    const int8_t* wp = w + p * blocks * kBlockElems;
    const float* ws = w_scales ? w_scales + p * kPanelRows : nullptr;
    for (int64_t row = 0; row < m; row += kRows) {
      if (p + 2 <= panels)
        int8_tile<2>(blocks, a + row * lda, lda, a_scales + row, wp, ws, c + row * ldc + p * kPanelRows, ldc);
      else
        int8_tile<1>(blocks, a + row * lda, lda, a_scales + row, wp, ws, c + row * ldc + p * kPanelRows, ldc);
    }
  }
}

// exp(x) = 2^n * e^f with n = round(x / ln 2), |f| <= ln(2) / 2, e^f by a degree-6
// polynomial (relative error ~1e-7), 2^n applied by vscalefps; x is clamped to +-88.
static inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 split in two parts
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 sigmoid_ps(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

// 16 floats to bf16 exactly as f32_to_bf16 (bf16.h): round to nearest even, NaN quiet.
static inline __m256i to_bf16_ps(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

static inline void store_masked(void* base, DType dt, int64_t at, __mmask16 m, __m512 v) {
  if (dt == DType::kF32)
    _mm512_mask_storeu_ps(static_cast<float*>(base) + at, m, v);
  else
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + at, m, to_bf16_ps(v));
}

static inline __m512 load_masked(const void* base, DType dt, int64_t at, __mmask16 m) {
  if (dt == DType::kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + at);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + at);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

float swiglu_backward_avx512(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at, const float* q,
                             float w, void* z_out, void* fused_out) {
  uint16_t *z = static_cast<uint16_t*>(z_out), *fused = static_cast<uint16_t*>(fused_out);
  const __m512 one = _mm512_set1_ps(1.f), wv = _mm512_set1_ps(w);
  __m512 dot = _mm512_setzero_ps();
  for (int64_t c = 0; c < ip; c += kPanelRows) {
    const int64_t left = I - c;
    uint16_t* panel = fused + 2 * c;
    if (left <= 0) {
      _mm512_storeu_si512(panel, _mm512_setzero_si512());
      continue;
    }
    const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512 g = load_masked(saved, saved_dtype, at + c, m), u = load_masked(saved, saved_dtype, at + I + c, m);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + c);
    const __m512 sg = sigmoid_ps(g), silu = _mm512_mul_ps(g, sg), zv = _mm512_mul_ps(silu, u);
    _mm256_mask_storeu_epi16(z + c, m, to_bf16_ps(zv));
    dot = _mm512_add_ps(dot, _mm512_mul_ps(zv, qv));
    const __m512 dz = _mm512_mul_ps(wv, qv);
    const __m512 slope = _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, sg)));
    const __m512 dg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dz, u), sg), slope);
    const __m512 du = _mm512_mul_ps(dz, silu);
    // Masked-off lanes are zero in g, u and q, so dg and du are zero there too.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel), to_bf16_ps(dg));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + kPanelRows), to_bf16_ps(du));
  }
  return _mm512_reduce_add_ps(dot);
}

void sigmoid_avx512(int64_t n, const float* x, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, sigmoid_ps(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

void swiglu_forward_avx512(int64_t valid, int64_t cols, const float* acc, void* z_out, void* saved,
                           DType saved_dtype, int64_t g_at, int64_t u_at) {
  uint16_t* z = static_cast<uint16_t*>(z_out);
  for (int64_t c = 0; c < cols; c += kPanelRows) {
    const int64_t left = valid - c;
    if (left <= 0) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(z + c), _mm256_setzero_si256());
      continue;
    }
    const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512 g = _mm512_loadu_ps(acc + 2 * c), u = _mm512_loadu_ps(acc + 2 * c + kPanelRows);
    const __m512 zv = _mm512_maskz_mov_ps(m, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid_ps(g)), u));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(z + c), to_bf16_ps(zv));
    store_masked(saved, saved_dtype, g_at + c, m, g);
    store_masked(saved, saved_dtype, u_at + c, m, u);
  }
}

namespace {

// Rows x (16 * Vecs) block of C kept in registers over the whole depth: per step one load of
// B per vector and one broadcast of A per row feed Rows * Vecs FMAs. `chunk` is the block's
// first 16-column chunk of the B rows.
template <DType BType, int Rows, int Vecs>
void rank_update_block(int64_t depth, const float* a, int64_t lda, const RankRows& b, int64_t chunk,
                       float* c, int64_t ldc, __mmask16 last_mask) {
  __m512 acc[Rows][Vecs];
  auto mask_of = [&](int v) { return v == Vecs - 1 ? last_mask : static_cast<__mmask16>(0xffff); };
  for (int j = 0; j < Rows; ++j)
    for (int v = 0; v < Vecs; ++v) acc[j][v] = _mm512_maskz_loadu_ps(mask_of(v), c + j * ldc + 16 * v);
  for (int64_t p = 0; p < depth; ++p) {
    __m512 bv[Vecs];
    for (int v = 0; v < Vecs; ++v) bv[v] = load_masked(b.rows[p], BType, (chunk + v) * b.chunk_stride, mask_of(v));
    for (int j = 0; j < Rows; ++j) {
      const __m512 aj = _mm512_set1_ps(a[p * lda + j]);
      for (int v = 0; v < Vecs; ++v) acc[j][v] = _mm512_fmadd_ps(aj, bv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < Rows; ++j)
    for (int v = 0; v < Vecs; ++v) _mm512_mask_storeu_ps(c + j * ldc + 16 * v, mask_of(v), acc[j][v]);
}

// Column blocks outermost: a block's piece of B (depth x 64 columns) stays in L1 while every
// group of four C rows meets it. The B rows are scattered (one per routed token), which the
// hardware prefetchers do not follow: the next block's piece is prefetched by hand.
template <DType BType>
void rank_update_cols(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda, const RankRows& b,
                      float* c, int64_t ldc) {
  constexpr int64_t elem = BType == DType::kF32 ? 4 : 2;
  for (int64_t col = 0; col < n; col += 64) {
    const int64_t left = n - col, chunk = col / 16;
    if (left > 64) {
      for (int64_t p = 0; p < depth; ++p)
        for (int64_t v = 4; v < 8 && 16 * v < left; ++v) {
          const char* first = static_cast<const char*>(b.rows[p]) + (chunk + v) * b.chunk_stride * elem;
          _mm_prefetch(first, _MM_HINT_T0);  // the chunk's first and last byte: all of its lines
          _mm_prefetch(first + 16 * elem - 1, _MM_HINT_T0);
        }
    }
    float* cc = c + col;
    if (left >= 64) {
      int64_t j = 0;
      for (; j + 4 <= rows; j += 4) rank_update_block<BType, 4, 4>(depth, a + j, lda, b, chunk, cc + j * ldc, ldc, 0xffff);
      for (; j < rows; ++j) rank_update_block<BType, 1, 4>(depth, a + j, lda, b, chunk, cc + j * ldc, ldc, 0xffff);
      continue;
    }
    for (int64_t v = 0; v * 16 < left; ++v) {
      const int64_t l = left - 16 * v;
      const __mmask16 mask = l >= 16 ? 0xffff : static_cast<__mmask16>((1u << l) - 1);
      int64_t j = 0;
      for (; j + 4 <= rows; j += 4)
        rank_update_block<BType, 4, 1>(depth, a + j, lda, b, chunk + v, cc + j * ldc + 16 * v, ldc, mask);
      for (; j < rows; ++j) rank_update_block<BType, 1, 1>(depth, a + j, lda, b, chunk + v, cc + j * ldc + 16 * v, ldc, mask);
    }
  }
}

}  // namespace

void rank_update_avx512(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda, const RankRows& b,
                        float* c, int64_t ldc) {
  if (b.dtype == DType::kBF16)
    rank_update_cols<DType::kBF16>(rows, n, depth, a, lda, b, c, ldc);
  else
    rank_update_cols<DType::kF32>(rows, n, depth, a, lda, b, c, ldc);
}

}  // namespace kt
#pragma GCC pop_options
