#include "routing.h"

namespace kt {

Routing::Routing(const int64_t* ids, int64_t n_pairs, int64_t experts)
    : first(experts + 1, 0), pairs(n_pairs), first_row(experts + 1, 0), row_of_pair(n_pairs) {
  for (int64_t p = 0; p < n_pairs; ++p)
    if (ids[p] != kNoExpert) ++first[ids[p] + 1];
  for (int64_t e = 0; e < experts; ++e) {
    first_row[e + 1] = first_row[e] + round_up(first[e + 1], kRowAlign);
    if (first[e + 1] > 0) active.push_back(e);
    first[e + 1] += first[e];
  }
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t e = ids[p];
    if (e == kNoExpert) {
      row_of_pair[p] = -1;
      unrouted.push_back(p);
      continue;
    }
    row_of_pair[p] = first_row[e] + fill[e] - first[e];
    pairs[fill[e]++] = p;
  }
}

SliceTasks::SliceTasks(const Routing& r, int64_t slices, int64_t panels, int64_t panel_stride) {
  for (int64_t s = 0; s < slices; ++s) {
    for (int64_t e : r.active)
      for (int64_t p = 0; p < panels; p += kPanelsPerTask)
        items.push_back({s, e, s * panel_stride + p, std::min(kPanelsPerTask, panels - p)});
    range_first.push_back(static_cast<int64_t>(items.size()));
  }
}

}  // namespace kt
