"""Random MoE layers and the comparison rule shared by the pytest suite."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kt_ops
from kt_ops.reference import (TOLERANCES, dequantize_fp8, dequantize_int4, dequantize_int8, moe_sft_reference,
                              moe_sft_w8a8_reference, quantize_fp8, quantize_int4, quantize_int8)

ALL_ISAS = ["amx", "avx512", "avx2", "scalar"]


def exact_path() -> bool:
    """Whether the kernels keep activations fp32 (AVX2, scalar) rather than rounding them to
    bf16 at the GEMM inputs (AMX, AVX-512)."""
    return kt_ops.isa() in ("avx2", "scalar")


@dataclass
class MoeCase:
    """One layer: unpacked weights, packed experts, routing, optional LoRA."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    experts: kt_ops.PackedExperts
    lora: Optional[list] = None
    scaling: float = 2.0
    grad_y: torch.Tensor = field(default=None)
    gate: kt_ops.Gate = kt_ops.Gate()
    gate_up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None
    # int8 experts: their codes and scales (quantize_int8 of each matrix), and whether the case
    # runs with W8A8 numerics (kt_ops.moe_sft's w8a8).
    int8_codes: Optional[tuple] = None
    w8a8: bool = False

    def biases(self) -> list[torch.Tensor]:
        return [b for b in (self.gate_up_bias, self.down_bias) if b is not None]

    def inputs_requiring_grad(self) -> list[torch.Tensor]:
        return [self.x, self.topk_weights] + (self.lora or []) + self.biases()


INT4_TEST_GROUP = 32  # the smallest group: the most scales, and the sizes it admits are the most varied


