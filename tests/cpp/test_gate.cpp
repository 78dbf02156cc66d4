#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "kt/gate.h"

namespace {

using kt::Gate;
using kt::GateActivation;

struct NamedGate {
  const char* name;
  Gate gate;
};

Gate make(GateActivation act, float alpha, float limit, float up_offset) {
  Gate g;
  g.activation = act;
  g.alpha = alpha;
  g.limit = limit;
  g.up_offset = up_offset;
  return g;
}

constexpr float kInf = std::numeric_limits<float>::infinity();

const NamedGate kGates[] = {
    {"swiglu", make(GateActivation::kSilu, 1.f, kInf, 0.f)},
    {"clamped_swiglu", make(GateActivation::kSilu, 1.f, 1.5f, 0.f)},
    {"gpt_oss", make(GateActivation::kSilu, 1.702f, 1.5f, 1.f)},
    {"gelu", make(GateActivation::kGelu, 1.f, kInf, 0.f)},
    {"gelu_tanh_clamped", make(GateActivation::kGeluTanh, 1.f, 1.5f, 0.5f)},
};

class Gates : public ::testing::TestWithParam<NamedGate> {};

// The analytic gradients against central differences of value(), at points away from the clamp
// limits (where the derivative is discontinuous).
TEST_P(Gates, GradientMatchesFiniteDifferences) {
  const Gate& gate = GetParam().gate;
  constexpr float kStep = 1e-3f;
  for (float g = -3.f; g <= 3.f; g += 0.37f) {
    for (float u = -2.5f; u <= 2.5f; u += 0.41f) {
      if (std::fabs(g - gate.limit) < 2 * kStep || std::fabs(std::fabs(u) - gate.limit) < 2 * kStep) continue;
      float dg, du;
      const float z = gate.gradient(g, u, 1.f, &dg, &du);
      EXPECT_FLOAT_EQ(z, gate.value(g, u)) << g << "," << u;
      const double fd_g = (double(gate.value(g + kStep, u)) - gate.value(g - kStep, u)) / (2 * kStep);
      const double fd_u = (double(gate.value(g, u + kStep)) - gate.value(g, u - kStep)) / (2 * kStep);
      EXPECT_NEAR(dg, fd_g, 2e-3 * (1 + std::fabs(fd_g))) << "g=" << g << " u=" << u;
      EXPECT_NEAR(du, fd_u, 2e-3 * (1 + std::fabs(fd_u))) << "g=" << g << " u=" << u;
    }
  }
}

// Past the limit the clamped input is constant: no gradient flows to it, as with torch.clamp.
TEST_P(Gates, ClampStopsTheGradientPastTheLimit) {
  const Gate& gate = GetParam().gate;
  if (std::isinf(gate.limit)) GTEST_SKIP() << "no clamp";
  float dg, du;
  gate.gradient(gate.limit + 1.f, 0.5f, 1.f, &dg, &du);
  EXPECT_EQ(dg, 0.f);
  EXPECT_NE(du, 0.f);
  gate.gradient(0.5f, -gate.limit - 1.f, 1.f, &dg, &du);
  EXPECT_EQ(du, 0.f);
  EXPECT_NE(dg, 0.f);
  EXPECT_FLOAT_EQ(gate.value(gate.limit + 3.f, gate.limit + 3.f), gate.value(gate.limit, gate.limit));
}

TEST_P(Gates, NanPassesThroughTheClamps) {
  const Gate& gate = GetParam().gate;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(gate.value(nan, 1.f)));
  EXPECT_TRUE(std::isnan(gate.value(1.f, nan)));
}

INSTANTIATE_TEST_SUITE_P(Kinds, Gates, ::testing::ValuesIn(kGates),
                         [](const ::testing::TestParamInfo<NamedGate>& info) { return std::string(info.param.name); });

TEST(Gate, OnlyPlainSwigluTakesTheVectorisedEpilogues) {
  EXPECT_TRUE(kGates[0].gate.is_plain_silu());
  for (size_t i = 1; i < sizeof kGates / sizeof kGates[0]; ++i) EXPECT_FALSE(kGates[i].gate.is_plain_silu()) << i;
}

TEST(Gate, SiluIsGTimesSigmoid) {
  const Gate gate;
  for (float g : {-4.f, -0.5f, 0.f, 0.7f, 3.f}) EXPECT_FLOAT_EQ(gate.value(g, 2.f), 2.f * g / (1.f + std::exp(-g)));
}

}  // namespace
