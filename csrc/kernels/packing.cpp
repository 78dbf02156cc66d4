#include "kt/packing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

namespace kt {
namespace {

inline bf16 to_bf16(bf16 v) { return v; }
inline bf16 to_bf16(int8_t v) { return f32_to_bf16(static_cast<float>(v)); }

}  // namespace

template <typename T>
void pack_weight(const T* w, int64_t n, int64_t k, int64_t ldw, int64_t kp, T* dst) {
  const int64_t np = round_up(n, kPadTo);
  std::memset(dst, 0, sizeof(T) * np * kp);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) dst[packed_offset(r, c, kp)] = w[r * ldw + c];
}

template <typename T>
void unpack_weight(const T* src, int64_t n, int64_t k, int64_t ldw, int64_t kp, T* w) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) w[r * ldw + c] = src[packed_offset(r, c, kp)];
}

template <typename T>
void pack_gate_up(const T* w_gate, const T* w_up, int64_t i, int64_t h, T* dst) {
  const int64_t ip = round_up(i, kPadTo), hp = round_up(h, kPadTo);
  std::memset(dst, 0, sizeof(T) * 2 * ip * hp);
  for (int64_t r = 0; r < i; ++r) {
    const int64_t gate_row = gate_up_column(r, false), up_row = gate_up_column(r, true);
    for (int64_t c = 0; c < h; ++c) {
      dst[packed_offset(gate_row, c, hp)] = w_gate[r * h + c];
      dst[packed_offset(up_row, c, hp)] = w_up[r * h + c];
    }
  }
}

template <typename T>
void unpack_gate_up(const T* src, int64_t i, int64_t h, T* w_gate, T* w_up) {
  const int64_t hp = round_up(h, kPadTo);
  for (int64_t r = 0; r < i; ++r) {
    const int64_t gate_row = gate_up_column(r, false), up_row = gate_up_column(r, true);
    for (int64_t c = 0; c < h; ++c) {
      w_gate[r * h + c] = src[packed_offset(gate_row, c, hp)];
      w_up[r * h + c] = src[packed_offset(up_row, c, hp)];
    }
  }
}

