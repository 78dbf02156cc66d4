"""The routed experts computed by ``torch.ops.kt`` on the CPU: the "kt" implementation of
transformers' experts interface and KtExperts (the drop-in module for models of one's own),
both with an optional share of their experts on the GPU (:mod:`kt_ops.gpu_share`)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from kt_ops.api import NO_EXPERT, SWIGLU, Gate, PackedExperts, moe_sft, pack_experts
from kt_ops.devices import to_device
from kt_ops.expert_parallel import ExpertShard, sharded_experts
from kt_ops.models.variants import ExpertsVariant, experts_variant
from kt_ops.packed_weights import ExpertsLayout, PackedExpertWeight, packed_parameters, to_canonical

# The fused-layout LoRA parameters of KtExperts, and the per-expert ones (transformers 4.x).
FUSED_LORA = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")


PER_EXPERT_LORA = ("lora_gate_A", "lora_gate_B", "lora_up_A", "lora_up_B", "lora_down_A", "lora_down_B")


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
        return routed_experts(self, self.packed, hidden_states, top_k_index, top_k_weights, self.lora_tensors(),
                              self.scaling)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"r={self.rank}, alpha={self.alpha:g}, layout={'per_expert' if self.per_expert else 'fused'}, "
                f"numa_slices={self.packed.numa_slices}")


# ---------------------------------------------------------------- the "kt" experts implementation

EXPERTS_IMPLEMENTATION = "kt"  # the name under transformers' experts interface


def _base_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s own parameter ``name``, not its parametrized value (reading that would form
    PEFT's ``W + s B A``)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return module._parameters[name]


def _set_base_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    if parametrize.is_parametrized(module, name):
        module.parametrizations[name].original = value
    else:
        module._parameters[name] = value


def supported_variant(module: nn.Module) -> ExpertsVariant:
    variant = experts_variant(module)
    reason = variant.unsupported()
    if reason is not None:
        model_type = getattr(getattr(module, "config", None), "model_type", "?")
        raise ValueError(f"kt_ops: the kt experts implementation cannot compute {model_type}'s "
                         f"{parametrize.type_before_parametrizations(module).__name__} ({variant.describe()}): "
                         f"{reason}. Choose another "
                         "experts_implementation for this model")
    return variant


# The bias parameters of an experts module of the interface with has_bias set.
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")


def _canonical_biases(module: nn.Module, layout: ExpertsLayout, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's (gate/up bias [E, 2I], gate columns then up columns; down bias [E, H]) on
    ``device``."""
    gate_up, down = (to_device(getattr(module, name), device) for name in EXPERT_BIASES)
    if not layout.concatenated:
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
    return gate_up, down


def _layout(variant: ExpertsVariant) -> ExpertsLayout:
    return ExpertsLayout(variant.concatenated, variant.transposed)


def _stand_in(module: nn.Module) -> Optional[PackedExpertWeight]:
    """The packed stand-in of a module's ``gate_up_proj`` (:func:`use_packed_experts`), or None."""
    if not (parametrize.is_parametrized(module, "gate_up_proj") or "gate_up_proj" in module._parameters):
        return None
    gate_up = _base_parameter(module, "gate_up_proj")
    return gate_up if isinstance(gate_up, PackedExpertWeight) else None


