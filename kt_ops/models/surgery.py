"""Putting the routed experts of a model on the kt kernels, with LoRA on them.

Models of transformers' experts interface keep their modules: their experts hold packed
weights, run with the "kt" experts implementation, and get stock PEFT LoRA. In transformers
4.x models, the expert lists are replaced by KtExperts.

Only the routed experts change. The router, shared experts, attention and everything
else stay the model's own modules, so routing (softmax or sigmoid scores, normalisation,
group-limited top-k, score correction bias, routed scaling factor) and the router logits and
auxiliary loss are exactly what the model computes, and the routing weights carry gradients
into the router through the kt op's backward.
"""
from __future__ import annotations

import copy
import re
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kt_ops.api import PackedExperts, check_weight_format, pack_experts
from kt_ops.expert_parallel import ExpertShard
from kt_ops.experts import EXPERTS_IMPLEMENTATION, KtExperts, supported_variant, use_packed_experts
from kt_ops.models.families import (ROUTER, experts_shape, expert_weights, family_of, interface_experts, moe_layers,
                                    router_of)
from kt_ops.models.variants import interface_experts_shape

@dataclass(frozen=True)
class ExpertLoraConfig:
    """LoRA on the routed experts: rank ``r`` and ``lora_alpha`` (scaling = alpha / r); the
    routers train too unless ``train_router`` is False; ``target_modules`` puts PEFT LoRA of
    the same rank on other modules as well (attention, say), in the same adapter."""

    r: int = 16
    lora_alpha: float = 32.0
    train_router: bool = True
    target_modules: tuple[str, ...] = ()


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


def resolve_lora_config(lora_rank: Optional[int], lora_alpha: Optional[float], config: Any) -> Any:
    """The LoRA :func:`patch_model` puts on the experts: an :class:`ExpertLoraConfig` from
    rank and alpha, or ``config`` (an ExpertLoraConfig or a ``peft.LoraConfig``) as it is."""
    if config is not None and (lora_rank is not None or lora_alpha is not None):
        raise ValueError("kt_ops.patch_model: give either config or lora_rank/lora_alpha, not both")
    if config is None:
        config = ExpertLoraConfig(16 if lora_rank is None else lora_rank, 32.0 if lora_alpha is None else lora_alpha)
    if not (isinstance(config, ExpertLoraConfig) or (hasattr(config, "r") and hasattr(config, "target_parameters"))):
        raise TypeError(f"kt_ops.patch_model: config must be an ExpertLoraConfig or a peft.LoraConfig, got "
                        f"{type(config).__name__}")
    if config.r < 1:
        raise ValueError(f"kt_ops: lora_rank must be >= 1, got {config.r}")
    return config


def patch_model(model: nn.Module, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None, *,
                config: Any = None, numa_nodes: int = 0, experts_format: str = "bf16",
                experts: Optional[dict[int, PackedExperts]] = None) -> nn.Module:
    """Puts the routed experts of every MoE layer on the kt kernels, with LoRA on each
    expert's gate, up and down projections.

    Args:
        model: a transformers MoE model, its expert weights on the CPU or any device (they
            are copied to the CPU and packed; the originals are released).
        lora_rank, lora_alpha: LoRA rank and alpha on every expert's gate/up/down (default 16
            and 32).
        config: instead of the two above, an :class:`ExpertLoraConfig` or a
            ``peft.LoraConfig``. A LoraConfig is taken as it is, with the experts' parameters
            added as its ``target_parameters`` and the routers as its ``modules_to_save``
            where it names none.
        numa_nodes: passed to :func:`kt_ops.pack_experts`.
        experts_format: the weight format of the packed experts, one of
            :func:`kt_ops.experts_formats` (``"int8"`` quantizes each layer as it is packed;
            ``"w8a8"`` also computes with int8 activations). Given ``experts`` keep the format
            they were packed in.
        experts: ``{layer index: PackedExperts}`` from :func:`kt_ops.load_experts`; the
            model's own expert weights are then never read, so they may sit on the ``meta``
            device (``with torch.device("meta"):`` when building the model) and the full bf16
            model is never materialised.

    Models whose experts use transformers' experts interface (transformers 5.x, every family
    of :func:`kt_ops.supported_families`) get the "kt" experts implementation and stock PEFT
    LoRA: the result is ``peft.get_peft_model(model, LoraConfig(target_parameters=[...
    "mlp.experts.gate_up_proj", "mlp.experts.down_proj"], modules_to_save=[routers]))``, a
    ``PeftModel`` that every PEFT, transformers and TRL tool takes as it takes an eager one.
    PEFT makes each LoRA tensor where its base parameter is, so move the model to its device
    before this call: the experts' LoRA then stays in CPU memory beside the packed experts.

    Transformers 4.x models (per-expert ``nn.Linear`` lists, the families of
    :data:`~kt_ops.models.families.ARCHITECTURES`) have their expert lists replaced by
    :class:`KtExperts` in place, with the LoRA as its parameters (``...experts.lora_*``);
    every other parameter is frozen except, unless ``train_router`` is False, the routers.
    Their MoE block's expert loop is replaced too (see :class:`Family`); its routing and
    outputs stay the block's.

    Returns the model (the ``PeftModel`` in the first case).
    """
    cfg = resolve_lora_config(lora_rank, lora_alpha, config)
    check_weight_format(experts_format, "kt_ops.patch_model")
    if is_peft_model(model):
        raise ValueError("kt_ops.patch_model: the model already has a PEFT adapter; patch the base model (PEFT's "
                         "add_adapter adds further adapters)")
    if interface_experts(model):
        import peft

        lora = expert_lora_config(model, cfg)  # first: it may refuse, and nothing has changed yet
        use_kt_experts(model, experts=experts, numa_nodes=numa_nodes, experts_format=experts_format)
        return peft.get_peft_model(model, lora)
    return _replace_expert_lists(model, cfg, numa_nodes, experts_format, experts)


