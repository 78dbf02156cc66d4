// The experts' forward: grouped GEMMs over expert-sorted rows. Work is split into phases
// separated by parallel_for barriers; in every phase each output element has exactly one
// owner and every reduction runs in a fixed order, so results do not depend on the thread
// count.
#include <algorithm>
#include <vector>

#include "kt/moe_sft.h"
#include "lora_operands.h"
#include "phase_timer.h"
#include "routing.h"
#include "workspace.h"

namespace kt {
namespace {

template <typename Act>
void forward_impl(const KernelSet& k, int threads, const MoeForwardArgs& args) {
  const MoeWeights& w = args.w;
  const CallShape c(args.dims, w.slices);
  const int64_t K = c.K, H = c.H, I = c.I, hp = c.hp, is = c.is, ip = c.ip;
  const float s = w.lora_scaling;
  const LoraShape l(w);
  const FormatInfo& format = format_info(k.format);
  const int64_t bits = format.bits;
  PhaseTimer timer("kt.moe_sft_forward", c.T);
  const Routing route(args.ids, c.T * K, c.E);
  ForwardWorkspace<Act> ws(c, l, route.rows());
  const W8A8Kernels* w8a8 = k.w8a8;
  const Int8Rows q(k, c, route.rows());  // W8A8: x, then z
  const DType act = k.activations;
  // Unrouted pairs are never computed; their saved activations are zeros, not stale memory.
  const std::vector<float> zeros(2 * I, 0.f);
  for (int64_t pair : route.unrouted) {
    store_f32(args.gate_up_act, args.act_dtype, pair * 2 * I, 2 * I, zeros.data());
    std::fill(args.lora_act + pair * l.width, args.lora_act + (pair + 1) * l.width, 0.f);
  }
  timer.mark("route");

  // Phase 1, per expert: gather its tokens (W8A8: and quantize them), pack its LoRA operands,
  // x [A_g; A_u]^T.
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task], n = route.count(e), m = route.padded_rows(e);
    const int64_t row0 = route.first_row[e];
    gather_rows(route, e, args.x, args.act_dtype, K, H, ws.x_rows, ws.ld_x);
    if (w8a8) q.quantize_tokens(*w8a8, route, e, args.x, args.act_dtype, K, H, nullptr);
    const LoraPacker<Act> pack(w, l, e, H, I, hp, ip);
    if (l.rd) {
      pack.a_d(ws.a_d + e * l.rd_p * ip);
      pack.b_d(ws.b_d + e * hp * l.rd_p);
    }
    if (!l.rgu) return;
    Act* a_e = ws.a_gu + e * l.rgu_p * hp;
    pack.a_gu(a_e);
    pack.b_gu(ws.b_gu + e * 2 * ip * l.rgu_p);
    float* acc = scratch<float>(Scratch::kTaskAcc, m * l.rgu_p);
    k.operand_gemm(m, hp, ws.x_rows + row0 * ws.ld_x, ws.ld_x, a_e, l.rgu_p / kPanelRows, acc, l.rgu_p, false);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < l.rgu_p; ++j)
        ws.x_lora[(row0 + i) * l.rgu_p + j] = f32_to_act<Act>(s * acc[i * l.rgu_p + j]);
      if (i >= n) continue;
      std::copy(acc + i * l.rgu_p, acc + i * l.rgu_p + l.rgu, args.lora_act + route.pair(e, i) * l.width);
    }
  });

  timer.mark("gather+lora_a");

  // Phase 2, per (expert, 16*kPanelsPerTask intermediate columns): fused gate/up GEMM plus the
  // LoRA-B product into the same tile; add the biases; save g and u; z = gate(g, u). SwiGLU
  // without biases, the common case, is the kernel set's epilogue; the parametric gate
  // (kt/gate.h) and the biases are computed here.
  const Gate& gate = w.gate;
  const bool plain_swiglu = w.plain_swiglu();
  SliceTasks(route, c.S, is / kPanelRows, is / kPanelRows).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, cols = np * kPanelRows, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), n = route.count(e), row0 = route.first_row[e];
    float* acc = scratch<float>(Scratch::kTaskAcc, m * 2 * cols);  // gate and up panels interleaved
    const int64_t first_row = 2 * (c0 - task.slice * is);  // of the slice's fused gate/up rows
    const void* weights = weight_at(w.gate_up, c.layout.gate_up_offset(task.slice, e) + first_row * hp, bits);
    const void* scales = gate_up_scales_at(w, format, c, task.slice, e, first_row);
    if (w8a8)
      w8a8->int8_gemm(m, hp, q.row(row0), q.ld, q.scales + row0, static_cast<const int8_t*>(weights),
                      static_cast<const float*>(scales), 2 * np, acc, 2 * cols);
    else
      k.weight_gemm(m, hp, ws.x_rows + row0 * ws.ld_x, ws.ld_x, weights, scales, 2 * np, acc, 2 * cols);
    if (l.rgu)
      k.operand_gemm(m, l.rgu_p, ws.x_lora + row0 * l.rgu_p, l.rgu_p, ws.b_gu + (e * 2 * ip + 2 * c0) * l.rgu_p,
                     2 * np, acc, 2 * cols, true);
    const int64_t valid = std::max<int64_t>(0, std::min(c0 + cols, I) - c0);
    std::vector<float> g(cols), u(cols);
    for (int64_t i = 0; i < m; ++i) {
      Act* z = ws.z_rows + (row0 + i) * ws.ld_z + c0;
      if (i < n && plain_swiglu) {
        const int64_t pair = route.pair(e, i);
        k.swiglu_forward(valid, cols, acc + i * 2 * cols, z, args.gate_up_act, args.act_dtype, pair * 2 * I + c0,
                         pair * 2 * I + I + c0);
        continue;
      }
      std::fill(z, z + cols, Act(0));
      if (i >= n) continue;
      const int64_t pair = route.pair(e, i);
      for (int64_t col = 0; col < valid; ++col) {
        g[col] = acc[i * 2 * cols + gate_up_column(col, false)];
        u[col] = acc[i * 2 * cols + gate_up_column(col, true)];
      }
      if (w.gate_up_bias) {
        const float* bias = w.gate_up_bias + e * 2 * I + c0;
        for (int64_t col = 0; col < valid; ++col) g[col] += bias[col], u[col] += bias[I + col];
      }
      for (int64_t col = 0; col < valid; ++col) z[col] = f32_to_act<Act>(gate.value(g[col], u[col]));
      store_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + c0, valid, g.data());
      store_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + I + c0, valid, u.data());
    }
  });

  timer.mark("gate_up");

  // Phase 3, per expert: LoRA-A of down (z A_d^T), from the same z the base GEMM reads (W8A8:
  // quantized first; x's codes are dead).
  if (l.rd || w8a8) {
    parallel_for(route.active.size(), threads, [&](int64_t task) {
      const int64_t e = route.active[task], n = route.count(e), m = route.padded_rows(e);
      const int64_t row0 = route.first_row[e];
      if (w8a8)
        w8a8->quantize_rows(m, ip, ws.z_rows + row0 * ws.ld_z, act, ws.ld_z, nullptr, q.row(row0), q.ld,
                            q.scales + row0);
      if (!l.rd) return;
      float* acc = scratch<float>(Scratch::kTaskAcc, m * l.rd_p);
      k.operand_gemm(m, ip, ws.z_rows + row0 * ws.ld_z, ws.ld_z, ws.a_d + e * l.rd_p * ip, l.rd_p / kPanelRows, acc,
                     l.rd_p, false);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < l.rd_p; ++j)
          ws.z_lora[(row0 + i) * l.rd_p + j] = f32_to_act<Act>(s * acc[i * l.rd_p + j]);
        if (i >= n) continue;
        std::copy(acc + i * l.rd_p, acc + i * l.rd_p + l.rd,
                  args.lora_act + route.pair(e, i) * l.width + l.offset(kDown));
      }
    });
  }

  timer.mark("lora_a_down");

  // Phase 4, per (slice, expert, hidden columns): down GEMM over the slice's intermediate
  // columns, plus LoRA-B (once, in slice 0), straight into expert-sorted partial outputs, one
  // set per slice.
  const int64_t rows = route.rows();
  SliceTasks(route, c.S, hp / kPanelRows, 0).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    float* out = ws.h_partial + (task.slice * rows + row0) * hp + c0;
    const void* weights = weight_at(w.down, c.layout.down_offset(task.slice, e) + c0 * is, bits);
    const void* scales = down_scales_at(w, format, c, task.slice, e, c0);
    if (w8a8)
      w8a8->int8_gemm(m, is, q.row(row0) + task.slice * is, q.ld, q.scales + row0, static_cast<const int8_t*>(weights),
                      static_cast<const float*>(scales), np, out, hp);
    else
      k.weight_gemm(m, is, ws.z_rows + row0 * ws.ld_z + task.slice * is, ws.ld_z, weights, scales, np, out, hp);
    if (l.rd && task.slice == 0)
      k.operand_gemm(m, l.rd_p, ws.z_lora + row0 * l.rd_p, l.rd_p, ws.b_d + (e * hp + c0) * l.rd_p, np, out, hp,
                     true);
  });

  timer.mark("down");

  // Phase 5, per token: weighted sum over the token's slots of the down bias and the slices'
  // partial outputs, in slot, bias, then slice order.
  parallel_for(c.T, threads, [&](int64_t t) {
    std::vector<float> y(H, 0.f);
    for (int64_t j = 0; j < K; ++j) {
      if (route.row_of_pair[t * K + j] < 0) continue;
      const float wt = args.weights[t * K + j];
      if (w.down_bias) {
        const float* b = w.down_bias + args.ids[t * K + j] * H;
        for (int64_t col = 0; col < H; ++col) y[col] += wt * b[col];
      }
      for (int64_t sl = 0; sl < c.S; ++sl) {
        const float* h = ws.h_partial + (sl * rows + route.row_of_pair[t * K + j]) * hp;
        for (int64_t col = 0; col < H; ++col) y[col] += wt * h[col];
      }
    }
    store_f32(args.y, args.act_dtype, t * H, H, y.data());
  });
  timer.mark("combine");
}

}  // namespace

void moe_sft_forward(const KernelSet& k, int num_threads, const MoeForwardArgs& args) {
  if (k.activations == DType::kBF16)
    forward_impl<bf16>(k, num_threads, args);
  else
    forward_impl<float>(k, num_threads, args);
}

}  // namespace kt
