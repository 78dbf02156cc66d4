// Grouped-GEMM driver for the routed experts. Work is split into phases separated by
// parallel_for barriers; in every phase each output element has exactly one owner and
// every reduction runs in a fixed order, so results do not depend on the thread count.
#include "kt/moe_sft.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kt/packing.h"
#include "kt/scratch.h"
#include "kt/thread_pool.h"

namespace kt {
namespace {

constexpr int64_t kRowAlign = 16;       // GEMM row blocks; each expert's rows are padded to it
// Output panels (16 columns each) per GEMM work item. A task reads all of its expert's rows as
// A, so wider tasks re-read A less: on the 16-core host 16 beat 4 by 12% per layer (8 and 32
// in between).
constexpr int64_t kPanelsPerTask = 16;
// Routed pairs per block of LoRA-gradient updates: C is loaded and stored once per block, and
// a block's 64 columns of its rows (8-16 KiB) stay in L1 while every group of C rows meets them.
constexpr int64_t kPairBlock = 64;
// Extra elements per row of the activation buffers the GEMMs read as A. Without them a row of
// 2048 bf16 is 4 KiB, and the 16 rows of one AMX tile load all fall in one L1 set.
constexpr int64_t kRowSkew = 32;

// With KT_OPS_PROFILE set, each call prints the wall time of its phases to stderr: the
// accelerator host has no profiler, and this is what says which phase bounds a step.
class PhaseTimer {
 public:
  PhaseTimer(const char* call, int64_t tokens) : enabled_(std::getenv("KT_OPS_PROFILE") != nullptr) {
    if (enabled_) report_ = std::string(call) + " T=" + std::to_string(tokens) + ":";
    last_ = std::chrono::steady_clock::now();
  }
  void mark(const char* phase) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    char buf[64];
    std::snprintf(buf, sizeof buf, " %s %.1f ms", phase, std::chrono::duration<double, std::milli>(now - last_).count());
    report_ += buf;
    last_ = now;
  }
  ~PhaseTimer() {
    if (enabled_) std::fprintf(stderr, "%s\n", report_.c_str());
  }

 private:
  bool enabled_;
  std::string report_;
  std::chrono::steady_clock::time_point last_;
};

template <typename Act> Act f32_to_act(float v);
template <> inline float f32_to_act<float>(float v) { return v; }
template <> inline bf16 f32_to_act<bf16>(float v) { return f32_to_bf16(v); }
inline float act_to_f32(float v) { return v; }
inline float act_to_f32(bf16 v) { return bf16_to_f32(v); }

// C (+)= A * W^T for the activation / weight element types of one path.
inline void gemm(const Kernels& k, int64_t m, int64_t kp, const bf16* a, int64_t lda, const bf16* w,
                 int64_t panels, float* c, int64_t ldc, bool accumulate = false) {
  k.gemm_bf16(m, kp, a, lda, w, panels, c, ldc, accumulate);
}
inline void gemm(const Kernels& k, int64_t m, int64_t kp, const float* a, int64_t lda, const bf16* w,
                 int64_t panels, float* c, int64_t ldc, bool accumulate = false) {
  k.gemm_f32(m, kp, a, lda, w, panels, c, ldc, accumulate);
}
inline void gemm(const Kernels&, int64_t m, int64_t kp, const float* a, int64_t lda, const float* w,
                 int64_t panels, float* c, int64_t ldc, bool accumulate = false) {
  gemm_scalar_f32_f32w(m, kp, a, lda, w, panels, c, ldc, accumulate);
}

// Packs the np x kp matrix value(n, k) into the panel layout (LoRA operands, per call),
// writing dst in order: panel, block, pair row, then the panel's 16 rows (packed_offset).
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


// Which routed pairs (t * K + j) each expert serves, in ascending pair order, and where
// each expert's rows start in the expert-sorted scratch buffers.
struct Routing {
  std::vector<int64_t> first;        // [E + 1] into `pairs`
  std::vector<int64_t> pairs;        // pair indices grouped by expert
  std::vector<int64_t> first_row;    // [E + 1] scratch rows; experts padded to kRowAlign
  std::vector<int64_t> active;       // experts with at least one pair
  std::vector<int64_t> row_of_pair;  // [pairs] each pair's expert-sorted row

