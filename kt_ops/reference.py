"""Pure-PyTorch specification of the kt ops: the yardstick of every test and benchmark.

Readable on purpose: one loop over experts, plain matmuls, gradients by autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kt_ops.api import SWIGLU, Gate

# Agreement required between kt ops and this reference, per activation dtype. Both are
# measured against a reference computed in fp32 from the same inputs:
#   rel: ||out - ref|| / ||ref||  (whole tensor)
#   max: max |out - ref| / max |ref|  (worst element, scaled by the tensor's range)
# bf16 activations (and fp32 activations on the AMX / AVX-512 paths, which round them to
# bf16 on the way into the GEMMs) carry bf16 rounding of x, g, u and z: ~2^-8 per value.
TOLERANCES = {
    torch.bfloat16: {"rel": 2e-2, "max": 4e-2},
    torch.float32: {"rel": 1e-2, "max": 2e-2},
}


def gate_reference(g: torch.Tensor, u: torch.Tensor, gate: Gate = SWIGLU) -> torch.Tensor:
    """``gate``'s ``act(min(g, limit)) * (clamp(u, -limit, limit) + up_offset)``."""
    if gate.limit is not None:
        g, u = g.clamp(max=gate.limit), u.clamp(min=-gate.limit, max=gate.limit)
    if gate.activation == "silu":
        a = g * torch.sigmoid(gate.alpha * g)
    elif gate.activation in ("gelu", "gelu_tanh"):
        a = F.gelu(g, approximate="tanh" if gate.activation == "gelu_tanh" else "none")
    else:
        raise ValueError(f"unknown activation {gate.activation!r}")
    return a * (u + gate.up_offset)


def moe_sft_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    lora: Optional[Sequence[Optional[torch.Tensor]]] = None,
    lora_scaling: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    gate: Gate = SWIGLU,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Routed-experts forward of ``kt_ops.moe_sft``, written out.

    Weights are unpacked: w_gate, w_up ``[E, I, H]``, w_down ``[E, H, I]``; ``lora``, the
    biases and ``gate`` as in ``kt_ops.moe_sft``. Everything is computed in ``compute_dtype``
    (fp32 for tests; bf16 gives the eager baseline of the benchmarks) and the result returned
    in x's dtype.
    """
    a_g, b_g, a_u, b_u, a_d, b_d = list(lora) if lora is not None else [None] * 6
    s = lora_scaling
    cd = compute_dtype
    xc = x.to(cd)
    y = torch.zeros(x.shape, dtype=cd, device=x.device)

    i = w_gate.shape[1]
    biases = {"gate": None if gate_up_bias is None else gate_up_bias[:, :i],
              "up": None if gate_up_bias is None else gate_up_bias[:, i:], "down": down_bias}

    def linear(inp, w, a, b, e, name):
        out = inp @ w[e].to(cd).t()
        if biases[name] is not None:
            out = out + biases[name][e].to(cd)
        if a is not None:
            out = out + s * ((inp @ a[e].to(cd).t()) @ b[e].to(cd).t())
        return out

    for e in range(w_gate.shape[0]):
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        xe = xc[tokens]
        g = linear(xe, w_gate, a_g, b_g, e, "gate")
        u = linear(xe, w_up, a_u, b_u, e, "up")
        h = linear(gate_reference(g, u, gate), w_down, a_d, b_d, e, "down")
        y = y.index_add(0, tokens, h * topk_weights[tokens, slots].to(cd).unsqueeze(-1))
    return y.to(x.dtype)


def moe_flops(tokens: int, top_k: int, hidden: int, intermediate: int) -> float:
    """Base-GEMM FLOPs of one forward + backward (2 x 2*T*K*3*H*I), the unit every benchmark
    reports effective TFLOP/s in (see PERF.md)."""
    return 2.0 * 2.0 * tokens * top_k * 3.0 * hidden * intermediate