def held_packed_experts(module: nn.Module) -> Optional[PackedExperts]:
    """The packed experts a module computes with: a KtExperts', or those an experts module of
    transformers' experts interface holds (:func:`use_packed_experts`); None for any other."""
    if isinstance(module, KtExperts):
        return module.packed
    stand_in = _stand_in(module)
    return None if stand_in is None else stand_in.packed


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> routed-experts module computed by the kt kernels (KtExperts, and the
    experts of transformers' experts interface holding packed weights), in model order."""
    return {name: m for name, m in model.named_modules() if held_packed_experts(m) is not None}


def packed_experts_in(model: nn.Module) -> list[PackedExperts]:
    """Every distinct PackedExperts a model's experts compute with, in model order."""
    found: dict[int, PackedExperts] = {}
    for module in experts_modules(model).values():
        packed = held_packed_experts(module)
        found.setdefault(id(packed), packed)
    return list(found.values())


def expert_shard_of(module: nn.Module) -> Optional[ExpertShard]:
    """Which of its experts an experts module holds on this host, when they are spread over
    hosts (:mod:`kt_ops.expert_parallel`); None when it holds them all."""
    stand_in = _stand_in(module)
    return None if stand_in is None else stand_in.shard


def install_packed_experts(module: nn.Module, packed: PackedExperts) -> None:
    """Makes an experts module that holds packed experts (a KtExperts, or one of transformers'
    experts interface after :func:`use_packed_experts`) compute with ``packed`` instead, the
    same experts held elsewhere (in shared memory, say); its parameters stay the same objects."""
    if isinstance(module, KtExperts):
        module.packed = packed
        return
    for name in ("gate_up_proj", "down_proj"):
        stand_in = _base_parameter(module, name)
        if not isinstance(stand_in, PackedExpertWeight):
            raise TypeError(f"kt_ops: {type(module).__name__}.{name} holds no packed experts")
        stand_in.packed, stand_in._serialized = packed, None


def packed_experts_of(module: nn.Module, layout: ExpertsLayout, numa_nodes: int = 0,
                      dtype: Optional[torch.dtype] = None, experts_format: str = "bf16") -> PackedExperts:
    """The packed experts of an experts module of transformers' experts interface, of weight
    layout ``layout``. The first call packs its weights (from whatever device they are on;
    ``numa_nodes`` and ``experts_format`` as :func:`kt_ops.pack_experts` takes them as
    ``numa_nodes`` and ``format``) and puts PackedExpertWeight
    stand-ins of ``dtype`` (default: the weights' own) in place of its ``gate_up_proj`` and
    ``down_proj``, so the bf16 weights are held once, in CPU memory; later calls return what
    those stand-ins hold."""
    gate_up, down = _base_parameter(module, "gate_up_proj"), _base_parameter(module, "down_proj")
    if isinstance(gate_up, PackedExpertWeight) and isinstance(down, PackedExpertWeight) and gate_up.packed is down.packed:
        return gate_up.packed
    weights = [w.detach().to("cpu", torch.bfloat16).contiguous() for w in to_canonical(gate_up, down, layout)]
    packed = pack_experts(*weights, numa_nodes, format=experts_format)
    _install(module, packed, layout, dtype or gate_up.dtype)
    return packed


def _install(module: nn.Module, packed: PackedExperts, layout: ExpertsLayout, dtype: torch.dtype,
             shard: Optional[ExpertShard] = None) -> None:
    for name, param in zip(("gate_up_proj", "down_proj"), packed_parameters(packed, layout, dtype, shard)):
        _set_base_parameter(module, name, param)


def use_packed_experts(module: nn.Module, packed: Optional[PackedExperts] = None, numa_nodes: int = 0,
                       dtype: Optional[torch.dtype] = None, experts_format: str = "bf16",
                       shard: Optional[ExpertShard] = None) -> None:
    """Makes an experts module of transformers' experts interface hold its weights packed:
    ``packed`` (from :func:`kt_ops.load_experts`; the module's own weights are then never
    read, so they may be on the meta device; the caller has checked their sizes against the
    module's), or its own weights packed now in ``experts_format``. The stand-ins show as
    ``dtype`` (default: the module's weights' dtype). With ``shard``, ``packed`` holds this
    host's share of the experts (:mod:`kt_ops.expert_parallel`). Raises ValueError, changing
    nothing, for a variant the kt kernels cannot compute."""
    layout = _layout(supported_variant(module))
    if packed is None:
        packed_experts_of(module, layout, numa_nodes, dtype, experts_format)
        return
    _install(module, packed, layout, dtype or _base_parameter(module, "gate_up_proj").dtype, shard)


def _lora_factors(module: nn.Module, name: str, transposed: bool
                  ) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A [E, r, in], B [E, out, r], scaling) of the PEFT LoRA active on parameter ``name``
    during this forward (PEFT's ``target_parameters`` LoRA parametrizes the parameter with its
    low-rank factors), or None when there is none."""
    if not parametrize.is_parametrized(module, name):
        return None
    terms = list(module.parametrizations[name])
    if len(terms) != 1 or not all(hasattr(terms[0], a) for a in ("lhs", "rhs", "scaling")):
        raise ValueError(f"kt_ops: {type(module).__name__}.{name} is parametrized by {[type(t).__name__ for t in terms]}; "
                         "the kt experts take one LoRA adapter at a time, as its low-rank factors (PEFT does so "
                         "with one active adapter)")
    lhs, rhs, scaling = terms[0].lhs, terms[0].rhs, float(terms[0].scaling)
    # PEFT's delta is scaling * lhs @ rhs: B A for [E, out, in] weights, (B A)^T for transposed ones.
    a, b = (lhs.transpose(1, 2), rhs.transpose(1, 2)) if transposed else (rhs, lhs)
    return a, b, scaling


def kt_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "kt" experts implementation: ``self``'s routed experts through ``torch.ops.kt`` on
    the CPU, with the LoRA PEFT puts on its ``gate_up_proj`` / ``down_proj`` computed from its
    factors (no ``B A`` is ever formed). Inputs may be on any device; the result comes back on
    theirs. Expert ids of ``num_experts`` or more are skipped, as the interface's other
    implementations skip them."""
    variant = supported_variant(self)
    layout = _layout(variant)
    packed = packed_experts_of(self, layout)
    cpu = torch.device("cpu")
    gate_up_bias, down_bias = _canonical_biases(self, layout, cpu) if variant.bias else (None, None)
    gate_up = _lora_factors(self, "gate_up_proj", layout.transposed)
    down = _lora_factors(self, "down_proj", layout.transposed)
    scaling = gate_up[2] if gate_up else down[2] if down else 1.0
    lora = [None] * 6
    if gate_up is not None:
        a, b, _ = (to_device(t, cpu) if isinstance(t, torch.Tensor) else t for t in gate_up)
        i = packed.intermediate_size
        b_gate, b_up = (b[:, :i], b[:, i:]) if layout.concatenated else (b[:, 0::2], b[:, 1::2])
        lora[:4] = [a, b_gate, a, b_up]
    if down is not None:
        a, b, s = (to_device(t, cpu) if isinstance(t, torch.Tensor) else t for t in down)
        lora[4:] = [a, b if s == scaling else b * (s / scaling)]
    return routed_experts(self, packed, hidden_states, top_k_index, top_k_weights, lora, scaling,
                          gate=variant.kernel_gate, gate_up_bias=gate_up_bias, down_bias=down_bias)