  Routing(const int64_t* ids, int64_t n_pairs, int64_t experts)
      : first(experts + 1, 0), pairs(n_pairs), first_row(experts + 1, 0), row_of_pair(n_pairs) {
    for (int64_t p = 0; p < n_pairs; ++p) ++first[ids[p] + 1];
    for (int64_t e = 0; e < experts; ++e) {
      first_row[e + 1] = first_row[e] + round_up(first[e + 1], kRowAlign);
      if (first[e + 1] > 0) active.push_back(e);
      first[e + 1] += first[e];
    }
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < n_pairs; ++p) {
      const int64_t e = ids[p];
      row_of_pair[p] = first_row[e] + fill[e] - first[e];
      pairs[fill[e]++] = p;
    }
  }
  int64_t count(int64_t e) const { return first[e + 1] - first[e]; }
  int64_t padded_rows(int64_t e) const { return first_row[e + 1] - first_row[e]; }
  int64_t rows() const { return first_row.back(); }
};

// A GEMM work item: output panels [panel, panel + panels) of expert `expert`, reading the
// weights of intermediate slice `slice`.
struct Task {
  int64_t slice, expert, panel, panels;
};

// A phase's work items grouped by slice: slice s's items are [range_first[s],
// range_first[s + 1]), and run first on the threads of the NUMA node holding that slice.
struct SliceTasks {
  std::vector<Task> items;
  std::vector<int64_t> range_first{0};

  // Items covering `panels` output panels per slice of every active expert, kPanelsPerTask
  // at a time. Slice s's panels are numbered from s * panel_stride: intermediate columns are
  // divided between the slices (stride = panels), hidden columns are not (stride 0: each
  // slice computes a partial sum over its part of the intermediate dimension).
  SliceTasks(const Routing& r, int64_t slices, int64_t panels, int64_t panel_stride) {
    for (int64_t s = 0; s < slices; ++s) {
      for (int64_t e : r.active)
        for (int64_t p = 0; p < panels; p += kPanelsPerTask)
          items.push_back({s, e, s * panel_stride + p, std::min(kPanelsPerTask, panels - p)});
      range_first.push_back(static_cast<int64_t>(items.size()));
    }
  }

  template <typename F>
  void run(int threads, const F& fn) const {
    parallel_for_ranges(range_first, threads, [&](int64_t i) { fn(items[i]); });
  }
};


// Copies the rows of `src` ([T, cols], dtype dt) that expert e's pairs read into the
// expert's block of `dst` ([rows, ld] Act), zero-filling padding rows and columns.
template <typename Act>
void gather_rows(const Routing& r, int64_t e, const void* src, DType dt, int64_t top_k,
                 int64_t cols, Act* dst, int64_t ld) {
  const int64_t n = r.count(e), padded = r.padded_rows(e);
  Act* out = dst + r.first_row[e] * ld;
  const bool same_type = (dt == DType::kBF16) == std::is_same_v<Act, bf16>;
  std::vector<float> row(cols);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = r.pairs[r.first[e] + i] / top_k;
    if (same_type) {
      std::memcpy(out + i * ld, static_cast<const Act*>(src) + t * cols, sizeof(Act) * cols);
    } else {
      load_f32(src, dt, t * cols, cols, row.data());
      for (int64_t c = 0; c < cols; ++c) out[i * ld + c] = f32_to_act<Act>(row[c]);
    }
    std::fill(out + i * ld + cols, out + (i + 1) * ld, Act(0));
  }
  std::fill(out + n * ld, out + padded * ld, Act(0));
}


// LoRA sizes of a call; each LoRA product runs as a GEMM against operands packed per call in
// the panel layout (their K padded to 32), gate and up side by side as one operand.
struct LoraShape {
  int64_t rg, ru, rd, rgu;  // ranks of gate, up, down; rgu = rg + ru
  int64_t rgu_p, rd_p;      // padded to kPadTo (0 when absent)
  int64_t width;            // columns of the saved lora activations: [x A_g^T | x A_u^T | z A_d^T]
  explicit LoraShape(const MoeWeights& w)
      : rg(w.lora[kGate].rank), ru(w.lora[kUp].rank), rd(w.lora[kDown].rank), rgu(rg + ru),
        rgu_p(round_up(rgu, kPadTo)), rd_p(round_up(rd, kPadTo)), width(rgu + rd) {}
  int64_t offset(int proj) const { return proj == kGate ? 0 : proj == kUp ? rg : rgu; }
};

// Element (rank row j, input column c) of [A_g; A_u] for expert e, zero outside.
inline float lora_a_gu(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t in, int64_t j,
                       int64_t c) {
  if (c >= in) return 0.f;
  if (j < l.rg) return w.lora[kGate].a[(e * l.rg + j) * in + c];
  if (j < l.rgu) return w.lora[kUp].a[(e * l.ru + j - l.rg) * in + c];
  return 0.f;
}

