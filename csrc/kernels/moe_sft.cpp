// Grouped-GEMM driver for the routed experts. Work is split into phases separated by
// parallel_for barriers; in every phase each output element has exactly one owner and
// every reduction runs in a fixed order, so results do not depend on the thread count.
#include "kt/moe_sft.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "kt/packing.h"
#include "kt/thread_pool.h"

namespace kt {
namespace {

constexpr int64_t kRowAlign = 16;       // GEMM row blocks; each expert's rows are padded to it
constexpr int64_t kPanelsPerTask = 4;   // output panels (16 columns each) per work item

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

inline float act_to_f32(float v) { return v; }
inline float act_to_f32(bf16 v) { return bf16_to_f32(v); }
template <typename Act> Act f32_to_act(float v);
template <> inline float f32_to_act<float>(float v) { return v; }
template <> inline bf16 f32_to_act<bf16>(float v) { return f32_to_bf16(v); }

inline void gemm(const Kernels& k, int64_t m, int64_t kp, const bf16* a, int64_t lda,
                 const bf16* w, int64_t panels, float* c, int64_t ldc) {
  k.gemm_bf16(m, kp, a, lda, w, panels, c, ldc, false);
}
inline void gemm(const Kernels& k, int64_t m, int64_t kp, const float* a, int64_t lda,
                 const bf16* w, int64_t panels, float* c, int64_t ldc) {
  k.gemm_f32(m, kp, a, lda, w, panels, c, ldc, false);
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[j] = sum_i v[i] * m[j * n + i] for j < rows: v times a row-major [rows, n] matrix^T.
inline void project(const float* v, const float* m, int64_t rows, int64_t n, float* out) {
  for (int64_t j = 0; j < rows; ++j) out[j] = dot(v, m + j * n, n);
}

// Which routed pairs (t * K + j) each expert serves, in ascending pair order, and where
// each expert's rows start in the expert-sorted scratch buffers.
struct Routing {
  std::vector<int64_t> first;      // [E + 1] into `pairs`
  std::vector<int64_t> pairs;      // pair indices grouped by expert
  std::vector<int64_t> first_row;  // [E + 1] scratch rows; experts padded to kRowAlign
  std::vector<int64_t> active;     // experts with at least one pair

  Routing(const int64_t* ids, int64_t n_pairs, int64_t experts)
      : first(experts + 1, 0), pairs(n_pairs), first_row(experts + 1, 0) {
    for (int64_t p = 0; p < n_pairs; ++p) ++first[ids[p] + 1];
    for (int64_t e = 0; e < experts; ++e) {
      first_row[e + 1] = first_row[e] + round_up(first[e + 1], kRowAlign);
      if (first[e + 1] > 0) active.push_back(e);
      first[e + 1] += first[e];
    }
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < n_pairs; ++p) pairs[fill[ids[p]]++] = p;
  }
  int64_t count(int64_t e) const { return first[e + 1] - first[e]; }
  int64_t padded_rows(int64_t e) const { return first_row[e + 1] - first_row[e]; }
  int64_t rows() const { return first_row.back(); }
};

// Work items (expert, first panel) covering `panels` output panels of every active expert.
std::vector<std::pair<int64_t, int64_t>> expert_panel_tasks(const Routing& r, int64_t panels,
                                                            int64_t panels_per_task) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t e : r.active)
    for (int64_t p = 0; p < panels; p += panels_per_task) tasks.emplace_back(e, p);
  return tasks;
}

// Offsets of each projection's LoRA columns in the saved lora activations.
struct LoraColumns {
  int64_t offset[3];
  int64_t width;
  explicit LoraColumns(const MoeWeights& w) {
    offset[kGate] = 0;
    offset[kUp] = w.lora[kGate].rank;
    offset[kDown] = offset[kUp] + w.lora[kUp].rank;
    width = offset[kDown] + w.lora[kDown].rank;
  }
};

// Copies the rows of `src` ([T, cols], dtype dt) that expert e's pairs read into the
// expert's block of `dst` ([rows, ld] Act), zero-filling padding rows and columns.
template <typename Act>
void gather_rows(const Routing& r, int64_t e, const void* src, DType dt, int64_t top_k,
                 int64_t cols, Act* dst, int64_t ld) {
  const int64_t n = r.count(e), padded = r.padded_rows(e);
  Act* out = dst + r.first_row[e] * ld;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = r.pairs[r.first[e] + i] / top_k;
    for (int64_t c = 0; c < cols; ++c) out[i * ld + c] = f32_to_act<Act>(load_as_f32(src, dt, t * cols + c));
    std::fill(out + i * ld + cols, out + (i + 1) * ld, Act(0));
  }
  std::fill(out + n * ld, out + padded * ld, Act(0));
}

