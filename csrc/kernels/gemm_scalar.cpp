// The portable reference kernels over the packed layout: the scalar path, and the yardstick
// every vector kernel is tested against. The fp32-weight GEMM serves the LoRA products of the
// fp32 paths, whose LoRA matrices are packed per call in the same layout with fp32 elements.
// The SwiGLU steps serve both fp32 paths (AVX2 computes its sigmoid here too).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernel_impls.h"
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

void gemm_scalar_f32(int64_t m, int64_t kp, const float* a, int64_t lda, const uint16_t* w,
                     int64_t panels, float* c, int64_t ldc, bool accumulate) {
  gemm_reference(m, kp, a, lda, w, panels, c, ldc, accumulate);
}

void scale_columns_scalar(int64_t m, int64_t cols, const float* scales, float* c, int64_t ldc) {
  for (int64_t row = 0; row < m; ++row)
    for (int64_t col = 0; col < cols; ++col) c[row * ldc + col] *= scales[col];
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

void swiglu_forward_scalar(int64_t valid, int64_t cols, const float* acc, void* z_out, void* saved,
                           DType saved_dtype, int64_t g_at, int64_t u_at) {
  float* z = static_cast<float*>(z_out);
  thread_local std::vector<float> g, u, sg;
  g.resize(valid), u.resize(valid), sg.resize(valid);
  std::fill(z, z + cols, 0.f);
  for (int64_t c = 0; c < valid; ++c) {
    g[c] = acc[gate_up_column(c, false)];
    u[c] = acc[gate_up_column(c, true)];
  }
  sigmoid_scalar(valid, g.data(), sg.data());
  for (int64_t c = 0; c < valid; ++c) z[c] = g[c] * sg[c] * u[c];
  store_f32(saved, saved_dtype, g_at, valid, g.data());
  store_f32(saved, saved_dtype, u_at, valid, u.data());
}

float swiglu_backward_scalar(int64_t I, int64_t ip, const void* saved, DType saved_dtype, int64_t at, const float* q,
                             float w, void* z_out, void* fused_out) {
  float *z = static_cast<float*>(z_out), *fused = static_cast<float*>(fused_out);
  thread_local std::vector<float> gu, sig;
  gu.resize(2 * I), sig.resize(I);
  std::fill(fused, fused + 2 * ip, 0.f);
  load_f32(saved, saved_dtype, at, 2 * I, gu.data());
  sigmoid_scalar(I, gu.data(), sig.data());
  float z_dot_q = 0.f;
  for (int64_t c = 0; c < I; ++c) {
    const float g = gu[c], u = gu[I + c];
    const float sg = sig[c], silu = g * sg;
    z[c] = silu * u;
    z_dot_q += silu * u * q[c];
    const float dz = w * q[c];
    fused[gate_up_column(c, false)] = dz * u * sg * (1.f + g * (1.f - sg));
    fused[gate_up_column(c, true)] = dz * silu;
  }
  return z_dot_q;
}

}  // namespace kt

namespace kt {

void quantize_rows_scalar(int64_t m, int64_t cols, const void* a, DType a_dtype, int64_t lda, const float* col_scales,
                          int8_t* q, int64_t ldq, float* row_scales) {
  std::vector<float> v(cols);
  const int64_t padded = round_up(cols, 64);
  for (int64_t r = 0; r < m; ++r) {
    load_f32(a, a_dtype, r * lda, cols, v.data());
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) {
      if (col_scales) v[c] *= col_scales[c];
      amax = std::max(amax, std::fabs(v[c]));
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t* out = q + r * ldq;
    for (int64_t c = 0; c < cols; ++c) {
      const float code = std::nearbyint(v[c] * inv);  // ties to even (the default rounding mode)
      out[c] = static_cast<int8_t>(code > 127.f ? 127.f : code < -127.f ? -127.f : code);
    }
    std::fill(out + cols, out + padded, int8_t(0));
    row_scales[r] = amax > 0.f ? amax / 127.f : 0.f;
  }
}

void int8_gemm_scalar(int64_t m, int64_t kp, const int8_t* a, int64_t lda, const float* a_scales, const int8_t* w,
                      const float* w_scales, int64_t panels, float* c, int64_t ldc) {
  const int64_t blocks = kp / kBlockDepth;
  for (int64_t p = 0; p < panels; ++p) {
    const int8_t* panel = w + p * blocks * kBlockElems;
    for (int64_t row = 0; row < m; ++row) {
      int32_t sum[kPanelRows] = {};
      const int8_t* a_row = a + row * lda;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int pair = 0; pair < kBlockDepth / 2; ++pair) {
          const int32_t a0 = a_row[b * kBlockDepth + 2 * pair], a1 = a_row[b * kBlockDepth + 2 * pair + 1];
          const int8_t* wp = panel + b * kBlockElems + pair * 2 * kPanelRows;
          for (int col = 0; col < kPanelRows; ++col) sum[col] += a0 * wp[2 * col] + a1 * wp[2 * col + 1];
        }
      }
      float* out = c + row * ldc + p * kPanelRows;
      for (int col = 0; col < kPanelRows; ++col) {
        out[col] = static_cast<float>(sum[col]) * a_scales[row];
        if (w_scales) out[col] *= w_scales[p * kPanelRows + col];
      }
    }
  }
}

}  // namespace kt
