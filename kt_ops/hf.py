"""Model surgery on Hugging Face MoE models: routed experts on the CPU through torch.ops.kt,
LoRA on every expert's gate/up/down projections, adapters in PEFT's format.

Only the routed experts are replaced. The router, shared experts, attention and everything
else stay the model's own modules, so routing (softmax or sigmoid scores, normalisation,
group-limited top-k, score correction bias, routed scaling factor) and the router logits and
auxiliary loss are exactly what the model computes, and the routing weights carry gradients
into the router through the kt op's backward.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import types
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from kt_ops.api import PackedExperts, moe_sft, pack_experts
from kt_ops.files import read_json, replacing


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

# PEFT names of the fused expert parameters, in the order the experts modules define them.
# PEFT wraps the first one innermost (its keys carry "base_layer."), whatever the order in
# adapter_config.json.
FUSED_PARAMETERS = ("gate_up_proj", "down_proj")
ROUTER = "gate"  # the router module beside the experts in every family
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names

# The fused-layout LoRA parameters of KtExperts, and the per-expert ones (transformers 4.x).
FUSED_LORA = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")
PER_EXPERT_LORA = ("lora_gate_A", "lora_gate_B", "lora_up_A", "lora_up_B", "lora_down_A", "lora_down_B")


@dataclass(frozen=True)
class ExpertLoraConfig:
    """LoRA on the routed experts: rank ``r`` and ``lora_alpha`` (scaling = alpha / r)."""

    r: int = 16
    lora_alpha: float = 32.0
    train_router: bool = True


def _family(model: nn.Module) -> tuple[str, Family]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"kt_ops: no MoE family for model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))} (add one to kt_ops.hf.ARCHITECTURES)")
    return model_type, ARCHITECTURES[model_type]


class _ViaPinnedMemory(torch.autograd.Function):
    """Moves a tensor between a CUDA device and the CPU through page-locked staging buffers
    (asynchronous DMA rather than a pageable copy); the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        ctx.source = t.device
        return _copy_via_pinned(t, device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _copy_via_pinned(grad, ctx.source), None


def _copy_via_pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    if device.type == "cpu":
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()  # the CPU reads it next
        return staged
    staged.copy_(t)
    # The caching host allocator keeps the staging buffer until the copy has run.
    return staged.to(device, non_blocking=True)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if "cuda" in (t.device.type, device.type):
        return _ViaPinnedMemory.apply(t, device)
    return t.to(device)


class KtExperts(nn.Module):
    """A routed-experts module computed by ``torch.ops.kt`` on the CPU.

    It is called like the transformers 5.x experts modules:
    ``experts(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]``,
    on any device. The expert work runs on the CPU; from and to a CUDA device the tensors
    cross through pinned staging buffers, and the result returns in the input's device and
    dtype. The frozen weights are held packed (``self.packed``), outside the module's
    parameters and buffers, and the LoRA parameters stay fp32 on the CPU: ``model.to(...)``
    never moves, casts or copies this module.

    LoRA parameters follow PEFT's LoRA on the layout they replace, with s = alpha / r:

    - fused (transformers 5.x; ``target_parameters`` LoRA): per expert e,
      ``gate_up_proj[e] += s * lora_gate_up_B[e] @ lora_gate_up_A[e]`` (one A shared by gate
      and up, B of 2I rows: gate rows first) and ``down_proj[e] += s * lora_down_B[e] @
      lora_down_A[e]``;
    - per expert (``per_expert=True``, transformers 4.x ``nn.Linear`` lists;
      ``target_modules`` LoRA): ``lora_gate_A/B``, ``lora_up_A/B``, ``lora_down_A/B``, A
      ``[E, r, in]`` and B ``[E, out, r]``, one A per projection.
    """

    def __init__(self, packed: PackedExperts, hidden_size: int, rank: int, alpha: float, *,
                 per_expert: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"kt_ops: lora_rank must be >= 1, got {rank}")
        self.packed = packed
        self.hidden_size = hidden_size
        self.intermediate_size = packed.intermediate_size
        self.num_experts = packed.num_experts
        self.rank, self.alpha = rank, float(alpha)
        self.per_expert = per_expert
        e, h, i = self.num_experts, hidden_size, self.intermediate_size
        shapes = {"gate_up_A": (e, rank, h), "gate_up_B": (e, 2 * i, rank), "gate_A": (e, rank, h),
                  "gate_B": (e, i, rank), "up_A": (e, rank, h), "up_B": (e, i, rank),
                  "down_A": (e, rank, i), "down_B": (e, h, rank)}
        for name in self.lora_names:
            # PEFT's default: A as nn.Linear's kaiming-uniform init (bound 1/sqrt(in)), B zero,
            # so a fresh adapter leaves the model's function unchanged.
            shape = shapes[name[len("lora_"):]]
            p = nn.Parameter(torch.zeros(shape))
            if name.endswith("A"):
                nn.init.uniform_(p, -1 / math.sqrt(shape[-1]), 1 / math.sqrt(shape[-1]))
            setattr(self, name, p)

    @property
    def lora_names(self) -> tuple[str, ...]:
        """Names of this module's LoRA parameters."""
        return PER_EXPERT_LORA if self.per_expert else FUSED_LORA

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def lora_tensors(self) -> list[torch.Tensor]:
        """(A_g, B_g, A_u, B_u, A_d, B_d), each ``[E, ...]``, as kt_ops.moe_sft takes them."""
        if self.per_expert:
            return [getattr(self, n) for n in PER_EXPERT_LORA]
        i = self.intermediate_size
        a_gu, b_gu = self.lora_gate_up_A, self.lora_gate_up_B
        return [a_gu, b_gu[:, :i], a_gu, b_gu[:, i:], self.lora_down_A, self.lora_down_B]

    def check_lora(self, tensors: list[torch.Tensor], source: str) -> None:
        """Raises unless (A_g, B_g, A_u, B_u, A_d, B_d) can be this module's LoRA: the shapes of
        :meth:`lora_tensors`, and in the fused layout A_g equal to A_u (``source`` names them
        in the error)."""
        for name, dst, src in zip(("A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down"), self.lora_tensors(), tensors):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"kt_ops.load_adapter: {source}: {name} has shape {tuple(src.shape)}, expected "
                                 f"{tuple(dst.shape)}")
        if not self.per_expert and not torch.equal(tensors[0], tensors[2]):
            raise ValueError(f"kt_ops.load_adapter: {source}: gate and up have different lora_A; the fused "
                             "experts of this model share one A between gate and up (PEFT's target_parameters "
                             "LoRA on gate_up_proj)")

    @torch.no_grad()
    def set_lora(self, tensors: list[torch.Tensor]) -> None:
        """Sets (A_g, B_g, A_u, B_u, A_d, B_d), which :meth:`check_lora` has accepted."""
        for dst, src in zip(self.lora_tensors(), tensors):
            dst.copy_(src)

    def _apply(self, fn, recurse=True):
        # The LoRA stays beside the packed experts, fp32 in CPU memory, where the kt op reads it
        # and writes its gradients (so its optimizer state stays there too): model.to("cuda"),
        # .bfloat16() and the like leave this module as it is.
        return self

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        cpu = torch.device("cpu")
        y = moe_sft(_to_device(hidden_states, cpu), top_k_index.cpu(), _to_device(top_k_weights, cpu),
                    self.packed, self.lora_tensors(), self.scaling)
        return _to_device(y, hidden_states.device)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"r={self.rank}, alpha={self.alpha:g}, layout={'per_expert' if self.per_expert else 'fused'}, "
                f"numa_slices={self.packed.numa_slices}")


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


