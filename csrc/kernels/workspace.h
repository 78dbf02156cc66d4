// The expert driver's per-call buffers, by what they hold. Every buffer is bound to a scratch
// slot (kt/scratch.h) here and nowhere else: buffers alive at the same time get different
// slots, and the forward and the backward share the slots (one thread never runs both at
// once), so the memory kept is the larger call's working set.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kt/moe_sft.h"
#include "kt/packing.h"
#include "kt/scratch.h"
#include "lora_operands.h"
#include "routing.h"

namespace kt {

// Extra elements per row of the activation buffers the GEMMs read as A. Without them a row of
// 2048 bf16 is 4 KiB, and the 16 rows of one AMX tile load all fall in one L1 set.
constexpr int64_t kRowSkew = 32;

// The sizes of one call, padded as the packed experts are.
struct CallShape {
  int64_t T, K, H, I, E, S;
  ExpertLayout layout;
  int64_t hp, is, ip;  // padded H, padded slice width, S * is
  CallShape(const MoeDims& d, int64_t slices)
      : T(d.tokens), K(d.top_k), H(d.hidden), I(d.intermediate), E(d.experts), S(slices),
        layout{E, H, I, S}, hp(layout.hp()), is(layout.slice_width()), ip(S * is) {}
};

template <typename Act>
struct ForwardWorkspace {
  int64_t ld_x, ld_z;  // row strides of x_rows and z_rows
  Act* x_rows;         // [rows, ld_x] x, expert-sorted
  Act* x_lora;         // [rows, rgu_p] s x [A_g; A_u]^T
  Act* z_rows;         // [rows, ld_z] z = gate(g, u)
  Act* z_lora;         // [rows, rd_p] s z A_d^T
  float* h_partial;    // [S, rows, hp] each slice's part of the experts' outputs
  Act* a_gu;           // [E, rgu_p, hp] [A_g; A_u], packed per expert
  Act* b_gu;           // [E, 2 ip, rgu_p] blockdiag(B_g, B_u) in the fused gate/up row order
  Act* a_d;            // [E, rd_p, ip] A_d
  Act* b_d;            // [E, hp, rd_p] B_d

  ForwardWorkspace(const CallShape& c, const LoraShape& l, int64_t rows)
      : ld_x(c.hp + kRowSkew), ld_z(c.ip + kRowSkew),
        x_rows(scratch<Act>(Scratch::kRowsA, rows * ld_x)),
        x_lora(scratch<Act>(Scratch::kRowsB, rows * l.rgu_p)),
        z_rows(scratch<Act>(Scratch::kRowsC, rows * ld_z)),
        z_lora(scratch<Act>(Scratch::kRowsD, rows * l.rd_p)),
        h_partial(scratch<float>(Scratch::kRowsOut, c.S * rows * c.hp)),
        a_gu(scratch<Act>(Scratch::kLoraA, c.E * l.rgu_p * c.hp)),
        b_gu(scratch<Act>(Scratch::kLoraB, c.E * 2 * c.ip * l.rgu_p)),
        a_d(scratch<Act>(Scratch::kLoraC, c.E * l.rd_p * c.ip)),
        b_d(scratch<Act>(Scratch::kLoraD, c.E * c.hp * l.rd_p)) {}
};

template <typename Act>
struct BackwardWorkspace {
  int64_t ld_dy, ld_grad_gu;  // row strides of dy_rows and grad_gu
  Act* dy_rows;               // [rows, ld_dy] grad_y, expert-sorted
  float* dy_b;                // [rows, rd_p] dy B_d
  Act* dy_b_scaled;           // [rows, rd_p] s dy B_d
  Act* grad_gu;               // [rows, ld_grad_gu] fused dg | du rows (gate/up weight row order)
  float* dgu_b;               // [rows, rgu_p] [dg B_g | du B_u]
  Act* dgu_b_scaled;          // [rows, rgu_p] s [dg B_g | du B_u]
  Act* z_rows;                // [rows, I] z again, for the down LoRA gradient
  // q [rows, ip], the gradient of z before the routing weight, and later dx_partial [S, rows,
  // hp], each slice's part of dx per pair: one buffer, q is dead once dx is computed.
  float* q_rows;
  float* dx_partial;
  Act* bt_d;   // [E, rd_p, hp] B_d^T, packed per expert
  Act* at_d;   // [E, ip, rd_p] A_d^T
  Act* bt_gu;  // [E, rgu_p, 2 ip] blockdiag(B_g, B_u)^T
  Act* at_gu;  // [E, hp, rgu_p] [A_g; A_u]^T

