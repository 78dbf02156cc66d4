// Each ISA's GEMM against the scalar reference, on the ISAs this CPU has (others skip).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

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
  kt::pack_weight(w.data(), gc.n, gc.k, gc.k, kt::round_up(gc.k, kt::kPadTo), packed.data());
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
                                         GemmCase{16, 160, 33, true}, GemmCase{64, 32, 256, true},
                                         GemmCase{48, 96, 1000, false}, GemmCase{32, 64, 2048, true})),
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

class IsaPackTransposed : public ::testing::TestWithParam<kt::Isa> {};

TEST_P(IsaPackTransposed, MatchesGenericRepack) {
  const kt::Isa isa = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  for (const auto& [n, k] : {std::make_pair(32, 32), std::make_pair(64, 96), std::make_pair(100, 70)}) {
    const int64_t np = kt::round_up(n, 32), kp = kt::round_up(k, 32);
    const auto w = kt_test::random_bf16(n * k, 41);
    std::vector<kt::bf16> packed(np * kp);
    kt::pack_weight(w.data(), n, k, k, kt::round_up(k, kt::kPadTo), packed.data());
    for (const auto& [first, count] : {std::make_pair<int64_t, int64_t>(0, kp / 16), std::make_pair<int64_t, int64_t>(1, kp / 16 - 1)}) {
      std::vector<kt::bf16> want(count * 16 * np), got(count * 16 * np + 32, 0x7777);
      kt::pack_transposed_panels(packed.data(), np, kp, first, count, want.data());
      kt::kernels_for(isa).pack_transposed(packed.data(), np, kp, first, count, got.data());
      for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "n=" << n << " k=" << k << " first=" << first << " at " << i;
      EXPECT_EQ(got[want.size()], 0x7777) << "wrote past the panels";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaPackTransposed,
                         ::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                         [](const auto& info) { return std::string(kt::isa_name(info.param)); });

class IsaSigmoid : public ::testing::TestWithParam<kt::Isa> {};

TEST_P(IsaSigmoid, MatchesScalarReference) {
  const kt::Isa isa = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  std::vector<float> x;
  for (float v = -120.f; v <= 120.f; v += 0.0371f) x.push_back(v);
  x.push_back(0.f);
  std::vector<float> want(x.size()), got(x.size() + 1, -1.f);
  kt::sigmoid_scalar(x.size(), x.data(), want.data());
  kt::kernels_for(isa).sigmoid(x.size(), x.data(), got.data());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-7f + 2e-7f * want[i]) << "x=" << x[i];
  EXPECT_EQ(got[x.size()], -1.f) << "wrote past n";
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaSigmoid,
                         ::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                         [](const auto& info) { return std::string(kt::isa_name(info.param)); });

class IsaGateUpEpilogue : public ::testing::TestWithParam<kt::Isa> {};

// The vector epilogue gives the scalar epilogue's bits: that ISA's sigmoid, z = g * sg * u and
// bf16 rounding (kt::f32_to_bf16, NaN included); zeros past `valid`; nothing written past it.
TEST_P(IsaGateUpEpilogue, MatchesTheScalarEpilogueBitForBit) {
  const kt::Isa isa = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  const kt::Kernels& k = kt::kernels_for(isa);
  if (!k.bf16_activations) {
    EXPECT_EQ(k.gate_up_epilogue, nullptr);
    return;
  }
  const int64_t cols = 64;
  for (int64_t valid : {int64_t{64}, int64_t{41}, int64_t{16}, int64_t{3}}) {
    for (kt::DType dt : {kt::DType::kBF16, kt::DType::kF32}) {
      std::vector<float> acc(2 * cols);
      for (int64_t i = 0; i < 2 * cols; ++i) {
        acc[i] = std::sin(0.37f * i) * 9.f;
        if (i % 3 == 1) {  // exactly halfway between two bf16 values, odd and even: ties to even
          const uint32_t bits = 0x40000000u | (static_cast<uint32_t>(i) << 16 & 0x7f0000u) | 0x8000u;
          std::memcpy(&acc[i], &bits, sizeof bits);
        }
      }
      acc[5] = std::nanf("");
      std::vector<float> g(valid), u(valid), sg(valid);
      for (int64_t c = 0; c < valid; ++c) {
        g[c] = acc[kt::gate_up_column(c, false)];
        u[c] = acc[kt::gate_up_column(c, true)];
      }
      k.sigmoid(valid, g.data(), sg.data());
      std::vector<bf16> z(cols, 0x7777);
      const int64_t g_at = 3, u_at = 3 + cols + 5, n_saved = u_at + cols + 8;
      std::vector<float> saved_f(n_saved, -7.f);
      std::vector<bf16> saved_b(n_saved, 0x7777);
      void* saved = dt == kt::DType::kF32 ? static_cast<void*>(saved_f.data()) : saved_b.data();
      k.gate_up_epilogue(valid, cols, acc.data(), z.data(), saved, dt, g_at, u_at);
      for (int64_t c = 0; c < cols; ++c) {
        const bf16 want = c < valid ? kt::f32_to_bf16(g[c] * sg[c] * u[c]) : bf16{0};
        ASSERT_EQ(z[c], want) << "z column " << c << " valid " << valid;
      }
      for (int64_t i = 0; i < n_saved; ++i) {
        const bool is_g = i >= g_at && i < g_at + valid, is_u = i >= u_at && i < u_at + valid;
        const float want = is_g ? g[i - g_at] : is_u ? u[i - u_at] : -7.f;
        if (dt == kt::DType::kF32) {
          if (std::isnan(want)) ASSERT_TRUE(std::isnan(saved_f[i])) << i;
          else ASSERT_EQ(saved_f[i], want) << "saved element " << i;
        } else {
          ASSERT_EQ(saved_b[i], is_g || is_u ? kt::f32_to_bf16(want) : bf16{0x7777}) << "saved element " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaGateUpEpilogue,
                         ::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                         [](const auto& info) { return std::string(kt::isa_name(info.param)); });

class IsaSiluGrad : public ::testing::TestWithParam<kt::Isa> {};

// The vector silu step gives the scalar loop's z and fused-gradient bits; z . q differs only in
// summation order.
TEST_P(IsaSiluGrad, MatchesTheScalarLoop) {
  const kt::Isa isa = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  const kt::Kernels& k = kt::kernels_for(isa);
  if (!k.bf16_activations) {
    EXPECT_EQ(k.silu_grad, nullptr);
    return;
  }
  for (int64_t I : {int64_t{48}, int64_t{37}, int64_t{5}}) {
    const int64_t ip = (I + 15) / 16 * 16 + 16;  // one all-padding panel too
    for (kt::DType dt : {kt::DType::kBF16, kt::DType::kF32}) {
      const int64_t at = 7;
      std::vector<float> g(I), u(I), q(I), sg(I);
      std::vector<float> saved_f(at + 2 * I);
      std::vector<bf16> saved_b(at + 2 * I);
      for (int64_t c = 0; c < I; ++c) {
        g[c] = std::sin(0.7f * c) * 6.f;
        u[c] = std::cos(0.3f * c) * 2.f;
        q[c] = std::sin(1.3f * c + 0.5f);
        if (dt == kt::DType::kBF16) {  // the kernel reads bf16: compare against the same values
          g[c] = kt::bf16_to_f32(kt::f32_to_bf16(g[c]));
          u[c] = kt::bf16_to_f32(kt::f32_to_bf16(u[c]));
        }
        saved_f[at + c] = g[c];
        saved_f[at + I + c] = u[c];
        saved_b[at + c] = kt::f32_to_bf16(g[c]);
        saved_b[at + I + c] = kt::f32_to_bf16(u[c]);
      }
      k.sigmoid(I, g.data(), sg.data());
      const float w = 0.625f;
      std::vector<bf16> z(I + 3, 0x7777), fused(2 * ip, 0x7777);
      const void* saved = dt == kt::DType::kF32 ? static_cast<const void*>(saved_f.data()) : saved_b.data();
      const float dot = k.silu_grad(I, ip, saved, dt, at, q.data(), w, z.data(), fused.data());
      float want_dot = 0.f;
      std::vector<bf16> want_fused(2 * ip, 0);
      for (int64_t c = 0; c < I; ++c) {
        const float silu = g[c] * sg[c], dz = w * q[c];
        ASSERT_EQ(z[c], kt::f32_to_bf16(silu * u[c])) << "z " << c;
        want_dot += silu * u[c] * q[c];
        want_fused[kt::gate_up_column(c, false)] = kt::f32_to_bf16(dz * u[c] * sg[c] * (1.f + g[c] * (1.f - sg[c])));
        want_fused[kt::gate_up_column(c, true)] = kt::f32_to_bf16(dz * silu);
      }
      for (int64_t c = I; c < I + 3; ++c) ASSERT_EQ(z[c], 0x7777) << "wrote past I";
      for (int64_t c = 0; c < 2 * ip; ++c) ASSERT_EQ(fused[c], want_fused[c]) << "fused " << c << " I " << I;
      EXPECT_NEAR(dot, want_dot, 1e-5f * (1.f + std::fabs(want_dot)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaSiluGrad,
                         ::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                         [](const auto& info) { return std::string(kt::isa_name(info.param)); });

class IsaRankUpdate : public ::testing::TestWithParam<kt::Isa> {};

// B rows are read in place through row pointers, as bf16 or fp32, dense or as one half of
// fused 16-column panels (chunk stride 32).
TEST_P(IsaRankUpdate, MatchesScalarReference) {
  const kt::Isa isa = GetParam();
  if (!kt::isa_supported(isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(isa);
  struct Case { int64_t rows, n, depth; };
  for (const kt::DType dtype : {kt::DType::kBF16, kt::DType::kF32})
    for (const int64_t chunk_stride : {16, 32})
      for (const Case cs : {Case{1, 1, 1}, Case{16, 2048, 16}, Case{5, 100, 7}, Case{8, 64, 0}, Case{64, 33, 16}}) {
        SCOPED_TRACE(testing::Message() << "rows " << cs.rows << " n " << cs.n << " depth " << cs.depth
                                        << (dtype == kt::DType::kBF16 ? " bf16" : " fp32") << " chunk stride "
                                        << chunk_stride);
        const int64_t lda = cs.rows + 3, ldc = cs.n + 2;  // strides wider than the data
        const int64_t row_elems = kt::round_up(cs.n, 16) / 16 * chunk_stride;
        auto to_f32 = [](const std::vector<kt::bf16>& v) {
          std::vector<float> out(v.size());
          for (size_t i = 0; i < v.size(); ++i) out[i] = kt::bf16_to_f32(v[i]);
          return out;
        };
        const auto a = to_f32(kt_test::random_bf16(std::max<int64_t>(cs.depth, 1) * lda, 31));
        // Rows in reverse order of memory, so the pointers are what locate them.
        const auto b_bf16 = kt_test::random_bf16(std::max<int64_t>(cs.depth, 1) * row_elems, 32);
        const auto b_f32 = to_f32(b_bf16);
        std::vector<const void*> rows(cs.depth);
        for (int64_t p = 0; p < cs.depth; ++p) {
          const int64_t at = (cs.depth - 1 - p) * row_elems;
          rows[p] = dtype == kt::DType::kBF16 ? static_cast<const void*>(b_bf16.data() + at)
                                              : static_cast<const void*>(b_f32.data() + at);
        }
        const kt::RankRows b{rows.data(), dtype, chunk_stride};
        auto want = to_f32(kt_test::random_bf16(cs.rows * ldc, 33));
        auto got = want;
        // Independent of the kernels: B_p[col] read straight from the layout's definition.
        for (int64_t p = 0; p < cs.depth; ++p)
          for (int64_t j = 0; j < cs.rows; ++j)
            for (int64_t col = 0; col < cs.n; ++col)
              want[j * ldc + col] += a[p * lda + j] *
                                     b_f32[(cs.depth - 1 - p) * row_elems + col / 16 * chunk_stride + col % 16];
        kt::kernels_for(isa).rank_update(cs.rows, cs.n, cs.depth, a.data(), lda, b, got.data(), ldc);
        for (int64_t j = 0; j < cs.rows; ++j)
          for (int64_t col = 0; col < ldc; ++col) {
            const float w = want[j * ldc + col], g = got[j * ldc + col];
            if (col >= cs.n) {
              ASSERT_EQ(g, w) << "wrote past n at " << j << "," << col;
            } else {
              ASSERT_NEAR(g, w, 1e-5f * (cs.depth + 1) * (1 + std::fabs(w))) << j << "," << col;
            }
          }
      }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaRankUpdate,
                         ::testing::Values(kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx),
                         [](const auto& info) { return std::string(kt::isa_name(info.param)); });

}  // namespace
