// The packed weight layout every GEMM path reads ("panel-VNNI").
//
// A weight W [N, K] used as y = x W^T is padded to Np = round_up(N, 32) rows and
// Kp = round_up(K, 32) columns (zeros) and stored as panels of 16 output rows. A panel is
// Kp/32 blocks of 32 reduction steps; a block is 16 rows of 64 bytes, row j holding the
// pairs (W[n][2j], W[n][2j+1]) for the panel's 16 n. One block is exactly one AMX B tile,
// and one of its rows is one AVX-512 vdpbf16ps operand, so AMX, AVX-512-BF16, AVX2 and the
// scalar path all read the same bytes. Real model sizes are multiples of 32: no padding.
#pragma once

#include <cstdint>
#include <functional>

#include "kt/bf16.h"
#include "kt/weight_format.h"

namespace kt {

constexpr int64_t kPanelRows = 16;                         // output rows per panel
constexpr int64_t kBlockDepth = 32;                        // reduction steps per block
constexpr int64_t kBlockElems = kPanelRows * kBlockDepth;  // 512 bf16 = 1 KiB
constexpr int64_t kPadTo = 32;                             // both dims are padded to this

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The size rule of the packed experts, for any integer type: the ops layer applies it to
// symbolic sizes (torch.compile), the kernels to int64_t.
template <typename Int>
Int padded_size(const Int& v) {
  return (v + (kPadTo - 1)) / kPadTo * kPadTo;
}
// Padded width of each of `slices` slices of an intermediate dimension of size `intermediate`.
template <typename Int, typename Count>
Int padded_slice_width(const Int& intermediate, const Count& slices) {
  return padded_size((intermediate + slices - 1) / slices);
}

// Offset of W[n][k] inside a packed matrix with padded depth kp.
inline int64_t packed_offset(int64_t n, int64_t k, int64_t kp) {
  return ((n / kPanelRows) * (kp / kBlockDepth) + k / kBlockDepth) * kBlockElems +
         ((k % kBlockDepth) / 2) * (2 * kPanelRows) + (n % kPanelRows) * 2 + (k % 2);
}

// Packs W [n, k] (row stride ldw) into dst as a matrix of depth kp (a multiple of 32, at
// least k): dst holds round_up(n,32) * kp elements; padding is written as zeros. T is the
// element: bf16, or the int8 or fp8 codes of a quantized format (same positions).
template <typename T>
void pack_weight(const T* w, int64_t n, int64_t k, int64_t ldw, int64_t kp, T* dst);

// Inverse of pack_weight: writes W [n, k] (row stride ldw) from src, packed with depth kp.
template <typename T>
void unpack_weight(const T* src, int64_t n, int64_t k, int64_t ldw, int64_t kp, T* w);

// The fused gate/up matrix of one expert: rows interleave 16-row panels of gate and up
// (gate panel j, up panel j, gate panel j+1, ...), so one GEMM pass yields g and u for the
// same 16 intermediate columns side by side. Shape [2 * round_up(i,32), round_up(h,32)].
template <typename T>
void pack_gate_up(const T* w_gate, const T* w_up, int64_t i, int64_t h, T* dst);
template <typename T>
void unpack_gate_up(const T* src, int64_t i, int64_t h, T* w_gate, T* w_up);

// Column index of gate (is_up = false) or up intermediate column c in the fused layout.
inline int64_t gate_up_column(int64_t c, bool is_up) {
  return (c / kPanelRows) * 2 * kPanelRows + (is_up ? kPanelRows : 0) + c % kPanelRows;
}

// The transposed use of a packed matrix (dX = dY W instead of y = x W^T): writes panels
// [first_panel, first_panel + panel_count) of pack(W^T) into dst, as bf16. np and kp are the
// padded sizes of W; dst holds panel_count * 16 * np elements. For a quantized W = diag(s) Q,
// `row_scales` holds s (np entries, one per row of the packed matrix) and the panels hold the
// dequantized weights bf16(Q[n][k] * s[n]); bf16 weights take null. The backward uses this to
// stream transposed weights through a small buffer instead of keeping a second copy resident.
template <typename T>
void pack_transposed_panels(const T* packed, const float* row_scales, int64_t np, int64_t kp, int64_t first_panel,
                            int64_t panel_count, bf16* dst);

// pack_transposed_panels of int8 codes as the codes themselves (no scales): the panels of the
// input gradient's int8 product of W8A8 (kt/kernels.h's W8A8Kernels).
void pack_transposed_codes(const int8_t* packed, int64_t np, int64_t kp, int64_t first_panel, int64_t panel_count,
                           int8_t* dst);

// `panels` consecutive packed panels of depth kp as bf16, same layout: int8 codes convert
// exactly (|q| <= 127 has at most 8 significant bits).
void decode_panels(const int8_t* packed, int64_t kp, int64_t panels, bf16* dst);

// int4 codes (in [-8, 7]) two per byte, as WeightStorage::kInt4 holds them: out[i] holds codes
// 2i and 2i + 1 (n even).
void pack_int4_codes(const int8_t* codes, int64_t n, uint8_t* out);

// int4: `panels` packed panels of depth kp (codes two per byte, kt/weight_format.h) as the
// dequantized bf16 weights bf16(code * scale), block_scales holding one per row of each block
// (WeightScales::kPerBlock); and the transposed panels of such a matrix (np x kp), as
// pack_transposed_panels writes them.
void decode_panels_int4(const uint8_t* packed, const bf16* block_scales, int64_t kp, int64_t panels, bf16* dst);
void pack_transposed_panels_int4(const uint8_t* packed, const bf16* block_scales, int64_t np, int64_t kp,
                                 int64_t first_panel, int64_t panel_count, bf16* dst);

// Symmetric int4 of one quantization group w[0, n) (kt_ops/reference.py's quantize_int4):
// writes the codes round(w / scale) (half to even, clamped to +-7) and returns scale =
// max|w| / 7 rounded to bf16 (1 for a group of zeros).
bf16 quantize_group_int4(const bf16* w, int64_t n, int8_t* codes);

// Symmetric int8 of one row w[0, n) (kt_ops/reference.py's quantize_int8): writes the codes
// round(w / scale) (half to even, clamped to +-127) and returns scale = max|w| / 127 (1 for a
// row of zeros).
float quantize_row_int8(const bf16* w, int64_t n, int8_t* codes);

// One layer's experts split along the intermediate dimension into `slices` slices of equal
// padded width Is, one per NUMA node, so each node's threads read only their node's memory:
//   gate_up [S, E, 2*Is, Hp]: slice s holds pack_gate_up of intermediate rows [s*Is, (s+1)*Is)
//   down    [S, E, Hp, Is]:   slice s holds pack_weight of the same columns of W_down
// With one slice this is the plain [E, 2*Ip, Hp] / [E, Hp, Ip] layout.
struct ExpertLayout {
  int64_t experts, hidden, intermediate, slices;