// Element (fused gate/up row, rank column j) of blockdiag(B_g, B_u) for expert e.
inline float lora_b_gu(const MoeWeights& w, const LoraShape& l, int64_t e, int64_t I, int64_t row,
                       int64_t j) {
  bool is_up;
  const int64_t c = fused_to_column(row, &is_up);
  if (c >= I) return 0.f;
  if (!is_up && j < l.rg) return w.lora[kGate].b[(e * I + c) * l.rg + j];
  if (is_up && j >= l.rg && j < l.rgu) return w.lora[kUp].b[(e * I + c) * l.ru + j - l.rg];
  return 0.f;
}

template <typename Act>
void forward_impl(const Kernels& k, int threads, const MoeForwardArgs& args) {
  const MoeWeights& w = args.w;
  const int64_t T = args.dims.tokens, K = args.dims.top_k, H = args.dims.hidden;
  const int64_t I = args.dims.intermediate, E = args.dims.experts, S = w.slices;
  const ExpertLayout layout{E, H, I, S};
  const int64_t hp = layout.hp(), is = layout.slice_width(), ip = S * is, n_pairs = T * K;
  const int64_t ld_h = hp + kRowSkew, ld_i = ip + kRowSkew;
  const float s = w.lora_scaling;
  const LoraShape l(w);
  const LoraWeights& ld = w.lora[kDown];
  PhaseTimer timer("kt.moe_sft_forward", T);
  const Routing route(args.ids, n_pairs, E);
  const int64_t rows = route.rows();
  timer.mark("route");

  // Phase 1, per expert: gather its tokens, pack its LoRA operands, x [A_g; A_u]^T.
  Act* xs = scratch<Act>(Scratch::kRowsA, rows * ld_h);
  Act* xa = scratch<Act>(Scratch::kRowsB, rows * l.rgu_p);  // s * x [A_g; A_u]^T
  Act* a_gu = scratch<Act>(Scratch::kLoraA, E * l.rgu_p * hp);
  Act* b_gu = scratch<Act>(Scratch::kLoraB, E * 2 * ip * l.rgu_p);
  Act* a_d = scratch<Act>(Scratch::kLoraC, E * l.rd_p * ip);
  Act* b_d = scratch<Act>(Scratch::kLoraD, E * hp * l.rd_p);
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task], n = route.count(e), m = route.padded_rows(e);
    const int64_t row0 = route.first_row[e];
    gather_rows(route, e, args.x, args.act_dtype, K, H, xs, ld_h);
    if (l.rd) {
      pack_elements(l.rd_p, ip, a_d + e * l.rd_p * ip, [&](int64_t j, int64_t c) {
        return j < l.rd && c < I ? ld.a[(e * l.rd + j) * I + c] : 0.f;
      });
      pack_elements(hp, l.rd_p, b_d + e * hp * l.rd_p, [&](int64_t o, int64_t j) {
        return o < H && j < l.rd ? ld.b[(e * H + o) * l.rd + j] : 0.f;
      });
    }
    if (!l.rgu) return;
    Act* a_e = a_gu + e * l.rgu_p * hp;
    pack_elements(l.rgu_p, hp, a_e, [&](int64_t j, int64_t c) { return lora_a_gu(w, l, e, H, j, c); });
    pack_elements(2 * ip, l.rgu_p, b_gu + e * 2 * ip * l.rgu_p,
                  [&](int64_t row, int64_t j) { return lora_b_gu(w, l, e, I, row, j); });
    float* acc = scratch<float>(Scratch::kTaskAcc, m * l.rgu_p);
    gemm(k, m, hp, xs + row0 * ld_h, ld_h, a_e, l.rgu_p / kPanelRows, acc, l.rgu_p);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < l.rgu_p; ++j) xa[(row0 + i) * l.rgu_p + j] = f32_to_act<Act>(s * acc[i * l.rgu_p + j]);
      if (i >= n) continue;
      const int64_t pair = route.pairs[route.first[e] + i];
      std::copy(acc + i * l.rgu_p, acc + i * l.rgu_p + l.rgu, args.lora_act + pair * l.width);
    }
  });

  timer.mark("gather+lora_a");

  // Phase 2, per (expert, 16*kPanelsPerTask intermediate columns): fused gate/up GEMM plus the
  // LoRA-B product into the same tile; add the biases; save g and u; z = gate(g, u).
  const Gate& gate = w.gate;
  const bool plain_silu = w.plain_swiglu();
  Act* zs = scratch<Act>(Scratch::kRowsC, rows * ld_i);
  SliceTasks(route, S, is / kPanelRows, is / kPanelRows).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, cols = np * kPanelRows, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), n = route.count(e), row0 = route.first_row[e];
    float* acc = scratch<float>(Scratch::kTaskAcc, m * 2 * cols);  // gate and up panels interleaved
    gemm(k, m, hp, xs + row0 * ld_h, ld_h,
         w.gate_up + layout.gate_up_offset(task.slice, e) + 2 * (c0 - task.slice * is) * hp, 2 * np, acc,
         2 * cols);
    if (l.rgu)
      gemm(k, m, l.rgu_p, xa + row0 * l.rgu_p, l.rgu_p, b_gu + (e * 2 * ip + 2 * c0) * l.rgu_p, 2 * np, acc,
           2 * cols, true);
    const int64_t valid = std::max<int64_t>(0, std::min(c0 + cols, I) - c0);
    std::vector<float> g(cols), u(cols), sg(cols);
    for (int64_t i = 0; i < m; ++i) {
      Act* z = zs + (row0 + i) * ld_i + c0;
      const int64_t pair = i < n ? route.pairs[route.first[e] + i] : -1;
      if constexpr (std::is_same_v<Act, bf16>) {
        if (pair >= 0 && plain_silu && k.gate_up_epilogue) {  // vectorised: the scalar loop is slow
          k.gate_up_epilogue(valid, cols, acc + i * 2 * cols, z, args.gate_up_act, args.act_dtype,
                             pair * 2 * I + c0, pair * 2 * I + I + c0);
          continue;
        }
      }
      std::fill(z, z + cols, Act(0));
      if (i >= n) continue;
      for (int64_t c = 0; c < valid; ++c) {
        g[c] = acc[i * 2 * cols + gate_up_column(c, false)];
        u[c] = acc[i * 2 * cols + gate_up_column(c, true)];
      }
      if (w.gate_up_bias) {
        const float* bias = w.gate_up_bias + e * 2 * I + c0;
        for (int64_t c = 0; c < valid; ++c) g[c] += bias[c], u[c] += bias[I + c];
      }
      if (plain_silu) {
        k.sigmoid(valid, g.data(), sg.data());
        for (int64_t c = 0; c < valid; ++c) z[c] = f32_to_act<Act>(g[c] * sg[c] * u[c]);
      } else {
        for (int64_t c = 0; c < valid; ++c) z[c] = f32_to_act<Act>(gate.value(g[c], u[c]));
      }
      store_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + c0, valid, g.data());
      store_f32(args.gate_up_act, args.act_dtype, pair * 2 * I + I + c0, valid, u.data());
    }
  });

  timer.mark("gate_up");

  // Phase 3, per expert: LoRA-A of down (z A_d^T), from the same z the base GEMM reads.
  Act* za = scratch<Act>(Scratch::kRowsD, rows * l.rd_p);  // s * z A_d^T
  if (l.rd) {
    parallel_for(route.active.size(), threads, [&](int64_t task) {
      const int64_t e = route.active[task], n = route.count(e), m = route.padded_rows(e);
      const int64_t row0 = route.first_row[e];
      float* acc = scratch<float>(Scratch::kTaskAcc, m * l.rd_p);
      gemm(k, m, ip, zs + row0 * ld_i, ld_i, a_d + e * l.rd_p * ip, l.rd_p / kPanelRows, acc,
           l.rd_p);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < l.rd_p; ++j) za[(row0 + i) * l.rd_p + j] = f32_to_act<Act>(s * acc[i * l.rd_p + j]);
        if (i >= n) continue;
        const int64_t pair = route.pairs[route.first[e] + i];
        std::copy(acc + i * l.rd_p, acc + i * l.rd_p + l.rd,
                  args.lora_act + pair * l.width + l.offset(kDown));
      }
    });
  }

  timer.mark("lora_a_down");

  // Phase 4, per (slice, expert, hidden columns): down GEMM over the slice's intermediate
  // columns, plus LoRA-B (once, in slice 0), straight into expert-sorted partial outputs, one
  // set per slice.
  float* h_rows = scratch<float>(Scratch::kRowsOut, S * rows * hp);
  SliceTasks(route, S, hp / kPanelRows, 0).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    float* out = h_rows + (task.slice * rows + row0) * hp + c0;
    gemm(k, m, is, zs + row0 * ld_i + task.slice * is, ld_i, w.down + layout.down_offset(task.slice, e) + c0 * is,
         np, out, hp);
    if (l.rd && task.slice == 0)
      gemm(k, m, l.rd_p, za + row0 * l.rd_p, l.rd_p, b_d + (e * hp + c0) * l.rd_p, np, out, hp, true);
  });

  timer.mark("down");

  // Phase 5, per token: weighted sum over the token's slots of the down bias and the slices'
  // partial outputs, in slot, bias, then slice order.
  parallel_for(T, threads, [&](int64_t t) {
    std::vector<float> y(H, 0.f);
    for (int64_t j = 0; j < K; ++j) {
      const float wt = args.weights[t * K + j];
      if (w.down_bias) {
        const float* b = w.down_bias + args.ids[t * K + j] * H;
        for (int64_t c = 0; c < H; ++c) y[c] += wt * b[c];
      }
      for (int64_t sl = 0; sl < S; ++sl) {
        const float* h = h_rows + (sl * rows + route.row_of_pair[t * K + j]) * hp;
        for (int64_t c = 0; c < H; ++c) y[c] += wt * h[c];
      }
    }
    store_f32(args.y, args.act_dtype, t * H, H, y.data());
  });
  timer.mark("combine");
}

