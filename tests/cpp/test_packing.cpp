#include <gtest/gtest.h>

#include "kt/packing.h"
#include "test_util.h"

namespace {

using kt::bf16;

class PackingShapes : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(PackingShapes, WeightRoundTripAndZeroPadding) {
  const auto [n, k] = GetParam();
  const auto w = kt_test::random_bf16(n * k, 1);
  const int64_t np = kt::round_up(n, 32), kp = kt::round_up(k, 32);
  std::vector<bf16> packed(np * kp, 0xffff);
  kt::pack_weight(w.data(), n, k, k, kt::round_up(k, kt::kPadTo), packed.data());
  std::vector<bf16> back(n * k);
  kt::unpack_weight(packed.data(), n, k, k, kp, back.data());
  EXPECT_EQ(back, w);
  // Every padded position must read as zero: the GEMMs rely on it.
  for (int64_t r = 0; r < np; ++r) {
    for (int64_t c = 0; c < kp; ++c) {
      if (r >= n || c >= k) {
        ASSERT_EQ(packed[kt::packed_offset(r, c, kp)], 0) << r << "," << c;
      }
    }
  }
}

TEST_P(PackingShapes, GateUpRoundTripAndInterleaving) {
  const auto [i, h] = GetParam();
  const auto g = kt_test::random_bf16(i * h, 2), u = kt_test::random_bf16(i * h, 3);
  const int64_t ip = kt::round_up(i, 32), hp = kt::round_up(h, 32);
  std::vector<bf16> packed(2 * ip * hp);
  kt::pack_gate_up(g.data(), u.data(), i, h, packed.data());
  std::vector<bf16> g2(i * h), u2(i * h);
  kt::unpack_gate_up(packed.data(), i, h, g2.data(), u2.data());
  EXPECT_EQ(g2, g);
  EXPECT_EQ(u2, u);
  // Gate row c sits at fused row gate_up_column(c, false), up row c at (c, true).
  EXPECT_EQ(packed[kt::packed_offset(kt::gate_up_column(i - 1, true), 0, hp)], u[(i - 1) * h]);
  EXPECT_EQ(packed[kt::packed_offset(kt::gate_up_column(i - 1, false), h - 1, hp)], g[i * h - 1]);
}

TEST_P(PackingShapes, TransposedPanelsEqualPackingTheTranspose) {
  const auto [n, k] = GetParam();
  const auto w = kt_test::random_bf16(n * k, 4);
  const int64_t np = kt::round_up(n, 32), kp = kt::round_up(k, 32);
  std::vector<bf16> packed(np * kp);
  kt::pack_weight(w.data(), n, k, k, kt::round_up(k, kt::kPadTo), packed.data());
  std::vector<bf16> wt(k * n);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) wt[c * n + r] = w[r * k + c];
  std::vector<bf16> expected(kp * np);
  kt::pack_weight(wt.data(), k, n, n, kt::round_up(n, kt::kPadTo), expected.data());
  // Whole matrix at once, and panel by panel from an offset.
  std::vector<bf16> got(kp * np);
  kt::pack_transposed_panels(packed.data(), np, kp, 0, kp / 16, got.data());
  EXPECT_EQ(got, expected);
  const int64_t first = 1, count = kp / 16 - 1;
  std::vector<bf16> part(count * 16 * np);
  kt::pack_transposed_panels(packed.data(), np, kp, first, count, part.data());
  EXPECT_TRUE(std::equal(part.begin(), part.end(), expected.begin() + first * 16 * np));
}

// The rule slices_for computes in closed form: start from one slice per node and drop slices
// while the last one would hold padding only.
int64_t slices_by_definition(int64_t intermediate, int64_t nodes) {
  int64_t s = nodes < 1 ? 1 : nodes;
  while (s > 1 && (s - 1) * kt::round_up((intermediate + s - 1) / s, kt::kPadTo) >= intermediate) --s;
  return s;
}

TEST(SliceCount, ClosedFormEqualsTheDefinitionAndEverySliceHoldsColumns) {
  for (int64_t i = 1; i <= 700; ++i) {
    for (int64_t nodes = 0; nodes <= 40; ++nodes) {
      const int64_t s = kt::slices_for(i, nodes);
      ASSERT_EQ(s, slices_by_definition(i, nodes)) << "I = " << i << ", nodes = " << nodes;
      const kt::ExpertLayout layout{1, 32, i, s};
      ASSERT_GE(s * layout.slice_width(), i);
      for (int64_t sl = 0; sl < s; ++sl) ASSERT_GT(layout.slice_columns(sl), 0) << i << " " << nodes << " " << sl;
    }
  }
}

TEST(SliceCount, HugeNodeCountsAndSizesTakeNoTime) {
  EXPECT_EQ(kt::slices_for(int64_t{1} << 40, int64_t{1} << 40), (int64_t{1} << 40) / 32);
  EXPECT_EQ(kt::slices_for(100, int64_t{1} << 62), 4);
}

TEST(LayoutTensor, RoundTripAndRejectsOtherValues) {
  const kt::ExpertLayout layout{6, 70, 45, 2};
  int64_t fields[kt::kLayoutFields];
  kt::encode_layout(layout, kt::WeightFormat::kBF16, fields);
  kt::ExpertLayout back{};
  int64_t format = -1;
  ASSERT_TRUE(kt::decode_layout(fields, &back, &format));
  EXPECT_EQ(format, 0);
  EXPECT_EQ(back.experts, 6);
  EXPECT_EQ(back.hidden, 70);
  EXPECT_EQ(back.intermediate, 45);
  EXPECT_EQ(back.slices, 2);
  fields[0] += 1;  // not written by encode_layout
  EXPECT_FALSE(kt::decode_layout(fields, &back, &format));
  kt::encode_layout({6, 70, 45, 3}, kt::WeightFormat::kBF16, fields);  // 3 slices of 45 columns: one empty
  EXPECT_FALSE(kt::decode_layout(fields, &back, &format));
}

INSTANTIATE_TEST_SUITE_P(OddAndAligned, PackingShapes,
                         ::testing::Values(std::make_pair(1, 1), std::make_pair(17, 33),
                                           std::make_pair(45, 70), std::make_pair(64, 96),
                                           std::make_pair(100, 31)));

}  // namespace
