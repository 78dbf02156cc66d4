#include <gtest/gtest.h>

#include <stdexcept>

#include "kt/packing.h"
#include "kt/topology.h"
#include "test_util.h"

namespace {

using kt::bf16;

TEST(Topology, ThisMachineHasCores) {
  const kt::Topology t = kt::Topology::load();
  EXPECT_TRUE(t.is_this_system());
  ASSERT_GE(t.nodes(), 1);
  for (int n = 0; n < t.nodes(); ++n) EXPECT_FALSE(t.node_cpus(n).empty());
  EXPECT_GE(t.cores(), t.nodes());
}

TEST(Topology, SyntheticTwoNodes) {
  const kt::Topology t = kt::Topology::load("pack:2 numa:1 core:3 pu:2");
  EXPECT_FALSE(t.is_this_system());
  ASSERT_EQ(t.nodes(), 2);
  EXPECT_EQ(t.cores(), 6);
  // One CPU per core: the first hardware thread of each.
  EXPECT_EQ(t.node_cpus(0), (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(t.node_cpus(1), (std::vector<int>{6, 8, 10}));
  EXPECT_EQ(t.describe(), "2 NUMA nodes: node 0 cores {0,2,4}, node 1 cores {6,8,10} (synthetic)");
  // Slots alternate between the nodes; nothing is pinned on a synthetic machine.
  EXPECT_EQ(t.node_of_slot(0), 0);
  EXPECT_EQ(t.node_of_slot(1), 1);
  EXPECT_EQ(t.node_of_slot(4), 0);
  EXPECT_FALSE(t.pin_current_thread(1));
}

TEST(Topology, BadSyntheticDescriptionThrows) {
  EXPECT_THROW(kt::Topology::load("numa:banana"), std::invalid_argument);
}

TEST(Topology, PinningBeyondTheCoresIsRefused) {
  const kt::Topology t = kt::Topology::load();
  EXPECT_FALSE(t.pin_current_thread(t.cores() * t.nodes() + t.nodes()));
}

struct SliceCase {
  int64_t intermediate, nodes, slices, width;
};

class ExpertSlices : public ::testing::TestWithParam<SliceCase> {};

TEST_P(ExpertSlices, SliceCountAndWidth) {
  const SliceCase c = GetParam();
  const int64_t s = kt::slices_for(c.intermediate, c.nodes);
  EXPECT_EQ(s, c.slices);
  const kt::ExpertLayout layout{1, 64, c.intermediate, s};
  EXPECT_EQ(layout.slice_width(), c.width);
  int64_t columns = 0;
  for (int64_t i = 0; i < s; ++i) {
    EXPECT_GT(layout.slice_columns(i), 0) << "slice " << i << " holds padding only";
    columns += layout.slice_columns(i);
  }
  EXPECT_EQ(columns, c.intermediate);
}

TEST_P(ExpertSlices, EachSliceIsThePlainPackingOfItsColumns) {
  const SliceCase c = GetParam();
  const int64_t E = 3, H = 40, I = c.intermediate, S = c.slices;
  const auto g = kt_test::random_bf16(E * I * H, 1), u = kt_test::random_bf16(E * I * H, 2);
  const auto d = kt_test::random_bf16(E * H * I, 3);
  const kt::ExpertLayout layout{E, H, I, S};
  std::vector<bf16> gate_up(layout.gate_up_elems(), 0xffff), down(layout.down_elems(), 0xffff);
  for (int64_t sl = 0; sl < S; ++sl)
    for (int64_t e = 0; e < E; ++e) kt::pack_expert_slice(layout, g.data(), u.data(), d.data(), e, sl, gate_up.data(), down.data());
  const int64_t is = layout.slice_width(), hp = layout.hp();
  for (int64_t sl = 0; sl < S; ++sl) {
    for (int64_t e = 0; e < E; ++e) {
      const bf16* gu = gate_up.data() + layout.gate_up_offset(sl, e);
      const bf16* dn = down.data() + layout.down_offset(sl, e);
      for (int64_t c0 = 0; c0 < is; ++c0) {
        const int64_t col = sl * is + c0;
        for (int64_t h = 0; h < hp; ++h) {
          const bool real = col < I && h < H;
          ASSERT_EQ(gu[kt::packed_offset(kt::gate_up_column(c0, false), h, hp)], real ? g[(e * I + col) * H + h] : 0);
          ASSERT_EQ(gu[kt::packed_offset(kt::gate_up_column(c0, true), h, hp)], real ? u[(e * I + col) * H + h] : 0);
          ASSERT_EQ(dn[kt::packed_offset(h, c0, is)], real ? d[(e * H + h) * I + col] : 0);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, ExpertSlices,
                         ::testing::Values(SliceCase{128, 2, 2, 64}, SliceCase{45, 2, 2, 32},
                                           SliceCase{100, 3, 2, 64}, SliceCase{20, 4, 1, 32},
                                           SliceCase{768, 1, 1, 768}, SliceCase{1408, 2, 2, 704}));

}  // namespace