namespace {

// Writes panels [first_panel, first_panel + panel_count) of pack(W^T) from packed W (np x kp),
// element W[n][k] as convert(W[n][k], source panel, n % 16).
template <typename T, typename Out, typename Convert>
void transpose_packed(const T* packed, int64_t np, int64_t kp, int64_t first_panel, int64_t panel_count, Out* dst,
                      const Convert& convert) {
  // Output panel q holds W^T rows k0..k0+15 (columns of W), i.e. one half of a source
  // block's depth. Each output block (32 n by those 16 k) is filled from the two source
  // panels covering its 32 n: a 16x16 transpose of pairs per source panel.
  const int64_t src_blocks = kp / kBlockDepth, dst_blocks = np / kBlockDepth;
  for (int64_t q = 0; q < panel_count; ++q) {
    const int64_t k0 = (first_panel + q) * kPanelRows;
    const int64_t kb = k0 / kBlockDepth, k_half = (k0 % kBlockDepth) / kPanelRows;
    for (int64_t nb = 0; nb < dst_blocks; ++nb) {
      Out* out = dst + (q * dst_blocks + nb) * kBlockElems;
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t panel = 2 * nb + half;
        const T* src = packed + (panel * src_blocks + kb) * kBlockElems;
        for (int64_t kk = 0; kk < kPanelRows; ++kk) {
          const int64_t k_local = k_half * kPanelRows + kk;
          const T* src_row = src + (k_local / 2) * 2 * kPanelRows + (k_local % 2);
          Out* out_col = out + half * (kPanelRows / 2) * 2 * kPanelRows + kk * 2;
          for (int64_t n = 0; n < kPanelRows; ++n)
            out_col[(n / 2) * 2 * kPanelRows + (n % 2)] = convert(src_row[2 * n], panel, n);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void pack_transposed_panels(const T* packed, const float* row_scales, int64_t np, int64_t kp, int64_t first_panel,
                            int64_t panel_count, bf16* dst) {
  transpose_packed(packed, np, kp, first_panel, panel_count, dst, [row_scales](T v, int64_t panel, int64_t n) {
    return row_scales ? f32_to_bf16(v * row_scales[panel * kPanelRows + n]) : to_bf16(v);
  });
}

void pack_transposed_codes(const int8_t* packed, int64_t np, int64_t kp, int64_t first_panel, int64_t panel_count,
                           int8_t* dst) {
  transpose_packed(packed, np, kp, first_panel, panel_count, dst, [](int8_t v, int64_t, int64_t) { return v; });
}

template void pack_weight(const bf16*, int64_t, int64_t, int64_t, int64_t, bf16*);
template void pack_weight(const int8_t*, int64_t, int64_t, int64_t, int64_t, int8_t*);
template void pack_weight(const uint8_t*, int64_t, int64_t, int64_t, int64_t, uint8_t*);
template void unpack_weight(const bf16*, int64_t, int64_t, int64_t, int64_t, bf16*);
template void unpack_weight(const int8_t*, int64_t, int64_t, int64_t, int64_t, int8_t*);
template void pack_gate_up(const bf16*, const bf16*, int64_t, int64_t, bf16*);
template void pack_gate_up(const int8_t*, const int8_t*, int64_t, int64_t, int8_t*);
template void pack_gate_up(const uint8_t*, const uint8_t*, int64_t, int64_t, uint8_t*);
template void unpack_gate_up(const bf16*, int64_t, int64_t, bf16*, bf16*);
template void unpack_gate_up(const int8_t*, int64_t, int64_t, int8_t*, int8_t*);
template void pack_transposed_panels(const bf16*, const float*, int64_t, int64_t, int64_t, int64_t, bf16*);
template void pack_transposed_panels(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, bf16*);

void decode_panels(const int8_t* packed, int64_t kp, int64_t panels, bf16* dst) {
  const int64_t n = panels * kPanelRows * kp;
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(packed[i]);
}

float quantize_row_int8(const bf16* w, int64_t n, int8_t* codes) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(bf16_to_f32(w[i])));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::nearbyint(bf16_to_f32(w[i]) / scale);
    codes[i] = static_cast<int8_t>(q > 127.f ? 127.f : q < -127.f ? -127.f : q);
  }
  return scale;
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
  unpack_gate_up(gate_up + layout.gate_up_offset(s, e), cols, H, w_gate + c0 * H, w_up + c0 * H);
  unpack_weight(down + layout.down_offset(s, e), H, cols, I, is, w_down + c0);
}

void pack_expert_slice_int8_codes(const ExpertLayout& layout, const Int8Slice& codes, int64_t e, int64_t s,
                                  int8_t* gate_up, int8_t* down, float* gate_up_scale, float* down_scale) {
  const int64_t H = layout.hidden, is = layout.slice_width(), hp = layout.hp();
  const int64_t cols = layout.slice_columns(s);
  float* gu_scale = gate_up_scale + layout.gate_up_scale_offset(s, e, WeightScales::kPerChannel);
  float* d_scale = down_scale + layout.down_scale_offset(s, e, WeightScales::kPerChannel);
  std::fill(gu_scale, gu_scale + 2 * is, 0.f);
  std::fill(d_scale, d_scale + hp, 0.f);
  for (int64_t r = 0; r < cols; ++r) {
    gu_scale[gate_up_column(r, false)] = codes.gate_scales[r];
    gu_scale[gate_up_column(r, true)] = codes.up_scales[r];
  }
  std::copy(codes.down_scales, codes.down_scales + H, d_scale);  // a down row spans every slice
  int8_t* gu = gate_up + layout.gate_up_offset(s, e);
  std::memset(gu, 0, 2 * is * hp);
  if (cols > 0) pack_gate_up(codes.gate, codes.up, cols, H, gu);
  pack_weight(codes.down, H, cols, codes.ld_down, is, down + layout.down_offset(s, e));
}

void pack_expert_slice_int8(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up, const bf16* w_down,
                            int64_t e, int64_t s, int8_t* gate_up, int8_t* down, float* gate_up_scale,
                            float* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, c0 = s * layout.slice_width();
  const int64_t cols = layout.slice_columns(s);
  std::vector<int8_t> g(cols * H), u(cols * H), d_row(I), d(H * cols);
  std::vector<float> g_scale(cols), u_scale(cols), d_scale(H);
  for (int64_t r = 0; r < cols; ++r) {
    const int64_t row = e * I + c0 + r;
    g_scale[r] = quantize_row_int8(w_gate + row * H, H, g.data() + r * H);
    u_scale[r] = quantize_row_int8(w_up + row * H, H, u.data() + r * H);
  }
  for (int64_t h = 0; h < H; ++h) {  // the whole row sets the scale; the slice keeps its columns
    d_scale[h] = quantize_row_int8(w_down + (e * H + h) * I, I, d_row.data());
    std::memcpy(d.data() + h * cols, d_row.data() + c0, cols);
  }
  const Int8Slice codes{g.data(), u.data(), d.data(), cols, g_scale.data(), u_scale.data(), d_scale.data()};
  pack_expert_slice_int8_codes(layout, codes, e, s, gate_up, down, gate_up_scale, down_scale);
}

void unpack_expert_slice_int8(const ExpertLayout& layout, const int8_t* gate_up, const int8_t* down,
                              const float* gate_up_scale, const float* down_scale, int64_t e, int64_t s,
                              bf16* w_gate, bf16* w_up, bf16* w_down) {
  const int64_t H = layout.hidden, I = layout.intermediate, is = layout.slice_width();
  const int64_t c0 = s * is, cols = layout.slice_columns(s);
  if (cols <= 0) return;
  std::vector<int8_t> g(cols * H), u(cols * H), d(H * cols);
  unpack_gate_up(gate_up + layout.gate_up_offset(s, e), cols, H, g.data(), u.data());
  unpack_weight(down + layout.down_offset(s, e), H, cols, cols, is, d.data());
  const float* gu_scale = gate_up_scale + layout.gate_up_scale_offset(s, e, WeightScales::kPerChannel);
  const float* d_scale = down_scale + layout.down_scale_offset(s, e, WeightScales::kPerChannel);
  for (int64_t r = 0; r < cols; ++r) {
    const float sg = gu_scale[gate_up_column(r, false)], su = gu_scale[gate_up_column(r, true)];
    for (int64_t c = 0; c < H; ++c) {
      w_gate[(c0 + r) * H + c] = f32_to_bf16(g[r * H + c] * sg);
      w_up[(c0 + r) * H + c] = f32_to_bf16(u[r * H + c] * su);
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < cols; ++c) w_down[h * I + c0 + c] = f32_to_bf16(d[h * cols + c] * d_scale[h]);
}


namespace {

// Element i of int4 codes packed two per byte.
inline int int4_code(const uint8_t* packed, int64_t i) {
  const int v = (packed[i / 2] >> (4 * (i % 2))) & 0xf;
  return (v ^ 8) - 8;
}

// Index of the block scale of packed element (n, k) in a matrix of `blocks` blocks per panel.
inline int64_t block_scale_index(int64_t n, int64_t k, int64_t blocks) {
  return ((n / kPanelRows) * blocks + k / kBlockDepth) * kPanelRows + n % kPanelRows;
}

}  // namespace

void pack_int4_codes(const int8_t* codes, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; i += 2)
    out[i / 2] = static_cast<uint8_t>((codes[i] & 0xf) | ((codes[i + 1] & 0xf) << 4));
}

bf16 quantize_group_int4(const bf16* w, int64_t n, int8_t* codes) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(bf16_to_f32(w[i])));
  bf16 scale = f32_to_bf16(amax > 0.f ? amax / 7.f : 1.f);
  if (!(bf16_to_f32(scale) > 0.f)) scale = f32_to_bf16(1.f);  // amax / 7 below bf16's range
  const float s = bf16_to_f32(scale);
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::nearbyint(bf16_to_f32(w[i]) / s);
    codes[i] = static_cast<int8_t>(q > 7.f ? 7.f : q < -7.f ? -7.f : q);
  }
  return scale;
}

