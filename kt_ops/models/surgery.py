"""Model surgery: the routed experts of every MoE layer replaced by KtExperts.

Only the routed experts are replaced. The router, shared experts, attention and everything
else stay the model's own modules, so routing (softmax or sigmoid scores, normalisation,
group-limited top-k, score correction bias, routed scaling factor) and the router logits and
auxiliary loss are exactly what the model computes, and the routing weights carry gradients
into the router through the kt op's backward.
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kt_ops.api import PackedExperts, pack_experts
from kt_ops.experts import KtExperts
from kt_ops.models.families import ROUTER, experts_shape, expert_weights, family_of, moe_layers

@dataclass(frozen=True)
class ExpertLoraConfig:
    """LoRA on the routed experts: rank ``r`` and ``lora_alpha`` (scaling = alpha / r)."""

    r: int = 16
    lora_alpha: float = 32.0
    train_router: bool = True


def _softmax_topk_forward(block: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of a transformers 4.x Qwen3-MoE / Qwen2-MoE / Mixtral sparse-MoE block whose
    expert list is a KtExperts: the block's own routing steps, then one kt call instead of
    the loop over experts. Returns (hidden states, router logits) as the block does."""
    batch, seq, hidden = hidden_states.shape
    jitter = getattr(block, "jitter_noise", 0)  # Mixtral
    if block.training and jitter > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
    x = hidden_states.view(-1, hidden)
    router_logits = block.get_submodule(ROUTER)(x)
    weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
    weights, ids = torch.topk(weights, block.top_k, dim=-1)
    if getattr(block, "norm_topk_prob", True):  # Mixtral always normalises
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = block.experts(x, ids, weights.to(x.dtype))
    if getattr(block, "shared_expert", None) is not None:  # Qwen2-MoE
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out.view(batch, seq, hidden), router_logits


def _experts_call(block: nn.Module, hidden_states: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``moe`` of a transformers 4.x DeepSeek MoE block whose expert list is a KtExperts."""
    return block.experts(hidden_states, ids, weights)


_PER_EXPERT_ROUTING = {"softmax_topk": ("forward", _softmax_topk_forward), "moe_method": ("moe", _experts_call)}


def _resolve_config(lora_rank: Optional[int], lora_alpha: Optional[float], config: Any) -> ExpertLoraConfig:
    if config is not None and (lora_rank is not None or lora_alpha is not None):
        raise ValueError("kt_ops.patch_model: give either config or lora_rank/lora_alpha, not both")
    if config is None:
        return ExpertLoraConfig(16 if lora_rank is None else lora_rank, 32.0 if lora_alpha is None else lora_alpha)
    if isinstance(config, ExpertLoraConfig):
        return config
    if hasattr(config, "r") and hasattr(config, "lora_alpha"):  # peft.LoraConfig
        return ExpertLoraConfig(int(config.r), float(config.lora_alpha))
    raise TypeError(f"kt_ops.patch_model: config must be an ExpertLoraConfig or a peft.LoraConfig, got "
                    f"{type(config).__name__}")


def patch_model(model: nn.Module, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None, *,
                config: Any = None, numa_nodes: int = 0,
                experts: Optional[dict[int, PackedExperts]] = None) -> nn.Module:
    """Replaces the routed experts of every MoE layer with :class:`KtExperts`, in place.

    Args:
        model: a transformers MoE model of a family in :data:`ARCHITECTURES`, with 5.x fused
            experts or 4.x per-expert ``nn.Linear`` lists, its expert weights on the CPU or any
            device (they are copied to the CPU and packed to bf16; the originals are released).
        lora_rank, lora_alpha: LoRA rank and alpha on every expert's gate/up/down (default 16
            and 32).
        config: instead of the two above, an :class:`ExpertLoraConfig` or a
            ``peft.LoraConfig`` (its ``r`` and ``lora_alpha``).
        numa_nodes: passed to :func:`kt_ops.pack_experts`.
        experts: ``{layer index: PackedExperts}`` from :func:`kt_ops.load_experts`; the
            model's own expert weights are then never read, so they may sit on the ``meta``
            device (``with torch.device("meta"):`` when building the model) and the full bf16
            model is never materialised.

    Returns the model. Every parameter is then frozen except the expert LoRA tensors (named
    ``...experts.lora_*``, so ``"lora" in name`` finds them) and, unless
    ``config.train_router`` is False, the routers. In 4.x models the MoE block's expert loop
    is replaced too (see :class:`Family`); its routing and outputs stay the block's.
    """
    cfg = _resolve_config(lora_rank, lora_alpha, config)
    _, family = family_of(model)
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"kt_ops.patch_model: the kt experts compute silu(g) * u; this model's hidden_act is {act!r}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"kt_ops.patch_model: found no routed experts in the model (a '{family.experts}' module "
                         f"with a 3-D gate_up_proj, or a '{family.expert_list}' list of "
                         f"{'/'.join(family.expert_linears)} nn.Linear experts)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in layers.items():
        if isinstance(module, KtExperts):
            raise ValueError(f"kt_ops.patch_model: {name} is already patched")
        e, h, i = experts_shape(module, family)
        if experts is None:
            packed = pack_experts(*expert_weights(module), numa_nodes)
        else:
            index = int(re.search(r"layers\.(\d+)\.", name).group(1))
            if index not in experts:
                raise KeyError(f"kt_ops.patch_model: experts has no layer {index} (for {name}); it has {sorted(experts)}")
            packed = experts[index]
            if (packed.num_experts, packed.hidden_size, packed.intermediate_size) != (e, h, i):
                raise ValueError(f"kt_ops.patch_model: experts[{index}] holds {packed.num_experts} experts of "
                                 f"hidden size {packed.hidden_size} and intermediate size "
                                 f"{packed.intermediate_size}; {name} has {e} of {h} and {i}")
        per_expert = isinstance(module, nn.ModuleList)
        new = KtExperts(packed, h, cfg.r, cfg.lora_alpha, per_expert=per_expert)
        block_name, _, child = name.rpartition(".")
        block = model.get_submodule(block_name)
        setattr(block, child, new)
        if per_expert:
            method, fn = _PER_EXPERT_ROUTING[family.per_expert_routing]
            setattr(block, method, types.MethodType(fn, block))
        if cfg.train_router:
            for p in block.get_submodule(ROUTER).parameters():
                p.requires_grad_(True)
    return model
