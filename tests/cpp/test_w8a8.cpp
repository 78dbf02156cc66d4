// The W8A8 kernels of int8's W8A8 sets (kt/kernels.h's W8A8Kernels), each against the scalar
// set's and against their definitions: codes and scales equal, int8 products bit for bit (the
// sums are exact integers and the scaling is the same two products), on the ISAs this CPU has.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kt/kernels.h"
#include "kt/packing.h"
#include "test_util.h"

namespace {

using kt_test::KernelSetParam;

std::vector<KernelSetParam> w8a8_sets() {
  std::vector<KernelSetParam> out;
  for (const kt::KernelSet* set : kt::kernel_sets(kt::WeightFormat::kInt8, true)) out.push_back({set});
  return out;
}

const kt::W8A8Kernels& reference_w8a8() { return *kt::kernel_sets(kt::WeightFormat::kInt8, true).back()->w8a8; }

std::vector<int8_t> random_codes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-127, 127);
  std::vector<int8_t> v(n);
  for (auto& x : v) x = static_cast<int8_t>(dist(gen));
  return v;
}

std::vector<float> random_floats(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

class W8A8Set : public ::testing::TestWithParam<KernelSetParam> {
 protected:
  void SetUp() override {
    if (!kt::isa_supported(GetParam().set->isa)) GTEST_SKIP() << "CPU lacks " << kt::isa_name(GetParam().set->isa);
  }
};

TEST(W8A8Registry, OnlyInt8HasW8A8SetsAndTheyAreComplete) {
  for (kt::WeightFormat format : kt::weight_formats()) {
    const auto& sets = kt::kernel_sets(format, true);
    if (format != kt::WeightFormat::kInt8) {
      EXPECT_TRUE(sets.empty()) << kt::format_name(format);
      EXPECT_EQ(kt::select_kernels(kt::Isa::kAmx, format, true), nullptr);
      continue;
    }
    ASSERT_EQ(sets.size(), kt::kernel_sets(format).size()) << "one W8A8 set per path";
    EXPECT_EQ(sets.back()->isa, kt::Isa::kScalar);
    for (const kt::KernelSet* s : sets) {
      ASSERT_NE(s->w8a8, nullptr) << s->name;
      EXPECT_NE(s->w8a8->quantize_rows, nullptr);
      EXPECT_NE(s->w8a8->int8_gemm, nullptr);
      EXPECT_NE(s->w8a8->pack_transposed_codes, nullptr);
    }
    for (const kt::KernelSet* s : kt::kernel_sets(format)) EXPECT_EQ(s->w8a8, nullptr) << "weight-only " << s->name;
  }
}

// Rows of both activation types, odd widths, a row of zeros, with and without column scales.
TEST_P(W8A8Set, QuantizeRowsMatchesItsDefinition) {
  const kt::KernelSet& set = *GetParam().set;
  for (int64_t cols : {1, 17, 64, 100, 2048}) {
    for (bool scaled : {false, true}) {
      const int64_t m = 5, lda = cols + 3, ldq = kt::round_up(cols, 64) + 64;
      std::vector<float> a = random_floats(m * lda, 7 + cols, -3.f, 3.f);
      std::fill(a.begin() + 2 * lda, a.begin() + 3 * lda, 0.f);  // row 2: zeros
      const std::vector<float> col_scales = random_floats(cols, 11, 0.01f, 2.f);
      std::vector<kt::bf16> a16(a.size());
      for (size_t i = 0; i < a.size(); ++i) a16[i] = kt::f32_to_bf16(a[i]);
      for (kt::DType dt : {kt::DType::kF32, kt::DType::kBF16}) {
        SCOPED_TRACE(testing::Message() << "cols " << cols << " scaled " << scaled << " bf16 " << (dt == kt::DType::kBF16));
        const void* src = dt == kt::DType::kF32 ? static_cast<const void*>(a.data()) : a16.data();
        std::vector<int8_t> q(m * ldq, 99);
        std::vector<float> s(m, -1.f);
        set.w8a8->quantize_rows(m, cols, src, dt, lda, scaled ? col_scales.data() : nullptr, q.data(), ldq, s.data());
        for (int64_t r = 0; r < m; ++r) {
          std::vector<float> v(cols);
          float amax = 0.f;
          for (int64_t c = 0; c < cols; ++c) {
            v[c] = (dt == kt::DType::kF32 ? a[r * lda + c] : kt::bf16_to_f32(a16[r * lda + c])) *
                   (scaled ? col_scales[c] : 1.f);
            amax = std::max(amax, std::fabs(v[c]));
          }
          ASSERT_EQ(s[r], amax > 0.f ? amax / 127.f : 0.f) << "row " << r;
          const float inv = amax > 0.f ? 127.f / amax : 0.f;
          for (int64_t c = 0; c < cols; ++c) {
            const float want = std::max(-127.f, std::min(127.f, std::nearbyint(v[c] * inv)));
            ASSERT_EQ(q[r * ldq + c], static_cast<int8_t>(want)) << "row " << r << " col " << c;
          }
          for (int64_t c = cols; c < kt::round_up(cols, 64); ++c) ASSERT_EQ(q[r * ldq + c], 0) << "padding " << c;
          if (r == 2) {
            ASSERT_EQ(*std::max_element(q.begin() + r * ldq, q.begin() + r * ldq + cols), 0);
          }
        }
      }
    }
  }
}

// The int8 product against exact integer sums over packed codes, at depths that are and are
// not multiples of 64, with and without the weights' scales.
TEST_P(W8A8Set, Int8GemmIsTheExactSumScaled) {
  const kt::KernelSet& set = *GetParam().set;
  for (int64_t k : {32, 64, 96, 2048}) {
    for (int64_t n : {32, 48, 80}) {
      for (int64_t m : {16, 48}) {
        for (bool scaled : {false, true}) {
          SCOPED_TRACE(testing::Message() << "m " << m << " n " << n << " k " << k << " scaled " << scaled);
          const int64_t np = kt::round_up(n, 32), kp = k, lda = kt::round_up(kp, 64) + 64;
          std::vector<int8_t> w = random_codes(n * k, 3 + n), packed(np * kp);
          kt::pack_weight(w.data(), n, k, k, kp, packed.data());
          std::vector<int8_t> a = random_codes(m * lda, 5 + m);
          const std::vector<float> a_scales = random_floats(m, 13, 0.001f, 0.1f);
          const std::vector<float> w_scales = random_floats(np, 17, 0.001f, 0.1f);
          const int64_t panels = n / kt::kPanelRows, ldc = np + 8;
          std::vector<float> c(m * ldc, -7.f);
          set.w8a8->int8_gemm(m, kp, a.data(), lda, a_scales.data(), packed.data(), scaled ? w_scales.data() : nullptr,
                              panels, c.data(), ldc);
          for (int64_t r = 0; r < m; ++r)
            for (int64_t col = 0; col < panels * kt::kPanelRows; ++col) {
              int64_t sum = 0;
              for (int64_t j = 0; j < k; ++j) sum += int64_t{a[r * lda + j]} * w[col * k + j];
              float want = static_cast<float>(sum) * a_scales[r];
              if (scaled) want *= w_scales[col];
              ASSERT_EQ(c[r * ldc + col], want) << "row " << r << " col " << col;
            }
        }
      }
    }
  }
}

TEST_P(W8A8Set, TransposedCodesAreTheScalarSets) {
  const kt::KernelSet& set = *GetParam().set;
  for (auto [n, k] : {std::pair<int64_t, int64_t>{64, 96}, {96, 64}, {2048, 768}}) {
    SCOPED_TRACE(testing::Message() << "n " << n << " k " << k);
    std::vector<int8_t> w = random_codes(n * k, 23), packed(n * k);
    kt::pack_weight(w.data(), n, k, k, k, packed.data());
    for (auto [first, count] : {std::pair<int64_t, int64_t>{0, k / 16}, {1, 2}}) {
      std::vector<int8_t> got(count * 16 * n, 1), want(count * 16 * n, 2);
      set.w8a8->pack_transposed_codes(packed.data(), n, k, first, count, got.data());
      reference_w8a8().pack_transposed_codes(packed.data(), n, k, first, count, want.data());
      ASSERT_EQ(got, want) << "panels from " << first;
      // And the scalar set's is W^T packed: element (row k, column n) of the panels.
      for (int64_t p = 0; p < count; ++p)
        for (int64_t kk = 0; kk < 16; ++kk)
          for (int64_t nn = 0; nn < n; ++nn)
            ASSERT_EQ(want[p * 16 * n + kt::packed_offset(kk, nn, n)], w[nn * k + (first + p) * 16 + kk]);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Int8, W8A8Set, ::testing::ValuesIn(w8a8_sets()),
                         [](const auto& info) { return std::string("w8a8_") + info.param.set->name; });

}  // namespace
