// fp8 e4m3 experts (kt/packing.h): block scales, quantization, packing of codes with one scale
// per packed block, and the portable decodes the scalar and AVX2 kernel sets use.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kt/fp8.h"
#include "kt/packing.h"

namespace kt {
namespace {

// Index of the tile scale of packed element (n, k) in a matrix of `blocks` blocks per panel.
inline int64_t tile_scale_index(int64_t n, int64_t k, int64_t blocks) {
  return (n / kPanelRows) * blocks + k / kBlockDepth;
}

inline int64_t block_count(int64_t n) { return (n + kFp8Block - 1) / kFp8Block; }

}  // namespace

void decode_panels_fp8(const uint8_t* packed, const float* tile_scales, int64_t kp, int64_t panels, bf16* dst) {
  const int64_t tiles = panels * kp / kBlockDepth;  // consecutive over the panels, as their scales
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t i = t * kBlockElems; i < (t + 1) * kBlockElems; ++i)
      dst[i] = f32_to_bf16(fp8_to_f32(packed[i]) * tile_scales[t]);
}

void pack_transposed_panels_fp8(const uint8_t* packed, const float* tile_scales, int64_t np, int64_t kp,
                                int64_t first_panel, int64_t panel_count, bf16* dst) {
  const int64_t blocks = kp / kBlockDepth, k0 = first_panel * kPanelRows;
  for (int64_t k = k0; k < k0 + panel_count * kPanelRows; ++k)
    for (int64_t n = 0; n < np; ++n)
      dst[packed_offset(k - k0, n, np)] =
          f32_to_bf16(fp8_to_f32(packed[packed_offset(n, k, kp)]) * tile_scales[tile_scale_index(n, k, blocks)]);
}

void fp8_block_scales(const bf16* w, int64_t n, int64_t k, float* out) {
  const int64_t bn = block_count(n), bk = block_count(k);
  std::fill(out, out + bn * bk, 0.f);
  for (int64_t r = 0; r < n; ++r) {
    float* row = out + (r / kFp8Block) * bk;
    for (int64_t c = 0; c < k; ++c) row[c / kFp8Block] = std::fmax(row[c / kFp8Block], std::fabs(bf16_to_f32(w[r * k + c])));
  }
  for (int64_t b = 0; b < bn * bk; ++b) out[b] = out[b] > 0.f ? out[b] / kFp8Max : 1.f;
}

void pack_expert_slice_fp8_codes(const ExpertLayout& layout, const Fp8Slice& codes, int64_t e, int64_t s,
                                 uint8_t* gate_up, uint8_t* down, float* gate_up_scale, float* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, is = layout.slice_width(), hp = layout.hp();
  const int64_t c0 = s * is, cols = layout.slice_columns(s);
  uint8_t* gu = gate_up + layout.gate_up_offset(s, e);
  std::memset(gu, 0, 2 * is * hp);  // pack_gate_up fills round_up(cols, 32) of the slice's Is rows
  if (cols > 0) pack_gate_up(codes.gate, codes.up, cols, H, gu);
  pack_weight(codes.down, H, cols, codes.ld_down, is, down + layout.down_offset(s, e));

  // A packed block lies inside one 128 x 128 block of its matrix: its 16 rows start at a
  // multiple of 16 and its 32 columns at a multiple of 32 (slices start at multiples of 32).
  const int64_t gu_blocks = hp / kBlockDepth, d_blocks = is / kBlockDepth;
  const int64_t h_blocks = block_count(H), i_blocks = block_count(I);
  float* gu_out = gate_up_scale + layout.gate_up_scale_offset(s, e, WeightScales::kPerTile);
  for (int64_t n = 0; n < 2 * is; n += kPanelRows) {
    const bool is_up = (n / kPanelRows) % 2 == 1;
    const int64_t r = (n / (2 * kPanelRows)) * kPanelRows;  // the panel's first row of its matrix
    const float* from = (is_up ? codes.up_scales : codes.gate_scales) + ((c0 + r) / kFp8Block) * h_blocks;
    for (int64_t k = 0; k < hp; k += kBlockDepth)
      gu_out[tile_scale_index(n, k, gu_blocks)] = r < cols && k < H ? from[k / kFp8Block] : 0.f;
  }
  float* d_out = down_scale + layout.down_scale_offset(s, e, WeightScales::kPerTile);
  for (int64_t h = 0; h < hp; h += kPanelRows)
    for (int64_t k = 0; k < is; k += kBlockDepth)
      d_out[tile_scale_index(h, k, d_blocks)] =
          h < H && k < cols ? codes.down_scales[(h / kFp8Block) * i_blocks + (c0 + k) / kFp8Block] : 0.f;
}

void pack_expert_slice_fp8(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up, const bf16* w_down,
                           int64_t e, int64_t s, uint8_t* gate_up, uint8_t* down, float* gate_up_scale,
                           float* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, c0 = s * layout.slice_width();
  const int64_t cols = layout.slice_columns(s), h_blocks = block_count(H), i_blocks = block_count(I);
  const bf16 *g = w_gate + e * I * H, *u = w_up + e * I * H, *d = w_down + e * H * I;
  // The scales of the whole matrices (a block may span two slices), the codes of this slice.
  std::vector<float> g_scales(i_blocks * h_blocks), u_scales(i_blocks * h_blocks), d_scales(h_blocks * i_blocks);
  fp8_block_scales(g, I, H, g_scales.data());
  fp8_block_scales(u, I, H, u_scales.data());
  fp8_block_scales(d, H, I, d_scales.data());
  std::vector<uint8_t> g_codes(cols * H), u_codes(cols * H), d_codes(H * cols);
  for (int64_t r = 0; r < cols; ++r)
    for (int64_t c = 0; c < H; ++c) {
      const int64_t at = (c0 + r) * H + c, block = ((c0 + r) / kFp8Block) * h_blocks + c / kFp8Block;
      g_codes[r * H + c] = f32_to_fp8(bf16_to_f32(g[at]) / g_scales[block]);
      u_codes[r * H + c] = f32_to_fp8(bf16_to_f32(u[at]) / u_scales[block]);
    }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < cols; ++c)
      d_codes[h * cols + c] =
          f32_to_fp8(bf16_to_f32(d[h * I + c0 + c]) / d_scales[(h / kFp8Block) * i_blocks + (c0 + c) / kFp8Block]);
  const Fp8Slice codes{g_codes.data(), u_codes.data(), d_codes.data(), cols,
                       g_scales.data(), u_scales.data(), d_scales.data()};
  pack_expert_slice_fp8_codes(layout, codes, e, s, gate_up, down, gate_up_scale, down_scale);
}

void unpack_expert_slice_fp8(const ExpertLayout& layout, const uint8_t* gate_up, const uint8_t* down,
                             const float* gate_up_scale, const float* down_scale, int64_t e, int64_t s, bf16* w_gate,
                             bf16* w_up, bf16* w_down) {
  const int64_t is = layout.slice_width(), hp = layout.hp();
  unpack_decoded_slice(layout, e, s, [&](bf16* gu, bf16* d) {
    decode_panels_fp8(gate_up + layout.gate_up_offset(s, e),
                      gate_up_scale + layout.gate_up_scale_offset(s, e, WeightScales::kPerTile), hp,
                      2 * is / kPanelRows, gu);
    decode_panels_fp8(down + layout.down_offset(s, e),
                      down_scale + layout.down_scale_offset(s, e, WeightScales::kPerTile), is, hp / kPanelRows, d);
  }, w_gate, w_up, w_down);
}

}  // namespace kt
