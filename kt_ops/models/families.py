"""MoE families: where each keeps its routed experts, and finding them in a model.

A family is a transformers ``model_type``. Its entry says where the transformers 5.x fused
experts module sits in a decoder layer, where the 4.x per-expert ``nn.ModuleList`` and its
projections sit (also the key names of checkpoints and per-expert PEFT adapters), and how a
4.x MoE block routes.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kt_ops.experts import KtExperts
from kt_ops.models.variants import ExpertsVariant, experts_variant, interface_experts_shape, is_interface_experts


@dataclass(frozen=True)
class Family:
    """Where one MoE family keeps its routed experts, per decoder layer, and how its
    transformers 4.x MoE block routes.

    ``experts`` is the path of the transformers 5.x fused experts module (``gate_up_proj
    [E, 2I, H]``, ``down_proj [E, H, I]``). ``expert_list`` is the path of the per-expert
    ``nn.ModuleList`` of transformers 4.x models, which is also where checkpoints and
    per-expert PEFT adapters keep per-expert tensors; ``expert_linears`` names its (gate, up,
    down) ``nn.Linear`` projections. The router is the ``gate`` module beside the experts.

    ``per_expert_routing`` says how kt_ops drives a 4.x MoE block once its expert list is
    replaced: ``"softmax_topk"`` (the block computes softmax, top-k and the optional
    normalisation inline: Qwen-MoE, Mixtral; kt_ops runs the same steps, then one kt call) or
    ``"moe_method"`` (the block's gate returns expert ids and weights and the block calls
    ``self.moe(hidden, ids, weights)``: DeepSeek; kt_ops replaces ``moe`` only).
    """

    experts: str = "mlp.experts"
    expert_list: str = "mlp.experts"
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    per_expert_routing: str = "softmax_topk"


# model_type -> Family. Adding a family is one entry.
ARCHITECTURES: dict[str, Family] = {
    "qwen3_moe": Family(),
    "qwen2_moe": Family(),
    "mixtral": Family(expert_list="block_sparse_moe.experts", expert_linears=("w1", "w3", "w2")),
    "deepseek_v2": Family(per_expert_routing="moe_method"),
    "deepseek_v3": Family(per_expert_routing="moe_method"),
}


ROUTER = "gate"  # the router module beside the experts in every family


def family_of(model: nn.Module) -> tuple[str, Family]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"kt_ops: no MoE family for model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))} (add one to kt_ops.models.families.ARCHITECTURES)")
    return model_type, ARCHITECTURES[model_type]


def _is_expert_list(m: nn.Module, family: Family) -> bool:
    return (isinstance(m, nn.ModuleList) and len(m) > 0
            and all(isinstance(getattr(m[0], p, None), nn.Linear) for p in family.expert_linears))


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> routed-experts module of every MoE layer, in model order: transformers
    5.x fused experts modules, 4.x per-expert ``nn.ModuleList``s, or the KtExperts that
    replaced either."""
    _, family = family_of(model)
    suffixes = ("." + family.experts, "." + family.expert_list)

    def is_experts(m: nn.Module) -> bool:
        fused = getattr(m, "gate_up_proj", None)
        return (isinstance(m, KtExperts) or (isinstance(fused, torch.Tensor) and fused.dim() == 3)
                or _is_expert_list(m, family))

    return {name: m for name, m in model.named_modules() if name.endswith(suffixes) and is_experts(m)}


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen weights of an unpatched experts module (5.x fused or 4.x per-expert list)
    as bf16 CPU tensors ``(w_gate [E, I, H], w_up [E, I, H], w_down [E, H, I])``, the inputs
    of :func:`kt_ops.pack_experts`."""
    if isinstance(experts, nn.ModuleList):
        for gate, up, down in {f.expert_linears for f in ARCHITECTURES.values()}:
            if all(isinstance(getattr(experts[0], p, None), nn.Linear) for p in (gate, up, down)):
                linears = [[getattr(m, p) for m in experts] for p in (gate, up, down)]
                if any(lin.bias is not None for group in linears for lin in group):
                    raise ValueError("kt_ops: the kt experts have no bias; these expert projections have one")
                return tuple(torch.stack([lin.weight.detach().to("cpu", torch.bfloat16) for lin in group])
                             for group in linears)
        raise ValueError(f"kt_ops: {type(experts[0]).__name__} has none of the expert projection names "
                         f"{sorted({f.expert_linears for f in ARCHITECTURES.values()})}")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    i = down.shape[2]
    return tuple(t.to("cpu", torch.bfloat16) for t in (gate_up[:, :i], gate_up[:, i:], down))


def experts_shape(experts: nn.Module, family: Family) -> tuple[int, int, int]:
    """(E, H, I) of an unpatched experts module, read from shapes only (weights may be on meta)."""
    if isinstance(experts, nn.ModuleList):
        down = getattr(experts[0], family.expert_linears[2]).weight
        return len(experts), down.shape[0], down.shape[1]
    return tuple(experts.down_proj.shape)


# ---------------------------------------------------------------- families of transformers' experts interface

def interface_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> experts module of transformers' experts interface, for every MoE layer
    of ``model`` (empty for transformers 4.x models and models of one's own)."""
    # PEFT's wrappers around an experts module pass its attributes through: the module is the innermost.
    return {name: m for name, m in model.named_modules() if is_interface_experts(m) and "base_layer" not in m._modules}


