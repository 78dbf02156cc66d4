// The LoRA factors as the expert driver's GEMMs read them: each LoRA product runs as a GEMM
// against operands packed per call in the panel layout (their K padded to 32), gate and up
// side by side as one operand.
#pragma once

#include <cstdint>

#include "kt/moe_sft.h"
#include "kt/packing.h"
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

// Packs the np x kp matrix value(n, k) into the panel layout, writing dst in order: panel,
// block, pair row, then the panel's 16 rows (packed_offset).
template <typename T, typename F>
void pack_elements(int64_t np, int64_t kp, T* dst, const F& value) {
  for (int64_t n0 = 0; n0 < np; n0 += kPanelRows)
    for (int64_t k = 0; k < kp; k += 2)
      for (int64_t n = n0; n < n0 + kPanelRows; ++n) {
        *dst++ = f32_to_act<T>(value(n, k));
        *dst++ = f32_to_act<T>(value(n, k + 1));
      }
}

// Inverse of gate_up_column: which intermediate column a fused gate/up row holds.
inline int64_t fused_to_column(int64_t row, bool* is_up) {
  const int64_t panel = row / kPanelRows;
  *is_up = panel % 2;
  return (panel / 2) * kPanelRows + row % kPanelRows;
}

// Element (rank row j, input column c) of [A_g; A_u] for expert e, zero outside.
inline float lora_a_gu(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t in, int64_t j, int64_t c) {
  if (c >= in) return 0.f;
  if (j < l.rg) return w.lora[kGate].a[(e * l.rg + j) * in + c];
  if (j < l.rgu) return w.lora[kUp].a[(e * l.ru + j - l.rg) * in + c];
  return 0.f;
}

// Element (fused gate/up row, rank column j) of blockdiag(B_g, B_u) for expert e.
inline float lora_b_gu(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t I, int64_t row, int64_t j) {
  bool is_up;
  const int64_t c = fused_to_column(row, &is_up);
  if (c >= I) return 0.f;
  if (!is_up && j < l.rg) return w.lora[kGate].b[(e * I + c) * l.rg + j];
  if (is_up && j >= l.rg && j < l.rgu) return w.lora[kUp].b[(e * I + c) * l.ru + j - l.rg];
  return 0.f;
}

// Element (rank row j, input column c) of A_d, and (output row o, rank column j) of B_d.
inline float lora_a_d(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t I, int64_t j, int64_t c) {
  return j < l.rd && c < I ? w.lora[kDown].a[(e * l.rd + j) * I + c] : 0.f;
}
inline float lora_b_d(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t H, int64_t o, int64_t j) {
  return o < H && j < l.rd ? w.lora[kDown].b[(e * H + o) * l.rd + j] : 0.f;
}

}  // namespace kt
