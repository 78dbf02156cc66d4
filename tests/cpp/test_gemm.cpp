// Each ISA's GEMM against the scalar reference, on the ISAs this CPU has (others skip).
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "kt/isa.h"
#include "kt/packing.h"
#include "test_util.h"

namespace {

using kt::bf16;

struct GemmCase {
  int64_t m, n, k;
  bool accumulate;
};

class IsaGemm : public ::testing::TestWithParam<std::tuple<kt::Isa, GemmCase>> {};

TEST_P(IsaGemm, MatchesScalarReference) {
  const auto [isa, gc] = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  const kt::Kernels& kern = kt::kernels_for(isa);
  const int64_t np = kt::round_up(gc.n, 32), kp = kt::round_up(gc.k, 32);
  const auto w = kt_test::random_bf16(gc.n * gc.k, 11);
  std::vector<bf16> packed(np * kp);
  kt::pack_weight(w.data(), gc.n, gc.k, gc.k, packed.data());
  // A is zero beyond column k, as the driver guarantees.
  const auto a_vals = kt_test::random_bf16(gc.m * kp, 12);
  std::vector<bf16> a_bf16(gc.m * kp, 0);
  std::vector<float> a_f32(gc.m * kp, 0.f);
  for (int64_t r = 0; r < gc.m; ++r) {
    for (int64_t c = 0; c < gc.k; ++c) {
      a_bf16[r * kp + c] = a_vals[r * kp + c];
      a_f32[r * kp + c] = kt::bf16_to_f32(a_vals[r * kp + c]);
    }
  }
  const int64_t ldc = np + 16;  // a row stride wider than the output checks ldc handling
  const auto init = kt_test::random_bf16(gc.m * ldc, 13);
  std::vector<float> c(gc.m * ldc), expected(gc.m * ldc);
  for (size_t i = 0; i < c.size(); ++i) c[i] = expected[i] = kt::bf16_to_f32(init[i]);
  const int64_t panels = np / 16;
  kt::gemm_scalar_f32(gc.m, kp, a_f32.data(), kp, packed.data(), panels, expected.data(), ldc, gc.accumulate);
  if (kern.bf16_activations)
    kern.gemm_bf16(gc.m, kp, a_bf16.data(), kp, packed.data(), panels, c.data(), ldc, gc.accumulate);
  else
    kern.gemm_f32(gc.m, kp, a_f32.data(), kp, packed.data(), panels, c.data(), ldc, gc.accumulate);
  for (int64_t r = 0; r < gc.m; ++r) {
    for (int64_t col = 0; col < ldc; ++col) {
      const float want = expected[r * ldc + col], got = c[r * ldc + col];
      if (col >= np) {
        ASSERT_EQ(got, kt::bf16_to_f32(init[r * ldc + col])) << "wrote past the panels at " << r << "," << col;
      } else {
        // Only the summation order differs: fp32 rounding over k products of O(1) values.
        ASSERT_NEAR(got, want, 1e-5f * kp + 1e-5f * std::fabs(want)) << "at " << r << "," << col;
      }
    }
  }
}

std::string case_name(const ::testing::TestParamInfo<std::tuple<kt::Isa, GemmCase>>& info) {
  const auto& [isa, gc] = info.param;
  return std::string(kt::isa_name(isa)) + "_m" + std::to_string(gc.m) + "_n" + std::to_string(gc.n) + "_k" +
         std::to_string(gc.k) + (gc.accumulate ? "_acc" : "");
}

INSTANTIATE_TEST_SUITE_P(
    AllIsas, IsaGemm,
    ::testing::Combine(::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                       ::testing::Values(GemmCase{16, 16, 32, false}, GemmCase{32, 64, 64, false},
                                         GemmCase{48, 48, 70, true}, GemmCase{80, 96, 128, false},
                                         GemmCase{16, 160, 33, true}, GemmCase{64, 32, 256, true})),
    case_name);

TEST(Isa, CapSelectsAtMostTheCap) {
  EXPECT_EQ(kt::select_isa("scalar"), kt::Isa::kScalar);
  EXPECT_EQ(kt::select_isa(""), kt::best_supported_isa());
  EXPECT_EQ(kt::select_isa(nullptr), kt::best_supported_isa());
  EXPECT_EQ(kt::select_isa("amx"), kt::best_supported_isa());
  if (kt::isa_supported(kt::Isa::kAvx2)) {
    EXPECT_EQ(kt::select_isa("avx2"), kt::Isa::kAvx2);
  }
  EXPECT_THROW(kt::select_isa("sse9"), std::invalid_argument);
}

TEST(Isa, NamesRoundTrip) {
  for (kt::Isa isa : {kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx}) {
    kt::Isa parsed;
    ASSERT_TRUE(kt::parse_isa(kt::isa_name(isa), &parsed));
    EXPECT_EQ(parsed, isa);
  }
}

}  // namespace

namespace {

class IsaAxpy : public ::testing::TestWithParam<kt::Isa> {};

TEST_P(IsaAxpy, MatchesScalarReference) {
  const kt::Isa isa = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  for (int64_t n : {0, 1, 7, 16, 33, 100}) {
    const auto xb = kt_test::random_bf16(n, 21), yb = kt_test::random_bf16(n, 22);
    std::vector<float> x(n), y(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = kt::bf16_to_f32(xb[i]);
      y[i] = want[i] = kt::bf16_to_f32(yb[i]);
    }
    kt::axpy_scalar(n, 0.37f, x.data(), want.data());
    kt::kernels_for(isa).axpy(n, 0.37f, x.data(), y.data());
    for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(y[i], want[i], 1e-6f * (1 + std::fabs(want[i]))) << "n=" << n << " i=" << i;
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaAxpy,
                         ::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                         [](const auto& info) { return std::string(kt::isa_name(info.param)); });

}  // namespace
