"""Typed Python API over the torch.ops.kt operators."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

LoraTuple = Sequence[torch.Tensor]  # (A_gate, B_gate, A_up, B_up, A_down, B_down)


def isa(format: str = "bf16", w8a8: bool = False) -> str:
    """Name of the kernel path the ops use now on experts of weight format ``format``
    (``w8a8``: with :func:`moe_sft`'s W8A8 numerics, int8 only): ``"amx"``, ``"avx512"``,
    ``"avx2"`` or ``"scalar"``.

    It is the best path this CPU supports that the format has kernels for (every format has
    all four), capped by the environment variable ``KT_OPS_MAX_ISA`` (read at every
    op call, so tests can switch paths in one process).
    """
    return torch.ops.kt.isa(format, w8a8)


def topology() -> str:
    """The machine as the kernels see it, e.g. ``"1 NUMA node: node 0 cores {0,1}"``.

    The kernels' thread pool pins its workers to these cores, spread round-robin over the
    NUMA nodes (``KT_OPS_PIN_THREADS=0`` leaves them unpinned), and :func:`pack_experts` splits
    each layer's experts into one slice per node, placed in that node's memory. The variable
    ``KT_OPS_TOPOLOGY``, read once per process, replaces the machine with an hwloc synthetic
    topology such as ``"pack:2 numa:1 core:4 pu:1"`` (for testing multi-node behaviour; then
    nothing is pinned or bound).
    """
    return torch.ops.kt.topology()


def weight_formats() -> list[str]:
    """The weight formats this build packs experts in and computes with, e.g. ``["bf16",
    "int8", "int4", "fp8"]``: the values :func:`pack_experts` takes as ``format``."""
    return list(torch.ops.kt.weight_formats())


# The experts format that names numerics besides a weight format: int8 weights whose products
# moe_sft computes in int8 (its w8a8) unless the caller says otherwise.
W8A8 = "w8a8"


def experts_formats() -> list[str]:
    """What :func:`pack_experts`, the loaders, :func:`kt_ops.patch_model` and ``kt-sft train
    --experts-format`` take: the :func:`weight_formats` and ``"w8a8"`` (int8 weights, computed
    with :func:`moe_sft`'s W8A8 numerics by default)."""
    return weight_formats() + [W8A8]


def check_weight_format(name: str, caller: str) -> None:
    """Raises ValueError naming ``caller`` unless ``name`` is one of :func:`experts_formats`:
    for the loaders, which check their arguments before they read anything."""
    if name not in experts_formats():
        raise ValueError(f"{caller}: experts_format must be one of {', '.join(experts_formats())}, got {name!r}")


def _storage_format(format: str) -> tuple[str, bool]:
    """The weight format an experts format stores, and whether it computes with W8A8."""
    return ("int8", True) if format == W8A8 else (format, False)


@dataclass(frozen=True)
class PackedExperts:
    """Frozen expert weights of one MoE layer in the kernels' layout.

    The intermediate dimension is split into S slices of padded width Is, one per NUMA
    node, each in its node's memory and computed by its node's threads.

    Attributes:
        tensors: what ``torch.ops.kt.pack_experts`` returned, the list the MoE ops take:
            :attr:`gate_up`, :attr:`down`, :attr:`layout`, then the format's scales (none for
            ``"bf16"``).
        format: the weight format (one of :func:`weight_formats`).
        intermediate_size: I, the experts' intermediate size.
        hidden_size: H, the experts' hidden size.
        group_size: the ``group_size`` they were packed with (0: the format's default), so
            that a repack quantizes as the packing did.
        w8a8: int8 experts only: :func:`moe_sft` computes with them in W8A8 numerics unless
            its caller says otherwise (what ``pack_experts(..., format="w8a8")`` makes; the
            Hugging Face path, which calls moe_sft for the model, follows it).

    Hp is H rounded up to 32 and Is is I / S rounded up to 32, padded with zeros; real
    model sizes need no padding, so the packed bytes equal the weight bytes there.
    """

    tensors: tuple[torch.Tensor, ...]
    format: str
    intermediate_size: int
    hidden_size: int
    group_size: int = 0
    w8a8: bool = False

    def __post_init__(self):
        if self.w8a8 and self.format != "int8":
            raise ValueError(f"kt_ops.PackedExperts: w8a8 needs int8 experts, got {self.format}")

    @property
    def experts_format(self) -> str:
        """The name :func:`pack_experts` took to make these: :attr:`format`, or ``"w8a8"``."""
        return W8A8 if self.w8a8 else self.format

    @property
    def gate_up(self) -> torch.Tensor:
        """``[S, E, 2*Is, Hp]``: the gate and up projections, 16-row panels interleaved (int4:
        ``Hp / 2`` bytes of two codes each)."""
        return self.tensors[0]

    @property
    def down(self) -> torch.Tensor:
        """``[S, E, Hp, Is]``: the down projection."""
        return self.tensors[1]

    @property
    def layout(self) -> torch.Tensor:
        """int64 ``[6]``: what the packed tensors hold (weight format, E, H, I, S); the ops check
        every call's sizes against it."""
        return self.tensors[2]

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[1]

    @property
    def numa_slices(self) -> int:
        """S, the slices of the intermediate dimension (one per NUMA node)."""
        return self.gate_up.shape[0]

    def unpack(self, experts: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bf16 weights these were packed from: ``(w_gate [E, I, H], w_up [E, I, H],
        w_down [E, H, I])``, new tensors (packing bf16 is a lossless permutation; a quantized
        format gives its dequantized weights rounded to bf16). With ``experts`` (ids in
        ``[0, E)``), those experts' weights only, in that order: ``[len(experts), ...]``."""
        ids = None if experts is None else [int(e) for e in experts]
        return torch.ops.kt.unpack_experts(list(self.tensors), self.hidden_size, self.intermediate_size, ids)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the packed experts, scales and layout included."""
        return sum(t.nbytes for t in self.tensors)


def pack_experts(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, numa_nodes: int = 0, *,
                 format: str = "bf16", group_size: int = 0) -> PackedExperts:
    """Packs one layer's expert weights for :func:`moe_sft`.

    Args:
        w_gate: bf16 ``[E, I, H]`` (PEFT/nn.Linear layout: out x in).
        w_up: bf16 ``[E, I, H]``.
        w_down: bf16 ``[E, H, I]``.
        numa_nodes: slices to split the intermediate dimension into, 0 to 1024; 0 (the
            default) gives one per NUMA node of :func:`topology`. Never more than I / 32.
        format: the weight format to hold them in, one of :func:`experts_formats`:
            ``"bf16"`` (the weights as they are), ``"int8"`` (symmetric, one fp32 scale per
            output channel: :func:`kt_ops.reference.quantize_int8` exactly; about half the
            bytes), ``"int4"`` (symmetric, two codes per byte, one bf16 scale per
            ``group_size`` elements of each row's reduction:
            :func:`kt_ops.reference.quantize_int4` exactly; about 0.28 of the bytes) or
            ``"fp8"`` (e4m3, one fp32 scale per 128 x 128 block of each matrix:
            :func:`kt_ops.reference.quantize_fp8` exactly; about half the bytes). The kernels
            compute with the dequantized weights (rounded to bf16), on every path.
            ``"w8a8"``: int8 as above, which :func:`moe_sft` then computes with in W8A8
            numerics by default (:attr:`PackedExperts.w8a8`).
        group_size: the quantization group of ``"int4"``: 32, 64 or 128, dividing H and I;
            0 (the default) takes 32. Must be 0 for the formats without groups.

    The inputs are not kept: once packed they can be freed.
    """
    stored, w8a8 = _storage_format(format)
    tensors = torch.ops.kt.pack_experts(w_gate, w_up, w_down, numa_nodes, stored, group_size)
    return PackedExperts(tuple(tensors), stored, int(w_gate.shape[1]), int(w_gate.shape[2]), group_size, w8a8)


def pack_expert_codes(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, scales: Sequence[torch.Tensor],
                      numa_nodes: int = 0, *, format: str, group_size: int = 0) -> PackedExperts:
    """Packs one layer's experts from a quantized format's codes, as they are (no rounding): what
    quantized checkpoints ship, in the form :mod:`kt_ops.reference`'s quantize functions return.

    Args:
        w_gate, w_up: codes ``[E, I, H]``; w_down: codes ``[E, H, I]``. int8 for ``"int8"``
            and ``"int4"`` (codes in [-8, 7], one per element); ``float8_e4m3fn`` (or its
            bytes as uint8) for ``"fp8"``.
        scales: ``[gate, up, down]``, each as the format's quantize function returns it for
            its matrix N x K (I x H for gate and up, H x I for down): ``"int8"`` float32
            ``[E, N]``; ``"int4"`` bfloat16 ``[E, N, K / group_size]``; ``"fp8"`` float32
            ``[E, ceil(N / 128), ceil(K / 128)]`` (the checkpoints' ``weight_scale_inv``).
        numa_nodes: as for :func:`pack_experts`.
        format: ``"int8"``, ``"int4"`` or ``"fp8"`` (or ``"w8a8"``: int8, as for
            :func:`pack_experts`).
        group_size: int4's group; 0 (the default) reads it from the scales' shape.

    Equals :func:`pack_experts` of the weights the codes stand for wherever that quantizes to
    the same codes (``pack_expert_codes(*w_codes, scales, format=f)`` with ``w_codes, scales``
    from ``kt_ops.reference.quantize_f`` of each matrix). Raises on codes the kernels cannot
    read (int4 codes outside [-8, 7], the e4m3 NaN codes) and scales that are not finite.
    """
    codes = [w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w for w in (w_gate, w_up, w_down)]
    if format == "int4" and group_size == 0 and len(scales) == 3 and scales[0].dim() == 3 and scales[0].shape[-1]:
        group_size = int(w_gate.shape[-1]) // int(scales[0].shape[-1])
    stored, w8a8 = _storage_format(format)
    tensors = torch.ops.kt.pack_expert_codes(*codes, list(scales), stored, numa_nodes, group_size)
    return PackedExperts(tuple(tensors), stored, int(w_gate.shape[1]), int(w_gate.shape[2]), group_size, w8a8)


@dataclass(frozen=True)
class Gate:
    """The experts' gated activation: ``z = act(min(g, limit)) * (clamp(u, -limit, limit) +
    up_offset)`` for gate and up projections g and u.

    Attributes:
        activation: ``"silu"`` (``v * sigmoid(alpha * v)``), ``"gelu"`` (the erf form) or
            ``"gelu_tanh"`` (the tanh approximation).
        alpha: the sigmoid's scale in ``"silu"`` (1 is SiLU; gpt-oss uses 1.702).
        limit: the clamp (None: none): g is clamped from above, u on both sides.
        up_offset: added to the clamped u (gpt-oss: 1).

    ``Gate()`` is SwiGLU, ``silu(g) * u``.
    """

    activation: str = "silu"
    alpha: float = 1.0
    limit: Optional[float] = None
    up_offset: float = 0.0

    def op_args(self) -> tuple[str, float, Optional[float], float]:
        """The activation arguments of ``torch.ops.kt.moe_sft_forward``, in its order."""
        return (self.activation, float(self.alpha), None if self.limit is None else float(self.limit),
                float(self.up_offset))


SWIGLU = Gate()

# The expert id of a routing slot that :func:`moe_sft` leaves out (kt/moe_sft.h's kNoExpert): a
# slot the caller computes elsewhere (another device's experts) or an empty one.
NO_EXPERT = -1


def _lora_args(lora: Optional[LoraTuple]) -> list[Optional[torch.Tensor]]:
    if lora is None:
        return []
    lora = list(lora)
    if len(lora) != 6:
        raise ValueError(
            "kt_ops.moe_sft: lora must be None or six tensors (A_gate, B_gate, A_up, B_up, A_down, "
            f"B_down), got {len(lora)}"
        )
    return lora


def moe_sft(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: PackedExperts,
    lora: Optional[LoraTuple] = None,
    lora_scaling: float = 1.0,
    *,
    gate: Gate = SWIGLU,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    w8a8: Optional[bool] = None,
) -> torch.Tensor:
    """Routed-experts MLP with LoRA, differentiable in x, topk_weights, every LoRA tensor and
    the biases.

    For token t routed to experts e_1..e_K with weights w_t,j, and s = ``lora_scaling``::

        g = x Wg^T + bg + s (x Ag^T) Bg^T;  u = x Wu^T + bu + s (x Au^T) Bu^T;  z = gate(g, u)
        h = z Wd^T + bd + s (z Ad^T) Bd^T;  y_t = sum_j w_t,j h_(e_j)

    Args:
        x: ``[T, H]`` bf16 or fp32 hidden states (CPU).
        topk_ids: ``[T, K]`` int32/int64 expert ids, each in ``[0, E)``, or
            :data:`NO_EXPERT` (-1): the slot adds nothing and its weight's gradient is zero
            (a slot the caller computes elsewhere).
        topk_weights: ``[T, K]`` fp32 or bf16 routing weights.
        experts: from :func:`pack_experts`.
        lora: ``None`` or ``(A_g, B_g, A_u, B_u, A_d, B_d)`` in PEFT layout, A ``[E, r, in]``
            and B ``[E, out, r]`` (fp32 or bf16). A pair may be ``None`` to leave that
            projection without LoRA; ranks may differ per projection.
        lora_scaling: s, usually ``alpha / r``.
        gate: the activation (:class:`Gate`; SwiGLU by default).
        gate_up_bias: ``None`` or the experts' ``[E, 2I]`` gate/up biases (bg then bu).
        down_bias: ``None`` or the experts' ``[E, H]`` down biases (bd). Biases that require
            grad get their gradients (the expert weights themselves stay frozen).
        w8a8: None (the default): the experts' own choice (:attr:`PackedExperts.w8a8`).
            True (int8 experts only) computes the base products (not the LoRA ones) in int8,
            on AMX-INT8 where the CPU has it: in the forward x and z are quantized per row
            (symmetric, 127 levels) and multiplied by the int8 codes; in the backward the
            input gradients' products take dy and the gate/up gradient, each times the
            weights' channel scales, quantized per row (the SwitchBack recipe; the frozen
            experts need no weight gradient). ``kt_ops.reference.moe_sft_w8a8_reference``
            defines it exactly; its results differ from the weight-only ones by the
            activations' rounding, ``kt_ops.reference.TOLERANCES["w8a8"]``. False: the
            int8 weights are converted to bf16 in the kernels (weight-only), activations
            stay as they are.

    Returns:
        ``[T, H]`` in x's dtype.

    Numerics: fp32 accumulation everywhere. On the AMX and AVX-512 paths activations and
    the LoRA matrices enter the GEMMs rounded to bf16; on the AVX2 and scalar paths they stay
    fp32. LoRA gradients are accumulated in fp32 and returned in each LoRA tensor's dtype.

    Memory: autograd keeps x, the routing tensors and, per token, ``K * 2I`` values in x's
    dtype (g and u) plus ``K * (r_g + r_u + r_d)`` fp32 LoRA activations: for a
    Qwen3-30B-A3B layer (K=8, I=768, r=16, bf16) that is 26,112 bytes per token. The
    kernels' scratch buffers are kept by each calling thread and reused by the next call
    (fresh buffers cost a page-fault pass every step); they hold the largest call's working
    set, about ``T * K * (6H + 6I)`` bytes with bf16 activations (0.5 GiB for T = 4096 there).
    What the backward needs is kept outside saved-tensor hooks, so activation checkpointing
    neither drops nor recomputes it: under such hooks the output (``T * H`` values) is kept
    too, and a recompute of the layer with equal inputs gets it back without running the
    experts again.

    Set ``KT_OPS_PROFILE=1`` to have every call print the wall time of its phases.
    """
    y, _, _ = torch.ops.kt.moe_sft_forward(
        x, topk_ids, topk_weights, list(experts.tensors), experts.intermediate_size, _lora_args(lora),
        float(lora_scaling), gate_up_bias, down_bias, *gate.op_args(), experts.w8a8 if w8a8 is None else bool(w8a8),
    )
    return y
