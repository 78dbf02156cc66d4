// The kernel registry: each weight format's kernel sets, best first.
#include <stdexcept>
#include <string>

#include "kernel_impls.h"
#include "kt/packing.h"
#include "kt/scratch.h"

namespace kt {
namespace {

// A typed GEMM as the registry's GemmFn; the set's activation type says what `a` points to.
template <typename A, typename W, void (*Gemm)(int64_t, int64_t, const A*, int64_t, const W*, int64_t, float*, int64_t, bool)>
void as_gemm(int64_t m, int64_t kp, const void* a, int64_t lda, const void* w, int64_t panels, float* c, int64_t ldc,
             bool accumulate) {
  Gemm(m, kp, static_cast<const A*>(a), lda, static_cast<const W*>(w), panels, c, ldc, accumulate);
}

constexpr GemmFn kAmxBf16 = as_gemm<uint16_t, uint16_t, gemm_amx_bf16>;
constexpr GemmFn kAvx512Bf16 = as_gemm<uint16_t, uint16_t, gemm_avx512_bf16>;
constexpr GemmFn kAvx2F32 = as_gemm<float, uint16_t, gemm_avx2_f32>;
constexpr GemmFn kScalarF32 = as_gemm<float, uint16_t, gemm_scalar_f32>;
constexpr GemmFn kScalarF32F32 = as_gemm<float, float, gemm_scalar_f32_f32w>;

// bf16 weights are the panels: the weight GEMM is the panel GEMM.
template <GemmFn Panel>
void bf16_weight_gemm(int64_t m, int64_t kp, const void* a, int64_t lda, const void* w, const void*, int64_t panels,
                      float* c, int64_t ldc) {
  Panel(m, kp, a, lda, w, panels, c, ldc, false);
}

void bf16_transposed(const void* packed, const void*, int64_t np, int64_t kp, int64_t first_panel,
                     int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels(static_cast<const bf16*>(packed), nullptr, np, kp, first_panel, panel_count, dst);
}
void bf16_transposed_avx512(const void* packed, const void*, int64_t np, int64_t kp, int64_t first_panel,
                            int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels_avx512(static_cast<const bf16*>(packed), np, kp, first_panel, panel_count, dst);
}
void int8_transposed(const void* packed, const void* scales, int64_t np, int64_t kp, int64_t first_panel,
                     int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels(static_cast<const int8_t*>(packed), static_cast<const float*>(scales), np, kp, first_panel,
                         panel_count, dst);
}
void int8_transposed_avx512(const void* packed, const void* scales, int64_t np, int64_t kp, int64_t first_panel,
                            int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels_int8_avx512(static_cast<const int8_t*>(packed), static_cast<const float*>(scales), np, kp,
                                     first_panel, panel_count, dst);
}
void int4_transposed(const void* packed, const void* scales, int64_t np, int64_t kp, int64_t first_panel,
                     int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels_int4(static_cast<const uint8_t*>(packed), static_cast<const bf16*>(scales), np, kp,
                              first_panel, panel_count, dst);
}
void int4_transposed_avx512(const void* packed, const void* scales, int64_t np, int64_t kp, int64_t first_panel,
                            int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels_int4_avx512(static_cast<const uint8_t*>(packed), static_cast<const bf16*>(scales), np, kp,
                                     first_panel, panel_count, dst);
}

void fp8_transposed(const void* packed, const void* scales, int64_t np, int64_t kp, int64_t first_panel,
                    int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels_fp8(static_cast<const uint8_t*>(packed), static_cast<const float*>(scales), np, kp,
                             first_panel, panel_count, dst);
}
void fp8_transposed_avx512(const void* packed, const void* scales, int64_t np, int64_t kp, int64_t first_panel,
                           int64_t panel_count, uint16_t* dst) {
  pack_transposed_panels_fp8_avx512(static_cast<const uint8_t*>(packed), static_cast<const float*>(scales), np, kp,
                                    first_panel, panel_count, dst);
}

// Decodes reduction steps [k0, k0 + depth) of packed panel `panel` (of a matrix of depth kp) to
// bf16 panels of depth `depth` at dst: the codes as they are for int8 (its per-channel scales
// go on the outputs), the dequantized weights for int4 and fp8.
using RangeDecodeFn = void (*)(const void* packed, const void* scales, int64_t kp, int64_t panel, int64_t k0,
                               int64_t depth, bf16* dst);

template <void (*Decode)(const int8_t*, int64_t, int64_t, bf16*)>
void int8_range(const void* packed, const void*, int64_t kp, int64_t panel, int64_t k0, int64_t depth, bf16* dst) {
  Decode(static_cast<const int8_t*>(packed) + (panel * kp + k0) * kPanelRows, depth, 1, dst);
}

template <void (*Decode)(const uint8_t*, const bf16*, int64_t, int64_t, bf16*)>
void int4_range(const void* packed, const void* scales, int64_t kp, int64_t panel, int64_t k0, int64_t depth,
                bf16* dst) {
  Decode(static_cast<const uint8_t*>(packed) + (panel * kp + k0) * kPanelRows / 2,
         static_cast<const bf16*>(scales) + (panel * (kp / kBlockDepth) + k0 / kBlockDepth) * kPanelRows, depth, 1,
         dst);
}

template <void (*Decode)(const uint8_t*, const float*, int64_t, int64_t, bf16*)>
void fp8_range(const void* packed, const void* scales, int64_t kp, int64_t panel, int64_t k0, int64_t depth,
               bf16* dst) {
  Decode(static_cast<const uint8_t*>(packed) + (panel * kp + k0) * kPanelRows,
         static_cast<const float*>(scales) + panel * (kp / kBlockDepth) + k0 / kBlockDepth, depth, 1, dst);
}

using ScaleColumnsFn = void (*)(int64_t m, int64_t cols, const float* scales, float* c, int64_t ldc);

// The quantized formats' weight GEMM, per pair of panels: the pair decoded to bf16 in a buffer
// of the calling thread, the path's panel GEMM on it, then (int8: `Scale` not null) each output
// column times its channel's scale. With more rows than one 32-row block the whole depth is
// decoded at once (64 KiB at depth 1024: it stays in L2 while every row block of A meets it, as
// the bf16 weights do in the panel GEMMs, which also take panel pairs outermost). With one row
// block (small T) each decode is read by one block only, so the depth goes in chunks whose 16
// KiB stay in L1, and a thread reads memory in short runs between its products instead of one
// long run before them.
template <typename Act, GemmFn Panel, RangeDecodeFn Decode, ScaleColumnsFn Scale>
void decoded_weight_gemm(int64_t m, int64_t kp, const void* a, int64_t lda, const void* w, const void* scales,
                         int64_t panels, float* c, int64_t ldc) {
  constexpr int64_t kChunkDepth = 256;
  const int64_t chunk = m > 32 ? kp : kChunkDepth;
  bf16* decoded = scratch<bf16>(Scratch::kTaskDecoded, 2 * kPanelRows * chunk);
  for (int64_t p = 0; p < panels; p += 2) {
    const int64_t count = panels - p < 2 ? panels - p : 2, col = p * kPanelRows;
    for (int64_t k0 = 0; k0 < kp; k0 += chunk) {
      const int64_t depth = kp - k0 < chunk ? kp - k0 : chunk;
      for (int64_t q = 0; q < count; ++q) Decode(w, scales, kp, p + q, k0, depth, decoded + q * kPanelRows * depth);
      Panel(m, depth, static_cast<const Act*>(a) + k0, lda, decoded, count, c + col, ldc, k0 > 0);
    }
    if constexpr (Scale != nullptr) Scale(m, count * kPanelRows, static_cast<const float*>(scales) + col, c + col, ldc);
  }
}

// bf16 weights. On the fp32 paths the LoRA operands are packed as fp32 (exact), on the bf16
// paths as bf16, read by the weights' own GEMM.
const KernelSet kBf16Amx{"amx", Isa::kAmx, WeightFormat::kBF16, DType::kBF16, bf16_weight_gemm<kAmxBf16>,
                         kAmxBf16, kAmxBf16, bf16_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                         swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kBf16Avx512{"avx512", Isa::kAvx512Bf16, WeightFormat::kBF16, DType::kBF16,
                            bf16_weight_gemm<kAvx512Bf16>, kAvx512Bf16, kAvx512Bf16, bf16_transposed_avx512,
                            rank_update_avx512, sigmoid_avx512, swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kBf16Avx2{"avx2", Isa::kAvx2, WeightFormat::kBF16, DType::kF32, bf16_weight_gemm<kAvx2F32>,
                          kAvx2F32, kScalarF32F32, bf16_transposed, rank_update_scalar, sigmoid_scalar,
                          swiglu_forward_scalar, swiglu_backward_scalar};
const KernelSet kBf16Scalar{"scalar", Isa::kScalar, WeightFormat::kBF16, DType::kF32,
                            bf16_weight_gemm<kScalarF32>, kScalarF32, kScalarF32F32, bf16_transposed,
                            rank_update_scalar, sigmoid_scalar, swiglu_forward_scalar, swiglu_backward_scalar};

// int8 weight-only: the bf16 sets' kernels on decoded panels, the scales on the outputs.
const KernelSet kInt8Amx{"amx", Isa::kAmx, WeightFormat::kInt8, DType::kBF16,
                         decoded_weight_gemm<bf16, kAmxBf16, int8_range<decode_panels_avx512>, scale_columns_avx512>,
                         kAmxBf16, kAmxBf16, int8_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                         swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kInt8Avx512{"avx512", Isa::kAvx512Bf16, WeightFormat::kInt8, DType::kBF16,
                            decoded_weight_gemm<bf16, kAvx512Bf16, int8_range<decode_panels_avx512>,
                                                scale_columns_avx512>,
                            kAvx512Bf16, kAvx512Bf16, int8_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                            swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kInt8Avx2{"avx2", Isa::kAvx2, WeightFormat::kInt8, DType::kF32,
                          decoded_weight_gemm<float, kAvx2F32, int8_range<decode_panels>, scale_columns_scalar>,
                          kAvx2F32, kScalarF32F32, int8_transposed, rank_update_scalar, sigmoid_scalar,
                          swiglu_forward_scalar, swiglu_backward_scalar};
const KernelSet kInt8Scalar{"scalar", Isa::kScalar, WeightFormat::kInt8, DType::kF32,
                            decoded_weight_gemm<float, kScalarF32, int8_range<decode_panels>, scale_columns_scalar>,
                            kScalarF32, kScalarF32F32, int8_transposed, rank_update_scalar, sigmoid_scalar,
                            swiglu_forward_scalar, swiglu_backward_scalar};

// int8 W8A8: the weight-only sets with the int8 products of the base GEMMs (kt/kernels.h's
// W8A8Kernels); the LoRA products stay in the activation type.
const W8A8Kernels kW8A8Amx{quantize_rows_avx512, int8_gemm_amx, pack_transposed_codes_avx512};
const W8A8Kernels kW8A8Avx512{quantize_rows_avx512, int8_gemm_avx512, pack_transposed_codes_avx512};
const W8A8Kernels kW8A8Scalar{quantize_rows_scalar, int8_gemm_scalar, pack_transposed_codes};
const KernelSet kInt8W8A8Amx{"amx", Isa::kAmx, WeightFormat::kInt8, DType::kBF16, kInt8Amx.weight_gemm, kAmxBf16,
                             kAmxBf16, int8_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                             swiglu_forward_avx512, swiglu_backward_avx512, &kW8A8Amx};
const KernelSet kInt8W8A8Avx512{"avx512", Isa::kAvx512Bf16, WeightFormat::kInt8, DType::kBF16,
                                kInt8Avx512.weight_gemm, kAvx512Bf16, kAvx512Bf16, int8_transposed_avx512,
                                rank_update_avx512, sigmoid_avx512, swiglu_forward_avx512, swiglu_backward_avx512,
                                &kW8A8Avx512};
const KernelSet kInt8W8A8Avx2{"avx2", Isa::kAvx2, WeightFormat::kInt8, DType::kF32, kInt8Avx2.weight_gemm, kAvx2F32,
                              kScalarF32F32, int8_transposed, rank_update_scalar, sigmoid_scalar,
                              swiglu_forward_scalar, swiglu_backward_scalar, &kW8A8Scalar};
const KernelSet kInt8W8A8Scalar{"scalar", Isa::kScalar, WeightFormat::kInt8, DType::kF32, kInt8Scalar.weight_gemm,
                                kScalarF32, kScalarF32F32, int8_transposed, rank_update_scalar, sigmoid_scalar,
                                swiglu_forward_scalar, swiglu_backward_scalar, &kW8A8Scalar};

// int4 weight-only: the bf16 sets' kernels on the dequantized weights.
const KernelSet kInt4Amx{"amx", Isa::kAmx, WeightFormat::kInt4, DType::kBF16,
                         decoded_weight_gemm<bf16, kAmxBf16, int4_range<decode_panels_int4_avx512>, nullptr>,
                         kAmxBf16, kAmxBf16, int4_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                         swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kInt4Avx512{"avx512", Isa::kAvx512Bf16, WeightFormat::kInt4, DType::kBF16,
                            decoded_weight_gemm<bf16, kAvx512Bf16, int4_range<decode_panels_int4_avx512>, nullptr>,
                            kAvx512Bf16, kAvx512Bf16, int4_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                            swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kInt4Avx2{"avx2", Isa::kAvx2, WeightFormat::kInt4, DType::kF32,
                          decoded_weight_gemm<float, kAvx2F32, int4_range<decode_panels_int4>, nullptr>, kAvx2F32,
                          kScalarF32F32, int4_transposed, rank_update_scalar, sigmoid_scalar, swiglu_forward_scalar,
                          swiglu_backward_scalar};
const KernelSet kInt4Scalar{"scalar", Isa::kScalar, WeightFormat::kInt4, DType::kF32,
                            decoded_weight_gemm<float, kScalarF32, int4_range<decode_panels_int4>, nullptr>,
                            kScalarF32, kScalarF32F32, int4_transposed, rank_update_scalar, sigmoid_scalar,
                            swiglu_forward_scalar, swiglu_backward_scalar};

// fp8 (e4m3, no AMX-FP8 on these CPUs): the bf16 sets' kernels on the dequantized weights.
const KernelSet kFp8Amx{"amx", Isa::kAmx, WeightFormat::kFp8, DType::kBF16,
                        decoded_weight_gemm<bf16, kAmxBf16, fp8_range<decode_panels_fp8_avx512>, nullptr>, kAmxBf16,
                        kAmxBf16, fp8_transposed_avx512, rank_update_avx512, sigmoid_avx512, swiglu_forward_avx512,
                        swiglu_backward_avx512};
const KernelSet kFp8Avx512{"avx512", Isa::kAvx512Bf16, WeightFormat::kFp8, DType::kBF16,
                           decoded_weight_gemm<bf16, kAvx512Bf16, fp8_range<decode_panels_fp8_avx512>, nullptr>,
                           kAvx512Bf16, kAvx512Bf16, fp8_transposed_avx512, rank_update_avx512, sigmoid_avx512,
                           swiglu_forward_avx512, swiglu_backward_avx512};
const KernelSet kFp8Avx2{"avx2", Isa::kAvx2, WeightFormat::kFp8, DType::kF32,
                         decoded_weight_gemm<float, kAvx2F32, fp8_range<decode_panels_fp8>, nullptr>, kAvx2F32,
                         kScalarF32F32, fp8_transposed, rank_update_scalar, sigmoid_scalar, swiglu_forward_scalar,
                         swiglu_backward_scalar};
const KernelSet kFp8Scalar{"scalar", Isa::kScalar, WeightFormat::kFp8, DType::kF32,
                           decoded_weight_gemm<float, kScalarF32, fp8_range<decode_panels_fp8>, nullptr>, kScalarF32,
                           kScalarF32F32, fp8_transposed, rank_update_scalar, sigmoid_scalar, swiglu_forward_scalar,
                           swiglu_backward_scalar};

// Each format's packing (kt/packing.h) as the registry's PackSliceFn / UnpackSliceFn.
void pack_bf16(const ExpertLayout& layout, const bf16* g, const bf16* u, const bf16* d, int64_t e, int64_t s, int64_t,
               void* gate_up, void* down, void*, void*) {
  pack_expert_slice(layout, g, u, d, e, s, static_cast<bf16*>(gate_up), static_cast<bf16*>(down));
}
void unpack_bf16(const ExpertLayout& layout, const void* gate_up, const void* down, const void*, const void*, int64_t e,
                 int64_t s, bf16* g, bf16* u, bf16* d) {
  unpack_expert_slice(layout, static_cast<const bf16*>(gate_up), static_cast<const bf16*>(down), e, s, g, u, d);
}
void pack_int8(const ExpertLayout& layout, const bf16* g, const bf16* u, const bf16* d, int64_t e, int64_t s, int64_t,
               void* gate_up, void* down, void* gate_up_scale, void* down_scale) {
  pack_expert_slice_int8(layout, g, u, d, e, s, static_cast<int8_t*>(gate_up), static_cast<int8_t*>(down),
                         static_cast<float*>(gate_up_scale), static_cast<float*>(down_scale));
}
void unpack_int8(const ExpertLayout& layout, const void* gate_up, const void* down, const void* gate_up_scale,
                 const void* down_scale, int64_t e, int64_t s, bf16* g, bf16* u, bf16* d) {
  unpack_expert_slice_int8(layout, static_cast<const int8_t*>(gate_up), static_cast<const int8_t*>(down),
                           static_cast<const float*>(gate_up_scale), static_cast<const float*>(down_scale), e, s, g,
                           u, d);
}
void pack_int4(const ExpertLayout& layout, const bf16* g, const bf16* u, const bf16* d, int64_t e, int64_t s,
               int64_t group, void* gate_up, void* down, void* gate_up_scale, void* down_scale) {
  pack_expert_slice_int4(layout, g, u, d, e, s, group, static_cast<uint8_t*>(gate_up), static_cast<uint8_t*>(down),
                         static_cast<bf16*>(gate_up_scale), static_cast<bf16*>(down_scale));
}
void unpack_int4(const ExpertLayout& layout, const void* gate_up, const void* down, const void* gate_up_scale,
                 const void* down_scale, int64_t e, int64_t s, bf16* g, bf16* u, bf16* d) {
  unpack_expert_slice_int4(layout, static_cast<const uint8_t*>(gate_up), static_cast<const uint8_t*>(down),
                           static_cast<const bf16*>(gate_up_scale), static_cast<const bf16*>(down_scale), e, s, g, u,
                           d);
}

void pack_fp8(const ExpertLayout& layout, const bf16* g, const bf16* u, const bf16* d, int64_t e, int64_t s, int64_t,
              void* gate_up, void* down, void* gate_up_scale, void* down_scale) {
  pack_expert_slice_fp8(layout, g, u, d, e, s, static_cast<uint8_t*>(gate_up), static_cast<uint8_t*>(down),
                        static_cast<float*>(gate_up_scale), static_cast<float*>(down_scale));
}
void unpack_fp8(const ExpertLayout& layout, const void* gate_up, const void* down, const void* gate_up_scale,
                const void* down_scale, int64_t e, int64_t s, bf16* g, bf16* u, bf16* d) {
  unpack_expert_slice_fp8(layout, static_cast<const uint8_t*>(gate_up), static_cast<const uint8_t*>(down),
                          static_cast<const float*>(gate_up_scale), static_cast<const float*>(down_scale), e, s, g, u,
                          d);
}

void pack_int8_codes_slice(const ExpertLayout& layout, const void* g, const void* u, const void* d, const void* gs,
                           const void* us, const void* ds, int64_t e, int64_t s, int64_t, void* gate_up, void* down,
                           void* gate_up_scale, void* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, c0 = s * layout.slice_width();
  const int64_t first_row = e * I + c0;
  const Int8Slice codes{static_cast<const int8_t*>(g) + first_row * H, static_cast<const int8_t*>(u) + first_row * H,
                        static_cast<const int8_t*>(d) + e * H * I + c0, I,
                        static_cast<const float*>(gs) + first_row, static_cast<const float*>(us) + first_row,
                        static_cast<const float*>(ds) + e * H};
  pack_expert_slice_int8_codes(layout, codes, e, s, static_cast<int8_t*>(gate_up), static_cast<int8_t*>(down),
                               static_cast<float*>(gate_up_scale), static_cast<float*>(down_scale));
}
void pack_int4_codes_slice(const ExpertLayout& layout, const void* g, const void* u, const void* d, const void* gs,
                           const void* us, const void* ds, int64_t e, int64_t s, int64_t group, void* gate_up,
                           void* down, void* gate_up_scale, void* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, c0 = s * layout.slice_width();
  const int64_t first_row = e * I + c0;
  const Int4Slice codes{static_cast<const int8_t*>(g) + first_row * H, static_cast<const int8_t*>(u) + first_row * H,
                        static_cast<const int8_t*>(d) + e * H * I + c0, I,
                        static_cast<const bf16*>(gs) + first_row * (H / group),
                        static_cast<const bf16*>(us) + first_row * (H / group),
                        static_cast<const bf16*>(ds) + e * H * (I / group)};
  pack_expert_slice_int4_codes(layout, codes, e, s, group, static_cast<uint8_t*>(gate_up), static_cast<uint8_t*>(down),
                               static_cast<bf16*>(gate_up_scale), static_cast<bf16*>(down_scale));
}
void pack_fp8_codes_slice(const ExpertLayout& layout, const void* g, const void* u, const void* d, const void* gs,
                          const void* us, const void* ds, int64_t e, int64_t s, int64_t, void* gate_up, void* down,
                          void* gate_up_scale, void* down_scale) {
  const int64_t H = layout.hidden, I = layout.intermediate, c0 = s * layout.slice_width();
  const int64_t first_row = e * I + c0, blocks = ((I + kFp8Block - 1) / kFp8Block) * ((H + kFp8Block - 1) / kFp8Block);
  const Fp8Slice codes{static_cast<const uint8_t*>(g) + first_row * H, static_cast<const uint8_t*>(u) + first_row * H,
                       static_cast<const uint8_t*>(d) + e * H * I + c0, I,
                       static_cast<const float*>(gs) + e * blocks, static_cast<const float*>(us) + e * blocks,
                       static_cast<const float*>(ds) + e * blocks};
  pack_expert_slice_fp8_codes(layout, codes, e, s, static_cast<uint8_t*>(gate_up), static_cast<uint8_t*>(down),
                              static_cast<float*>(gate_up_scale), static_cast<float*>(down_scale));
}

struct FormatEntry {
  FormatInfo info;
  std::vector<const KernelSet*> sets;  // best first, the scalar reference last
  std::vector<const KernelSet*> w8a8_sets = {};  // the same for W8A8; empty where the format has none
};

// One entry per format: what it stores, how it packs, and the kernels that compute with it.
const std::vector<FormatEntry>& registry() {
  static const std::vector<FormatEntry> formats = {
      {{WeightFormat::kBF16, "bf16", WeightStorage::kBF16, 16, WeightScales::kNone, 0, pack_bf16, unpack_bf16,
        CodeScales::kNone, nullptr},
       {&kBf16Amx, &kBf16Avx512, &kBf16Avx2, &kBf16Scalar}},
      {{WeightFormat::kInt8, "int8", WeightStorage::kInt8, 8, WeightScales::kPerChannel, 0, pack_int8,
        unpack_int8, CodeScales::kPerRow, pack_int8_codes_slice},
       {&kInt8Amx, &kInt8Avx512, &kInt8Avx2, &kInt8Scalar},
       {&kInt8W8A8Amx, &kInt8W8A8Avx512, &kInt8W8A8Avx2, &kInt8W8A8Scalar}},
      {{WeightFormat::kInt4, "int4", WeightStorage::kInt4, 4, WeightScales::kPerBlock, 32, pack_int4,
        unpack_int4, CodeScales::kPerGroup, pack_int4_codes_slice},
       {&kInt4Amx, &kInt4Avx512, &kInt4Avx2, &kInt4Scalar}},
      {{WeightFormat::kFp8, "fp8", WeightStorage::kFp8E4M3, 8, WeightScales::kPerTile, 0, pack_fp8, unpack_fp8,
        CodeScales::kPer128Block, pack_fp8_codes_slice},
       {&kFp8Amx, &kFp8Avx512, &kFp8Avx2, &kFp8Scalar}},
  };
  return formats;
}

const FormatEntry* entry_of(WeightFormat format) {
  for (const FormatEntry& e : registry())
    if (e.info.format == format) return &e;
  return nullptr;
}

}  // namespace

const FormatInfo& format_info(WeightFormat format) {
  const FormatEntry* e = entry_of(format);
  if (e == nullptr) throw std::invalid_argument("kt: no weight format has code " + std::to_string(static_cast<int64_t>(format)));
  return e->info;
}

const char* format_name(WeightFormat format) {
  const FormatEntry* e = entry_of(format);
  return e ? e->info.name : "unknown";
}

bool parse_format(const std::string& name, WeightFormat* out) {
  for (const FormatEntry& e : registry()) {
    if (name == e.info.name) {
      *out = e.info.format;
      return true;
    }
  }
  return false;
}

bool format_of_code(int64_t code, WeightFormat* out) {
  for (const FormatEntry& e : registry()) {
    if (static_cast<int64_t>(e.info.format) == code) {
      *out = e.info.format;
      return true;
    }
  }
  return false;
}

std::string format_names() {
  std::string names;
  for (const FormatEntry& e : registry()) names += (names.empty() ? "" : ", ") + std::string(e.info.name);
  return names;
}

const std::vector<WeightFormat>& weight_formats() {
  static const std::vector<WeightFormat> formats = [] {
    std::vector<WeightFormat> out;
    for (const FormatEntry& e : registry()) out.push_back(e.info.format);
    return out;
  }();
  return formats;
}

const std::vector<const KernelSet*>& kernel_sets(WeightFormat format, bool w8a8) {
  static const std::vector<const KernelSet*> none;
  const FormatEntry* e = entry_of(format);
  return e ? (w8a8 ? e->w8a8_sets : e->sets) : none;
}

const KernelSet* select_kernels(Isa isa, WeightFormat format, bool w8a8) {
  for (const KernelSet* set : kernel_sets(format, w8a8))
    if (static_cast<int>(set->isa) <= static_cast<int>(isa)) return set;
  return nullptr;
}

}  // namespace kt
