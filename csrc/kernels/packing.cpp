#include "kt/packing.h"

#include <cstring>

namespace kt {

void pack_weight(const bf16* w, int64_t n, int64_t k, int64_t ldw, int64_t kp, bf16* dst) {
  const int64_t np = round_up(n, kPadTo);
  std::memset(dst, 0, sizeof(bf16) * np * kp);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) dst[packed_offset(r, c, kp)] = w[r * ldw + c];
}

void unpack_weight(const bf16* src, int64_t n, int64_t k, int64_t ldw, int64_t kp, bf16* w) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) w[r * ldw + c] = src[packed_offset(r, c, kp)];
}

void pack_gate_up(const bf16* w_gate, const bf16* w_up, int64_t i, int64_t h, bf16* dst) {
  const int64_t ip = round_up(i, kPadTo), hp = round_up(h, kPadTo);
  std::memset(dst, 0, sizeof(bf16) * 2 * ip * hp);
  for (int64_t r = 0; r < i; ++r) {
    const int64_t gate_row = gate_up_column(r, false), up_row = gate_up_column(r, true);
    for (int64_t c = 0; c < h; ++c) {
      dst[packed_offset(gate_row, c, hp)] = w_gate[r * h + c];
      dst[packed_offset(up_row, c, hp)] = w_up[r * h + c];
    }
  }
}

void unpack_gate_up(const bf16* src, int64_t i, int64_t h, bf16* w_gate, bf16* w_up) {
  const int64_t hp = round_up(h, kPadTo);
  for (int64_t r = 0; r < i; ++r) {
    const int64_t gate_row = gate_up_column(r, false), up_row = gate_up_column(r, true);
    for (int64_t c = 0; c < h; ++c) {
      w_gate[r * h + c] = src[packed_offset(gate_row, c, hp)];
      w_up[r * h + c] = src[packed_offset(up_row, c, hp)];
    }
  }
}

void pack_transposed_panels(const bf16* packed, int64_t np, int64_t kp, int64_t first_panel,
                            int64_t panel_count, bf16* dst) {
  // Output panel q holds W^T rows k0..k0+15 (columns of W), i.e. one half of a source
  // block's depth. Each output block (32 n by those 16 k) is filled from the two source
  // panels covering its 32 n: a 16x16 transpose of pairs per source panel.
  const int64_t src_blocks = kp / kBlockDepth, dst_blocks = np / kBlockDepth;
  for (int64_t q = 0; q < panel_count; ++q) {
    const int64_t k0 = (first_panel + q) * kPanelRows;
    const int64_t kb = k0 / kBlockDepth, k_half = (k0 % kBlockDepth) / kPanelRows;
    for (int64_t nb = 0; nb < dst_blocks; ++nb) {
      bf16* out = dst + (q * dst_blocks + nb) * kBlockElems;
      for (int64_t half = 0; half < 2; ++half) {
        const bf16* src = packed + ((2 * nb + half) * src_blocks + kb) * kBlockElems;
        for (int64_t kk = 0; kk < kPanelRows; ++kk) {
          const int64_t k_local = k_half * kPanelRows + kk;
          const bf16* src_row = src + (k_local / 2) * 2 * kPanelRows + (k_local % 2);
          bf16* out_col = out + half * (kPanelRows / 2) * 2 * kPanelRows + kk * 2;
          for (int64_t n = 0; n < kPanelRows; ++n)
            out_col[(n / 2) * 2 * kPanelRows + (n % 2)] = src_row[2 * n];
        }
      }
    }
  }
}

void pack_expert_slice(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up,
                       const bf16* w_down, int64_t e, int64_t s, bf16* gate_up, bf16* down) {
  const int64_t H = layout.hidden, I = layout.intermediate, is = layout.slice_width(), hp = layout.hp();
  const int64_t c0 = s * is, cols = layout.slice_columns(s);
  bf16* gu = gate_up + layout.gate_up_offset(s, e);
  // pack_gate_up fills round_up(cols, 32) of the slice's Is rows; the rest stays zero.
  std::memset(gu, 0, sizeof(bf16) * 2 * is * hp);
  if (cols > 0) pack_gate_up(w_gate + (e * I + c0) * H, w_up + (e * I + c0) * H, cols, H, gu);
  pack_weight(w_down + e * H * I + c0, H, cols, I, is, down + layout.down_offset(s, e));
}

void unpack_expert_slice(const ExpertLayout& layout, const bf16* gate_up, const bf16* down, int64_t e,
                         int64_t s, bf16* w_gate, bf16* w_up, bf16* w_down) {
  const int64_t H = layout.hidden, I = layout.intermediate, is = layout.slice_width();
  const int64_t c0 = s * is, cols = layout.slice_columns(s);
  if (cols <= 0) return;
  unpack_gate_up(gate_up + layout.gate_up_offset(s, e), cols, H, w_gate + (e * I + c0) * H, w_up + (e * I + c0) * H);
  unpack_weight(down + layout.down_offset(s, e), H, cols, I, is, w_down + e * H * I + c0);
}

}  // namespace kt