template <typename Act>
void backward_impl(const Kernels& k, int threads, const MoeBackwardArgs& args) {
  const MoeWeights& w = args.w;
  const int64_t T = args.dims.tokens, K = args.dims.top_k, H = args.dims.hidden;
  const int64_t I = args.dims.intermediate, E = args.dims.experts, S = w.slices;
  const ExpertLayout layout{E, H, I, S};
  const int64_t hp = layout.hp(), is = layout.slice_width(), ip = S * is, n_pairs = T * K;
  const int64_t ld_h = hp + kRowSkew, ld_gu = 2 * ip + kRowSkew;
  const float s = w.lora_scaling;
  const LoraShape l(w);
  const LoraWeights& ld = w.lora[kDown];
  PhaseTimer timer("kt.moe_sft_backward", T);
  const Routing route(args.ids, n_pairs, E);
  const int64_t rows = route.rows();
  timer.mark("route");

  // Phase 1, per expert: gather dy rows, pack the transposed LoRA operands, dy B_d.
  Act* dys = scratch<Act>(Scratch::kRowsA, rows * ld_h);
  float* dy_b = scratch<float>(Scratch::kRowsB, rows * l.rd_p);  // dy B_d, expert-sorted rows
  Act* dy_bs = scratch<Act>(Scratch::kRowsC, rows * l.rd_p);  // s * dy B_d
  Act* bt_d = scratch<Act>(Scratch::kLoraA, E * l.rd_p * hp);
  Act* at_d = scratch<Act>(Scratch::kLoraB, E * ip * l.rd_p);
  Act* bt_gu = scratch<Act>(Scratch::kLoraC, E * l.rgu_p * 2 * ip);
  Act* at_gu = scratch<Act>(Scratch::kLoraD, E * hp * l.rgu_p);
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task], m = route.padded_rows(e), row0 = route.first_row[e];
    gather_rows(route, e, args.grad_y, args.act_dtype, K, H, dys, ld_h);
    if (l.rgu) {
      pack_elements(l.rgu_p, 2 * ip, bt_gu + e * l.rgu_p * 2 * ip,
                    [&](int64_t j, int64_t row) { return lora_b_gu(w, l, e, I, row, j); });
      pack_elements(hp, l.rgu_p, at_gu + e * hp * l.rgu_p,
                    [&](int64_t c, int64_t j) { return lora_a_gu(w, l, e, H, j, c); });
    }
    if (!l.rd) return;
    Act* bt = bt_d + e * l.rd_p * hp;
    pack_elements(l.rd_p, hp, bt, [&](int64_t j, int64_t o) {
      return j < l.rd && o < H ? ld.b[(e * H + o) * l.rd + j] : 0.f;
    });
    pack_elements(ip, l.rd_p, at_d + e * ip * l.rd_p, [&](int64_t c, int64_t j) {
      return c < I && j < l.rd ? ld.a[(e * l.rd + j) * I + c] : 0.f;
    });
    float* out = dy_b + row0 * l.rd_p;
    gemm(k, m, hp, dys + row0 * ld_h, ld_h, bt, l.rd_p / kPanelRows, out, l.rd_p);
    for (int64_t i = 0; i < m * l.rd_p; ++i) dy_bs[row0 * l.rd_p + i] = f32_to_act<Act>(s * out[i]);
  });

  timer.mark("gather+pack");

  // Phase 2, per (expert, intermediate columns): q = dy W_d + s (dy B_d) A_d, the gradient
  // of z before the routing weight. W_d's transposed panels stream through a small buffer.
  float* q_rows = scratch<float>(Scratch::kRowsOut, rows * ip);
  SliceTasks(route, S, is / kPanelRows, is / kPanelRows).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, cols = np * kPanelRows, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    bf16* wt = scratch<bf16>(Scratch::kTaskWeights, cols * hp);
    k.pack_transposed(w.down + layout.down_offset(task.slice, e), hp, is, (c0 - task.slice * is) / kPanelRows,
                      np, wt);
    float* out = q_rows + row0 * ip + c0;
    gemm(k, m, hp, dys + row0 * ld_h, ld_h, wt, np, out, ip);
    if (l.rd)
      gemm(k, m, l.rd_p, dy_bs + row0 * l.rd_p, l.rd_p, at_d + (e * ip + c0) * l.rd_p, np, out, ip, true);
  });

  timer.mark("down_t");

  // Phase 3, per token: routing-weight gradient z.q, then dg and du through gate(g, u), in
  // the fused column order of the gate/up weights (padding columns zero).
  const Gate& gate = w.gate;
  const bool plain_silu = w.plain_swiglu();
  Act* dgus = scratch<Act>(Scratch::kRowsD, rows * ld_gu);
  const std::vector<int64_t>& row_of_pair = route.row_of_pair;
  Act* z_rows = scratch<Act>(Scratch::kRowsG, rows * I);  // z again, for the down LoRA gradient
  parallel_for(T, threads, [&](int64_t t) {
    std::vector<float> gu(2 * I), sig(I);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t pair = t * K + j;
      const float* q = q_rows + row_of_pair[pair] * ip;
      Act* fused = dgus + row_of_pair[pair] * ld_gu;
      Act* z = z_rows + row_of_pair[pair] * I;
      if constexpr (std::is_same_v<Act, bf16>) {
        if (plain_silu && k.silu_grad) {  // vectorised; the scalar loop serves the rest
          args.grad_weights[pair] = k.silu_grad(I, ip, args.gate_up_act, args.act_dtype, pair * 2 * I, q,
                                                args.weights[pair], z, fused);
          continue;
        }
      }
      std::fill(fused, fused + 2 * ip, Act(0));
      load_f32(args.gate_up_act, args.act_dtype, pair * 2 * I, 2 * I, gu.data());
      float z_dot_q = 0.f;
      if (!plain_silu) {
        for (int64_t c = 0; c < I; ++c) {
          float dg, du;
          const float zc = gate.gradient(gu[c], gu[I + c], args.weights[pair] * q[c], &dg, &du);
          z[c] = f32_to_act<Act>(zc);
          z_dot_q += zc * q[c];
          fused[gate_up_column(c, false)] = f32_to_act<Act>(dg);
          fused[gate_up_column(c, true)] = f32_to_act<Act>(du);
        }
        args.grad_weights[pair] = z_dot_q;
        continue;
      }
      k.sigmoid(I, gu.data(), sig.data());
      for (int64_t c = 0; c < I; ++c) {
        const float g = gu[c], u = gu[I + c];
        const float sg = sig[c], silu = g * sg;
        z[c] = f32_to_act<Act>(silu * u);
        z_dot_q += silu * u * q[c];
        const float dz = args.weights[pair] * q[c];
        fused[gate_up_column(c, false)] = f32_to_act<Act>(dz * u * sg * (1.f + g * (1.f - sg)));
        fused[gate_up_column(c, true)] = f32_to_act<Act>(dz * silu);
      }
      args.grad_weights[pair] = z_dot_q;
    }
  });

  timer.mark("gate_grad");

  // Phase 4, per expert: padding rows of the fused gradient; [dg B_g | du B_u].
  float* dgu_b = scratch<float>(Scratch::kRowsE, rows * l.rgu_p);  // expert-sorted rows
  Act* dgu_bs = scratch<Act>(Scratch::kRowsF, rows * l.rgu_p);  // s * [dg B_g | du B_u]
  parallel_for(route.active.size(), threads, [&](int64_t task) {
    const int64_t e = route.active[task], m = route.padded_rows(e), row0 = route.first_row[e];
    std::fill(dgus + (row0 + route.count(e)) * ld_gu, dgus + (row0 + m) * ld_gu, Act(0));
    if (!l.rgu) return;
    float* out = dgu_b + row0 * l.rgu_p;
    gemm(k, m, 2 * ip, dgus + row0 * ld_gu, ld_gu, bt_gu + e * l.rgu_p * 2 * ip,
         l.rgu_p / kPanelRows, out, l.rgu_p);
    for (int64_t i = 0; i < m * l.rgu_p; ++i) dgu_bs[row0 * l.rgu_p + i] = f32_to_act<Act>(s * out[i]);
  });

  timer.mark("lora_b_gu");

  // What the biases add to the gradients, per expert over its pairs in pair order (zero for
  // experts without tokens): d bg|bu = sum of the pairs' dg|du rows, d bd = sum of w dy, and
  // each pair's routing weight gains dy.bd (h includes bd). One read of dy serves both.
  const bool gate_up_bias_grad = args.grad_gate_up_bias && w.gate_up_bias;
  if (gate_up_bias_grad || w.down_bias) {
    parallel_for(E, threads, [&](int64_t e) {
      const int64_t n = route.count(e);
      if (gate_up_bias_grad) {
        float* gb = args.grad_gate_up_bias + e * 2 * I;
        std::fill(gb, gb + 2 * I, 0.f);
        for (int64_t i = 0; i < n; ++i) {
          const Act* row = dgus + (route.first_row[e] + i) * ld_gu;
          for (int64_t c = 0; c < I; ++c) {
            gb[c] += act_to_f32(row[gate_up_column(c, false)]);
            gb[I + c] += act_to_f32(row[gate_up_column(c, true)]);
          }
        }
      }
      if (w.down_bias) {
        const float* b = w.down_bias + e * H;
        float* gd = args.grad_down_bias ? args.grad_down_bias + e * H : nullptr;
        if (gd) std::fill(gd, gd + H, 0.f);
        std::vector<float> dy(H);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t pair = route.pairs[route.first[e] + i];
          load_f32(args.grad_y, args.act_dtype, pair / K * H, H, dy.data());
          float dot = 0.f;
          for (int64_t c = 0; c < H; ++c) dot += dy[c] * b[c];
          args.grad_weights[pair] += dot;
          if (gd) {
            for (int64_t c = 0; c < H; ++c) gd[c] += args.weights[pair] * dy[c];
          }
        }
      }
    });
  }

  timer.mark("bias_grads");

  // Phase 5, per (slice, expert, hidden columns): dx per pair = dg W_g + du W_u over the
  // slice's intermediate columns, plus s [dgB|duB] [A_g;A_u] once (slice 0); partial sums
  // per slice.
  float* dx_rows = scratch<float>(Scratch::kRowsOut, S * rows * hp);  // q_rows is dead here
  SliceTasks(route, S, hp / kPanelRows, 0).run(threads, [&](const Task& task) {
    const int64_t e = task.expert, np = task.panels, cols = np * kPanelRows, c0 = task.panel * kPanelRows;
    const int64_t m = route.padded_rows(e), row0 = route.first_row[e];
    bf16* wt = scratch<bf16>(Scratch::kTaskWeights, cols * 2 * is);
    k.pack_transposed(w.gate_up + layout.gate_up_offset(task.slice, e), 2 * is, hp, task.panel, np, wt);
    float* out = dx_rows + (task.slice * rows + row0) * hp + c0;
    gemm(k, m, 2 * is, dgus + row0 * ld_gu + 2 * task.slice * is, ld_gu, wt, np, out, hp);
    if (l.rgu && task.slice == 0)
      gemm(k, m, l.rgu_p, dgu_bs + row0 * l.rgu_p, l.rgu_p, at_gu + (e * hp + c0) * l.rgu_p, np, out, hp, true);
  });

  timer.mark("gate_up_t");

  // Phase 6, per (expert, {gate and up | down}): the LoRA gradients, summed over the expert's
  // pairs in pair order; experts without tokens get zeros. Per block of pairs, dA += (s grad
  // B)^T input and dB^T += (s input A^T)^T grad, blocks of rank-1 updates (dB summed transposed
  // so both run along long rows) that read the inputs and gradients in place: x, z, dy and the
  // fused dg/du rows. Gate and up share their input x: [dA_g; dA_u] is one update of rg + ru
  // rows whose coefficients [dg B_g | du B_u] are one row of dgu_b. The down projection's
  // gradient of h is w * dy: the routing weight goes into the coefficients.
  constexpr DType act_type = std::is_same_v<Act, bf16> ? DType::kBF16 : DType::kF32;
  struct BSide {
    int proj;
    int64_t rank, act_offset;  // rows of dB^T; its columns in the saved LoRA activations
    int64_t grad_offset;       // where its gradient starts in a fused dg/du row (gate and up)
  };
  parallel_for(E * 2, threads, [&](int64_t task) {
    const int64_t e = task / 2;
    const bool down = task % 2;
    const int64_t ra = down ? l.rd : l.rgu, in = down ? I : H, out = down ? H : I;
    if (!ra) return;
    std::vector<BSide> sides;
    if (down) {
      sides.push_back({kDown, l.rd, l.rgu, 0});
    } else {
      if (l.rg) sides.push_back({kGate, l.rg, 0, 0});
      if (l.ru) sides.push_back({kUp, l.ru, l.rg, kPanelRows});
    }
    std::vector<float> ga(ra * in, 0.f), coef(kPairBlock * ra), act_s(kPairBlock * ra);
    std::vector<const void*> in_rows(kPairBlock);
    std::vector<std::vector<const void*>> grad_rows(sides.size(), std::vector<const void*>(kPairBlock));
    std::vector<std::vector<float>> gb_t;
    for (const BSide& side : sides) gb_t.emplace_back(side.rank * out, 0.f);
    const RankRows inputs{in_rows.data(), down ? act_type : args.act_dtype, kPanelRows};
    const int64_t n = route.count(e);
    for (int64_t i0 = 0; i0 < n; i0 += kPairBlock) {
      const int64_t depth = std::min(kPairBlock, n - i0);
      for (int64_t b = 0; b < depth; ++b) {
        const int64_t i = i0 + b, pair = route.pairs[route.first[e] + i], t = pair / K, row = route.first_row[e] + i;
        const float* act_a = args.lora_act + pair * l.width + (down ? l.rgu : 0);  // input A^T
        float *cf = coef.data() + b * ra, *as = act_s.data() + b * ra;
        if (down) {
          const float sw = s * args.weights[pair];
          for (int64_t j = 0; j < ra; ++j) as[j] = sw * act_a[j];
          for (int64_t j = 0; j < ra; ++j) cf[j] = sw * dy_b[row * l.rd_p + j];
          in_rows[b] = z_rows + row * I;
          grad_rows[0][b] = element_at(args.grad_y, args.act_dtype, t * H);
          continue;
        }
        for (int64_t j = 0; j < ra; ++j) as[j] = s * act_a[j];
        for (int64_t j = 0; j < ra; ++j) cf[j] = s * dgu_b[row * l.rgu_p + j];
        in_rows[b] = element_at(args.x, args.act_dtype, t * H);
        for (size_t side = 0; side < sides.size(); ++side)
          grad_rows[side][b] = dgus + row * ld_gu + sides[side].grad_offset;
      }
      k.rank_update(ra, in, depth, coef.data(), ra, inputs, ga.data(), in);
      for (size_t side = 0; side < sides.size(); ++side) {
        const int64_t first = sides[side].act_offset - (down ? l.rgu : 0);  // its columns of act_s
        const RankRows grads = down ? RankRows{grad_rows[side].data(), args.act_dtype, kPanelRows}
                                    : RankRows{grad_rows[side].data(), act_type, 2 * kPanelRows};
        k.rank_update(sides[side].rank, out, depth, act_s.data() + first, ra, grads, gb_t[side].data(), out);
      }
    }
    int64_t row_a = 0;
    for (size_t side = 0; side < sides.size(); ++side) {
      const int64_t r = sides[side].rank;
      const int proj = sides[side].proj;
      std::copy(ga.begin() + row_a * in, ga.begin() + (row_a + r) * in, args.grad_lora_a[proj] + e * r * in);
      row_a += r;
      float* gb = args.grad_lora_b[proj] + e * out * r;
      for (int64_t o = 0; o < out; ++o)
        for (int64_t j = 0; j < r; ++j) gb[o * r + j] = gb_t[side][j * out + o];
    }
  });

  timer.mark("lora_grads");

  // Phase 7, per token: dx = sum over the token's slots and the slices, in that order.
  parallel_for(T, threads, [&](int64_t t) {
    std::vector<float> dx(H, 0.f);
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t sl = 0; sl < S; ++sl) {
        const float* part = dx_rows + (sl * rows + row_of_pair[t * K + j]) * hp;
        for (int64_t c = 0; c < H; ++c) dx[c] += part[c];
      }
    }
    store_f32(args.grad_x, args.act_dtype, t * H, H, dx.data());
  });
  timer.mark("combine");
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
