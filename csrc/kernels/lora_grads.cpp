#include "lora_grads.h"

#include <algorithm>
#include <vector>

#include "kt/scratch.h"

namespace kt {
namespace {

// Routed pairs per block of LoRA-gradient updates: C is loaded and stored once per block, and
// a block's 64 columns of its rows (8-16 KiB) stay in L1 while every group of C rows meets them.
constexpr int64_t kPairBlock = 64;

// One projection on the B side of an update: rows of dB^T, its columns in the saved LoRA
// activations, and where its gradient starts in a fused dg/du row (gate and up).
struct BSide {
  int proj;
  int64_t rank, act_offset, grad_offset;
};

}  // namespace

// Per block of pairs, dA += (s grad B)^T input and dB^T += (s input A^T)^T grad, blocks of
// rank-1 updates (dB summed transposed so both run along long rows) that read the inputs and
// gradients in place: x, z, dy and the fused dg/du rows. Gate and up share their input x:
// [dA_g; dA_u] is one update of rg + ru rows whose coefficients [dg B_g | du B_u] are one row of
// dgu_b. The down projection's gradient of h is w * dy: the routing weight goes into the
// coefficients.
template <typename Act>
void lora_gradients(const KernelSet& k, int threads, const MoeBackwardArgs& args, const CallShape& c,
                    const LoraShape& l, const Routing& route, const BackwardWorkspace<Act>& ws) {
  const int64_t K = c.K, H = c.H, I = c.I;
  const float s = args.w.lora_scaling;
  constexpr DType act_type = dtype_of<Act>();
  parallel_for(c.E * 2, threads, [&](int64_t task) {
    const int64_t e = task / 2;
    const bool down = task % 2;
    const int64_t ra = down ? l.rd : l.rgu, in = down ? I : H, out = down ? H : I;
    if (!ra) return;
    std::vector<BSide> sides;
    if (down) {
      sides.push_back({kDown, l.rd, l.rgu, 0});
    } else {
      if (l.rg) sides.push_back({kGate, l.rg, 0, 0});
      if (l.ru) sides.push_back({kUp, l.ru, l.rg, kPanelRows});
    }
    const int64_t n = route.count(e);
    if (n == 0) {  // an idle expert's gradients are zero: written once, with no sums to make
      for (const BSide& side : sides) {
        float* ga = args.grad_lora_a[side.proj] + e * side.rank * in;
        float* gb = args.grad_lora_b[side.proj] + e * out * side.rank;
        std::fill(ga, ga + side.rank * in, 0.f);
        std::fill(gb, gb + out * side.rank, 0.f);
      }
      return;
    }
    // dA of every side as one ra x in block, then each side's dB^T (rank x out), one after
    // another; the coefficients and scaled activations of a block of pairs after them.
    float* ga = scratch<float>(Scratch::kTaskAcc, ra * in);
    float* gb_t_all = scratch<float>(Scratch::kTaskWeights, ra * out);
    float* coef = scratch<float>(Scratch::kTaskDense, 2 * kPairBlock * ra);
    float* act_s = coef + kPairBlock * ra;
    std::fill(ga, ga + ra * in, 0.f);
    std::fill(gb_t_all, gb_t_all + ra * out, 0.f);
    std::vector<float*> gb_t;
    for (int64_t side = 0, row = 0; side < static_cast<int64_t>(sides.size()); row += sides[side++].rank)
      gb_t.push_back(gb_t_all + row * out);
    std::vector<const void*> in_rows(kPairBlock);
    std::vector<std::vector<const void*>> grad_rows(sides.size(), std::vector<const void*>(kPairBlock));
    const RankRows inputs{in_rows.data(), down ? act_type : args.act_dtype, kPanelRows};
    for (int64_t i0 = 0; i0 < n; i0 += kPairBlock) {
      const int64_t depth = std::min(kPairBlock, n - i0);
      for (int64_t b = 0; b < depth; ++b) {
        const int64_t i = i0 + b, pair = route.pair(e, i), t = pair / K, row = route.first_row[e] + i;
        const float* act_a = args.lora_act + pair * l.width + (down ? l.rgu : 0);  // input A^T
        float *cf = coef + b * ra, *as = act_s + b * ra;
        if (down) {
          const float sw = s * args.weights[pair];
          for (int64_t j = 0; j < ra; ++j) as[j] = sw * act_a[j];
          for (int64_t j = 0; j < ra; ++j) cf[j] = sw * ws.dy_b[row * l.rd_p + j];
          in_rows[b] = ws.z_rows + row * I;
          grad_rows[0][b] = element_at(args.grad_y, args.act_dtype, t * H);
          continue;
        }
        for (int64_t j = 0; j < ra; ++j) as[j] = s * act_a[j];
        for (int64_t j = 0; j < ra; ++j) cf[j] = s * ws.dgu_b[row * l.rgu_p + j];
        in_rows[b] = element_at(args.x, args.act_dtype, t * H);
        for (size_t side = 0; side < sides.size(); ++side)
          grad_rows[side][b] = ws.grad_gu + row * ws.ld_grad_gu + sides[side].grad_offset;
      }
      k.rank_update(ra, in, depth, coef, ra, inputs, ga, in);
      for (size_t side = 0; side < sides.size(); ++side) {
        const int64_t first = sides[side].act_offset - (down ? l.rgu : 0);  // its columns of act_s
        const RankRows grads = down ? RankRows{grad_rows[side].data(), args.act_dtype, kPanelRows}
                                    : RankRows{grad_rows[side].data(), act_type, 2 * kPanelRows};
        k.rank_update(sides[side].rank, out, depth, act_s + first, ra, grads, gb_t[side], out);
      }
    }
    int64_t row_a = 0;
    for (size_t side = 0; side < sides.size(); ++side) {
      const int64_t r = sides[side].rank;
      const int proj = sides[side].proj;
      std::copy(ga + row_a * in, ga + (row_a + r) * in, args.grad_lora_a[proj] + e * r * in);
      row_a += r;
      float* gb = args.grad_lora_b[proj] + e * out * r;
      for (int64_t o = 0; o < out; ++o)
        for (int64_t j = 0; j < r; ++j) gb[o * r + j] = gb_t[side][j * out + o];
    }
  });
}

template void lora_gradients<bf16>(const KernelSet&, int, const MoeBackwardArgs&, const CallShape&, const LoraShape&,
                                   const Routing&, const BackwardWorkspace<bf16>&);
template void lora_gradients<float>(const KernelSet&, int, const MoeBackwardArgs&, const CallShape&, const LoraShape&,
                                    const Routing&, const BackwardWorkspace<float>&);

}  // namespace kt
