// Routing for the expert driver: which routed pairs each expert serves, the expert-sorted rows
// the GEMMs read, and the work items a phase runs in parallel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kt/bf16.h"
#include "kt/moe_sft.h"
#include "kt/packing.h"
#include "kt/thread_pool.h"

namespace kt {

constexpr int64_t kRowAlign = 16;  // GEMM row blocks; each expert's rows are padded to it
// Output panels (16 columns each) per GEMM work item. A task reads all of its expert's rows as
// A, so wider tasks re-read A less: on the 16-core host 16 beat 4 by 12% per layer (8 and 32
// in between).
constexpr int64_t kPanelsPerTask = 16;

// Which routed pairs (t * K + j) each expert serves, in ascending pair order, and where
// each expert's rows start in the expert-sorted buffers.
struct Routing {
  std::vector<int64_t> first;        // [E + 1] into `pairs`
  std::vector<int64_t> pairs;        // pair indices grouped by expert
  std::vector<int64_t> first_row;    // [E + 1] buffer rows; experts padded to kRowAlign
  std::vector<int64_t> active;       // experts with at least one pair
  std::vector<int64_t> row_of_pair;  // [pairs] each pair's expert-sorted row; -1 if unrouted
  std::vector<int64_t> unrouted;     // pairs of id kNoExpert, ascending

  Routing(const int64_t* ids, int64_t n_pairs, int64_t experts);
  int64_t count(int64_t e) const { return first[e + 1] - first[e]; }
  int64_t padded_rows(int64_t e) const { return first_row[e + 1] - first_row[e]; }
  int64_t rows() const { return first_row.back(); }
  // The pair of expert e's row i (i < count(e)).
  int64_t pair(int64_t e, int64_t i) const { return pairs[first[e] + i]; }
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
  SliceTasks(const Routing& r, int64_t slices, int64_t panels, int64_t panel_stride);

  template <typename F>
  void run(int threads, const F& fn) const {
    parallel_for_ranges(range_first, threads, [&](int64_t i) { fn(items[i]); });
  }
};

template <typename Act> Act f32_to_act(float v);
template <> inline float f32_to_act<float>(float v) { return v; }
template <> inline bf16 f32_to_act<bf16>(float v) { return f32_to_bf16(v); }
inline float act_to_f32(float v) { return v; }
inline float act_to_f32(bf16 v) { return bf16_to_f32(v); }
template <typename Act>
constexpr DType dtype_of() { return std::is_same_v<Act, bf16> ? DType::kBF16 : DType::kF32; }

// Copies the rows of `src` ([T, cols], dtype dt) that expert e's pairs read into the
// expert's block of `dst` ([rows, ld] Act), zero-filling padding rows and columns.
template <typename Act>
void gather_rows(const Routing& r, int64_t e, const void* src, DType dt, int64_t top_k,
                 int64_t cols, Act* dst, int64_t ld) {
  const int64_t n = r.count(e), padded = r.padded_rows(e);
  Act* out = dst + r.first_row[e] * ld;
  const bool same_type = dt == dtype_of<Act>();
  std::vector<float> row(cols);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = r.pair(e, i) / top_k;
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

}  // namespace kt
