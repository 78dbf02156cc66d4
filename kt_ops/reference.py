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
#   "w8a8": kt_ops.moe_sft(..., w8a8=True) against moe_sft_w8a8_reference, both activation
#   dtypes: the kernels quantize the activations as the reference does, but the values they
#   quantize differ by the bf16 roundings above, which moves a code by one here and there.
#   "w8a8_vs_weight_only": moe_sft_w8a8_reference against moe_sft_reference on the same int8
#   weights, dequantized: what quantizing the activations costs (127 levels per row).
TOLERANCES = {
    torch.bfloat16: {"rel": 2e-2, "max": 4e-2},
    torch.float32: {"rel": 1e-2, "max": 2e-2},
    "w8a8": {"rel": 2e-2, "max": 4e-2},
    "w8a8_vs_weight_only": {"rel": 4e-2, "max": 1e-1},
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


def quantize_rows_int8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activations: symmetric int8 with one scale per row, ``(q int8 [..., K], scale
    float32 [...])``: ``q = round(a * (127 / amax))`` clamped to [-127, 127], ``scale = amax /
    127``, amax the row's max |a| (in float32; a row of zeros has q = 0 and scale 0)."""
    a = a.float()
    amax = a.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(a * inv[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))


def _int8_product(qa: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qa @ qw as exact integers (in float64, exact up to 2^53), rounded once to float32."""
    return (qa.double() @ qw.double()).float()


class _W8A8Linear(torch.autograd.Function):
    """y = r * (inp W^T) for W = diag(w_scale) w_codes, in int8, with per-row weights r (None:
    1): (inp W^T)[t, n] = (q_inp w_codes^T)[t, n] * s_inp[t] * w_scale[n], q_inp, s_inp =
    quantize_rows_int8(inp). The backward's product is the same in the other direction (the
    SwitchBack recipe): b = dy times w_scale per column, quantized per row, times the codes.
    The input's gradient is r * b, the row weights' inp . b (as for any linear map: exact for
    unquantized activations); the frozen weights get none."""

    @staticmethod
    def forward(ctx, inp, row_weights, w_codes, w_scale):
        ctx.save_for_backward(inp, row_weights, w_codes, w_scale)
        q, s = quantize_rows_int8(inp)
        y = _int8_product(q, w_codes.t()) * s[:, None] * w_scale.float()[None, :]
        return y if row_weights is None else y * row_weights.float()[:, None]

    @staticmethod
    def backward(ctx, grad):
        inp, row_weights, w_codes, w_scale = ctx.saved_tensors
        q, s = quantize_rows_int8(grad.float() * w_scale.float()[None, :])
        b = _int8_product(q, w_codes) * s[:, None]
        if row_weights is None:
            return b, None, None, None
        return b * row_weights.float()[:, None], (inp.float() * b).sum(-1), None, None


def moe_sft_w8a8_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate: tuple[torch.Tensor, torch.Tensor],
    w_up: tuple[torch.Tensor, torch.Tensor],
    w_down: tuple[torch.Tensor, torch.Tensor],
    lora: Optional[Sequence[Optional[torch.Tensor]]] = None,
    lora_scaling: float = 1.0,
    gate: Gate = SWIGLU,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``kt_ops.moe_sft(..., w8a8=True)`` written out, in float32.

    ``w_gate``, ``w_up``, ``w_down`` are the int8 experts as :func:`quantize_int8` returns
    them, ``(codes [E, N, K], scale [E, N])``. Per expert the gate and up products are one
    (``[W_g; W_u]``: x is quantized once, and their gradient rows together), the down product
    another, each a W8A8 linear (x and z quantized per row; dy and the gate/up gradient times
    the channel scales, per row). The routing weight multiplies the down product's output, and
    its gradient from that product is z . (the product's backward of dy), as for the other
    terms of h. The LoRA products, biases and gate are :func:`moe_sft_reference`'s, in float32
    on the unquantized activations.
    """
    a_g, b_g, a_u, b_u, a_d, b_d = list(lora) if lora is not None else [None] * 6
    s = lora_scaling
    xc = x.float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    i = w_gate[0].shape[1]
    gate_up_codes = torch.cat([w_gate[0], w_up[0]], dim=1)
    gate_up_scale = torch.cat([w_gate[1], w_up[1]], dim=1)

    def lora_term(inp, a, b, e):
        return 0 if a is None else s * ((inp @ a[e].float().t()) @ b[e].float().t())

    for e in range(w_gate[0].shape[0]):
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        xe = xc[tokens]
        gu = _W8A8Linear.apply(xe, None, gate_up_codes[e], gate_up_scale[e])
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e].float()
        g = gu[:, :i] + lora_term(xe, a_g, b_g, e)
        u = gu[:, i:] + lora_term(xe, a_u, b_u, e)
        z = gate_reference(g, u, gate)
        route = topk_weights[tokens, slots].float()
        h = lora_term(z, a_d, b_d, e)
        if down_bias is not None:
            h = h + down_bias[e].float()
        weighted = _W8A8Linear.apply(z, route, w_down[0][e], w_down[1][e]) + h * route.unsqueeze(-1)
        y = y.index_add(0, tokens, weighted)
    return y.to(x.dtype)