void decode_panels_int4(const uint8_t* packed, const bf16* block_scales, int64_t kp, int64_t panels, bf16* dst) {
  const int64_t blocks = kp / kBlockDepth;
  for (int64_t i = 0; i < panels * kPanelRows * kp; ++i) {
    const int64_t panel = i / (kPanelRows * kp), block = i % (kPanelRows * kp) / kBlockElems;
    const int64_t row = i % (2 * kPanelRows) / 2;
    const float scale = bf16_to_f32(block_scales[(panel * blocks + block) * kPanelRows + row]);
    dst[i] = f32_to_bf16(int4_code(packed, i) * scale);
  }
}

void pack_transposed_panels_int4(const uint8_t* packed, const bf16* block_scales, int64_t np, int64_t kp,
                                 int64_t first_panel, int64_t panel_count, bf16* dst) {
  const int64_t blocks = kp / kBlockDepth, k0 = first_panel * kPanelRows;
  for (int64_t k = k0; k < k0 + panel_count * kPanelRows; ++k)
    for (int64_t n = 0; n < np; ++n) {
      const float scale = bf16_to_f32(block_scales[block_scale_index(n, k, blocks)]);
      dst[packed_offset(k - k0, n, np)] = f32_to_bf16(int4_code(packed, packed_offset(n, k, kp)) * scale);
    }
}

