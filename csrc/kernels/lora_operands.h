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

// Packs the np x kp matrix M into the panel layout, writing dst in order: panel, block, pair
// row, then the panel's 16 rows (packed_offset). M is the fp32 matrix m (row-major np x kp),
// or with `transposed` its transpose (m row-major kp x np), read 16 contiguous values a row.
template <typename T>
void pack_dense(int64_t np, int64_t kp, const float* m, bool transposed, T* dst) {
  for (int64_t n0 = 0; n0 < np; n0 += kPanelRows)
    for (int64_t k = 0; k < kp; k += 2) {
      if (transposed) {
        const float *k0 = m + k * np + n0, *k1 = k0 + np;
        for (int64_t n = 0; n < kPanelRows; ++n, dst += 2) dst[0] = f32_to_act<T>(k0[n]), dst[1] = f32_to_act<T>(k1[n]);
      } else {
        const float* row = m + n0 * kp + k;
        for (int64_t n = 0; n < kPanelRows; ++n, dst += 2)
          dst[0] = f32_to_act<T>(row[n * kp]), dst[1] = f32_to_act<T>(row[n * kp + 1]);
      }
    }
}

// The LoRA operands of one expert. Each is one of four dense fp32 matrices made from whole
// rows of the factors in a per-thread buffer (zero outside them), packed as it is (the
// forward's operands) or transposed (the backward's):
//   [A_g; A_u]                      rgu_p x hp
//   blockdiag(B_g, B_u), fused rows 2 ip x rgu_p (gate_up_column orders the rows)
//   A_d                             rd_p x ip
//   B_d                             hp x rd_p
template <typename T>
class LoraPacker {
 public:
  LoraPacker(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t H, int64_t I, int64_t hp, int64_t ip)
      : w_(w), l_(l), e_(e), H_(H), I_(I), hp_(hp), ip_(ip) {}

  void a_gu(T* dst) const { pack_dense(l_.rgu_p, hp_, dense_a_gu(), false, dst); }
  void b_gu(T* dst) const { pack_dense(2 * ip_, l_.rgu_p, dense_b_gu(), false, dst); }
  void a_d(T* dst) const { pack_dense(l_.rd_p, ip_, dense_a_d(), false, dst); }
  void b_d(T* dst) const { pack_dense(hp_, l_.rd_p, dense_b_d(), false, dst); }
  void at_gu(T* dst) const { pack_dense(hp_, l_.rgu_p, dense_a_gu(), true, dst); }
  void bt_gu(T* dst) const { pack_dense(l_.rgu_p, 2 * ip_, dense_b_gu(), true, dst); }
  void at_d(T* dst) const { pack_dense(ip_, l_.rd_p, dense_a_d(), true, dst); }
  void bt_d(T* dst) const { pack_dense(l_.rd_p, hp_, dense_b_d(), true, dst); }

 private:
  const float* a(int proj) const { return w_.lora[proj].a + e_ * w_.lora[proj].rank * (proj == kDown ? I_ : H_); }
  const float* b(int proj) const { return w_.lora[proj].b + e_ * (proj == kDown ? H_ : I_) * w_.lora[proj].rank; }

  const float* dense_a_gu() const {
    float* m = dense(l_.rgu_p, hp_);
    copy_rows(m, hp_, a(kGate), l_.rg, H_);
    copy_rows(m + l_.rg * hp_, hp_, a(kUp), l_.ru, H_);
    return m;
  }
  const float* dense_b_gu() const {
    float* m = dense(2 * ip_, l_.rgu_p);
    // Panels of fused rows alternate gate and up, kPanelRows intermediate columns each.
    for (int64_t panel = 0; panel < 2 * ip_ / kPanelRows; ++panel) {
      const bool is_up = panel % 2 == 1;
      const int64_t rank = is_up ? l_.ru : l_.rg, first_col = (panel / 2) * kPanelRows;
      const int64_t rows = std::max<int64_t>(0, std::min(kPanelRows, I_ - first_col));
      copy_rows(m + panel * kPanelRows * l_.rgu_p + (is_up ? l_.rg : 0), l_.rgu_p,
                b(is_up ? kUp : kGate) + first_col * rank, rows, rank);
    }
    return m;
  }
  const float* dense_a_d() const {
    float* m = dense(l_.rd_p, ip_);
    copy_rows(m, ip_, a(kDown), l_.rd, I_);
    return m;
  }
  const float* dense_b_d() const {
    float* m = dense(hp_, l_.rd_p);
    copy_rows(m, l_.rd_p, b(kDown), H_, l_.rd);
    return m;
  }

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

  const MoeWeights& w_;
  const LoraShape& l_;
  const int64_t e_, H_, I_, hp_, ip_;
};

}  // namespace kt