  BackwardWorkspace(const CallShape& c, const LoraShape& l, int64_t rows)
      : ld_dy(c.hp + kRowSkew), ld_grad_gu(2 * c.ip + kRowSkew),
        dy_rows(scratch<Act>(Scratch::kRowsA, rows * ld_dy)),
        dy_b(scratch<float>(Scratch::kRowsB, rows * l.rd_p)),
        dy_b_scaled(scratch<Act>(Scratch::kRowsC, rows * l.rd_p)),
        grad_gu(scratch<Act>(Scratch::kRowsD, rows * ld_grad_gu)),
        dgu_b(scratch<float>(Scratch::kRowsE, rows * l.rgu_p)),
        dgu_b_scaled(scratch<Act>(Scratch::kRowsF, rows * l.rgu_p)),
        z_rows(scratch<Act>(Scratch::kRowsG, rows * c.I)),
        q_rows(scratch<float>(Scratch::kRowsOut, std::max(rows * c.ip, c.S * rows * c.hp))),
        dx_partial(q_rows),
        bt_d(scratch<Act>(Scratch::kLoraA, c.E * l.rd_p * c.hp)),
        at_d(scratch<Act>(Scratch::kLoraB, c.E * c.ip * l.rd_p)),
        bt_gu(scratch<Act>(Scratch::kLoraC, c.E * l.rgu_p * 2 * c.ip)),
        at_gu(scratch<Act>(Scratch::kLoraD, c.E * c.hp * l.rgu_p)) {}
};

// W8A8's quantized activation rows (kt/kernels.h's W8A8Kernels), expert-sorted: one phase's
// rows at a time (x, then z in the forward; dy, then the fused gate/up gradient in the
// backward), each dead before the next is quantized. Unused (empty) for weight-only sets.
struct Int8Rows {
  int64_t ld;     // row stride, at least the widest row rounded up to the 64 steps of a tile
  int8_t* codes;  // [rows, ld]
  float* scales;  // [rows]

  Int8Rows(const KernelSet& k, const CallShape& c, int64_t rows)
      : ld(k.w8a8 ? round_up(std::max(c.hp, 2 * c.ip), 64) + 64 : 0),
        codes(scratch<int8_t>(Scratch::kRowsInt8, rows * ld)),
        scales(scratch<float>(Scratch::kRowsInt8Scales, k.w8a8 ? rows : 0)) {}
  int8_t* row(int64_t r) const { return codes + r * ld; }

  // Quantizes expert e's rows from their tokens' rows of src ([T, cols], dtype dt) as they
  // are (fp32 ones not rounded to the bf16 paths' activation type first), each times
  // col_scales (null: 1); padding rows get zero codes and scales.
  void quantize_tokens(const W8A8Kernels& k8, const Routing& r, int64_t e, const void* src, DType dt, int64_t top_k,
                       int64_t cols, const float* col_scales) const {
    const int64_t n = r.count(e), row0 = r.first_row[e];
    for (int64_t i = 0; i < n; ++i)
      k8.quantize_rows(1, cols, element_at(src, dt, r.pair(e, i) / top_k * cols), dt, cols, col_scales,
                       row(row0 + i), ld, scales + row0 + i);
    for (int64_t i = n; i < r.padded_rows(e); ++i) {
      std::fill(row(row0 + i), row(row0 + i) + round_up(cols, 64), int8_t(0));
      scales[row0 + i] = 0.f;
    }
  }
};

// Element `offset` of packed weights of `bits` bits per element.
inline const void* weight_at(const void* base, int64_t offset, int64_t bits) {
  return static_cast<const char*>(base) + offset * bits / 8;
}

// The scales of expert e's slice s from packed row `row` (a multiple of 16) of gate_up (depth
// hp) or of down (depth is), in format f; null for a format without scales.
inline const void* gate_up_scales_at(const MoeWeights& w, const FormatInfo& f, const CallShape& c, int64_t s,
                                     int64_t e, int64_t row) {
  if (w.gate_up_scale == nullptr) return nullptr;
  return static_cast<const char*>(w.gate_up_scale) +
         (c.layout.gate_up_scale_offset(s, e, f.scales) + scales_of_rows(f.scales, row, c.hp)) * scale_bytes(f.scales);
}
inline const void* down_scales_at(const MoeWeights& w, const FormatInfo& f, const CallShape& c, int64_t s, int64_t e,
                                  int64_t row) {
  if (w.down_scale == nullptr) return nullptr;
  return static_cast<const char*>(w.down_scale) +
         (c.layout.down_scale_offset(s, e, f.scales) + scales_of_rows(f.scales, row, c.is)) * scale_bytes(f.scales);
}

}  // namespace kt