def _is_expert_list(m: nn.Module, family: Family) -> bool:
    return (isinstance(m, nn.ModuleList) and len(m) > 0
            and all(isinstance(getattr(m[0], p, None), nn.Linear) for p in family.expert_linears))


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> routed-experts module of every MoE layer, in model order: transformers
    5.x fused experts modules, 4.x per-expert ``nn.ModuleList``s, or the KtExperts that
    replaced either."""
    _, family = _family(model)
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


def _experts_shape(experts: nn.Module, family: Family) -> tuple[int, int, int]:
    """(E, H, I) of an unpatched experts module, read from shapes only (weights may be on meta)."""
    if isinstance(experts, nn.ModuleList):
        down = getattr(experts[0], family.expert_linears[2]).weight
        return len(experts), down.shape[0], down.shape[1]
    return tuple(experts.down_proj.shape)


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
    _, family = _family(model)
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
        e, h, i = _experts_shape(module, family)
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


def _keep_expert_outputs(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op is torch.ops.kt.moe_sft_forward.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_kwargs() -> dict[str, Any]:
    """``gradient_checkpointing_kwargs`` for a patched model (``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=kt_ops.checkpointing_kwargs())`` or transformers'
    ``TrainingArguments``): the backward recomputes the layers' other modules (attention, on the
    GPU, whose activations are what checkpointing saves) but not the kt experts' forward, whose
    results are kept: they are the costly part of a layer, and what they keep for the backward
    is in CPU memory anyway."""
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return {"use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_expert_outputs)}


def lora_state_dict(model: nn.Module, *, gradients: bool = False) -> dict[str, torch.Tensor]:
    """The expert LoRA tensors as PEFT saves them for this model, fp32 on the CPU: keys and
    layouts of ``target_parameters`` LoRA on ``gate_up_proj`` / ``down_proj`` for fused
    experts, of ``target_modules`` LoRA on each expert's ``nn.Linear`` for per-expert lists.
    With ``gradients=True``, the same for the tensors' ``.grad`` (to compare with a PEFT
    model's gradients)."""
    _, family = _family(model)
    out = {}
    for name, m in moe_layers(model).items():
        if not isinstance(m, KtExperts):
            raise ValueError(f"kt_ops: {name} is not patched (call kt_ops.patch_model first)")
        prefix = f"base_model.model.{_unwrapped_name(name)}."
        value = {n: (getattr(m, n).grad if gradients else getattr(m, n)) for n in m.lora_names}
        if m.per_expert:
            for e in range(m.num_experts):
                for proj, stem in zip(family.expert_linears, ("gate", "up", "down")):
                    for ab in "AB":
                        out[f"{prefix}{e}.{proj}.lora_{ab}.weight"] = value[f"lora_{stem}_{ab}"][e].detach().cpu().float()
            continue
        for depth, stem in enumerate(("gate_up", "down")):
            base = "base_layer." * (len(FUSED_PARAMETERS) - 1 - depth)
            out[prefix + base + "lora_A.weight"], out[prefix + base + "lora_B.weight"] = to_peft_layout(
                value[f"lora_{stem}_A"], value[f"lora_{stem}_B"])
    return out


