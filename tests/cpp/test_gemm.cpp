// Every kernel set of the registry (kt/kernels.h), each kernel against its format's scalar
// reference set, on the ISAs this CPU has (others skip).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kt/fp8.h"
#include "kt/kernels.h"
#include "kt/packing.h"
#include "test_util.h"

namespace {

using kt::bf16;

struct GemmCase {
  int64_t m, n, k;
  bool accumulate;
};

using kt_test::KernelSetParam;

class SetGemm : public ::testing::TestWithParam<std::tuple<KernelSetParam, GemmCase>> {};

// The weight GEMM on the set's packed weights (bf16, or int8 codes with a scale per output
// column) against the sum of products itself; the panel GEMM on bf16 panels and the operand GEMM
// on per-call operands in the set's activation type (fp32 there on the fp32 paths), with and
// without accumulating, against the reference set's panel GEMM on the same values.
TEST_P(SetGemm, MatchesScalarReference) {
  const auto [param, gc] = GetParam();
  const kt::KernelSet& set = *param.set;
  if (!kt::isa_supported(set.isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(set.isa);
  const kt::KernelSet& reference = *kt::kernel_sets(kt::WeightFormat::kBF16).back();
  const int64_t np = kt::round_up(gc.n, 32), kp = kt::round_up(gc.k, 32);
  const auto w = kt_test::random_bf16(gc.n * gc.k, 11);
  std::vector<bf16> packed(np * kp);
  kt::pack_weight(w.data(), gc.n, gc.k, gc.k, kp, packed.data());
  std::vector<float> packed_f32(packed.size());
  for (size_t i = 0; i < packed.size(); ++i) packed_f32[i] = kt::bf16_to_f32(packed[i]);
  // The format's weights and, as fp32 [np, kp], the values they stand for: int8 codes with a
  // scale per row; int4 codes with a bf16 scale per 32 steps of a row (here of the zero-padded
  // row), standing for bf16(code * scale).
  std::vector<int8_t> codes(gc.n * gc.k), packed_codes(np * kp), codes4(np * kp, 0), packed_codes4(np * kp);
  std::vector<float> scales(np, 0.f), values(np * kp, 0.f);
  std::vector<bf16> padded_w(kp, 0), block_scales(np * kp / 32, 0);
  const bool int8 = set.format == kt::WeightFormat::kInt8, int4 = set.format == kt::WeightFormat::kInt4;
  for (int64_t r = 0; r < gc.n; ++r) {
    if (int8) scales[r] = kt::quantize_row_int8(w.data() + r * gc.k, gc.k, codes.data() + r * gc.k);
    std::copy(w.begin() + r * gc.k, w.begin() + (r + 1) * gc.k, padded_w.begin());
    for (int64_t b = 0; b < kp / 32; ++b) {
      const bf16 s = kt::quantize_group_int4(padded_w.data() + 32 * b, 32, codes4.data() + r * kp + 32 * b);
      block_scales[((r / 16) * (kp / 32) + b) * 16 + r % 16] = s;
      for (int64_t c = 32 * b; c < 32 * b + 32 && c < gc.k; ++c)
        if (int4) values[r * kp + c] = kt::bf16_to_f32(kt::f32_to_bf16(codes4[r * kp + c] * kt::bf16_to_f32(s)));
    }
    for (int64_t c = 0; c < gc.k; ++c) {
      if (int8) values[r * kp + c] = codes[r * gc.k + c] * scales[r];
      if (set.format == kt::WeightFormat::kBF16) values[r * kp + c] = kt::bf16_to_f32(w[r * gc.k + c]);
    }
  }
  // fp8: e4m3 codes with one fp32 scale per packed block (16 rows by 32 steps), the block's
  // max |w| / 448, standing for bf16(code * scale).
  const bool fp8 = set.format == kt::WeightFormat::kFp8;
  std::vector<uint8_t> codes8(np * kp, 0), packed_codes8(np * kp);
  std::vector<float> tile_scales(np / 16 * kp / 32, 0.f);
  for (int64_t t = 0; fp8 && t < np / 16 * kp / 32; ++t) {
    const int64_t r0 = t / (kp / 32) * 16, c0 = t % (kp / 32) * 32;
    float amax = 0.f;
    for (int64_t r = r0; r < r0 + 16 && r < gc.n; ++r)
      for (int64_t c = c0; c < c0 + 32 && c < gc.k; ++c) amax = std::fmax(amax, std::fabs(kt::bf16_to_f32(w[r * gc.k + c])));
    const float s = tile_scales[t] = amax > 0.f ? amax / kt::kFp8Max : 1.f;
    for (int64_t r = r0; r < r0 + 16 && r < gc.n; ++r)
      for (int64_t c = c0; c < c0 + 32 && c < gc.k; ++c) {
        codes8[r * kp + c] = kt::f32_to_fp8(kt::bf16_to_f32(w[r * gc.k + c]) / s);
        values[r * kp + c] = kt::bf16_to_f32(kt::f32_to_bf16(kt::fp8_to_f32(codes8[r * kp + c]) * s));
      }
  }
  kt::pack_weight(codes.data(), gc.n, gc.k, gc.k, kp, packed_codes.data());
  kt::pack_weight(codes4.data(), np, kp, kp, kp, packed_codes4.data());
  kt::pack_weight(codes8.data(), np, kp, kp, kp, packed_codes8.data());
  std::vector<uint8_t> nibbles(np * kp / 2);
  kt::pack_int4_codes(packed_codes4.data(), np * kp, nibbles.data());
  const void* weights = int8   ? static_cast<const void*>(packed_codes.data())
                        : int4 ? static_cast<const void*>(nibbles.data())
                        : fp8  ? static_cast<const void*>(packed_codes8.data())
                               : packed.data();
  const void* weight_scales = int8   ? static_cast<const void*>(scales.data())
                              : int4 ? static_cast<const void*>(block_scales.data())
                              : fp8  ? static_cast<const void*>(tile_scales.data())
                                     : nullptr;
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
  const bool bf16_act = set.activations == kt::DType::kBF16;
  const void* a = bf16_act ? static_cast<const void*>(a_bf16.data()) : a_f32.data();
  const int64_t ldc = np + 16;  // a row stride wider than the output checks ldc handling
  const auto init = kt_test::random_bf16(gc.m * ldc, 13);
  const int64_t panels = np / 16;
  const auto check = [&](const std::vector<float>& got, const std::vector<float>& want, float tolerance) {
    for (int64_t r = 0; r < gc.m; ++r) {
      for (int64_t col = 0; col < ldc; ++col) {
        const float g = got[r * ldc + col], e = want[r * ldc + col];
        if (col >= np) {
          ASSERT_EQ(g, kt::bf16_to_f32(init[r * ldc + col])) << "wrote past the panels at " << r << "," << col;
        } else {
          ASSERT_NEAR(g, e, tolerance * (kp + std::fabs(e))) << "at " << r << "," << col;
        }
      }
    }
  };
  {
    SCOPED_TRACE("weight GEMM");
    std::vector<float> c(gc.m * ldc), want(gc.m * ldc);
    for (size_t i = 0; i < c.size(); ++i) c[i] = want[i] = kt::bf16_to_f32(init[i]);
    for (int64_t r = 0; r < gc.m; ++r)
      for (int64_t col = 0; col < np; ++col) {
        double sum = 0;
        for (int64_t k = 0; k < kp; ++k) sum += double(a_f32[r * kp + k]) * values[col * kp + k];
        want[r * ldc + col] = static_cast<float>(sum);
      }
    set.weight_gemm(gc.m, kp, a, kp, weights, weight_scales, panels, c.data(), ldc);
    check(c, want, 1e-5f);
  }
  std::vector<float> expected(gc.m * ldc);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] = kt::bf16_to_f32(init[i]);
  reference.panel_gemm(gc.m, kp, a_f32.data(), kp, packed.data(), panels, expected.data(), ldc, gc.accumulate);
  for (const bool operands : {false, true}) {
    SCOPED_TRACE(operands ? "operand GEMM" : "panel GEMM");
    std::vector<float> c(gc.m * ldc);
    for (size_t i = 0; i < c.size(); ++i) c[i] = kt::bf16_to_f32(init[i]);
    if (operands) {
      const void* b = bf16_act ? static_cast<const void*>(packed.data()) : packed_f32.data();
      set.operand_gemm(gc.m, kp, a, kp, b, panels, c.data(), ldc, gc.accumulate);
    } else {
      set.panel_gemm(gc.m, kp, a, kp, packed.data(), panels, c.data(), ldc, gc.accumulate);
    }
    // Only the summation order differs: fp32 rounding over k products of O(1) values.
    check(c, expected, 1e-5f);
  }
}

std::string case_name(const ::testing::TestParamInfo<std::tuple<KernelSetParam, GemmCase>>& info) {
  const auto& [param, gc] = info.param;
  return kt_test::set_name(param) + "_m" + std::to_string(gc.m) + "_n" + std::to_string(gc.n) + "_k" +
         std::to_string(gc.k) + (gc.accumulate ? "_acc" : "");
}

INSTANTIATE_TEST_SUITE_P(
    AllSets, SetGemm,
    ::testing::Combine(::testing::ValuesIn(kt_test::all_kernel_sets()),
                       ::testing::Values(GemmCase{16, 16, 32, false}, GemmCase{32, 64, 64, false},
                                         GemmCase{48, 48, 70, true}, GemmCase{80, 96, 128, false},
                                         GemmCase{16, 160, 33, true}, GemmCase{64, 32, 256, true},
                                         GemmCase{48, 96, 1000, false}, GemmCase{32, 64, 2048, true},
                                         GemmCase{16, 64, 600, false})),
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

class SetPackTransposed : public ::testing::TestWithParam<KernelSetParam> {};

// The transposed panels hold pack(W^T) as bf16, W the dequantized weights (bf16(code * scale)
// with, for int8, the scale of the code's row, for int4 that of its row's block, for fp8 that
// of its packed block); panel `first`
// of pack(W^T) holds rows [16 first, 16 first + 16) of W^T.
TEST_P(SetPackTransposed, MatchesThePackedTranspose) {
  const kt::KernelSet& set = *GetParam().set;
  if (!kt::isa_supported(set.isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(set.isa);
  const bool int8 = set.format == kt::WeightFormat::kInt8, int4 = set.format == kt::WeightFormat::kInt4;
  for (const auto& [n, k] : {std::make_pair(32, 32), std::make_pair(64, 96), std::make_pair(100, 70)}) {
    const int64_t np = kt::round_up(n, 32), kp = kt::round_up(k, 32);
    auto w = kt_test::random_bf16(n * k, 41);
    std::vector<int8_t> codes(n * k), codes4(np * kp, 0);
    std::vector<float> scales(np, 0.f);  // zero for the padding rows, as pack_experts writes them
    for (int64_t r = 0; r < n; ++r) scales[r] = 1e-3f * (1 + r % 7) + (r % 3 == 0 ? 1.f : 0.f);
    std::vector<kt::bf16> block_scales(np * kp / 32, 0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t b = 0; b < kp / 32; ++b)
        block_scales[((r / 16) * (kp / 32) + b) * 16 + r % 16] = kt::f32_to_bf16(1e-2f * (1 + (r + 3 * b) % 5));
    // fp8: every code but the two NaNs, a scale per packed block (zero for padding blocks).
    std::vector<uint8_t> codes8(np * kp, 0), packed_codes8(np * kp);
    std::vector<float> tile_scales(np / 16 * kp / 32, 0.f);
    for (int64_t t = 0; t < np / 16 * kp / 32; ++t)
      if (t / (kp / 32) * 16 < n) tile_scales[t] = 1e-3f * (1 + t % 11);
    for (int64_t i = 0; i < n * k; ++i) {
      const int64_t r = i / k, c = i % k;
      codes[i] = static_cast<int8_t>(i * 37 % 255 - 127);
      codes4[r * kp + c] = static_cast<int8_t>(i * 37 % 16 - 8);
      codes8[r * kp + c] = static_cast<uint8_t>(i * 37 % 254);
      if (kt::fp8_is_nan(codes8[r * kp + c])) codes8[r * kp + c] = 0xfe;
      const float block_scale = kt::bf16_to_f32(block_scales[((r / 16) * (kp / 32) + c / 32) * 16 + r % 16]);
      const float tile_scale = tile_scales[(r / 16) * (kp / 32) + c / 32];
      if (int8) w[i] = kt::f32_to_bf16(codes[i] * scales[r]);
      if (int4) w[i] = kt::f32_to_bf16(codes4[r * kp + c] * block_scale);
      if (set.format == kt::WeightFormat::kFp8) w[i] = kt::f32_to_bf16(kt::fp8_to_f32(codes8[r * kp + c]) * tile_scale);
    }
    std::vector<kt::bf16> packed(np * kp), wt(k * n), want(np * kp);
    std::vector<int8_t> packed_codes(np * kp), packed_codes4(np * kp);
    std::vector<uint8_t> nibbles(np * kp / 2);
    kt::pack_weight(w.data(), n, k, k, kp, packed.data());
    kt::pack_weight(codes.data(), n, k, k, kp, packed_codes.data());
    kt::pack_weight(codes4.data(), np, kp, kp, kp, packed_codes4.data());
    kt::pack_int4_codes(packed_codes4.data(), np * kp, nibbles.data());
    kt::pack_weight(codes8.data(), np, kp, kp, kp, packed_codes8.data());
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) wt[c * n + r] = w[r * k + c];
    kt::pack_weight(wt.data(), k, n, n, np, want.data());  // pack(W^T): kp rows of depth np
    const bool fp8 = set.format == kt::WeightFormat::kFp8;
    const void* src = int8   ? static_cast<const void*>(packed_codes.data())
                      : int4 ? static_cast<const void*>(nibbles.data())
                      : fp8  ? static_cast<const void*>(packed_codes8.data())
                             : packed.data();
    const void* src_scales = int8   ? static_cast<const void*>(scales.data())
                             : int4 ? static_cast<const void*>(block_scales.data())
                             : fp8  ? static_cast<const void*>(tile_scales.data())
                                    : nullptr;
    for (const auto& [first, count] : {std::make_pair<int64_t, int64_t>(0, kp / 16), std::make_pair<int64_t, int64_t>(1, kp / 16 - 1)}) {
      std::vector<kt::bf16> got(count * 16 * np + 32, 0x7777);
      set.pack_transposed(src, src_scales, np, kp, first, count, got.data());
      for (int64_t i = 0; i < count * 16 * np; ++i)
        ASSERT_EQ(got[i], want[first * 16 * np + i]) << "n=" << n << " k=" << k << " first=" << first << " at " << i;
      EXPECT_EQ(got[count * 16 * np], 0x7777) << "wrote past the panels";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllSets, SetPackTransposed,
                         ::testing::ValuesIn(kt_test::all_kernel_sets()),
                         [](const auto& info) { return kt_test::set_name(info.param); });

class SetSigmoid : public ::testing::TestWithParam<KernelSetParam> {};

TEST_P(SetSigmoid, MatchesScalarReference) {
  const kt::KernelSet& set = *GetParam().set;
  if (!kt::isa_supported(set.isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(set.isa);
  std::vector<float> x;
  for (float v = -120.f; v <= 120.f; v += 0.0371f) x.push_back(v);
  x.push_back(0.f);
  std::vector<float> want(x.size()), got(x.size() + 1, -1.f);
  kt_test::reference_of(set).sigmoid(x.size(), x.data(), want.data());
  set.sigmoid(x.size(), x.data(), got.data());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-7f + 2e-7f * want[i]) << "x=" << x[i];
  EXPECT_EQ(got[x.size()], -1.f) << "wrote past n";
}

INSTANTIATE_TEST_SUITE_P(AllSets, SetSigmoid,
                         ::testing::ValuesIn(kt_test::all_kernel_sets()),
                         [](const auto& info) { return kt_test::set_name(info.param); });

class SetSwigluForward : public ::testing::TestWithParam<KernelSetParam> {};

// An activation value as the set's buffers hold it: bf16 (rounded as kt::f32_to_bf16, NaN
// included) on the bf16 paths, the fp32 value itself on the others.
float as_activation(const kt::KernelSet& set, float v) {
  return set.activations == kt::DType::kBF16 ? kt::bf16_to_f32(kt::f32_to_bf16(v)) : v;
}

// Reads element i of a buffer of the set's activation type.
float activation_at(const kt::KernelSet& set, const std::vector<float>& buffer, int64_t i) {
  if (set.activations == kt::DType::kF32) return buffer[i];
  bf16 v;
  std::memcpy(&v, reinterpret_cast<const char*>(buffer.data()) + 2 * i, sizeof v);
  return kt::bf16_to_f32(v);
}

// Whether element i of a buffer of the set's activation type is as it was in `before`.
bool untouched(const kt::KernelSet& set, const std::vector<float>& after, const std::vector<float>& before, int64_t i) {
  const int64_t size = set.activations == kt::DType::kF32 ? 4 : 2;
  return std::memcmp(reinterpret_cast<const char*>(after.data()) + size * i,
                     reinterpret_cast<const char*>(before.data()) + size * i, size) == 0;
}

// Equal as stored values: bit for bit, any NaN matching any NaN.
bool same_value(float got, float want) {
  return (std::isnan(got) && std::isnan(want)) || std::memcmp(&got, &want, sizeof got) == 0;
}

// The epilogue gives the bits of its definition: the set's sigmoid, z = g * sg * u in the
// set's activation type; zeros past `valid`; g and u saved exactly; nothing written past them.
TEST_P(SetSwigluForward, MatchesItsDefinitionBitForBit) {
  const kt::KernelSet& set = *GetParam().set;
  if (!kt::isa_supported(set.isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(set.isa);
  const int64_t cols = 64;
  for (int64_t valid : {int64_t{64}, int64_t{41}, int64_t{16}, int64_t{3}, int64_t{0}}) {
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
      set.sigmoid(valid, g.data(), sg.data());
      std::vector<float> z(cols + 4, -3.f);  // room for fp32; bf16 uses the first half
      const std::vector<float> z_before = z;
      const int64_t g_at = 3, u_at = 3 + cols + 5, n_saved = u_at + cols + 8;
      std::vector<float> saved_f(n_saved, -7.f);
      std::vector<bf16> saved_b(n_saved, 0x7777);
      void* saved = dt == kt::DType::kF32 ? static_cast<void*>(saved_f.data()) : saved_b.data();
      set.swiglu_forward(valid, cols, acc.data(), z.data(), saved, dt, g_at, u_at);
      for (int64_t c = 0; c < cols; ++c) {
        const float want = c < valid ? as_activation(set, g[c] * sg[c] * u[c]) : 0.f;
        ASSERT_TRUE(same_value(activation_at(set, z, c), want)) << "z column " << c << " valid " << valid;
      }
      for (int64_t c = cols; c < cols + 4; ++c) ASSERT_TRUE(untouched(set, z, z_before, c)) << "wrote past cols";
      for (int64_t i = 0; i < n_saved; ++i) {
        const bool is_g = i >= g_at && i < g_at + valid, is_u = i >= u_at && i < u_at + valid;
        const float want = is_g ? g[i - g_at] : is_u ? u[i - u_at] : -7.f;
        if (dt == kt::DType::kF32) {
          ASSERT_TRUE(same_value(saved_f[i], want)) << "saved element " << i;
        } else {
          ASSERT_EQ(saved_b[i], is_g || is_u ? kt::f32_to_bf16(want) : bf16{0x7777}) << "saved element " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllSets, SetSwigluForward, ::testing::ValuesIn(kt_test::all_kernel_sets()),
                         [](const auto& info) { return kt_test::set_name(info.param); });

class SetSwigluBackward : public ::testing::TestWithParam<KernelSetParam> {};

// The backward step gives its definition's z and fused-gradient bits in the set's activation
// type; z . q differs only in summation order.
TEST_P(SetSwigluBackward, MatchesItsDefinition) {
  const kt::KernelSet& set = *GetParam().set;
  if (!kt::isa_supported(set.isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(set.isa);
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
      set.sigmoid(I, g.data(), sg.data());
      const float w = 0.625f;
      std::vector<float> z(I + 3, -3.f), fused(2 * ip, -3.f);  // fp32-sized; bf16 uses the first half
      const std::vector<float> z_before = z;
      const void* saved = dt == kt::DType::kF32 ? static_cast<const void*>(saved_f.data()) : saved_b.data();
      const float dot = set.swiglu_backward(I, ip, saved, dt, at, q.data(), w, z.data(), fused.data());
      float want_dot = 0.f;
      std::vector<float> want_fused(2 * ip, 0.f);
      for (int64_t c = 0; c < I; ++c) {
        const float silu = g[c] * sg[c], dz = w * q[c];
        ASSERT_TRUE(same_value(activation_at(set, z, c), as_activation(set, silu * u[c]))) << "z " << c;
        want_dot += silu * u[c] * q[c];
        want_fused[kt::gate_up_column(c, false)] = as_activation(set, dz * u[c] * sg[c] * (1.f + g[c] * (1.f - sg[c])));
        want_fused[kt::gate_up_column(c, true)] = as_activation(set, dz * silu);
      }
      for (int64_t c = I; c < I + 3; ++c) ASSERT_TRUE(untouched(set, z, z_before, c)) << "wrote past I at " << c;
      for (int64_t c = 0; c < 2 * ip; ++c)
        ASSERT_TRUE(same_value(activation_at(set, fused, c), want_fused[c])) << "fused " << c << " I " << I;
      EXPECT_NEAR(dot, want_dot, 1e-5f * (1.f + std::fabs(want_dot)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllSets, SetSwigluBackward, ::testing::ValuesIn(kt_test::all_kernel_sets()),
                         [](const auto& info) { return kt_test::set_name(info.param); });

class SetRankUpdate : public ::testing::TestWithParam<KernelSetParam> {};

// B rows are read in place through row pointers, as bf16 or fp32, dense or as one half of
// fused 16-column panels (chunk stride 32).
TEST_P(SetRankUpdate, MatchesScalarReference) {
  const kt::KernelSet& set = *GetParam().set;
  if (!kt::isa_supported(set.isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(set.isa);
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
        set.rank_update(cs.rows, cs.n, cs.depth, a.data(), lda, b, got.data(), ldc);
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

INSTANTIATE_TEST_SUITE_P(AllSets, SetRankUpdate,
                         ::testing::ValuesIn(kt_test::all_kernel_sets()),
                         [](const auto& info) { return kt_test::set_name(info.param); });

}  // namespace