inline void load_row(const void* src, DType dt, int64_t row, int64_t cols, float* out) {
  for (int64_t c = 0; c < cols; ++c) out[c] = load_as_f32(src, dt, row * cols + c);
}

template <typename Act>
void forward_impl(const Kernels& k, int threads, const MoeForwardArgs& args) {
  const MoeDims& d = args.dims;
  const MoeWeights& w = args.w;
  const int64_t T = d.tokens, K = d.top_k, H = d.hidden, I = d.intermediate;
  const int64_t hp = round_up(H, kPadTo), ip = round_up(I, kPadTo), n_pairs = T * K;
  const float s = w.lora_scaling;
  const LoraWeights &lg = w.lora[kGate], &lu = w.lora[kUp], &ld = w.lora[kDown];
  const LoraColumns lcol(w);
  const Routing route(args.ids, n_pairs, d.experts);

  // Phase 1, per expert: gather the expert's tokens; LoRA-A of gate and up (x A^T).
  auto xs = uninitialized<Act>(route.rows() * hp);
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task];
    gather_rows(route, e, args.x, args.act_dtype, K, H, xs.get(), hp);
    if (lg.rank + lu.rank == 0) return;
    std::vector<float> xrow(H);
    for (int64_t i = 0; i < route.count(e); ++i) {
      const int64_t pair = route.pairs[route.first[e] + i];
      load_row(args.x, args.act_dtype, pair / K, H, xrow.data());
      float* la = args.lora_act + pair * lcol.width;
      project(xrow.data(), lg.a + e * lg.rank * H, lg.rank, H, la + lcol.offset[kGate]);
      project(xrow.data(), lu.a + e * lu.rank * H, lu.rank, H, la + lcol.offset[kUp]);
    }
  });

  // Phase 2, per (expert, 16*kPanelsPerTask intermediate columns): fused gate/up GEMM, LoRA-B,
  // save g and u, z = silu(g) * u.
  auto zs = uninitialized<Act>(route.rows() * ip);
  const int64_t i_panels = ip / kPanelRows;
  const auto gu_tasks = expert_panel_tasks(route, i_panels, kPanelsPerTask);
  parallel_for(gu_tasks.size(), threads, [&](int64_t task) {
    const auto [e, p0] = gu_tasks[task];
    const int64_t np = std::min(kPanelsPerTask, i_panels - p0), cols = np * kPanelRows;
    const int64_t m = route.padded_rows(e), n = route.count(e), row0 = route.first_row[e];
    auto acc = uninitialized<float>(m * 2 * cols);  // gate and up panels interleaved
    gemm(k, m, hp, xs.get() + row0 * hp, hp, w.gate_up + (e * 2 * ip + 2 * p0 * kPanelRows) * hp,
         2 * np, acc.get(), 2 * cols);
    const int64_t c0 = p0 * kPanelRows, c_end = std::min(c0 + cols, I);
    for (int64_t i = 0; i < m; ++i) {
      Act* z = zs.get() + (row0 + i) * ip;
      std::fill(z + c0, z + c0 + cols, Act(0));
      if (i >= n) continue;
      const int64_t pair = route.pairs[route.first[e] + i];
      const float* la = args.lora_act + pair * lcol.width;
      for (int64_t c = c0; c < c_end; ++c) {
        float g = acc[i * 2 * cols + gate_up_column(c - c0, false)];
        float u = acc[i * 2 * cols + gate_up_column(c - c0, true)];
        if (lg.rank) g += s * dot(la + lcol.offset[kGate], lg.b + (e * I + c) * lg.rank, lg.rank);
        if (lu.rank) u += s * dot(la + lcol.offset[kUp], lu.b + (e * I + c) * lu.rank, lu.rank);
        store_from_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + c, g);
        store_from_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + I + c, u);
        z[c] = f32_to_act<Act>(g * sigmoid(g) * u);
      }
    }
  });

  // Phase 3, per expert: LoRA-A of down (z A^T), from the same z the base GEMM reads.
  if (ld.rank) {
    parallel_for(route.active.size(), threads, [&](int64_t task) {
      const int64_t e = route.active[task];
      std::vector<float> zrow(I);
      for (int64_t i = 0; i < route.count(e); ++i) {
        const Act* z = zs.get() + (route.first_row[e] + i) * ip;
        for (int64_t c = 0; c < I; ++c) zrow[c] = act_to_f32(z[c]);
        const int64_t pair = route.pairs[route.first[e] + i];
        project(zrow.data(), ld.a + e * ld.rank * I, ld.rank, I,
                args.lora_act + pair * lcol.width + lcol.offset[kDown]);
      }
    });
  }

  // Phase 4, per (expert, hidden columns): down GEMM + LoRA-B into per-pair outputs.
  auto h_pair = uninitialized<float>(n_pairs * H);
  const int64_t h_panels = hp / kPanelRows;
  const auto down_tasks = expert_panel_tasks(route, h_panels, kPanelsPerTask);
  parallel_for(down_tasks.size(), threads, [&](int64_t task) {
    const auto [e, p0] = down_tasks[task];
    const int64_t np = std::min(kPanelsPerTask, h_panels - p0), cols = np * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    auto acc = uninitialized<float>(m * cols);
    gemm(k, m, ip, zs.get() + row0 * ip, ip, w.down + (e * hp + p0 * kPanelRows) * ip, np,
         acc.get(), cols);
    const int64_t c0 = p0 * kPanelRows, c_end = std::min(c0 + cols, H);
    for (int64_t i = 0; i < route.count(e); ++i) {
      const int64_t pair = route.pairs[route.first[e] + i];
      const float* za = args.lora_act + pair * lcol.width + lcol.offset[kDown];
      for (int64_t c = c0; c < c_end; ++c) {
        float h = acc[i * cols + c - c0];
        if (ld.rank) h += s * dot(za, ld.b + (e * H + c) * ld.rank, ld.rank);
        h_pair[pair * H + c] = h;
      }
    }
  });

  // Phase 5, per token: weighted sum over the token's slots in slot order.
  parallel_for(T, threads, [&](int64_t t) {
    for (int64_t c = 0; c < H; ++c) {
      float y = 0.f;
      for (int64_t j = 0; j < K; ++j) y += args.weights[t * K + j] * h_pair[(t * K + j) * H + c];
      store_from_f32(args.y, args.act_dtype, t * H + c, y);
    }
  });
}