def to_peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KtExperts' fused-layout A [E, r, in] and B [E, out, r] as PEFT's fused-experts
    ``lora_A.weight`` [E*r, in] (rows expert-major) and ``lora_B.weight`` [out, r*E] (column
    j*E + e is rank j of expert e); fp32 on the CPU."""
    e, r = a.shape[0], a.shape[1]
    a_w = a.detach().cpu().float().reshape(e * r, -1).contiguous()
    b_w = b.detach().cpu().float().permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()
    return a_w, b_w


def _unwrapped_name(name: str) -> str:
    """A module path inside a PeftModel ("base_model.model.model.layers.0...") as inside the
    plain model ("model.layers.0...")."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _per_expert_targets(family: Family, user_targets: Any) -> str:
    """PEFT ``target_modules`` regex matching every routed expert's linears exactly (not the
    shared experts' or dense layers' ones), plus the user's own targets."""
    experts = rf".*\.{re.escape(family.expert_list)}\.\d+\.({'|'.join(family.expert_linears)})"
    if not user_targets:
        return experts
    if isinstance(user_targets, str):  # already a regex
        return f"(?:{user_targets})|(?:{experts})"
    # PEFT's list matching: the module name is the target or ends with "." + target.
    return f"(?:(.*\\.)?({'|'.join(map(re.escape, sorted(user_targets)))}))|(?:{experts})"