def routed_experts(module: nn.Module, packed: PackedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, lora: list, scaling: float, *, gate: Gate = SWIGLU,
                   gate_up_bias: Optional[torch.Tensor] = None,
                   down_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output of an experts module whose experts are ``packed``: :func:`kt_ops.moe_sft` on
    the CPU for every routing slot, or, where the module holds a share of its experts on the
    GPU (:mod:`kt_ops.gpu_share`), the share's slots there and the rest on the CPU, summed;
    where the experts are spread over hosts, each slot on its expert's host
    (:mod:`kt_ops.expert_parallel`). The
    result comes back in the device and dtype of ``hidden_states``. Ids of ``num_experts`` or
    more are the experts interface's sentinels (a "no expert" slot, or an expert held
    elsewhere): they add nothing and pass no gradient to their weight."""
    cpu = torch.device("cpu")
    shard = expert_shard_of(module)
    total = packed.num_experts if shard is None else shard.total
    ids = top_k_index.masked_fill(top_k_index >= total, NO_EXPERT)

    def on_cpu(x_cpu: torch.Tensor, cpu_ids: torch.Tensor, weights_cpu: torch.Tensor) -> torch.Tensor:
        if shard is not None:
            return sharded_experts(shard, packed, x_cpu, cpu_ids, weights_cpu, lora, scaling, gate, gate_up_bias,
                                   down_bias)
        return moe_sft(x_cpu, cpu_ids, weights_cpu, packed, lora, scaling, gate=gate, gate_up_bias=gate_up_bias,
                       down_bias=down_bias)

    from kt_ops.gpu_share import shared_experts_of  # the share's room builds on this one

    share = shared_experts_of(module)
    if share is None:
        y = on_cpu(to_device(hidden_states, cpu), ids.to(cpu), to_device(top_k_weights, cpu))
        return to_device(y, hidden_states.device)
    routing = share.route(ids)
    cpu_work = routing.cpu_has_work or not len(routing.pairs)
    # x and the weights cross to the CPU before the share's kernels are queued, so that the
    # copies wait for nothing else, and the GPU computes the share while the CPU computes the rest.
    crossed = (to_device(hidden_states, cpu), to_device(top_k_weights, cpu)) if cpu_work else None
    y = share.forward(hidden_states, top_k_weights, routing, lora, scaling, gate, gate_up_bias, down_bias)
    if crossed is not None:
        y_cpu = to_device(on_cpu(crossed[0], routing.cpu_ids, crossed[1]), share.device).float()
        y = y_cpu if y is None else y + y_cpu
    return to_device(y.to(hidden_states.dtype), hidden_states.device)


def register_experts_implementation() -> bool:
    """Registers :func:`kt_experts_forward` as the "kt" experts implementation of the installed
    transformers (``from_pretrained(..., experts_implementation="kt")``,
    ``model.set_experts_implementation("kt")``). False where transformers has no experts
    interface (4.x)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, kt_experts_forward)
    return True
