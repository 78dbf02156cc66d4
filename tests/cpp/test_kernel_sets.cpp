// The kernel registry itself: complete sets, ordered best first down to the scalar reference,
// selected by the ISA cap; format names.
#include <gtest/gtest.h>

#include <set>
#include <stdexcept>
#include <string>

#include "kt/kernels.h"
#include "test_util.h"

namespace {

TEST(KernelRegistry, EveryFormatEndsInTheScalarReferenceBestFirst) {
  ASSERT_FALSE(kt::weight_formats().empty());
  for (kt::WeightFormat format : kt::weight_formats()) {
    const auto& sets = kt::kernel_sets(format);
    ASSERT_FALSE(sets.empty()) << kt::format_name(format);
    EXPECT_EQ(sets.back()->isa, kt::Isa::kScalar) << kt::format_name(format);
    EXPECT_EQ(sets.back()->activations, kt::DType::kF32) << "the reference computes in fp32";
    for (size_t i = 1; i < sets.size(); ++i)
      EXPECT_GT(static_cast<int>(sets[i - 1]->isa), static_cast<int>(sets[i]->isa)) << "not best first at " << i;
  }
}

TEST(KernelRegistry, EverySetIsComplete) {
  for (const kt_test::KernelSetParam& p : kt_test::all_kernel_sets()) {
    const kt::KernelSet& s = *p.set;
    SCOPED_TRACE(kt_test::set_name(p));
    EXPECT_NE(s.name, nullptr);
    EXPECT_EQ(std::string(s.name), kt::isa_name(s.isa)) << "a path is named by its ISA";
    EXPECT_NE(s.weight_gemm, nullptr);
    EXPECT_NE(s.operand_gemm, nullptr);
    EXPECT_NE(s.pack_transposed, nullptr);
    EXPECT_NE(s.rank_update, nullptr);
    EXPECT_NE(s.sigmoid, nullptr);
    EXPECT_NE(s.swiglu_forward, nullptr);
    EXPECT_NE(s.swiglu_backward, nullptr);
  }
}

TEST(KernelRegistry, SelectionTakesTheBestSetTheCapAllows) {
  for (kt::WeightFormat format : kt::weight_formats()) {
    const auto& sets = kt::kernel_sets(format);
    for (kt::Isa cap : {kt::Isa::kScalar, kt::Isa::kAvx2, kt::Isa::kAvx512Bf16, kt::Isa::kAmx}) {
      const kt::KernelSet* chosen = kt::select_kernels(cap, format);
      ASSERT_NE(chosen, nullptr) << "the scalar reference always runs";
      EXPECT_LE(static_cast<int>(chosen->isa), static_cast<int>(cap));
      for (const kt::KernelSet* s : sets) {
        if (s == chosen) break;
        EXPECT_GT(static_cast<int>(s->isa), static_cast<int>(cap)) << s->name << " comes first and runs under the cap";
      }
    }
  }
}

TEST(KernelRegistry, FormatNamesAndCodesRoundTrip) {
  std::set<std::string> names;
  for (kt::WeightFormat format : kt::weight_formats()) {
    const std::string name = kt::format_name(format);
    EXPECT_TRUE(names.insert(name).second) << "two formats named " << name;
    kt::WeightFormat parsed;
    ASSERT_TRUE(kt::parse_format(name, &parsed));
    EXPECT_EQ(parsed, format);
    ASSERT_TRUE(kt::format_of_code(static_cast<int64_t>(format), &parsed));
    EXPECT_EQ(parsed, format);
    EXPECT_NE(kt::format_names().find(name), std::string::npos);
  }
  kt::WeightFormat unused;
  EXPECT_FALSE(kt::parse_format("bf17", &unused));
  EXPECT_FALSE(kt::parse_format("", &unused));
  EXPECT_FALSE(kt::format_of_code(-1, &unused));
  EXPECT_FALSE(kt::format_of_code(1 << 20, &unused));
  EXPECT_TRUE(kt::kernel_sets(static_cast<kt::WeightFormat>(1 << 20)).empty());
  EXPECT_EQ(kt::select_kernels(kt::Isa::kAmx, static_cast<kt::WeightFormat>(1 << 20)), nullptr);
}

// Each format's description is its own (the ops derive the packed tensors from it) and agrees
// with what its packing writes: bf16 elements are 16 bits and carry no scales, int8 codes 8
// bits with one scale per output channel.
TEST(KernelRegistry, FormatDescriptionsMatchTheirPacking) {
  for (kt::WeightFormat format : kt::weight_formats()) {
    const kt::FormatInfo& info = kt::format_info(format);
    EXPECT_EQ(info.format, format);
    EXPECT_EQ(std::string(info.name), kt::format_name(format));
    EXPECT_NE(info.pack_slice, nullptr);
    EXPECT_NE(info.unpack_slice, nullptr);
  }
  const kt::FormatInfo &bf16 = kt::format_info(kt::WeightFormat::kBF16), &int8 = kt::format_info(kt::WeightFormat::kInt8);
  EXPECT_EQ(bf16.storage, kt::WeightStorage::kBF16);
  EXPECT_EQ(bf16.bits, 8 * static_cast<int64_t>(sizeof(kt::bf16)));
  EXPECT_EQ(bf16.scales, kt::WeightScales::kNone);
  EXPECT_EQ(int8.storage, kt::WeightStorage::kInt8);
  EXPECT_EQ(int8.bits, 8 * static_cast<int64_t>(sizeof(int8_t)));
  EXPECT_EQ(int8.scales, kt::WeightScales::kPerChannel);
  EXPECT_THROW(kt::format_info(static_cast<kt::WeightFormat>(1 << 20)), std::invalid_argument);
}

}  // namespace