def save_adapter(model: nn.Module, out_dir: Union[str, os.PathLike]) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's format.

    Stock PEFT loads it with ``PeftModel.from_pretrained(unpatched_model, out_dir)``: LoRA
    through ``target_parameters`` on fused experts (transformers 5.x), through
    ``target_modules`` on each expert's ``nn.Linear`` for per-expert lists (4.x). If the user
    also wrapped the patched model with PEFT LoRA on other modules (attention, say), those
    tensors and their targets are saved in the same adapter. Routers that train (the
    default of :func:`patch_model`) are saved whole, as PEFT's ``modules_to_save``.
    """
    import peft
    from safetensors.torch import save_file

    tensors = lora_state_dict(model)
    m = next(iter(moe_layers(model).values()))
    user_targets: Any = []
    if isinstance(model, peft.PeftModel):
        user_cfg = model.peft_config[model.active_adapter]
        if user_cfg.r != m.rank or user_cfg.lora_alpha != m.alpha:
            raise ValueError(f"kt_ops.save_adapter: PEFT LoRA on other modules has r={user_cfg.r}, "
                             f"alpha={user_cfg.lora_alpha}; the experts have r={m.rank}, alpha={m.alpha:g}. "
                             "One adapter file holds one r and alpha")
        user_targets = user_cfg.target_modules or []
        for k, v in peft.get_peft_model_state_dict(model).items():
            tensors[k] = v.detach().cpu().contiguous()
    routers = trained_routers(model)
    for block, gate in routers.items():
        for k, v in gate.state_dict().items():
            tensors[f"base_model.model.{block}.{ROUTER}.{k}"] = v.detach().cpu().contiguous()
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    _, family = _family(base)
    if m.per_expert:
        targets = dict(target_modules=_per_expert_targets(family, user_targets))
    else:
        targets = dict(target_modules=sorted(user_targets) if not isinstance(user_targets, str) else user_targets,
                       target_parameters=[f"{family.experts}.{p}" for p in FUSED_PARAMETERS])
    if routers:  # PEFT's whole-module copies, saved as "<module>.<tensor>" as here; PEFT matches
        # names by suffix, so "mlp.gate" (not "gate", which would take shared_expert_gate too).
        targets["modules_to_save"] = sorted({".".join(b.split(".")[-1:] + [ROUTER]) for b in routers})
    cfg = peft.LoraConfig(r=m.rank, lora_alpha=m.alpha, lora_dropout=0.0, **targets,
                          base_model_name_or_path=getattr(base.config, "_name_or_path", None) or None)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Tensors first, config last, each written whole: a directory with a config always has
    # the tensors that config describes (a kill in between leaves the previous config).
    with replacing(os.path.join(out_dir, ADAPTER_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as staging:
        cfg.save_pretrained(staging)  # PEFT's own serialisation of its config
        with replacing(os.path.join(out_dir, ADAPTER_CONFIG)) as tmp:
            os.replace(os.path.join(staging, ADAPTER_CONFIG), tmp)


# LoraConfig fields that change what an adapter computes in ways kt_ops's experts do not:
# refused rather than ignored.
_UNSUPPORTED_LORA = {"use_dora": "DoRA", "use_rslora": "rank-stabilised scaling", "lora_bias": "LoRA biases",
                     "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas"}


def read_adapter_config(in_dir: Union[str, os.PathLike], caller: str = "kt_ops.load_adapter") -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter directory, checked: ``r`` a positive
    integer, ``lora_alpha`` a positive number, ``target_modules`` a string or a list of
    strings (or absent), ``target_parameters`` and ``modules_to_save`` lists of strings (or
    absent), and none of the options kt_ops's experts cannot compute (DoRA, rsLoRA, LoRA
    biases, per-module ranks or alphas). ValueError naming the file and the field otherwise."""
    path = os.path.join(os.fspath(in_dir), ADAPTER_CONFIG)
    cfg = read_json(path, caller)
    if not isinstance(cfg, dict):
        raise ValueError(f"{caller}: {path} must hold a JSON object, got {type(cfg).__name__}")

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"{caller}: {path}: \"{field}\" must be {expected}, got {json.dumps(cfg.get(field))[:80]}")

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(cfg.get("r"), int) and not isinstance(cfg["r"], bool) and cfg["r"] > 0):
        raise bad("r", "a positive integer")
    if not (is_number(cfg.get("lora_alpha")) and cfg["lora_alpha"] > 0):
        raise bad("lora_alpha", "a positive number")
    targets = cfg.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise bad("target_modules", "a string, a list of strings or null")
    for field in ("target_parameters", "modules_to_save"):
        value = cfg.get(field)
        if not (value is None or (isinstance(value, list) and all(isinstance(t, str) for t in value))):
            raise bad(field, "a list of strings or null")
    for field, what in _UNSUPPORTED_LORA.items():
        if cfg.get(field):
            raise ValueError(f"{caller}: {path}: \"{field}\" is set; kt_ops computes plain LoRA and cannot load "
                             f"{what}")
    return cfg