def router_of(model: nn.Module, experts_name: str) -> Optional[str]:
    """Path of the router of the experts module at ``experts_name``: the one module beside it
    (a child of the same block) holding a matrix of one row per expert (or one more, for a
    "no expert" slot, or one per the config's ``zero_expert_num`` experts that compute
    nothing, as LongCat-Flash has), at any depth; None when there is not exactly one such module."""
    block_name, _, own = experts_name.rpartition(".")
    block = model.get_submodule(block_name)
    e = interface_experts_shape(block.get_submodule(own))[0]
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = {e, e + 1, e + (getattr(text_config, "zero_expert_num", None) or 0)}
    found = [name for name, m in block.named_children() if name != own
             and any(p.dim() == 2 and p.shape[0] in rows for p in m.parameters())]
    return f"{block_name}.{found[0]}" if len(found) == 1 else None


@dataclass(frozen=True)
class InterfaceFamily:
    """A model type whose experts module uses transformers' experts interface, as its default
    config builds it: the experts class, its variant, and why the kt kernels cannot compute it
    (None when they can). ``variant`` is None when the default config does not build a model
    (``problem`` says why)."""

    model_type: str
    experts_class: Optional[str]
    variant: Optional[ExpertsVariant]
    problem: Optional[str]

    @property
    def supported(self) -> bool:
        return self.variant is not None and self.problem is None


def interface_model_types() -> list[str]:
    """Model types of the installed transformers whose modeling code decorates an experts class
    with ``@use_experts_implementation`` (read from the source, as transformers itself decides
    whether a model can switch its experts implementation)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = os.path.dirname(transformers.models.__file__)
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        package = model_type_to_module_name(model_type)
        path = os.path.join(root, package, f"modeling_{package}.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                if "@use_experts_implementation" in fh.read():
                    found.append(model_type)
    return found


def _model_class(model_type: str):
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES):
        if model_type in mapping:
            return getattr(transformers, mapping[model_type])
    return None


def describe_family(model_type: str, config=None) -> InterfaceFamily:
    """The experts of ``model_type`` as ``config`` (default: the config class's defaults)
    builds them, on the meta device (no memory)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_class = _model_class(model_type)
    if model_class is None:
        return InterfaceFamily(model_type, None, None, "no model class of its own (a part of a larger model)")
    try:
        config = config if config is not None else CONFIG_MAPPING[model_type]()
        with torch.device("meta"):
            model = model_class(config)
    except Exception as e:  # a default config that does not build is the family's to describe, not an error here
        return InterfaceFamily(model_type, None, None, f"its default config builds no model ({type(e).__name__}: {e})")
    experts = [m for m in model.modules() if is_interface_experts(m)]
    if not experts:
        return InterfaceFamily(model_type, None, None, "its default config has no routed experts")
    variant = experts_variant(experts[0])
    return InterfaceFamily(model_type, type(experts[0]).__name__, variant, variant.unsupported())


@functools.lru_cache(maxsize=None)
def supported_families() -> dict[str, str]:
    """Every MoE family kt_ops knows, with what it computes for it: ``{model_type:
    description}``. The families of transformers' experts interface are found by
    introspection of the installed transformers (``experts_implementation="kt"``); the
    description says the experts class and variant, and for a variant the kernels cannot
    compute yet, why. The families of :data:`ARCHITECTURES` also run through
    :func:`kt_ops.patch_model` (transformers 4.x per-expert ``nn.Linear`` experts)."""
    out = {}
    try:
        model_types = interface_model_types()
    except ImportError:
        model_types = []
    for model_type in model_types:
        f = describe_family(model_type)
        if f.experts_class is None and not f.problem.startswith("its default config builds no model"):
            continue  # a vision or audio part of a larger model, with no experts of its own
        if f.variant is None:
            out[model_type] = f"unknown: {f.problem}"
        else:
            out[model_type] = (f"{f.experts_class}: {f.variant.describe()}"
                               + ("" if f.problem is None else f"; not supported: {f.problem}"))
    for model_type in ARCHITECTURES:
        out.setdefault(model_type, "per-expert nn.Linear experts through kt_ops.patch_model (transformers 4.x)")
    return dict(sorted(out.items()))
