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
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from kt_ops.api import PackedExperts, moe_sft, pack_experts


@dataclass(frozen=True)
class Family:
    """Where one MoE family keeps its routed experts and router, per decoder layer.

    ``experts`` and ``router`` are module paths inside a decoder layer (transformers 5.x
    fused experts: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). ``expert_linears``
    names the per-expert ``nn.Linear`` projections (gate, up, down) of the checkpoints and of
    transformers 4.x ModuleLists, under ``checkpoint_experts``.
    """

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    checkpoint_experts: str = "mlp.experts"
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


# model_type -> Family. Adding a family is one entry.
ARCHITECTURES: dict[str, Family] = {
    "qwen3_moe": Family(),
    "qwen2_moe": Family(),
    "mixtral": Family(checkpoint_experts="block_sparse_moe.experts", expert_linears=("w1", "w3", "w2")),
    "deepseek_v2": Family(),
    "deepseek_v3": Family(),
}

# PEFT names of the fused expert parameters, in the order the experts modules define them.
# PEFT wraps the first one innermost (its keys carry "base_layer."), whatever the order in
# adapter_config.json.
FUSED_PARAMETERS = ("gate_up_proj", "down_proj")


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


class KtExperts(nn.Module):
    """A routed-experts module computed by ``torch.ops.kt`` on the CPU.

    It is called like the transformers 5.x experts modules it replaces:
    ``experts(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]``,
    on any device; the expert work runs on the CPU and the result returns to the input's
    device and dtype. The frozen weights are held packed (``self.packed``), outside the
    module's parameters and buffers, so ``model.to(...)`` never moves or copies them.

    LoRA parameters follow PEFT's ``target_parameters`` LoRA on the fused weights, per expert
    e: ``gate_up_proj[e] += s * lora_gate_up_B[e] @ lora_gate_up_A[e]`` (one A shared by gate
    and up, B of 2I rows: gate rows first) and ``down_proj[e] += s * lora_down_B[e] @
    lora_down_A[e]``, with s = alpha / r.
    """

    def __init__(self, packed: PackedExperts, hidden_size: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"kt_ops: lora_rank must be >= 1, got {rank}")
        self.packed = packed
        self.hidden_size = hidden_size
        self.intermediate_size = packed.intermediate_size
        self.num_experts = packed.num_experts
        self.rank, self.alpha = rank, float(alpha)
        e, h, i = self.num_experts, hidden_size, self.intermediate_size
        self.lora_gate_up_A = nn.Parameter(torch.empty(e, rank, h))
        self.lora_gate_up_B = nn.Parameter(torch.zeros(e, 2 * i, rank))
        self.lora_down_A = nn.Parameter(torch.empty(e, rank, i))
        self.lora_down_B = nn.Parameter(torch.zeros(e, h, rank))
        # PEFT's default: A as nn.Linear's kaiming-uniform init (bound 1/sqrt(in)), B zero,
        # so a fresh adapter leaves the model's function unchanged.
        for a in (self.lora_gate_up_A, self.lora_down_A):
            nn.init.uniform_(a, -1 / math.sqrt(a.shape[-1]), 1 / math.sqrt(a.shape[-1]))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def lora_tensors(self) -> list[torch.Tensor]:
        """(A_g, B_g, A_u, B_u, A_d, B_d) for kt_ops.moe_sft, on the CPU: gate and up share A."""
        i = self.intermediate_size
        a_gu, b_gu = self.lora_gate_up_A.cpu(), self.lora_gate_up_B.cpu()
        return [a_gu, b_gu[:, :i], a_gu, b_gu[:, i:], self.lora_down_A.cpu(), self.lora_down_B.cpu()]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        device = hidden_states.device
        y = moe_sft(hidden_states.cpu(), top_k_index.cpu(), top_k_weights.cpu(), self.packed,
                    self.lora_tensors(), self.scaling)
        return y.to(device)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"r={self.rank}, alpha={self.alpha:g}, numa_slices={self.packed.numa_slices}")


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


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> experts module of every MoE layer (patched or not), in model order."""
    _, family = _family(model)
    suffix = "." + family.experts
    def is_experts(m: nn.Module) -> bool:
        fused = getattr(m, "gate_up_proj", None)
        return isinstance(m, KtExperts) or (isinstance(fused, torch.Tensor) and fused.dim() == 3)

    return {name: m for name, m in model.named_modules() if name.endswith(suffix) and is_experts(m)}


def patch_model(model: nn.Module, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None, *,
                config: Any = None, numa_nodes: int = 0,
                experts: Optional[dict[int, PackedExperts]] = None) -> nn.Module:
    """Replaces the routed experts of every MoE layer with :class:`KtExperts`, in place.

    Args:
        model: a transformers 5.x MoE model of a family in :data:`ARCHITECTURES`, with its
            expert weights on the CPU or any device (they are copied to the CPU and packed
            to bf16; the originals are released).
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
    ``config.train_router`` is False, the routers.
    """
    cfg = _resolve_config(lora_rank, lora_alpha, config)
    _, family = _family(model)
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"kt_ops.patch_model: the kt experts compute silu(g) * u; this model's hidden_act is {act!r}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"kt_ops.patch_model: found no fused experts module ('{family.experts}' with a 3-D "
                         "gate_up_proj) in the model; kt_ops supports transformers 5.x MoE models")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in layers.items():
        if isinstance(module, KtExperts):
            raise ValueError(f"kt_ops.patch_model: {name} is already patched")
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        e, h, i = down.shape
        if experts is None:
            packed = pack_experts(gate_up[:, :i].to("cpu", torch.bfloat16), gate_up[:, i:].to("cpu", torch.bfloat16),
                                  down.to("cpu", torch.bfloat16), numa_nodes)
        else:
            index = int(re.search(r"layers\.(\d+)\.", name).group(1))
            if index not in experts:
                raise KeyError(f"kt_ops.patch_model: experts has no layer {index} (for {name}); it has {sorted(experts)}")
            packed = experts[index]
            if (packed.num_experts, packed.intermediate_size) != (e, i):
                raise ValueError(f"kt_ops.patch_model: experts[{index}] holds {packed.num_experts} experts of "
                                 f"intermediate size {packed.intermediate_size}; {name} has {e} of {i}")
        device = gate_up.device if gate_up.device.type != "meta" else torch.device("cpu")
        new = KtExperts(packed, h, cfg.r, cfg.lora_alpha).to(device=device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        if cfg.train_router:
            decoder_layer = name[: -len(family.experts)]  # "model.layers.3."
            for p in model.get_submodule(decoder_layer + family.router).parameters():
                p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert LoRA tensors as PEFT saves them (keys and layouts of ``target_parameters``
    LoRA on ``gate_up_proj`` and ``down_proj``), fp32 on the CPU."""
    out = {}
    for name, m in moe_layers(model).items():
        if not isinstance(m, KtExperts):
            raise ValueError(f"kt_ops: {name} is not patched (call kt_ops.patch_model first)")
        prefix = f"base_model.model.{_unwrapped_name(name)}."
        e, r = m.num_experts, m.rank
        for depth, (a, b) in enumerate([(m.lora_gate_up_A, m.lora_gate_up_B), (m.lora_down_A, m.lora_down_B)]):
            base = "base_layer." * (len(FUSED_PARAMETERS) - 1 - depth)
            out[prefix + base + "lora_A.weight"], out[prefix + base + "lora_B.weight"] = to_peft_layout(a, b)
    return out