def _read_adapter_tensors(in_dir: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors, each a finite floating-point tensor (ValueError naming the key)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(in_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"kt_ops.load_adapter: {path}: no such file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"kt_ops.load_adapter: {path} is not a readable safetensors file ({e})") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"kt_ops.load_adapter: {key} in {path} is {str(t.dtype).removeprefix('torch.')}; "
                             "adapter tensors must be floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"kt_ops.load_adapter: {key} in {path} holds NaN or infinite values")
    return tensors


def load_adapter(model: nn.Module, in_dir: Union[str, os.PathLike]) -> nn.Module:
    """Loads a PEFT-format adapter (written by :func:`save_adapter` or by PEFT itself) into
    a patched model; returns the model (wrapped in a ``peft.PeftModel`` if the adapter has
    LoRA on other modules than the experts and ``model`` is not one yet).

    The layout is read from ``adapter_config.json`` (checked by
    :func:`read_adapter_config`): ``target_parameters`` LoRA on fused ``gate_up_proj`` /
    ``down_proj``, or per-expert ``target_modules`` LoRA (``experts.{e}.gate_proj`` ... as
    PEFT writes for transformers 4.x models). Either loads into either kind of patched model,
    except that fused 5.x experts share one A between gate and up, so a per-expert adapter
    whose gate and up A differ cannot load there. Rank, alpha and every tensor's shape must
    match the patched model, every expert LoRA tensor must be present, and every tensor must
    be finite floating point: a mismatch or a missing key raises an error naming it. Routers
    saved as ``modules_to_save`` are loaded in place; LoRA on other modules (attention, say)
    goes through PEFT; a tensor that none of these takes is an error too.

    All or nothing: everything is read and checked before the first value of the model is
    changed, so an adapter that does not fit leaves the model as it was.
    """
    in_dir = os.fspath(in_dir)
    cfg = read_adapter_config(in_dir)
    tensors = _read_adapter_tensors(in_dir)
    _, family = _family(model)
    layers = moe_layers(model)
    for name, m in layers.items():
        if not isinstance(m, KtExperts):
            raise ValueError(f"kt_ops.load_adapter: {name} is not patched (call kt_ops.patch_model first)")
        if cfg["r"] != m.rank or float(cfg["lora_alpha"]) != m.alpha:
            raise ValueError(f"kt_ops.load_adapter: adapter has r={cfg['r']}, lora_alpha={cfg['lora_alpha']}; "
                             f"{name} has r={m.rank}, alpha={m.alpha:g}")
    targets = cfg.get("target_parameters") or []
    fused = [p for p in FUSED_PARAMETERS if any(t == p or t.endswith("." + p) for t in targets)]
    if fused and len(fused) != len(FUSED_PARAMETERS):
        raise ValueError(f"kt_ops.load_adapter: adapter targets {fused} only; the kt experts carry LoRA on "
                         f"{list(FUSED_PARAMETERS)}")

    # Plan: every value the model will take, read and checked; nothing is written yet.
    expert_values = {}
    for name, m in layers.items():
        values = _read_fused(tensors, name, m) if fused else _read_per_expert(tensors, name, m, family)
        m.check_lora(values, name)
        expert_values[name] = values
    saved_whole = cfg.get("modules_to_save") or []
    router_values = []
    for name in layers:
        block = name.rpartition(".")[0]
        router = f"{_unwrapped_name(block)}.{ROUTER}"
        if any(router.endswith(t) for t in saved_whole):  # PEFT's suffix match
            for k, v in model.get_submodule(block).get_submodule(ROUTER).state_dict().items():
                router_values.append((v, _take(tensors, f"base_model.model.{router}.{k}", tuple(v.shape))))
    other_lora = _plan_other_lora(model, cfg, tensors) if tensors else None

    # Apply: nothing below can fail on the adapter's contents.
    for name, m in layers.items():
        m.set_lora(expert_values[name])
    with torch.no_grad():
        for dst, value in router_values:
            dst.copy_(value)
    if other_lora is not None:
        model = other_lora()
    return model


def _plan_other_lora(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor]):
    """Checks the adapter's PEFT LoRA on modules other than the experts (attention, say)
    against the model, and returns the function that loads it (wrapping ``model`` with PEFT
    first if it is not a PeftModel yet). Raises before any change if a key has no module to
    take it, a module PEFT would wrap has no tensors, or a shape differs."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    r = cfg["r"]
    if isinstance(model, peft.PeftModel):
        expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items()
                    if re.search(r"\.lora_[AB]\.", k)}
    else:
        if not cfg.get("target_modules"):
            raise KeyError(f"kt_ops.load_adapter: unexpected keys {sorted(tensors)[:3]}: the adapter has no "
                           "target_modules for them")
        matcher = peft.LoraConfig(r=r, target_modules=cfg["target_modules"])
        expected = {}
        for name, module in model.named_modules():
            if not name or isinstance(module, KtExperts) or not check_target_module_exists(matcher, name):
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(f"kt_ops.load_adapter: target_modules takes {name}, a {type(module).__name__}; "
                                 "kt_ops loads PEFT LoRA on nn.Linear modules only")
            expected[f"base_model.model.{name}.lora_A.weight"] = (r, module.in_features)
            expected[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, r)
        if not expected:  # the targets name only the experts, say, which the patch replaced
            raise KeyError(f"kt_ops.load_adapter: unexpected keys {sorted(tensors)[:3]}: the adapter has no "
                           f"target_modules for them (its target_modules {cfg['target_modules']!r} match no module "
                           "of the model)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise KeyError(f"kt_ops.load_adapter: unexpected keys {unexpected[:3]}: no module of the model takes them")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise KeyError(f"kt_ops.load_adapter: missing key {missing[0]} (and {len(missing) - 1} more)")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"kt_ops.load_adapter: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")

    def load() -> nn.Module:
        wrapped = model if isinstance(model, peft.PeftModel) else add_peft_lora(model, r, cfg["lora_alpha"],
                                                                                cfg["target_modules"])
        peft.set_peft_model_state_dict(wrapped, tensors)
        return wrapped

    return load


def add_peft_lora(model: nn.Module, rank: int, alpha: float, target_modules: Any) -> nn.Module:
    """``model`` wrapped by PEFT with LoRA on ``target_modules`` (attention, say), beside the
    experts' LoRA; what trained before (the experts' LoRA, the routers) still trains, where
    PEFT alone would freeze all but its own LoRA."""
    import peft

    trainable = [p for p in model.parameters() if p.requires_grad]
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                       target_modules=target_modules))
    for p in trainable:
        p.requires_grad_(True)
    return model


def trained_routers(model: nn.Module) -> dict[str, nn.Module]:
    """``{MoE block name: router}`` for the routers with trainable parameters (block names as
    in the unwrapped model)."""
    out = {}
    for name in moe_layers(model):
        block = name.rpartition(".")[0]
        gate = model.get_submodule(block).get_submodule(ROUTER)
        if any(p.requires_grad for p in gate.parameters()):
            out[_unwrapped_name(block)] = gate
    return out


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Removes and returns ``tensors[key]`` as fp32, checking its shape; what no reader takes
    is left over."""
    if key not in tensors:
        raise KeyError(f"kt_ops.load_adapter: missing key {key}")
    t = tensors.pop(key)
    if tuple(t.shape) != shape:
        raise ValueError(f"kt_ops.load_adapter: {key} has shape {tuple(t.shape)}, expected {shape}")
    return t.float()


