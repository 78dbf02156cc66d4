#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kt/fp8.h"
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
  kt::pack_transposed_panels(packed.data(), nullptr, np, kp, 0, kp / 16, got.data());
  EXPECT_EQ(got, expected);
  const int64_t first = 1, count = kp / 16 - 1;
  std::vector<bf16> part(count * 16 * np);
  kt::pack_transposed_panels(packed.data(), nullptr, np, kp, first, count, part.data());
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

namespace {

// kt_ops/reference.py's quantize_int8 on one row: scale max|w| / 127, codes round half to even,
// within +-127; a row of zeros has scale 1.
TEST(Int8Rows, QuantizeAsTheReferenceDefinesIt) {
  std::vector<bf16> w = {kt::f32_to_bf16(1.27f), kt::f32_to_bf16(-1.27f), kt::f32_to_bf16(0.005f),
                         kt::f32_to_bf16(0.015f), kt::f32_to_bf16(0.f)};
  std::vector<int8_t> q(w.size());
  const float amax = kt::bf16_to_f32(w[0]);
  const float scale = kt::quantize_row_int8(w.data(), w.size(), q.data());
  EXPECT_EQ(scale, amax / 127.f);
  for (size_t i = 0; i < w.size(); ++i) {
    const float want = std::nearbyint(kt::bf16_to_f32(w[i]) / scale);
    EXPECT_EQ(q[i], static_cast<int8_t>(want)) << i;
  }
  EXPECT_EQ(q[0], 127);
  EXPECT_EQ(q[1], -127);
  std::vector<bf16> zeros(7, 0);
  std::vector<int8_t> qz(7, 5);
  EXPECT_EQ(kt::quantize_row_int8(zeros.data(), 7, qz.data()), 1.f);
  for (int8_t v : qz) EXPECT_EQ(v, 0);
}

// Packed int8 experts hold every row's codes where bf16 packing puts its values, and unpack to
// code * scale rounded to bf16; padding codes and scales are zero.
TEST(Int8Experts, PackUnpackAgainstTheRowQuantization) {
  for (int64_t slices : {1, 2}) {
    const kt::ExpertLayout layout{3, 70, 45, slices};
    const int64_t E = 3, H = 70, I = 45;
    const auto g = kt_test::random_bf16(E * I * H, 5), u = kt_test::random_bf16(E * I * H, 6),
               d = kt_test::random_bf16(E * H * I, 7);
    std::vector<int8_t> gu(layout.gate_up_elems(), 9), dn(layout.down_elems(), 9);
    std::vector<float> gs(slices * E * 2 * layout.slice_width(), -1.f), ds(slices * E * layout.hp(), -1.f);
    for (int64_t s = 0; s < slices; ++s)
      for (int64_t e = 0; e < E; ++e) kt::pack_expert_slice_int8(layout, g.data(), u.data(), d.data(), e, s, gu.data(), dn.data(), gs.data(), ds.data());
    std::vector<bf16> g2(g.size()), u2(u.size()), d2(d.size());
    for (int64_t s = 0; s < slices; ++s)
      for (int64_t e = 0; e < E; ++e)
        kt::unpack_expert_slice_int8(layout, gu.data(), dn.data(), gs.data(), ds.data(), e, s, g2.data() + e * I * H,
                                     u2.data() + e * I * H, d2.data() + e * H * I);
    std::vector<int8_t> q(std::max(H, I));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t r = 0; r < I; ++r) {
        const float sg = kt::quantize_row_int8(g.data() + (e * I + r) * H, H, q.data());
        for (int64_t c = 0; c < H; ++c) ASSERT_EQ(g2[(e * I + r) * H + c], kt::f32_to_bf16(q[c] * sg)) << e << "," << r;
        const float su = kt::quantize_row_int8(u.data() + (e * I + r) * H, H, q.data());
        for (int64_t c = 0; c < H; ++c) ASSERT_EQ(u2[(e * I + r) * H + c], kt::f32_to_bf16(q[c] * su));
      }
      for (int64_t h = 0; h < H; ++h) {
        const float sd = kt::quantize_row_int8(d.data() + (e * H + h) * I, I, q.data());
        for (int64_t c = 0; c < I; ++c) ASSERT_EQ(d2[(e * H + h) * I + c], kt::f32_to_bf16(q[c] * sd));
        for (int64_t s = 0; s < slices; ++s) ASSERT_EQ(ds[layout.down_scale_offset(s, e, kt::WeightScales::kPerChannel) + h], sd);
      }
      for (int64_t s = 0; s < slices; ++s) {
        for (int64_t h = H; h < layout.hp(); ++h) ASSERT_EQ(ds[layout.down_scale_offset(s, e, kt::WeightScales::kPerChannel) + h], 0.f);
        for (int64_t c = layout.slice_columns(s); c < layout.slice_width(); ++c) {
          ASSERT_EQ(gs[layout.gate_up_scale_offset(s, e, kt::WeightScales::kPerChannel) + kt::gate_up_column(c, false)], 0.f);
          ASSERT_EQ(gs[layout.gate_up_scale_offset(s, e, kt::WeightScales::kPerChannel) + kt::gate_up_column(c, true)], 0.f);
        }
      }
    }
  }
}

}  // namespace

// Every e4m3 code but the two NaNs converts to its value and back; values between two codes
// round to the nearer, ties to the even code; magnitudes past 448 saturate; NaN stays NaN.
TEST(Fp8, CodesRoundTripAndRoundToNearestEven) {
  for (int code = 0; code < 256; ++code) {
    const auto c = static_cast<uint8_t>(code);
    if (kt::fp8_is_nan(c)) {
      EXPECT_TRUE(std::isnan(kt::fp8_to_f32(c)));
      continue;
    }
    ASSERT_EQ(kt::f32_to_fp8(kt::fp8_to_f32(c)), c) << code;
    const uint8_t next = c + 1;
    if ((c & 0x7f) >= 0x7e) continue;  // 448 has no finite successor
    const float lo = kt::fp8_to_f32(c), hi = kt::fp8_to_f32(next), mid = (lo + hi) / 2;
    ASSERT_EQ(kt::f32_to_fp8(mid), (c & 1) ? next : c) << code;
    ASSERT_EQ(kt::f32_to_fp8(std::nextafter(mid, lo)), c) << code;
    ASSERT_EQ(kt::f32_to_fp8(std::nextafter(mid, hi)), next) << code;
  }
  EXPECT_EQ(kt::fp8_to_f32(0x7e), 448.f);
  EXPECT_EQ(kt::fp8_to_f32(0x01), std::ldexp(1.f, -9));
  EXPECT_EQ(kt::f32_to_fp8(1e6f), 0x7e);
  EXPECT_EQ(kt::f32_to_fp8(-448.1f), 0xfe);
  EXPECT_TRUE(kt::fp8_is_nan(kt::f32_to_fp8(std::nanf(""))));
}
