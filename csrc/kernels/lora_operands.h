// The LoRA factors as the expert driver's GEMMs read them: each LoRA product runs as a GEMM
// against operands packed per call in the panel layout (their K padded to 32), gate and up
// side by side as one operand.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kt/moe_sft.h"
#include "kt/packing.h"
#include "kt/scratch.h"
#include "routing.h"

namespace kt {

// LoRA sizes of a call.
struct LoraShape {
  int64_t rg, ru, rd, rgu;  // ranks of gate, up, down; rgu = rg + ru
  int64_t rgu_p, rd_p;      // padded to kPadTo (0 when absent)
  int64_t width;            // columns of the saved lora activations: [x A_g^T | x A_u^T | z A_d^T]
  explicit LoraShape(const MoeWeights& w)
      : rg(w.lora[kGate].rank), ru(w.lora[kUp].rank), rd(w.lora[kDown].rank), rgu(rg + ru),
        rgu_p(round_up(rgu, kPadTo)), rd_p(round_up(rd, kPadTo)), width(rgu + rd) {}
  int64_t offset(int proj) const { return proj == kGate ? 0 : proj == kUp ? rg : rgu; }
};

// Packs the dense np x kp fp32 matrix m (row-major, ld kp) into the panel layout, writing
// dst in order: panel, block, pair row, then the panel's 16 rows (packed_offset).
template <typename T>
void pack_dense(int64_t np, int64_t kp, const float* m, T* dst) {
  for (int64_t n0 = 0; n0 < np; n0 += kPanelRows) {
    const float* panel = m + n0 * kp;
    for (int64_t k = 0; k < kp; k += 2)
      for (int64_t n = 0; n < kPanelRows; ++n) {
        *dst++ = f32_to_act<T>(panel[n * kp + k]);
        *dst++ = f32_to_act<T>(panel[n * kp + k + 1]);
      }
  }
}

// The LoRA operands of one expert, each built as a dense fp32 matrix (zero outside the
// factors) in a per-thread buffer and packed from it: whole rows of the factors are copied,
// so the packing streams through them rather than computing each element's source.
template <typename T>
class LoraPacker {
 public:
  LoraPacker(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t H, int64_t I, int64_t hp, int64_t ip)
      : w_(w), l_(l), e_(e), H_(H), I_(I), hp_(hp), ip_(ip) {}

  // Forward: [A_g; A_u] (rgu_p x hp), blockdiag(B_g, B_u) over the fused gate/up rows
  // (2 ip x rgu_p), A_d (rd_p x ip), B_d (hp x rd_p).
  void a_gu(T* dst) const {
    float* m = dense(l_.rgu_p, hp_);
    copy_rows(m, hp_, a(kGate), l_.rg, H_);
    copy_rows(m + l_.rg * hp_, hp_, a(kUp), l_.ru, H_);
    pack_dense(l_.rgu_p, hp_, m, dst);
  }
  void b_gu(T* dst) const {
    float* m = dense(2 * ip_, l_.rgu_p);
    for_fused_rows([&](int64_t row, int64_t c, bool is_up) {
      if (is_up)
        std::copy(b(kUp) + c * l_.ru, b(kUp) + (c + 1) * l_.ru, m + row * l_.rgu_p + l_.rg);
      else
        std::copy(b(kGate) + c * l_.rg, b(kGate) + (c + 1) * l_.rg, m + row * l_.rgu_p);
    });
    pack_dense(2 * ip_, l_.rgu_p, m, dst);
  }
  void a_d(T* dst) const {
    float* m = dense(l_.rd_p, ip_);
    copy_rows(m, ip_, a(kDown), l_.rd, I_);
    pack_dense(l_.rd_p, ip_, m, dst);
  }
  void b_d(T* dst) const {
    float* m = dense(hp_, l_.rd_p);
    copy_rows(m, l_.rd_p, b(kDown), H_, l_.rd);
    pack_dense(hp_, l_.rd_p, m, dst);
  }

  // Backward, the transposes: blockdiag(B_g, B_u)^T (rgu_p x 2 ip), [A_g; A_u]^T (hp x rgu_p),
  // B_d^T (rd_p x hp), A_d^T (ip x rd_p).
  void bt_gu(T* dst) const {
    float* m = dense(l_.rgu_p, 2 * ip_);
    const int64_t ld = 2 * ip_;
    for_fused_rows([&](int64_t row, int64_t c, bool is_up) {
      if (is_up)
        for (int64_t j = 0; j < l_.ru; ++j) m[(l_.rg + j) * ld + row] = b(kUp)[c * l_.ru + j];
      else
        for (int64_t j = 0; j < l_.rg; ++j) m[j * ld + row] = b(kGate)[c * l_.rg + j];
    });
    pack_dense(l_.rgu_p, ld, m, dst);
  }
  void at_gu(T* dst) const {
    float* m = dense(hp_, l_.rgu_p);
    transpose_rows(m, l_.rgu_p, a(kGate), l_.rg, H_);
    transpose_rows(m + l_.rg, l_.rgu_p, a(kUp), l_.ru, H_);
    pack_dense(hp_, l_.rgu_p, m, dst);
  }
  void bt_d(T* dst) const {
    float* m = dense(l_.rd_p, hp_);
    transpose_rows(m, hp_, b(kDown), H_, l_.rd);
    pack_dense(l_.rd_p, hp_, m, dst);
  }
  void at_d(T* dst) const {
    float* m = dense(ip_, l_.rd_p);
    transpose_rows(m, l_.rd_p, a(kDown), l_.rd, I_);
    pack_dense(ip_, l_.rd_p, m, dst);
  }

 private:
  const float* a(int proj) const { return w_.lora[proj].a + e_ * w_.lora[proj].rank * (proj == kDown ? I_ : H_); }
  const float* b(int proj) const { return w_.lora[proj].b + e_ * (proj == kDown ? H_ : I_) * w_.lora[proj].rank; }

  // A zeroed rows x cols buffer of the calling thread.
  static float* dense(int64_t rows, int64_t cols) {
    float* m = scratch<float>(Scratch::kTaskDense, rows * cols);
    std::fill(m, m + rows * cols, 0.f);
    return m;
  }
  // dst[i][0..cols) = src[i][0..cols) for the src rows x cols matrix (ld dst_ld).
  static void copy_rows(float* dst, int64_t dst_ld, const float* src, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) std::copy(src + i * cols, src + (i + 1) * cols, dst + i * dst_ld);
  }
  // dst[c][i] = src[i][c] for the src rows x cols matrix (ld dst_ld).
  static void transpose_rows(float* dst, int64_t dst_ld, const float* src, int64_t rows, int64_t cols) {
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t i = 0; i < rows; ++i) dst[c * dst_ld + i] = src[i * cols + c];
  }
  // f(fused row, intermediate column, is_up) for each fused gate/up row that holds a column
  // below I: panels alternate gate and up, kPanelRows columns each (gate_up_column).
  template <typename F>
  void for_fused_rows(const F& f) const {
    for (int64_t panel = 0; panel < 2 * ip_ / kPanelRows; ++panel)
      for (int64_t i = 0; i < kPanelRows; ++i) {
        const int64_t c = (panel / 2) * kPanelRows + i;
        if (c < I_) f(panel * kPanelRows + i, c, panel % 2 == 1);
      }
  }

  const MoeWeights& w_;
  const LoraShape& l_;
  const int64_t e_, H_, I_, hp_, ip_;
};

}  // namespace kt