def _read_fused(tensors: dict[str, torch.Tensor], name: str, m: KtExperts) -> list[torch.Tensor]:
    """(A_g, B_g, A_u, B_u, A_d, B_d) of one layer from PEFT's fused-experts keys."""
    prefix = f"base_model.model.{_unwrapped_name(name)}."
    e, r, h, i = m.num_experts, m.rank, m.hidden_size, m.intermediate_size
    pairs = []
    for depth, (fan_in, fan_out) in enumerate([(h, 2 * i), (i, h)]):
        base = "base_layer." * (len(FUSED_PARAMETERS) - 1 - depth)
        a_w = _take(tensors, prefix + base + "lora_A.weight", (e * r, fan_in))
        b_w = _take(tensors, prefix + base + "lora_B.weight", (fan_out, r * e))
        pairs.append((a_w.reshape(e, r, fan_in), b_w.reshape(fan_out, r, e).permute(2, 0, 1)))
    (a_gu, b_gu), (a_d, b_d) = pairs
    return [a_gu, b_gu[:, :i], a_gu, b_gu[:, i:], a_d, b_d]


def _read_per_expert(tensors: dict[str, torch.Tensor], name: str, m: KtExperts, family: Family) -> list[torch.Tensor]:
    """(A_g, B_g, A_u, B_u, A_d, B_d) of one layer from PEFT LoRA keys on per-expert nn.Linear
    modules (``...experts.{e}.gate_proj.lora_A.weight``)."""
    layer = _unwrapped_name(name)
    for suffix in (family.experts, family.expert_list):
        if layer.endswith("." + suffix):
            layer = layer[: -len(suffix)]
            break
    prefix = f"base_model.model.{layer}{family.expert_list}."
    i, h, r = m.intermediate_size, m.hidden_size, m.rank
    shapes = {"A": [(r, h), (r, h), (r, i)], "B": [(i, r), (i, r), (h, r)]}
    out = []
    for j, proj in enumerate(family.expert_linears):
        for ab in "AB":
            out.append(torch.stack([_take(tensors, f"{prefix}{e}.{proj}.lora_{ab}.weight", shapes[ab][j])
                                    for e in range(m.num_experts)]))
    return out
