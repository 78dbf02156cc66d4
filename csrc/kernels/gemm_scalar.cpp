// Portable reference GEMM over the packed layout: the fallback path and the yardstick the
// vector kernels are tested against. The fp32-weight variant serves the LoRA products of the
// fp32 paths, whose LoRA matrices are packed per call in the same layout with fp32 elements.
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

void axpy_scalar(int64_t n, float a, const float* x, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void gemm_scalar_f32_f32w(int64_t m, int64_t kp, const float* a, int64_t lda, const float* w,
                          int64_t panels, float* c, int64_t ldc, bool accumulate) {
  gemm_reference(m, kp, a, lda, w, panels, c, ldc, accumulate);
}

}  // namespace kt