def moe_flops(tokens: int, top_k: int, hidden: int, intermediate: int) -> float:
    """Base-GEMM FLOPs of one forward + backward (2 x 2*T*K*3*H*I), the unit every benchmark
    reports effective TFLOP/s in (see PERF.md)."""
    return 2.0 * 2.0 * tokens * top_k * 3.0 * hidden * intermediate


# ---------------------------------------------------------------- quantized weight formats
#
# What each frozen-weight format means, exactly: a weight W [..., N, K] (N output rows, K the
# reduction) is stored as integer or fp8 codes q and float32 scales, and stands for
# dequantize(q, scales). The kernels of a format compute with these values; quantize is how
# kt_ops makes a format from bf16 weights (checkpoints that ship a format are read as they
# are). Rounding is to nearest, ties to even (torch.round); a row or group of zeros gets
# scale 1, since any scale gives it zeros.

INT8_MAX = 127  # int8 codes of quantize_int8 lie in [-127, 127]
INT4_MAX = 7  # int4 codes of quantize_int4 lie in [-7, 7]; dequantize_int4 reads [-8, 7]
INT4_GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = 128  # fp8 e4m3 weights carry one scale per 128 x 128 block (DeepSeek-V3, Kimi-K2)
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def _scale_for(amax: torch.Tensor, top: float) -> torch.Tensor:
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: ``(q int8 [..., N, K], scale float32
    [..., N])``, ``scale = max|W[n, :]| / 127``."""
    w = w.float()
    scale = _scale_for(w.abs().amax(dim=-1), INT8_MAX)
    q = torch.round(w / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q[..., n, k] * scale[..., n]``."""
    return q.float() * scale.float()[..., None]


def _check_group(k: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"kt_ops: int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"kt_ops: int4 group_size {group_size} does not divide the reduction size {k}")


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 with one scale per ``group_size`` consecutive reduction elements of a
    row: ``(q int8 [..., N, K] holding codes in [-7, 7], scale bfloat16 [..., N, K /
    group_size])``, ``scale = max|group| / 7`` rounded to bf16 (as int4 checkpoints ship their
    scales; 1 where that rounds to 0). (Two codes share a byte in the packed experts; here each
    has its own.)"""
    _check_group(w.shape[-1], group_size)
    groups = w.float().unflatten(-1, (-1, group_size))
    scale = _scale_for(groups.abs().amax(dim=-1), INT4_MAX).bfloat16()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale.float()[..., None]).clamp(-INT4_MAX, INT4_MAX).to(torch.int8)
    return q.flatten(-2), scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q[..., n, k] * scale[..., n, k // group_size]`` rounded to bf16 (as float32): the
    weights the kernels compute with, which decode int4 to bf16 with its scales applied."""
    _check_group(q.shape[-1], group_size)
    return (q.float().unflatten(-1, (-1, group_size)) * scale.float()[..., None]).flatten(-2).bfloat16().float()


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 with one scale per 128 x 128 block of the last two dimensions (the edge blocks
    are partial): ``(q float8_e4m3fn [..., N, K], scale_inv float32 [..., ceil(N / 128),
    ceil(K / 128)])``, ``scale_inv = max|block| / 448``, the name and meaning checkpoints use
    (the weight is ``q * scale_inv``). The quotients are clamped to +-448 before they round:
    one a rounding above 448 would convert to NaN."""
    w = w.float()
    n, k = w.shape[-2:]
    padded = F.pad(w, (0, -k % FP8_BLOCK, 0, -n % FP8_BLOCK))
    blocks = padded.unflatten(-1, (-1, FP8_BLOCK)).unflatten(-3, (-1, FP8_BLOCK))  # [..., bn, 128, bk, 128]
    scale_inv = _scale_for(blocks.abs().amax(dim=(-3, -1)), FP8_MAX)
    q = (w / _per_element(scale_inv, n, k)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale_inv


def _per_element(block_scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[..., ceil(n/128), ceil(k/128)] block values spread over [..., n, k]."""
    return block_scales.float().repeat_interleave(FP8_BLOCK, -2)[..., :n, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``q[..., n, k] * scale_inv[..., n // 128, k // 128]`` (in float32) rounded to bf16 (as
    float32): the weights the kernels compute with, which decode fp8 to bf16 with its scales
    applied."""
    n, k = q.shape[-2:]
    return (q.float() * _per_element(scale_inv, n, k)).bfloat16().float()
