// The experts' gated activation, z = act(min(g, limit)) * (clamp(u, -limit, limit) + up_offset),
// with g and u the gate and up projections.
// One parametric form covers the gates of the transformers MoE families: SwiGLU (silu, no
// clamp), the clamped SwiGLU of DeepSeek-V4 / GLM-5 / Hunyuan-V4 (a limit), and gpt-oss's
// (g * sigmoid(alpha g)) * (u + 1) with a limit; GELU gates take act = GELU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace kt {

enum class GateActivation : int {
  kSilu = 0,      // v * sigmoid(alpha v); alpha = 1 is SiLU
  kGelu = 1,      // v * Phi(v), the erf form
  kGeluTanh = 2,  // 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
};

struct Gate {
  GateActivation activation = GateActivation::kSilu;
  float alpha = 1.f;                                   // kSilu only
  float limit = std::numeric_limits<float>::infinity();  // clamp of g (above) and u (both sides)
  float up_offset = 0.f;

  // SwiGLU exactly: the vectorised epilogues of the bf16 paths compute this case only.
  bool is_plain_silu() const {
    return activation == GateActivation::kSilu && alpha == 1.f && std::isinf(limit) && up_offset == 0.f;
  }

  // act(v) and its derivative at v.
  void activate(float v, float* value, float* slope) const {
    switch (activation) {
      case GateActivation::kSilu: {
        const float sg = 1.f / (1.f + std::exp(-alpha * v));
        *value = v * sg;
        *slope = sg * (1.f + alpha * v * (1.f - sg));
        return;
      }
      case GateActivation::kGelu: {
        constexpr float kInvSqrt2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;
        const float cdf = 0.5f * (1.f + std::erf(v * kInvSqrt2));
        *value = v * cdf;
        *slope = cdf + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
        return;
      }
      case GateActivation::kGeluTanh: {
        constexpr float kSqrt2OverPi = 0.79788456080286536f, kCubic = 0.044715f;
        const float th = std::tanh(kSqrt2OverPi * (v + kCubic * v * v * v));
        *value = 0.5f * v * (1.f + th);
        *slope = 0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * kSqrt2OverPi * (1.f + 3.f * kCubic * v * v);
        return;
      }
    }
    *value = *slope = std::numeric_limits<float>::quiet_NaN();
  }

  // The clamps, written so that a NaN passes through as torch.clamp lets it.
  float clamp_gate(float g) const { return g > limit ? limit : g; }
  float clamp_up(float u) const { return u > limit ? limit : u < -limit ? -limit : u; }

  // z for one (g, u).
  float value(float g, float u) const {
    float a, slope;
    activate(clamp_gate(g), &a, &slope);
    return a * (clamp_up(u) + up_offset);
  }

  // z, and the gradients of g and u given dz. A clamp passes the gradient where its input is
  // inside the closed range, as torch.clamp does.
  float gradient(float g, float u, float dz, float* dg, float* du) const {
    float a, slope;
    const bool g_in = !(g > limit), u_in = !(u > limit || u < -limit);
    activate(clamp_gate(g), &a, &slope);
    const float uc = clamp_up(u);
    *dg = g_in ? dz * slope * (uc + up_offset) : 0.f;
    *du = u_in ? dz * a : 0.f;
    return a * (uc + up_offset);
  }
};

}  // namespace kt