  int64_t hp() const { return padded_size(hidden); }
  int64_t slice_width() const { return padded_slice_width(intermediate, slices); }
  // Intermediate columns of slice s that hold weights (the rest is padding).
  int64_t slice_columns(int64_t s) const {
    const int64_t left = intermediate - s * slice_width();
    return left <= 0 ? 0 : left < slice_width() ? left : slice_width();
  }
  int64_t gate_up_elems() const { return slices * experts * 2 * slice_width() * hp(); }
  int64_t down_elems() const { return slices * experts * hp() * slice_width(); }
  // Offsets of expert e's slice s inside the packed tensors.
  int64_t gate_up_offset(int64_t s, int64_t e) const { return (s * experts + e) * 2 * slice_width() * hp(); }
  int64_t down_offset(int64_t s, int64_t e) const { return (s * experts + e) * hp() * slice_width(); }
  // The scales of a quantized format (kt/weight_format.h's WeightScales): expert e's slice s
  // starts at these offsets into gate_up_scale and down_scale.
  int64_t gate_up_scale_offset(int64_t s, int64_t e, WeightScales scales) const {
    return (s * experts + e) * scales_of_rows(scales, 2 * slice_width(), hp());
  }
  int64_t down_scale_offset(int64_t s, int64_t e, WeightScales scales) const {
    return (s * experts + e) * scales_of_rows(scales, hp(), slice_width());
  }
};

// How many slices a layer of this intermediate size gets on a machine of `nodes` NUMA nodes:
// one per node, but never a slice of padding only. In closed form: the columns come in
// ceil(I / 32) groups of 32; `nodes` slices would take ceil(groups / nodes) groups each, and
// that many groups per slice need only ceil(groups / per_slice) slices.
inline int64_t slices_for(int64_t intermediate, int64_t nodes) {
  const int64_t groups = (intermediate + kPadTo - 1) / kPadTo;
  const int64_t wanted = nodes < 1 ? 1 : nodes < groups ? nodes : groups;
  if (wanted <= 1) return 1;
  const int64_t per_slice = (groups + wanted - 1) / wanted;
  return (groups + per_slice - 1) / per_slice;
}

// kt.pack_experts returns, beside the packed tensors, a small int64 tensor that says what they
// hold: the true sizes (the padded shapes alone admit other sizes: H = 60 and H = 64 pack to the
// same shape) and the weight format. The ops check it against their other arguments, so a
// call on experts packed for other sizes raises instead of computing another function.
// Fields, in the tensor's order: magic, format, experts, hidden, intermediate, slices.
constexpr int64_t kLayoutFields = 6;
constexpr int64_t kLayoutMagic = 0x6b745f6f7073;  // "kt_ops" in ASCII

inline void encode_layout(const ExpertLayout& layout, WeightFormat format, int64_t* out) {
  const int64_t fields[kLayoutFields] = {kLayoutMagic,    static_cast<int64_t>(format), layout.experts,
                                         layout.hidden, layout.intermediate,          layout.slices};
  for (int64_t i = 0; i < kLayoutFields; ++i) out[i] = fields[i];
}

// The layout encoded in `in`; false if `in` was not written by encode_layout (wrong magic, or
// sizes no packing has).
inline bool decode_layout(const int64_t* in, ExpertLayout* layout, int64_t* format) {
  if (in[0] != kLayoutMagic) return false;
  *format = in[1];
  *layout = {in[2], in[3], in[4], in[5]};
  return layout->experts >= 0 && layout->hidden > 0 && layout->intermediate > 0 && layout->slices > 0 &&
         layout->slices == slices_for(layout->intermediate, layout->slices);
}

// Packs expert e's slice s from w_gate, w_up [E, I, H] and w_down [E, H, I] into the
// tensors gate_up and down of `layout`.
void pack_expert_slice(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up,
                       const bf16* w_down, int64_t e, int64_t s, bf16* gate_up, bf16* down);

// Inverse of pack_expert_slice: writes expert e's slice s of its own weights w_gate, w_up
// [I, H] and w_down [H, I] (the expert's block of the [E, ...] tensors, or a tensor of
// selected experts) from the packed tensors. So do the formats' unpack_expert_slice_* below.
void unpack_expert_slice(const ExpertLayout& layout, const bf16* gate_up, const bf16* down, int64_t e,
                         int64_t s, bf16* w_gate, bf16* w_up, bf16* w_down);

// One expert's slice s in int8 as kt_ops/reference.py's quantize_int8 returns it: the codes
// of the slice's gate and up rows ([cols, H], row stride H) and their scales ([cols]), the
// codes of the slice's down columns ([H, cols], row stride ld_down) and the scales of the
// whole down rows ([H]).
struct Int8Slice {
  const int8_t *gate, *up, *down;
  int64_t ld_down;
  const float *gate_scales, *up_scales, *down_scales;
};

// Packs expert e's slice s from its int8 codes: codes in the packed layout, scales at
// gate_up_scale_offset / down_scale_offset (each slice holds the scales of every down row;
// zero for padding rows).
void pack_expert_slice_int8_codes(const ExpertLayout& layout, const Int8Slice& codes, int64_t e, int64_t s,
                                  int8_t* gate_up, int8_t* down, float* gate_up_scale, float* down_scale);

// pack_expert_slice into int8 from bf16 weights: each gate, up and down row quantized whole by
// quantize_row_int8, then pack_expert_slice_int8_codes.
void pack_expert_slice_int8(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up, const bf16* w_down,
                            int64_t e, int64_t s, int8_t* gate_up, int8_t* down, float* gate_up_scale,
                            float* down_scale);

// One expert's slice s in int4 as kt_ops/reference.py's quantize_int4 returns it (one code per
// int8, in [-8, 7]): the codes of the slice's gate and up rows ([cols, H], row stride H) and
// their group scales ([cols, H / group]), the codes of the slice's down columns ([H, cols],
// row stride ld_down) and the group scales of the whole down rows ([H, I / group]).
struct Int4Slice {
  const int8_t *gate, *up, *down;
  int64_t ld_down;
  const bf16 *gate_scales, *up_scales, *down_scales;
};

// Packs expert e's slice s from its int4 codes in groups of `group` (32, 64 or 128, dividing
// H and I): codes two per byte in the packed layout, block scales as WeightScales::kPerBlock
// orders them (zero for padding).
void pack_expert_slice_int4_codes(const ExpertLayout& layout, const Int4Slice& codes, int64_t e, int64_t s,
                                  int64_t group, uint8_t* gate_up, uint8_t* down, bf16* gate_up_scale,
                                  bf16* down_scale);

// pack_expert_slice into int4 from bf16 weights: each gate, up and down row quantized by
// quantize_group_int4 group by group, then pack_expert_slice_int4_codes.
void pack_expert_slice_int4(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up, const bf16* w_down,
                            int64_t e, int64_t s, int64_t group, uint8_t* gate_up, uint8_t* down, bf16* gate_up_scale,
                            bf16* down_scale);

// Expert e's slice s of its w_gate, w_up [I, H] and w_down [H, I] from its panels as bf16:
// decode(gate_up, down) writes the slice's 2 is / 16 gate/up panels (depth hp) and hp / 16
// down panels (depth is) as packed bf16, for a format whose kernels decode panels.
void unpack_decoded_slice(const ExpertLayout& layout, int64_t e, int64_t s,
                          const std::function<void(bf16* gate_up, bf16* down)>& decode, bf16* w_gate, bf16* w_up,
                          bf16* w_down);

// The dequantized weights (bf16(code * scale)) of expert e's slice s.
void unpack_expert_slice_int4(const ExpertLayout& layout, const uint8_t* gate_up, const uint8_t* down,
                              const bf16* gate_up_scale, const bf16* down_scale, int64_t e, int64_t s, bf16* w_gate,
                              bf16* w_up, bf16* w_down);

// The dequantized weights (code * scale, rounded to bf16) of expert e's slice s.
void unpack_expert_slice_int8(const ExpertLayout& layout, const int8_t* gate_up, const int8_t* down,
                              const float* gate_up_scale, const float* down_scale, int64_t e, int64_t s,
                              bf16* w_gate, bf16* w_up, bf16* w_down);

// fp8 (kt/fp8.h): `panels` packed panels of depth kp as the dequantized bf16 weights
// bf16(code * scale), tile_scales holding one per packed block (WeightScales::kPerTile); and
// the transposed panels of such a matrix (np x kp), as pack_transposed_panels writes them.
void decode_panels_fp8(const uint8_t* packed, const float* tile_scales, int64_t kp, int64_t panels, bf16* dst);
void pack_transposed_panels_fp8(const uint8_t* packed, const float* tile_scales, int64_t np, int64_t kp,
                                int64_t first_panel, int64_t panel_count, bf16* dst);

// fp8's block scales of w [n, k] (kt_ops/reference.py's quantize_fp8): out [ceil(n/128),
// ceil(k/128)] (row major) = max|block| / 448, 1 for a block of zeros.
constexpr int64_t kFp8Block = 128;
void fp8_block_scales(const bf16* w, int64_t n, int64_t k, float* out);

// One expert's slice s in fp8 as checkpoints ship it: the codes of the slice's gate and up
// rows ([cols, H], row stride H), of the slice's down columns ([H, cols], row stride
// ld_down), and the block scales of the expert's whole matrices (gate, up [ceil(I/128),
// ceil(H/128)], down [ceil(H/128), ceil(I/128)]; the weight is code * scale).
struct Fp8Slice {
  const uint8_t *gate, *up, *down;
  int64_t ld_down;
  const float *gate_scales, *up_scales, *down_scales;
};

// Packs expert e's slice s from its fp8 codes: codes in the packed layout, one scale per
// packed block (the scale of the 128 x 128 block it lies in; zero for blocks of padding).
void pack_expert_slice_fp8_codes(const ExpertLayout& layout, const Fp8Slice& codes, int64_t e, int64_t s,
                                 uint8_t* gate_up, uint8_t* down, float* gate_up_scale, float* down_scale);

// pack_expert_slice into fp8 from bf16 weights: quantize_fp8 of each whole matrix (block
// scales by fp8_block_scales, codes by f32_to_fp8 of w / scale), then
// pack_expert_slice_fp8_codes.
void pack_expert_slice_fp8(const ExpertLayout& layout, const bf16* w_gate, const bf16* w_up, const bf16* w_down,
                           int64_t e, int64_t s, uint8_t* gate_up, uint8_t* down, float* gate_up_scale,
                           float* down_scale);

// The dequantized weights (bf16(code * scale)) of expert e's slice s.
void unpack_expert_slice_fp8(const ExpertLayout& layout, const uint8_t* gate_up, const uint8_t* down,
                             const float* gate_up_scale, const float* down_scale, int64_t e, int64_t s, bf16* w_gate,
                             bf16* w_up, bf16* w_down);

}  // namespace kt