void pack_expert_slice_int4_codes(const ExpertLayout& layout, const Int4Slice& codes, int64_t e, int64_t s,
                                  int64_t group, uint8_t* gate_up, uint8_t* down, bf16* gate_up_scale,
                                  bf16* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, is = layout.slice_width(), hp = layout.hp();
  const int64_t c0 = s * is, cols = layout.slice_columns(s);
  const int64_t gu_blocks = hp / kBlockDepth, d_blocks = is / kBlockDepth;
  const int64_t h_groups = H / group, i_groups = I / group;
  // Codes in the int8 layout first (same positions), then two per byte.
  std::vector<int8_t> gu_codes(2 * is * hp, 0), d_codes(hp * is);
  if (cols > 0) pack_gate_up(codes.gate, codes.up, cols, H, gu_codes.data());
  pack_weight(codes.down, H, cols, codes.ld_down, is, d_codes.data());
  pack_int4_codes(gu_codes.data(), 2 * is * hp, gate_up + layout.gate_up_offset(s, e) / 2);
  pack_int4_codes(d_codes.data(), hp * is, down + layout.down_offset(s, e) / 2);

  bf16* gu_out = gate_up_scale + layout.gate_up_scale_offset(s, e, WeightScales::kPerBlock);
  bf16* d_out = down_scale + layout.down_scale_offset(s, e, WeightScales::kPerBlock);
  std::fill(gu_out, gu_out + 2 * is * gu_blocks, bf16(0));
  std::fill(d_out, d_out + hp * d_blocks, bf16(0));
  for (int64_t r = 0; r < cols; ++r)
    for (const bool is_up : {false, true}) {
      const int64_t n = gate_up_column(r, is_up);
      const bf16* from = (is_up ? codes.up_scales : codes.gate_scales) + r * h_groups;
      for (int64_t k = 0; k < H; k += kBlockDepth) gu_out[block_scale_index(n, k, gu_blocks)] = from[k / group];
    }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t k = 0; k < cols; k += kBlockDepth)
      d_out[block_scale_index(h, k, d_blocks)] = codes.down_scales[h * i_groups + (c0 + k) / group];
}

void pack_expert_slice_int4(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up, const bf16* w_down,
                            int64_t e, int64_t s, int64_t group, uint8_t* gate_up, uint8_t* down, bf16* gate_up_scale,
                            bf16* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, c0 = s * layout.slice_width();
  const int64_t cols = layout.slice_columns(s), h_groups = H / group, i_groups = I / group;
  // The slice's gate and up rows and its down columns; the whole down rows set their scales.
  std::vector<int8_t> g(cols * H), u(cols * H), d(H * cols), d_row(I);
  std::vector<bf16> g_scale(cols * h_groups), u_scale(cols * h_groups), d_scale(H * i_groups);
  for (int64_t r = 0; r < cols; ++r)
    for (int64_t q = 0; q < h_groups; ++q) {
      const int64_t at = (e * I + c0 + r) * H + q * group;
      g_scale[r * h_groups + q] = quantize_group_int4(w_gate + at, group, g.data() + r * H + q * group);
      u_scale[r * h_groups + q] = quantize_group_int4(w_up + at, group, u.data() + r * H + q * group);
    }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t q = 0; q < i_groups; ++q)
      d_scale[h * i_groups + q] = quantize_group_int4(w_down + (e * H + h) * I + q * group, group, d_row.data() + q * group);
    std::memcpy(d.data() + h * cols, d_row.data() + c0, cols);
  }
  const Int4Slice codes{g.data(), u.data(), d.data(), cols, g_scale.data(), u_scale.data(), d_scale.data()};
  pack_expert_slice_int4_codes(layout, codes, e, s, group, gate_up, down, gate_up_scale, down_scale);
}

void unpack_decoded_slice(const ExpertLayout& layout, int64_t e, int64_t s,
                          const std::function<void(bf16* gate_up, bf16* down)>& decode, bf16* w_gate, bf16* w_up,
                          bf16* w_down) {
  const int64_t H = layout.hidden, I = layout.intermediate, is = layout.slice_width(), hp = layout.hp();
  const int64_t c0 = s * is, cols = layout.slice_columns(s);
  if (cols <= 0) return;
  std::vector<bf16> gu(2 * is * hp), d(hp * is);
  decode(gu.data(), d.data());
  unpack_gate_up(gu.data(), cols, H, w_gate + c0 * H, w_up + c0 * H);
  unpack_weight(d.data(), H, cols, I, is, w_down + c0);
}

void unpack_expert_slice_int4(const ExpertLayout& layout, const uint8_t* gate_up, const uint8_t* down,
                              const bf16* gate_up_scale, const bf16* down_scale, int64_t e, int64_t s, bf16* w_gate,
                              bf16* w_up, bf16* w_down) {
  const int64_t is = layout.slice_width(), hp = layout.hp();
  unpack_decoded_slice(layout, e, s, [&](bf16* gu, bf16* d) {
    decode_panels_int4(gate_up + layout.gate_up_offset(s, e) / 2,
                       gate_up_scale + layout.gate_up_scale_offset(s, e, WeightScales::kPerBlock), hp,
                       2 * is / kPanelRows, gu);
    decode_panels_int4(down + layout.down_offset(s, e) / 2,
                       down_scale + layout.down_scale_offset(s, e, WeightScales::kPerBlock), is, hp / kPanelRows, d);
  }, w_gate, w_up, w_down);
}

}  // namespace kt