template <typename Act>
void backward_impl(const Kernels& k, int threads, const MoeBackwardArgs& args) {
  const MoeDims& d = args.dims;
  const MoeWeights& w = args.w;
  const int64_t T = d.tokens, K = d.top_k, H = d.hidden, I = d.intermediate, E = d.experts;
  const int64_t hp = round_up(H, kPadTo), ip = round_up(I, kPadTo), n_pairs = T * K;
  const float s = w.lora_scaling;
  const LoraWeights &lg = w.lora[kGate], &lu = w.lora[kUp], &ld = w.lora[kDown];
  const LoraColumns lcol(w);
  const Routing route(args.ids, n_pairs, E);
  const int64_t rank_gu = lg.rank + lu.rank;

  // Phase 1, per expert: gather dy rows; dy B_d (LoRA path of the down projection).
  auto dys = uninitialized<Act>(route.rows() * hp);
  auto dy_b = uninitialized<float>(n_pairs * ld.rank);
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task];
    gather_rows(route, e, args.grad_y, args.act_dtype, K, H, dys.get(), hp);
    if (!ld.rank) return;
    std::vector<float> dy(H);
    for (int64_t i = 0; i < route.count(e); ++i) {
      const int64_t pair = route.pairs[route.first[e] + i];
      load_row(args.grad_y, args.act_dtype, pair / K, H, dy.data());
      float* out = dy_b.get() + pair * ld.rank;
      std::fill(out, out + ld.rank, 0.f);
      const float* b = ld.b + e * H * ld.rank;
      for (int64_t c = 0; c < H; ++c)
        for (int64_t j = 0; j < ld.rank; ++j) out[j] += dy[c] * b[c * ld.rank + j];
    }
  });

  // Phase 2, per (expert, intermediate columns): q = dy W_d + s (dy B_d) A_d, the gradient
  // of z before the routing weight. W_d's transposed panels stream through a small buffer.
  auto q_pair = uninitialized<float>(n_pairs * I);
  const int64_t i_panels = ip / kPanelRows;
  const auto q_tasks = expert_panel_tasks(route, i_panels, kPanelsPerTask);
  parallel_for(q_tasks.size(), threads, [&](int64_t task) {
    const auto [e, p0] = q_tasks[task];
    const int64_t np = std::min(kPanelsPerTask, i_panels - p0), cols = np * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    auto wt = uninitialized<bf16>(cols * hp);
    pack_transposed_panels(w.down + e * hp * ip, hp, ip, p0, np, wt.get());
    auto acc = uninitialized<float>(m * cols);
    gemm(k, m, hp, dys.get() + row0 * hp, hp, wt.get(), np, acc.get(), cols);
    const int64_t c0 = p0 * kPanelRows, c_end = std::min(c0 + cols, I);
    for (int64_t i = 0; i < route.count(e); ++i) {
      const int64_t pair = route.pairs[route.first[e] + i];
      for (int64_t c = c0; c < c_end; ++c) {
        float q = acc[i * cols + c - c0];
        if (ld.rank) {
          const float* a = ld.a + e * ld.rank * I;
          const float* yb = dy_b.get() + pair * ld.rank;
          float lora = 0.f;
          for (int64_t j = 0; j < ld.rank; ++j) lora += yb[j] * a[j * I + c];
          q += s * lora;
        }
        q_pair[pair * I + c] = q;
      }
    }
  });

  // Phase 3, per token: routing-weight gradient z.q, then dg and du through silu(g) * u.
  // dgu (fp32, [pair, 2I]) feeds the LoRA gradients; dgus (Act, fused column order) the GEMM.
  auto dgu = uninitialized<float>(n_pairs * 2 * I);
  auto dgus = uninitialized<Act>(route.rows() * 2 * ip);
  auto dgu_b = uninitialized<float>(n_pairs * rank_gu);  // [dg B_g | du B_u]
  std::vector<int64_t> row_of_pair(n_pairs);
  for (int64_t e : route.active)
    for (int64_t i = 0; i < route.count(e); ++i) row_of_pair[route.pairs[route.first[e] + i]] = route.first_row[e] + i;
  parallel_for(T, threads, [&](int64_t t) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t pair = t * K + j, e = args.ids[pair];
      const float* q = q_pair.get() + pair * I;
      float* dg = dgu.get() + pair * 2 * I;
      float* du = dg + I;
      Act* fused = dgus.get() + row_of_pair[pair] * 2 * ip;
      std::fill(fused, fused + 2 * ip, Act(0));
      float z_dot_q = 0.f;
      for (int64_t c = 0; c < I; ++c) {
        const float g = load_as_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + c);
        const float u = load_as_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + I + c);
        const float sg = sigmoid(g), silu = g * sg;
        z_dot_q += silu * u * q[c];
        const float dz = args.weights[pair] * q[c];
        dg[c] = dz * u * sg * (1.f + g * (1.f - sg));
        du[c] = dz * silu;
        fused[gate_up_column(c, false)] = f32_to_act<Act>(dg[c]);
        fused[gate_up_column(c, true)] = f32_to_act<Act>(du[c]);
      }
      args.grad_weights[pair] = z_dot_q;
      float* b_out = dgu_b.get() + pair * rank_gu;
      for (int64_t r = 0; r < lg.rank; ++r) b_out[r] = 0.f;
      for (int64_t r = 0; r < lu.rank; ++r) b_out[lg.rank + r] = 0.f;
      for (int64_t c = 0; c < I; ++c) {
        for (int64_t r = 0; r < lg.rank; ++r) b_out[r] += dg[c] * lg.b[(e * I + c) * lg.rank + r];
        for (int64_t r = 0; r < lu.rank; ++r) b_out[lg.rank + r] += du[c] * lu.b[(e * I + c) * lu.rank + r];
      }
    }
  });
  for (int64_t e : route.active) {  // padding rows of the fused gradient
    Act* pad = dgus.get() + (route.first_row[e] + route.count(e)) * 2 * ip;
    std::fill(pad, pad + (route.padded_rows(e) - route.count(e)) * 2 * ip, Act(0));
  }

  // Phase 4, per (expert, hidden columns): dx per pair = dg W_g + du W_u + LoRA terms.
  auto dx_pair = uninitialized<float>(n_pairs * H);
  const int64_t h_panels = hp / kPanelRows;
  const auto dx_tasks = expert_panel_tasks(route, h_panels, kPanelsPerTask);
  parallel_for(dx_tasks.size(), threads, [&](int64_t task) {
    const auto [e, p0] = dx_tasks[task];
    const int64_t np = std::min(kPanelsPerTask, h_panels - p0), cols = np * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    auto wt = uninitialized<bf16>(cols * 2 * ip);
    pack_transposed_panels(w.gate_up + e * 2 * ip * hp, 2 * ip, hp, p0, np, wt.get());
    auto acc = uninitialized<float>(m * cols);
    gemm(k, m, 2 * ip, dgus.get() + row0 * 2 * ip, 2 * ip, wt.get(), np, acc.get(), cols);
    const int64_t c0 = p0 * kPanelRows, c_end = std::min(c0 + cols, H);
    for (int64_t i = 0; i < route.count(e); ++i) {
      const int64_t pair = route.pairs[route.first[e] + i];
      const float* b = dgu_b.get() + pair * rank_gu;
      for (int64_t c = c0; c < c_end; ++c) {
        float dx = acc[i * cols + c - c0];
        float lora = 0.f;
        for (int64_t r = 0; r < lg.rank; ++r) lora += b[r] * lg.a[(e * lg.rank + r) * H + c];
        for (int64_t r = 0; r < lu.rank; ++r) lora += b[lg.rank + r] * lu.a[(e * lu.rank + r) * H + c];
        dx_pair[pair * H + c] = dx + s * lora;
      }
    }
  });

  // Phase 5, per (expert, projection): the six LoRA gradients, summed over the expert's
  // pairs in pair order. Experts without tokens get zeros.
  parallel_for(E * 3, threads, [&](int64_t task) {
    const int64_t e = task / 3;
    const int proj = static_cast<int>(task % 3);
    const LoraWeights& lw = w.lora[proj];
    if (!lw.rank) return;
    const int64_t r = lw.rank;
    const int64_t in = proj == kDown ? I : H, out = proj == kDown ? H : I;
    float* ga = args.grad_lora_a[proj] + e * r * in;
    float* gb = args.grad_lora_b[proj] + e * out * r;
    std::fill(ga, ga + r * in, 0.f);
    std::fill(gb, gb + out * r, 0.f);
    std::vector<float> in_row(in), out_grad(out), coef(r);
    for (int64_t i = 0; i < route.count(e); ++i) {
      const int64_t pair = route.pairs[route.first[e] + i], t = pair / K;
      const float* act_a = args.lora_act + pair * lcol.width + lcol.offset[proj];  // in A^T
      if (proj == kDown) {
        // grad of h is w * dy; its B-side projection is w * (dy B_d); the input is z.
        const float wt = args.weights[pair];
        load_row(args.grad_y, args.act_dtype, t, H, out_grad.data());
        for (int64_t c = 0; c < H; ++c) out_grad[c] *= wt;
        for (int64_t j = 0; j < r; ++j) coef[j] = wt * dy_b[pair * r + j];
        for (int64_t c = 0; c < I; ++c) {
          const float g = load_as_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + c);
          const float u = load_as_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + I + c);
          in_row[c] = g * sigmoid(g) * u;
        }
      } else {
        const float* grad = dgu.get() + pair * 2 * I + (proj == kUp ? I : 0);
        std::copy(grad, grad + I, out_grad.begin());
        const float* b = dgu_b.get() + pair * rank_gu + (proj == kUp ? lg.rank : 0);
        std::copy(b, b + r, coef.begin());
        load_row(args.x, args.act_dtype, t, H, in_row.data());
      }
      for (int64_t j = 0; j < r; ++j) {  // dA += s * (grad B)^T input
        const float cj = s * coef[j];
        for (int64_t c = 0; c < in; ++c) ga[j * in + c] += cj * in_row[c];
      }
      for (int64_t o = 0; o < out; ++o) {  // dB += s * grad^T (input A^T)
        const float go = s * out_grad[o];
        for (int64_t j = 0; j < r; ++j) gb[o * r + j] += go * act_a[j];
      }
    }
  });

  // Phase 6, per token: dx = sum over the token's slots, in slot order.
  parallel_for(T, threads, [&](int64_t t) {
    for (int64_t c = 0; c < H; ++c) {
      float dx = 0.f;
      for (int64_t j = 0; j < K; ++j) dx += dx_pair[(t * K + j) * H + c];
      store_from_f32(args.grad_x, args.act_dtype, t * H + c, dx);
    }
  });
}

}  // namespace

void moe_sft_forward(const Kernels& k, int num_threads, const MoeForwardArgs& args) {
  if (k.bf16_activations)
    forward_impl<bf16>(k, num_threads, args);
  else
    forward_impl<float>(k, num_threads, args);
}

void moe_sft_backward(const Kernels& k, int num_threads, const MoeBackwardArgs& args) {
  if (k.bf16_activations)
    backward_impl<bf16>(k, num_threads, args);
  else
    backward_impl<float>(k, num_threads, args);
}

}  // namespace kt