def format_sizes(weight_format: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """H and I as a test of ``weight_format`` takes them: as they are, or for a format with
    quantization groups (int4) the nearest multiples of the group at or below them (the group at
    least), which keeps a case about as large as it was."""
    if weight_format != "int4":
        return hidden, intermediate
    return tuple(max(INT4_TEST_GROUP, n // INT4_TEST_GROUP * INT4_TEST_GROUP) for n in (hidden, intermediate))


def make_case(
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    tokens: int,
    rank: Optional[int],
    dtype: torch.dtype = torch.bfloat16,
    ids_dtype: torch.dtype = torch.int64,
    weights_dtype: torch.dtype = torch.float32,
    lora_dtype: torch.dtype = torch.float32,
    used_experts: Optional[int] = None,
    seed: int = 0,
    numa_nodes: int = 0,
    gate: Optional[kt_ops.Gate] = None,
    biases: bool = False,
    clamped_share: Optional[float] = None,
    weight_format: str = "bf16",
    w8a8: bool = False,
    unrouted_share: float = 0.0,
) -> MoeCase:
    """A layer with O(1) activations. Experts at or past ``used_experts`` get no tokens;
    ``numa_nodes`` is passed to pack_experts (0: one slice per NUMA node of this machine);
    ``gate`` is the activation and ``biases`` gives the experts O(1) biases; with
    ``clamped_share`` the gate's limit becomes :func:`limit_in_a_gap` of that share. The
    experts are packed in ``weight_format``; for a quantized one the case's weights become the
    reference's dequantized weights (fp32), the truth the kernels are held to. A format with
    quantization groups (int4, in groups of INT4_TEST_GROUP) needs H and I divisible by the
    group: for it they become :func:`format_sizes`'. ``w8a8`` (int8 only) makes the case run
    with W8A8 numerics, against :func:`kt_ops.reference.moe_sft_w8a8_reference`.
    ``unrouted_share`` of the routing slots (drawn at random) get id -1: no expert."""
    hidden, intermediate = format_sizes(weight_format, hidden, intermediate)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    w_gate = randn(experts, intermediate, hidden, scale=hidden**-0.5).bfloat16()
    w_up = randn(experts, intermediate, hidden, scale=hidden**-0.5).bfloat16()
    w_down = randn(experts, hidden, intermediate, scale=intermediate**-0.5).bfloat16()
    pool = used_experts or experts
    scores = torch.rand(tokens, pool, generator=gen)
    topk_ids = scores.topk(top_k, dim=1).indices.to(ids_dtype)  # distinct experts per token
    if unrouted_share:
        topk_ids[torch.rand(tokens, top_k, generator=gen) < unrouted_share] = -1
    topk_weights = torch.rand(tokens, top_k, generator=gen).to(weights_dtype).requires_grad_()
    x = randn(tokens, hidden).to(dtype).requires_grad_()
    lora = None
    if rank is not None:
        shapes = [(rank, hidden), (intermediate, rank), (rank, hidden), (intermediate, rank),
                  (rank, intermediate), (hidden, rank)]
        lora = [randn(experts, *s, scale=0.5 * s[-1] ** -0.5).to(lora_dtype).requires_grad_() for s in shapes]
    if weight_format == "int4":
        packed = kt_ops.pack_experts(w_gate, w_up, w_down, numa_nodes, format="int4", group_size=INT4_TEST_GROUP)
        w_gate, w_up, w_down = (dequantize_int4(*quantize_int4(w, INT4_TEST_GROUP), INT4_TEST_GROUP)
                                for w in (w_gate, w_up, w_down))
    else:
        packed = kt_ops.pack_experts(w_gate, w_up, w_down, numa_nodes, format=weight_format)
    int8_codes = None
    if weight_format == "int8":
        int8_codes = tuple(quantize_int8(w) for w in (w_gate, w_up, w_down))
        w_gate, w_up, w_down = (dequantize_int8(*codes) for codes in int8_codes)
    if weight_format == "fp8":
        w_gate, w_up, w_down = (dequantize_fp8(*quantize_fp8(w)) for w in (w_gate, w_up, w_down))
    if w8a8 and weight_format != "int8":
        raise ValueError(f"w8a8 needs int8 experts, not {weight_format}")
    case = MoeCase(x, topk_ids, topk_weights, w_gate, w_up, w_down, packed, lora, int8_codes=int8_codes, w8a8=w8a8)
    case.grad_y = randn(tokens, hidden).to(dtype)
    case.gate = gate or kt_ops.Gate()
    if biases:
        case.gate_up_bias = randn(experts, 2 * intermediate).to(dtype).requires_grad_()
        case.down_bias = randn(experts, hidden).to(dtype).requires_grad_()
    if clamped_share is not None:
        case.gate = dataclasses.replace(case.gate, limit=limit_in_a_gap(case, clamped_share))
    return case


def preactivations(case: MoeCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up pre-activations (g, u) ``[T, K, I]`` of every routed pair, in fp64."""
    e = case.topk_ids
    x = case.x.detach().double()
    s = case.scaling
    i = case.w_gate.shape[1]
    lora = [t.detach().double() for t in case.lora] if case.lora else None
    bias = case.gate_up_bias.detach().double() if case.gate_up_bias is not None else None
    out = []
    for j, w in enumerate((case.w_gate, case.w_up)):
        p = torch.einsum("th,tkih->tki", x, w.double()[e])
        if bias is not None:
            p = p + bias[e][..., j * i:(j + 1) * i]
        if lora is not None:
            a, b = lora[2 * j], lora[2 * j + 1]
            p = p + s * torch.einsum("tkr,tkir->tki", torch.einsum("th,tkrh->tkr", x, a[e]), b[e])
        out.append(p)
    return out[0], out[1]


# Kernel and reference compute a pre-activation a rounding apart (bf16 operands on the AMX and
# AVX-512 paths, g and u saved in x's dtype: a few parts per thousand), and the gradient of a
# clamp is a step at the limit, so no pre-activation may lie closer to the limit than this.
LIMIT_CLEARANCE = 0.005


def limit_in_a_gap(case: MoeCase, share: float) -> float:
    """A clamp limit L that cuts about ``share`` of the layer's pre-activations (g > L, |u| > L)
    with no pre-activation within ``LIMIT_CLEARANCE * L`` of it: the widest gap between the
    sorted values whose cut share lies within a factor two of ``share``."""
    g, u = preactivations(case)
    values = torch.cat([g.flatten(), u.abs().flatten()]).sort().values
    n = values.numel()
    best, best_clearance = None, 0.0
    for j in range(int(n * (1 - 2 * share)), min(int(n * (1 - share / 2)), n - 1)):
        mid = 0.5 * (values[j] + values[j + 1]).item()
        clearance = 0.5 * (values[j + 1] - values[j]).item() / mid if mid > 0 else 0.0
        if clearance > best_clearance:
            best, best_clearance = mid, clearance
    if best is None or best_clearance < LIMIT_CLEARANCE:
        raise ValueError(f"no clamp limit cuts about {share:.0%} of these {n} pre-activations with "
                         f"{LIMIT_CLEARANCE:.0%} clearance (best {best_clearance:.2%}): use fewer tokens or experts")
    return best


def run_kt(case: MoeCase):
    """kt_ops forward and the gradients of <y, grad_y> for every input requiring grad."""
    y = kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts, case.lora, case.scaling,
                       gate=case.gate, gate_up_bias=case.gate_up_bias, down_bias=case.down_bias, w8a8=case.w8a8)
    grads = torch.autograd.grad(y, case.inputs_requiring_grad(), case.grad_y, allow_unused=True)
    return y.detach(), list(grads)


def run_reference(case: MoeCase, w8a8: Optional[bool] = None):
    """The same in fp32 through kt_ops.reference (gradients of unused inputs are zeros): with
    W8A8 numerics where ``w8a8`` (None: the case's own) says so, else on the dequantized
    weights."""
    leaves = [t.detach().float().requires_grad_() for t in case.inputs_requiring_grad()]
    n_lora = len(case.lora or [])
    x, w, lora = leaves[0], leaves[1], leaves[2:2 + n_lora] or None
    biases = iter(leaves[2 + n_lora:])
    gate_up_bias = next(biases) if case.gate_up_bias is not None else None
    down_bias = next(biases) if case.down_bias is not None else None
    if case.w8a8 if w8a8 is None else w8a8:
        y = moe_sft_w8a8_reference(x, case.topk_ids, w, *case.int8_codes, lora, case.scaling, gate=case.gate,
                                   gate_up_bias=gate_up_bias, down_bias=down_bias)
    else:
        y = moe_sft_reference(x, case.topk_ids, w, case.w_gate, case.w_up, case.w_down, lora, case.scaling,
                              gate=case.gate, gate_up_bias=gate_up_bias, down_bias=down_bias)
    if y.requires_grad:  # with no tokens the reference never touches its inputs
        grads = torch.autograd.grad(y, leaves, case.grad_y.float(), allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves)]
    return y.detach(), grads


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    """The one comparison rule: relative norm and worst element, both scaled by the reference,
    at the tolerances TOLERANCES[dtype] (an activation dtype, or a numerics' name: "w8a8")."""
    tol = TOLERANCES[dtype]
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    diff = got - ref
    ref_norm = ref.norm().item()
    rel = diff.norm().item() / ref_norm if ref_norm > 0 else diff.norm().item()
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    worst = diff.abs().max().item() / ref_max if ref_max > 0 else (diff.abs().max().item() if diff.numel() else 0.0)
    assert rel <= tol["rel"], f"{name}: relative error {rel:.2e} > {tol['rel']:.0e}"
    assert worst <= tol["max"], f"{name}: worst element error {worst:.2e} > {tol['max']:.0e}"


class CountExpertForwards(TorchDispatchMode):
    """Counts the kt.moe_sft_forward kernels that run (a forward handed out again on a
    checkpoint's recompute runs none)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.kt.moe_sft_forward.default
        return func(*args, **(kwargs or {}))
