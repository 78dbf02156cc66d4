#include "kt/packing.h"

#include <cstring>

namespace kt {

void pack_weight(const bf16* w, int64_t n, int64_t k, int64_t ldw, bf16* dst) {
  const int64_t np = round_up(n, kPadTo), kp = round_up(k, kPadTo);
  std::memset(dst, 0, sizeof(bf16) * np * kp);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) dst[packed_offset(r, c, kp)] = w[r * ldw + c];
}

void unpack_weight(const bf16* src, int64_t n, int64_t k, int64_t ldw, bf16* w) {
  const int64_t kp = round_up(k, kPadTo);
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
  // Row r of W^T is column k = 16 * first_panel + r of W; its depth runs over W's np rows.
  for (int64_t r = 0; r < panel_count * kPanelRows; ++r) {
    const int64_t k = first_panel * kPanelRows + r;
    for (int64_t n = 0; n < np; ++n) dst[packed_offset(r, n, np)] = packed[packed_offset(n, k, kp)];
  }
}

}  // namespace kt
