"""Random MoE layers for examples and benchmarks (no checkpoint needed)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kt_ops.api import PackedExperts, pack_experts
from kt_ops.shapes import MoeShape


@dataclass
class RandomLayer:
    """Unpacked bf16 weights, their packed form, routing for ``tokens`` tokens and LoRA."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    experts: PackedExperts
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    lora: Optional[list[torch.Tensor]]
    lora_scaling: float


def random_layer(shape: MoeShape, tokens: int, rank: Optional[int] = 16, alpha: float = 32.0,
                 seed: int = 0, numa_nodes: int = 0, experts_format: str = "bf16") -> RandomLayer:
    """A layer of ``shape`` with random weights, softmax top-k routing of random router
    logits and LoRA of rank ``rank`` (None for no LoRA), all on the CPU; ``numa_nodes`` and
    ``experts_format`` go to :func:`kt_ops.pack_experts` (as its ``numa_nodes`` and
    ``format``)."""
    torch.manual_seed(seed)
    e, i, h, k = shape.experts, shape.intermediate, shape.hidden, shape.top_k
    w_gate = torch.randn(e, i, h, dtype=torch.bfloat16) * h**-0.5
    w_up = torch.randn(e, i, h, dtype=torch.bfloat16) * h**-0.5
    w_down = torch.randn(e, h, i, dtype=torch.bfloat16) * i**-0.5
    experts = pack_experts(w_gate, w_up, w_down, numa_nodes, format=experts_format)
    x = torch.randn(tokens, h, dtype=torch.bfloat16)
    probs = torch.randn(tokens, e).softmax(dim=-1)
    topk_weights, topk_ids = probs.topk(k, dim=-1)
    lora = None
    if rank:
        shapes = [(rank, h), (i, rank), (rank, h), (i, rank), (rank, i), (h, rank)]
        lora = [torch.randn(e, *s) * 0.01 for s in shapes]
    return RandomLayer(w_gate, w_up, w_down, experts, x, topk_ids, topk_weights, lora,
                       alpha / rank if rank else 1.0)
