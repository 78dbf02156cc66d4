// Portable reference GEMM over the packed layout: the fallback path and the yardstick the
// vector kernels are tested against. The fp32-weight variant serves the LoRA products of the
// fp32 paths, whose LoRA matrices are packed per call in the same layout with fp32 elements.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kt/isa.h"
#include "kt/packing.h"

namespace kt {
namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

template <typename Act, typename W>
void gemm_reference(int64_t m, int64_t kp, const Act* a, int64_t lda, const W* w,
                    int64_t panels, float* c, int64_t ldc, bool accumulate) {
  const int64_t blocks = kp / kBlockDepth;
  for (int64_t p = 0; p < panels; ++p) {
    const W* panel = w + p * blocks * kBlockElems;
    for (int64_t row = 0; row < m; ++row) {
      float sum[kPanelRows];
      float* out = c + row * ldc + p * kPanelRows;
      for (int col = 0; col < kPanelRows; ++col) sum[col] = accumulate ? out[col] : 0.f;
      const Act* a_row = a + row * lda;
      for (int64_t b = 0; b < blocks; ++b) {
        const W* block = panel + b * kBlockElems;
        for (int pair = 0; pair < kBlockDepth / 2; ++pair) {
          const float a0 = to_f32(a_row[b * kBlockDepth + 2 * pair]);
          const float a1 = to_f32(a_row[b * kBlockDepth + 2 * pair + 1]);
          const W* wp = block + pair * 2 * kPanelRows;
          for (int col = 0; col < kPanelRows; ++col)
            sum[col] += a0 * to_f32(wp[2 * col]) + a1 * to_f32(wp[2 * col + 1]);
        }
      }
      for (int col = 0; col < kPanelRows; ++col) out[col] = sum[col];
    }
  }
}

}  // namespace

void gemm_scalar_bf16(int64_t m, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* w,
                      int64_t panels, float* c, int64_t ldc, bool accumulate) {
  gemm_reference(m, kp, a, lda, w, panels, c, ldc, accumulate);
}

void gemm_scalar_f32(int64_t m, int64_t kp, const float* a, int64_t lda, const uint16_t* w,
                     int64_t panels, float* c, int64_t ldc, bool accumulate) {
  gemm_reference(m, kp, a, lda, w, panels, c, ldc, accumulate);
}

void sigmoid_scalar(int64_t n, const float* x, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.f / (1.f + std::exp(-x[i]));
}

// Also the AVX2 path's.
void rank_update_scalar(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t lda, const RankRows& b,
                        float* c, int64_t ldc) {
  std::vector<float> row(n);
  for (int64_t p = 0; p < depth; ++p) {
    for (int64_t c0 = 0; c0 < n; c0 += 16)
      load_f32(b.rows[p], b.dtype, c0 / 16 * b.chunk_stride, std::min<int64_t>(16, n - c0), row.data() + c0);
    for (int64_t j = 0; j < rows; ++j) {
      const float aj = a[p * lda + j];
      for (int64_t col = 0; col < n; ++col) c[j * ldc + col] += aj * row[col];
    }
  }
}

void gemm_scalar_f32_f32w(int64_t m, int64_t kp, const float* a, int64_t lda, const float* w,
                          int64_t panels, float* c, int64_t ldc, bool accumulate) {
  gemm_reference(m, kp, a, lda, w, panels, c, ldc, accumulate);
}

}  // namespace kt
