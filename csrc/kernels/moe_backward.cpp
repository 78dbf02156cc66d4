// The experts' backward, in phases as the forward (moe_forward.cpp says why results do not
// depend on the thread count); the LoRA gradients are their own room (lora_grads.cpp).
#include <algorithm>
#include <vector>

#include "kt/moe_sft.h"
#include "lora_grads.h"
#include "lora_operands.h"
#include "phase_timer.h"
#include "routing.h"
#include "workspace.h"

namespace kt {
namespace {

// What the biases add to the gradients, per expert over its pairs in pair order (zero for
// experts without tokens): d bg|bu = sum of the pairs' dg|du rows, d bd = sum of w dy, and
// each pair's routing weight gains dy.bd (h includes bd). One read of dy serves both.
template <typename Act>
void bias_gradients(int threads, const MoeBackwardArgs& args, const CallShape& c, const Routing& route,
                    const BackwardWorkspace<Act>& ws) {
  const MoeWeights& w = args.w;
  const int64_t K = c.K, H = c.H, I = c.I;
  const bool gate_up_bias_grad = args.grad_gate_up_bias && w.gate_up_bias;
  if (!gate_up_bias_grad && !w.down_bias) return;
  parallel_for(c.E, threads, [&](int64_t e) {
    const int64_t n = route.count(e);
    if (gate_up_bias_grad) {
      float* gb = args.grad_gate_up_bias + e * 2 * I;
      std::fill(gb, gb + 2 * I, 0.f);
      for (int64_t i = 0; i < n; ++i) {
        const Act* row = ws.grad_gu + (route.first_row[e] + i) * ws.ld_grad_gu;
        for (int64_t col = 0; col < I; ++col) {
          gb[col] += act_to_f32(row[gate_up_column(col, false)]);
          gb[I + col] += act_to_f32(row[gate_up_column(col, true)]);
        }
      }
    }
    if (w.down_bias) {
      const float* b = w.down_bias + e * H;
      float* gd = args.grad_down_bias ? args.grad_down_bias + e * H : nullptr;
      if (gd) std::fill(gd, gd + H, 0.f);
      std::vector<float> dy(H);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pair = route.pair(e, i);
        load_f32(args.grad_y, args.act_dtype, pair / K * H, H, dy.data());
        float dot = 0.f;
        for (int64_t col = 0; col < H; ++col) dot += dy[col] * b[col];
        args.grad_weights[pair] += dot;
        if (gd) {
          for (int64_t col = 0; col < H; ++col) gd[col] += args.weights[pair] * dy[col];
        }
      }
    }
  });
}

template <typename Act>
void backward_impl(const KernelSet& k, int threads, const MoeBackwardArgs& args) {
  const MoeWeights& w = args.w;
  const CallShape c(args.dims, w.slices);
  const int64_t T = c.T, K = c.K, H = c.H, I = c.I, hp = c.hp, is = c.is, ip = c.ip;
  const float s = w.lora_scaling;
  const LoraShape l(w);
  const FormatInfo& format = format_info(k.format);
  const int64_t bits = format.bits;
  PhaseTimer timer("kt.moe_sft_backward", T);
  const Routing route(args.ids, T * K, c.E);
  const int64_t rows = route.rows();
  BackwardWorkspace<Act> ws(c, l, rows);
  const W8A8Kernels* w8a8 = k.w8a8;
  const Int8Rows q(k, c, rows);  // W8A8: dy, then the fused gate/up gradient
  const DType act = k.activations;
  timer.mark("route");

  // Phase 1, per expert: gather dy rows (W8A8: and quantize them with the down weights'
  // channel scales folded in, which every slice shares), pack the transposed LoRA operands,
  // dy B_d.
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task], m = route.padded_rows(e), row0 = route.first_row[e];
    gather_rows(route, e, args.grad_y, args.act_dtype, K, H, ws.dy_rows, ws.ld_dy);
    if (w8a8)
      q.quantize_tokens(*w8a8, route, e, args.grad_y, args.act_dtype, K, H,
                        static_cast<const float*>(down_scales_at(w, format, c, 0, e, 0)));
    const LoraPacker<Act> pack(w, l, e, H, I, hp, ip);
    if (l.rgu) {
      pack.bt_gu(ws.bt_gu + e * l.rgu_p * 2 * ip);
      pack.at_gu(ws.at_gu + e * hp * l.rgu_p);
    }
    if (!l.rd) return;
    Act* bt = ws.bt_d + e * l.rd_p * hp;
    pack.bt_d(bt);
    pack.at_d(ws.at_d + e * ip * l.rd_p);
    float* out = ws.dy_b + row0 * l.rd_p;
    k.operand_gemm(m, hp, ws.dy_rows + row0 * ws.ld_dy, ws.ld_dy, bt, l.rd_p / kPanelRows, out, l.rd_p, false);
    for (int64_t i = 0; i < m * l.rd_p; ++i) ws.dy_b_scaled[row0 * l.rd_p + i] = f32_to_act<Act>(s * out[i]);
  });

  timer.mark("gather+pack");

  // Phase 2, per (expert, intermediate columns): q = dy W_d + s (dy B_d) A_d, the gradient
  // of z before the routing weight. W_d's transposed panels stream through a small buffer, as
  // the dequantized weights for a format with scales (which thus cost no scaled copy of dy).
  SliceTasks(route, c.S, is / kPanelRows, is / kPanelRows).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, cols = np * kPanelRows, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    const void* weights = weight_at(w.down, c.layout.down_offset(task.slice, e), bits);
    const int64_t first_panel = (c0 - task.slice * is) / kPanelRows;
    float* out = ws.q_rows + row0 * ip + c0;
    if (w8a8) {
      int8_t* wt = scratch<int8_t>(Scratch::kTaskWeights, cols * hp);
      w8a8->pack_transposed_codes(static_cast<const int8_t*>(weights), hp, is, first_panel, np, wt);
      w8a8->int8_gemm(m, hp, q.row(row0), q.ld, q.scales + row0, wt, nullptr, np, out, ip);
    } else {
      bf16* wt = scratch<bf16>(Scratch::kTaskWeights, cols * hp);
      k.pack_transposed(weights, down_scales_at(w, format, c, task.slice, e, 0), hp, is, first_panel, np, wt);
      k.panel_gemm(m, hp, ws.dy_rows + row0 * ws.ld_dy, ws.ld_dy, wt, np, out, ip, false);
    }
    if (l.rd)
      k.operand_gemm(m, l.rd_p, ws.dy_b_scaled + row0 * l.rd_p, l.rd_p, ws.at_d + (e * ip + c0) * l.rd_p, np, out,
                     ip, true);
  });

  timer.mark("down_t");

  // Phase 3, per token: routing-weight gradient z.q, then dg and du through gate(g, u), in
  // the fused column order of the gate/up weights (padding columns zero). SwiGLU is the kernel
  // set's; the parametric gate (kt/gate.h) is computed here.
  const Gate& gate = w.gate;
  const bool plain_swiglu = w.plain_swiglu();
  parallel_for(T, threads, [&](int64_t t) {
    std::vector<float> gu(plain_swiglu ? 0 : 2 * I);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t pair = t * K + j, row = route.row_of_pair[pair];
      if (row < 0) {
        args.grad_weights[pair] = 0.f;
        continue;
      }
      const float* q = ws.q_rows + row * ip;
      Act* fused = ws.grad_gu + row * ws.ld_grad_gu;
      Act* z = ws.z_rows + row * I;
      if (plain_swiglu) {
        args.grad_weights[pair] =
            k.swiglu_backward(I, ip, args.gate_up_act, args.act_dtype, pair * 2 * I, q, args.weights[pair], z, fused);
        continue;
      }
      std::fill(fused, fused + 2 * ip, Act(0));
      load_f32(args.gate_up_act, args.act_dtype, pair * 2 * I, 2 * I, gu.data());
      float z_dot_q = 0.f;
      for (int64_t col = 0; col < I; ++col) {
        float dg, du;
        const float zc = gate.gradient(gu[col], gu[I + col], args.weights[pair] * q[col], &dg, &du);
        z[col] = f32_to_act<Act>(zc);
        z_dot_q += zc * q[col];
        fused[gate_up_column(col, false)] = f32_to_act<Act>(dg);
        fused[gate_up_column(col, true)] = f32_to_act<Act>(du);
      }
      args.grad_weights[pair] = z_dot_q;
    }
  });

  timer.mark("gate_grad");

  // Phase 4, per expert: padding rows of the fused gradient (W8A8: quantized with each slice's
  // gate/up channel scales folded in; dy's codes are dead); [dg B_g | du B_u].
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task], m = route.padded_rows(e), row0 = route.first_row[e];
    std::fill(ws.grad_gu + (row0 + route.count(e)) * ws.ld_grad_gu, ws.grad_gu + (row0 + m) * ws.ld_grad_gu, Act(0));
    if (w8a8) {
      std::vector<float> channel_scales(2 * ip);
      for (int64_t sl = 0; sl < c.S; ++sl) {
        const float* scales = static_cast<const float*>(gate_up_scales_at(w, format, c, sl, e, 0));
        std::copy(scales, scales + 2 * is, channel_scales.begin() + 2 * sl * is);
      }
      w8a8->quantize_rows(m, 2 * ip, ws.grad_gu + row0 * ws.ld_grad_gu, act, ws.ld_grad_gu, channel_scales.data(),
                          q.row(row0), q.ld, q.scales + row0);
    }
    if (!l.rgu) return;
    float* out = ws.dgu_b + row0 * l.rgu_p;
    k.operand_gemm(m, 2 * ip, ws.grad_gu + row0 * ws.ld_grad_gu, ws.ld_grad_gu, ws.bt_gu + e * l.rgu_p * 2 * ip,
                   l.rgu_p / kPanelRows, out, l.rgu_p, false);
    for (int64_t i = 0; i < m * l.rgu_p; ++i) ws.dgu_b_scaled[row0 * l.rgu_p + i] = f32_to_act<Act>(s * out[i]);
  });

  timer.mark("lora_b_gu");

  bias_gradients(threads, args, c, route, ws);

  timer.mark("bias_grads");

  // Phase 5, per (slice, expert, hidden columns): dx per pair = dg W_g + du W_u over the
  // slice's intermediate columns, plus s [dgB|duB] [A_g;A_u] once (slice 0); partial sums
  // per slice.
  SliceTasks(route, c.S, hp / kPanelRows, 0).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, cols = np * kPanelRows, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    const void* weights = weight_at(w.gate_up, c.layout.gate_up_offset(task.slice, e), bits);
    float* out = ws.dx_partial + (task.slice * rows + row0) * hp + c0;
    if (w8a8) {
      int8_t* wt = scratch<int8_t>(Scratch::kTaskWeights, cols * 2 * is);
      w8a8->pack_transposed_codes(static_cast<const int8_t*>(weights), 2 * is, hp, task.panel, np, wt);
      w8a8->int8_gemm(m, 2 * is, q.row(row0) + 2 * task.slice * is, q.ld, q.scales + row0, wt, nullptr, np, out, hp);
    } else {
      bf16* wt = scratch<bf16>(Scratch::kTaskWeights, cols * 2 * is);
      k.pack_transposed(weights, gate_up_scales_at(w, format, c, task.slice, e, 0), 2 * is, hp, task.panel, np, wt);
      k.panel_gemm(m, 2 * is, ws.grad_gu + row0 * ws.ld_grad_gu + 2 * task.slice * is, ws.ld_grad_gu, wt, np, out,
                   hp, false);
    }
    if (l.rgu && task.slice == 0)
      k.operand_gemm(m, l.rgu_p, ws.dgu_b_scaled + row0 * l.rgu_p, l.rgu_p, ws.at_gu + (e * hp + c0) * l.rgu_p, np,
                     out, hp, true);
  });

  timer.mark("gate_up_t");

  lora_gradients(k, threads, args, c, l, route, ws);

  timer.mark("lora_grads");

  // Phase 6, per token: dx = sum over the token's slots and the slices, in that order.
  parallel_for(T, threads, [&](int64_t t) {
    std::vector<float> dx(H, 0.f);
    for (int64_t j = 0; j < K; ++j) {
      if (route.row_of_pair[t * K + j] < 0) continue;
      for (int64_t sl = 0; sl < c.S; ++sl) {
        const float* part = ws.dx_partial + (sl * rows + route.row_of_pair[t * K + j]) * hp;
        for (int64_t col = 0; col < H; ++col) dx[col] += part[col];
      }
    }
    store_f32(args.grad_x, args.act_dtype, t * H, H, dx.data());
  });
  timer.mark("combine");
}

}  // namespace

void moe_sft_backward(const KernelSet& k, int num_threads, const MoeBackwardArgs& args) {
  if (k.activations == DType::kBF16)
    backward_impl<bf16>(k, num_threads, args);
  else
    backward_impl<float>(k, num_threads, args);
}

}  // namespace kt