def to_peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KtExperts' A [E, r, in] and B [E, out, r] as PEFT's fused-experts ``lora_A.weight``
    [E*r, in] (rows expert-major) and ``lora_B.weight`` [out, r*E] (column j*E + e is rank j
    of expert e); fp32 on the CPU. Also maps gradients."""
    e, r = a.shape[0], a.shape[1]
    a_w = a.detach().cpu().float().reshape(e * r, -1).contiguous()
    b_w = b.detach().cpu().float().permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()
    return a_w, b_w


def _unwrapped_name(name: str) -> str:
    """A module path inside a PeftModel ("base_model.model.model.layers.0...") as inside the
    plain model ("model.layers.0...")."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def save_adapter(model: nn.Module, out_dir: Union[str, os.PathLike]) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's format.

    Stock PEFT loads it with ``PeftModel.from_pretrained(unpatched_model, out_dir)`` (LoRA
    through ``target_parameters`` on the fused experts). If the user also wrapped the patched
    model with PEFT LoRA on other modules (attention, say), those tensors and their
    ``target_modules`` are saved in the same adapter.
    """
    import peft
    from safetensors.torch import save_file

    tensors = lora_state_dict(model)
    layers = list(moe_layers(model).values())
    m = layers[0]
    target_modules: list[str] = []
    if isinstance(model, peft.PeftModel):
        user_cfg = model.peft_config[model.active_adapter]
        if user_cfg.r != m.rank or user_cfg.lora_alpha != m.alpha:
            raise ValueError(f"kt_ops.save_adapter: PEFT LoRA on other modules has r={user_cfg.r}, "
                             f"alpha={user_cfg.lora_alpha}; the experts have r={m.rank}, alpha={m.alpha:g}. "
                             "One adapter file holds one r and alpha")
        target_modules = sorted(user_cfg.target_modules or [])
        for k, v in peft.get_peft_model_state_dict(model).items():
            tensors[k] = v.detach().cpu().contiguous()
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    cfg = peft.LoraConfig(r=m.rank, lora_alpha=m.alpha, lora_dropout=0.0, target_modules=target_modules,
                          target_parameters=[f"{ARCHITECTURES[base.config.model_type].experts}.{p}" for p in FUSED_PARAMETERS],
                          base_model_name_or_path=getattr(base.config, "_name_or_path", None) or None)
    os.makedirs(out_dir, exist_ok=True)
    cfg.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model: nn.Module, in_dir: Union[str, os.PathLike]) -> nn.Module:
    """Loads a PEFT-format adapter (written by :func:`save_adapter` or by PEFT itself) into
    the expert LoRA of a patched model; returns the model.

    The layout is read from ``adapter_config.json``: ``target_parameters`` LoRA on fused
    ``gate_up_proj`` / ``down_proj``, or per-expert ``target_modules`` LoRA
    (``experts.{e}.gate_proj`` ... as PEFT writes for transformers 4.x models). Rank, alpha
    and every tensor's shape must match the patched model, and every expert LoRA tensor must
    be present: a mismatch or a missing key raises an error naming it.
    """
    from safetensors.torch import load_file

    with open(os.path.join(in_dir, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    tensors = load_file(os.path.join(in_dir, "adapter_model.safetensors"))
    _, family = _family(model)
    layers = moe_layers(model)
    for name, m in layers.items():
        if not isinstance(m, KtExperts):
            raise ValueError(f"kt_ops.load_adapter: {name} is not patched (call kt_ops.patch_model first)")
        if cfg.get("r") != m.rank or float(cfg.get("lora_alpha")) != m.alpha:
            raise ValueError(f"kt_ops.load_adapter: adapter has r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}; "
                             f"{name} has r={m.rank}, alpha={m.alpha:g}")
    targets = cfg.get("target_parameters") or []
    fused = [p for p in FUSED_PARAMETERS if any(t == p or t.endswith("." + p) for t in targets)]
    if fused:
        if len(fused) != len(FUSED_PARAMETERS):
            raise ValueError(f"kt_ops.load_adapter: adapter targets {fused} only; the kt experts carry LoRA on "
                             f"{list(FUSED_PARAMETERS)}")
        _load_fused(layers, tensors)
    else:
        _load_per_expert(layers, tensors, family)
    return model


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise KeyError(f"kt_ops.load_adapter: missing key {key}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"kt_ops.load_adapter: {key} has shape {tuple(t.shape)}, expected {shape}")
    return t.float()


def _load_fused(layers: dict[str, KtExperts], tensors: dict[str, torch.Tensor]) -> None:
    for name, m in layers.items():
        prefix = f"base_model.model.{_unwrapped_name(name)}."
        e, r = m.num_experts, m.rank
        pairs = [(m.lora_gate_up_A, m.lora_gate_up_B), (m.lora_down_A, m.lora_down_B)]
        with torch.no_grad():
            for depth, (a, b) in enumerate(pairs):
                base = "base_layer." * (len(FUSED_PARAMETERS) - 1 - depth)
                a_w = _take(tensors, prefix + base + "lora_A.weight", (e * r, a.shape[2]))
                b_w = _take(tensors, prefix + base + "lora_B.weight", (b.shape[1], r * e))
                a.copy_(a_w.reshape(e, r, -1))
                b.copy_(b_w.reshape(b.shape[1], r, e).permute(2, 0, 1))


def _load_per_expert(layers: dict[str, KtExperts], tensors: dict[str, torch.Tensor], family: Family) -> None:
    """PEFT LoRA on per-expert nn.Linear modules: gate and up have separate A matrices there,
    which the fused layout holds only when they are equal."""
    gate, up, down = family.expert_linears
    ckpt_suffix = family.checkpoint_experts
    for name, m in layers.items():
        layer_prefix = f"base_model.model.{_unwrapped_name(name)[: -len(family.experts)]}{ckpt_suffix}."
        i, h, r = m.intermediate_size, m.hidden_size, m.rank
        with torch.no_grad():
            for e in range(m.num_experts):
                key = lambda proj, ab: f"{layer_prefix}{e}.{proj}.lora_{ab}.weight"  # noqa: E731
                a_g, a_u = _take(tensors, key(gate, "A"), (r, h)), _take(tensors, key(up, "A"), (r, h))
                if not torch.equal(a_g, a_u):
                    raise ValueError(f"kt_ops.load_adapter: {key(gate, 'A')} and {key(up, 'A')} differ; the kt "
                                     "experts share one A between gate and up (PEFT's fused-experts LoRA)")
                m.lora_gate_up_A[e].copy_(a_g)
                m.lora_gate_up_B[e, :i].copy_(_take(tensors, key(gate, "B"), (i, r)))
                m.lora_gate_up_B[e, i:].copy_(_take(tensors, key(up, "B"), (i, r)))
                m.lora_down_A[e].copy_(_take(tensors, key(down, "A"), (r, i)))
                m.lora_down_B[e].copy_(_take(tensors, key(down, "B"), (h, r)))