def is_peft_model(model: nn.Module) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def _layer_index(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def _given_experts(experts: dict[int, PackedExperts], name: str, shape: tuple[int, int, int]) -> PackedExperts:
    """``experts[layer of name]``, checked against the module's (E, H, I)."""
    index = _layer_index(name)
    if index not in experts:
        raise KeyError(f"kt_ops.patch_model: experts has no layer {index} (for {name}); it has {sorted(experts)}")
    packed = experts[index]
    if (packed.num_experts, packed.hidden_size, packed.intermediate_size) != tuple(shape):
        e, h, i = shape
        raise ValueError(f"kt_ops.patch_model: experts[{index}] holds {packed.num_experts} experts of hidden size "
                         f"{packed.hidden_size} and intermediate size {packed.intermediate_size}; {name} has {e} of "
                         f"{h} and {i}")
    return packed


def use_kt_experts(model: nn.Module, *, experts: Optional[dict[int, PackedExperts]] = None,
                   numa_nodes: int = 0, experts_format: str = "bf16", sharded: bool = False) -> dict[str, nn.Module]:
    """Packs the experts of every experts module of transformers' experts interface in
    ``model`` in ``experts_format`` (or takes ``experts`` from :func:`kt_ops.load_experts` for
    them) and sets the
    "kt" experts implementation; no LoRA. Returns ``{module path: experts module}``. Every
    module is checked (a variant the kernels cannot compute, missing or mis-sized experts)
    before the first is changed. ``sharded``: ``experts`` hold this host's share of each
    layer's experts (:mod:`kt_ops.expert_parallel`), which compute with the other hosts'.

    The packed weights show as float32 parameters whatever the model's dtype. PEFT casts the
    LoRA factors to the dtype of the parameter they adapt on every forward; as float32 they
    reach the kt op as views of PEFT's fp32 LoRA weights, and their gradients come back in
    fp32, where a bf16 model would have them rounded to bf16 (and copied twice) each step.
    The kernels read the bf16 packed weights either way."""
    layers = interface_experts(model)
    if not layers:
        raise ValueError("kt_ops.patch_model: found no experts module of transformers' experts interface")
    given, shards = {}, {}
    for name, module in layers.items():
        supported_variant(module)
        e, h, i = interface_experts_shape(module)
        if sharded:  # experts: this host's share of each layer's (kt_ops.expert_parallel)
            shards[name] = ExpertShard.of_this_host(e)
            e = shards[name].count
        if experts is not None:
            given[name] = _given_experts(experts, name, (e, h, i))
    for name, module in layers.items():
        use_packed_experts(module, given.get(name), numa_nodes, dtype=torch.float32, experts_format=experts_format,
                           shard=shards.get(name))
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return layers


def expert_lora_config(model: nn.Module, config: Any):
    """The ``peft.LoraConfig`` :func:`patch_model` gives ``peft.get_peft_model`` for a model of
    transformers' experts interface: ``config`` (an :class:`ExpertLoraConfig` or a LoraConfig)
    with the experts' own parameter names as ``target_parameters`` and the routers (found
    beside the experts by :func:`~kt_ops.models.families.router_of`) as ``modules_to_save``
    where the config names none. ValueError when a router is wanted and a layer has none
    that can be found."""
    import peft

    layers = interface_experts(model)
    stems = sorted({".".join(name.split(".")[-2:]) for name in layers})
    targets = [f"{stem}.{p}" for stem in stems for p in ("gate_up_proj", "down_proj")]
    if isinstance(config, ExpertLoraConfig):
        want_routers = config.train_router
        config = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(config.target_modules))
    else:
        config = copy.deepcopy(config)
        want_routers = config.modules_to_save is None
        if config.target_modules is None:  # PEFT would pick its per-architecture default modules
            config.target_modules = []
    if not config.target_parameters:
        config.target_parameters = targets
    if want_routers:
        routers = []
        for name in layers:
            router = router_of(model, name)
            if router is None:
                e, h, _ = interface_experts_shape(layers[name])
                raise ValueError(f"kt_ops.patch_model: found no router beside {name} (one module with a [{e}, {h}] "
                                 "weight); pass train_router=False, or a peft.LoraConfig with modules_to_save")
            # PEFT matches names by suffix: "mlp.gate", not "gate" (which also names shared_expert_gate).
            routers.append(".".join(router.split(".")[-2:]))
        config.modules_to_save = sorted(set(routers))
    if config.task_type is None and model.get_output_embeddings() is not None:
        config.task_type = "CAUSAL_LM"  # what AutoPeftModelForCausalLM reads from the saved adapter
    return config


def _replace_expert_lists(model: nn.Module, cfg: Any, numa_nodes: int, experts_format: str,
                          experts: Optional[dict[int, PackedExperts]]) -> nn.Module:
    """patch_model for transformers 4.x models: expert lists replaced by KtExperts."""
    from kt_ops.adapters import add_peft_lora

    if not isinstance(cfg, ExpertLoraConfig):  # a peft.LoraConfig: its rank, alpha and other targets
        cfg = ExpertLoraConfig(int(cfg.r), float(cfg.lora_alpha), cfg.modules_to_save is None,
                               tuple(cfg.target_modules or ()))
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
            packed = pack_experts(*expert_weights(module), numa_nodes, format=experts_format)
        else:
            packed = _given_experts(experts, name, (e, h, i))
        per_expert = isinstance(module, nn.ModuleList)  # else fused experts of a 5.x without the interface
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
    if cfg.target_modules:
        model = add_peft_lora(model, cfg.r, cfg.lora_alpha, list(cfg.target_modules))
    return model
