"""A share of the routed experts held and computed on the GPU, beside the CPU's kt kernels.

Within a GPU memory budget, the most-routed experts of a model (counted over some batches with
:func:`count_routing`, or named by the user) keep a dequantized copy of their weights on the
GPU (:func:`share_experts`). An experts module with a share sends each routing slot of one
of those experts to the GPU and the rest to the kt op on the CPU (the op's ``NO_EXPERT`` slots
are the share's), and sums the two. The GPU's work is queued before the CPU's call starts and
runs while it computes. The LoRA stays one set of parameters in CPU memory: the rows of the
shared experts cross to the GPU each forward and their gradients come back through autograd,
so PEFT, the optimizer and the saved adapter see one adapter, whatever is shared.

On the GPU the experts are grouped GEMMs over the expert-sorted rows (``grouped_mm``), in the
dtype of the shared weights (the model's), with the LoRA factors and the gate computed as
:func:`kt_ops.reference.moe_sft_reference` defines them (the gate in fp32). The split depends
on the routing (the share's slot counts are read on the host), so a compiled graph breaks
around a layer with a share; layers without one stay a single kt op.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kt_ops.api import NO_EXPERT, Gate, PackedExperts
from kt_ops.devices import to_device
from kt_ops.experts import expert_shard_of, experts_modules, held_packed_experts
from kt_ops.reference import gate_reference

# The attribute of an experts module that holds its share (a GpuExperts), like ``packed``
# outside its parameters and buffers: ``model.to(...)`` neither moves nor copies it.
SHARE_ATTRIBUTE = "kt_gpu_experts"

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``16GiB``, ``500MB``, ``1.5g`` or ``0`` (decimal units for
    k/M/G/T and kB/MB/GB/TB, binary ones for KiB/MiB/GiB/TiB); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (expected a number and a unit such as 16GiB, 500MB or 0)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``3.9 MiB``, ``16.00 GiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{n} B"


def _grouped_mm_fits(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` takes rows ``a`` [N, in] against ``w`` [G, out, in]: its rows
    must be 16-byte aligned, and CUDA's kernel takes bf16 on Hopper and newer."""
    row = 16 // a.element_size()
    if a.shape[1] % row or w.shape[1] % row or a.dtype != w.dtype:
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    return a.device.type == "cpu"


def grouped_linear(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Rows of ``a`` [N, in] times ``w[g]^T`` [G, out, in] for the rows of group g, the groups
    consecutive (``offsets`` [G] int32 on a's device: each group's end; ``counts``: each
    group's rows, the same on the host) -> [N, out] in a's dtype. One ``grouped_mm`` where it
    takes the operands, else one product per group."""
    if _grouped_mm_fits(a, w):
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return grouped_mm(a, w.transpose(1, 2), offs=offsets)
    parts, start = [], 0
    for g, n in enumerate(counts):
        if n:
            parts.append(a[start:start + n] @ w[g].t())
        start += n
    return torch.cat(parts) if parts else a.new_zeros(0, w.shape[1])


@dataclass
class SharedRouting:
    """One call's routing slots split between the share and the CPU: the share's slots
    (``pairs``, flat ``t * K + j`` indices, grouped by the shared expert they name, in
    ascending order within a group), the groups' ends and sizes, and the CPU's ids (the
    share's slots as ``NO_EXPERT``)."""

    pairs: torch.Tensor  # [N] int64 on the share's device
    group: torch.Tensor  # [N] int64: each pair's index among the shared experts
    offsets: torch.Tensor  # [G] int32 on the share's device
    counts: list[int]  # [G] on the host
    cpu_ids: torch.Tensor  # [T, K] int64 on the CPU

    @property
    def cpu_has_work(self) -> bool:
        return bool((self.cpu_ids >= 0).any())


class GpuExperts:
    """Some experts of one layer, held on ``device`` as dense weights: ``gate_up`` [G, 2I, H]
    (gate rows, then up rows) and ``down`` [G, H, I] for the experts ``ids`` (ascending), in
    the canonical layout of :func:`kt_ops.moe_sft`."""

    def __init__(self, packed: PackedExperts, ids: Sequence[int], device: torch.device, dtype: torch.dtype):
        ids = sorted({int(e) for e in ids})
        if not ids:
            raise ValueError("kt_ops.share_experts: a layer's share needs at least one expert")
        self.num_experts = packed.num_experts
        self.ids = torch.tensor(ids, dtype=torch.int64)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as the tensors on it name it
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        w_gate, w_up, w_down = packed.unpack(ids)
        self.gate_up = torch.cat([w_gate, w_up], dim=1).to(self.device, dtype)
        self.down = w_down.to(self.device, dtype)
        slot = torch.full((self.num_experts,), -1, dtype=torch.int64)
        slot[self.ids] = torch.arange(len(ids))
        self.slot_of = slot.to(self.device)  # expert id -> its index here, or -1
        self._ids_on = {self.device: self.ids.to(self.device), torch.device("cpu"): self.ids}

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2]

    def route(self, ids: torch.Tensor) -> SharedRouting:
        """Splits ``ids`` [T, K] (each in ``[0, E)`` or NO_EXPERT) between this share and the CPU."""
        on_device = ids.to(self.device)
        slot = torch.where(on_device >= 0, self.slot_of[on_device.clamp(min=0)], -1).flatten()
        shared = slot >= 0
        pairs = shared.nonzero().squeeze(1)
        group, order = torch.sort(slot[pairs], stable=True)
        counts = torch.bincount(group, minlength=len(self.ids))
        cpu_ids = ids.to("cpu", torch.int64).masked_fill(shared.view(ids.shape).cpu(), NO_EXPERT)
        return SharedRouting(pairs[order], group, counts.cumsum(0).to(torch.int32), counts.tolist(), cpu_ids)

    def _rows(self, t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The shared experts' rows of a per-expert tensor ``t`` [E, ...] (a LoRA factor or a
        bias, wherever it lives) on this device in ``dtype``; autograd carries their gradients
        back to ``t``. The rows are cast before they cross (the products take them in ``dtype``
        and give their gradients in it), so half the bytes cross for bf16; a share of every
        expert takes ``t`` whole."""
        if t is None:
            return None
        if len(self.ids) < self.num_experts:
            ids = self._ids_on.get(t.device)
            t = t.index_select(0, ids if ids is not None else self.ids.to(t.device))
        return to_device(t.to(dtype), self.device).contiguous()  # grouped_mm takes dense factors

    def forward(self, x: torch.Tensor, weights: torch.Tensor, routing: SharedRouting,
                lora: Sequence[Optional[torch.Tensor]], scaling: float, gate: Gate,
                gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The shared experts' part of the layer's output, fp32 [T, H] on this device (None
        when no slot names one): ``x`` [T, H], ``weights`` [T, K] and the rest as
        :func:`kt_ops.moe_sft` takes them (``lora`` canonical, six entries or none)."""
        if not len(routing.pairs):
            return None
        dt, top_k, i = self.gate_up.dtype, weights.shape[1], self.intermediate_size
        tokens = routing.pairs // top_k
        rows = to_device(x, self.device).index_select(0, tokens).to(dt)
        a_g, b_g, a_u, b_u, a_d, b_d = list(lora) if lora else [None] * 6

        def linear(inp, w, a, b):
            out = grouped_linear(inp, w, routing.offsets, routing.counts)
            if a is not None:
                low = grouped_linear(inp, a, routing.offsets, routing.counts)
                out = out + scaling * grouped_linear(low, b, routing.offsets, routing.counts)
            return out

        if a_g is a_u and a_g is not None:  # one A for gate and up: x A^T once, B of 2I rows
            gu = linear(rows, self.gate_up, self._rows(a_g, dt), torch.cat([self._rows(b_g, dt), self._rows(b_u, dt)], 1))
        else:
            gu = grouped_linear(rows, self.gate_up, routing.offsets, routing.counts)
            for a, b, half in ((a_g, b_g, 0), (a_u, b_u, 1)):
                if a is not None:
                    low = grouped_linear(rows, self._rows(a, dt), routing.offsets, routing.counts)
                    delta = scaling * grouped_linear(low, self._rows(b, dt), routing.offsets, routing.counts)
                    gu = gu + F.pad(delta, (half * i, (1 - half) * i))
        gu = gu.float()
        if gate_up_bias is not None:
            gu = gu + self._rows(gate_up_bias, torch.float32).index_select(0, routing.group)
        z = gate_reference(gu[:, :i], gu[:, i:], gate).to(dt)
        h = linear(z, self.down, self._rows(a_d, dt), self._rows(b_d, dt)).float()
        if down_bias is not None:
            h = h + self._rows(down_bias, torch.float32).index_select(0, routing.group)
        w = to_device(weights, self.device).flatten().index_select(0, routing.pairs).float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=self.device)
        return out.index_add(0, tokens, h * w.unsqueeze(1))


def shared_experts_of(module: nn.Module) -> Optional[GpuExperts]:
    """The share of an experts module, or None."""
    return getattr(module, SHARE_ATTRIBUTE, None)


# ---------------------------------------------------------------- choosing and placing a share

class RoutingCounts:
    """Routed slots per expert of every experts module of a model, while counting (see
    :func:`count_routing`): ``counts[name]`` int64 [E]."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.counts = {name: torch.zeros(held_packed_experts(m).num_experts, dtype=torch.int64) for name, m in modules.items()}
        self._hooks = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, m in modules.items()]

    def _hook(self, name: str):
        def count(module, args, kwargs):
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            ids = ids.detach().flatten().cpu()
            ids = ids[(ids >= 0) & (ids < len(self.counts[name]))]
            self.counts[name] += torch.bincount(ids, minlength=len(self.counts[name]))
        return count

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@contextlib.contextmanager
def count_routing(model: nn.Module) -> Iterator[RoutingCounts]:
    """Counts, while the block runs, the routing slots each expert of each experts module of
    ``model`` receives (a recomputed forward, under activation checkpointing, counts again)::

        with kt_ops.count_routing(model) as routing:
            model(**batch)
        selection = kt_ops.choose_gpu_experts(model, 16 * 2**30, routing.counts)
    """
    counts = RoutingCounts(experts_modules(model))
    try:
        yield counts
    finally:
        counts.remove()


def expert_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """GPU bytes one expert of ``module`` takes in a share of ``dtype``: its gate, up and down."""
    packed = held_packed_experts(module)
    return 3 * packed.hidden_size * packed.intermediate_size * torch.empty(0, dtype=dtype).element_size()


def choose_gpu_experts(model: nn.Module, budget: int, counts: Optional[dict[str, torch.Tensor]] = None,
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, list[int]]:
    """The experts to hold on the GPU within ``budget`` bytes of ``dtype`` weights: the most
    routed first over all layers (``counts`` as :func:`count_routing` gives them; experts
    without a count come after every counted one, and ties go to the earlier layer, then
    the lower id). Returns ``{module path: [expert ids]}`` for the layers that get any."""
    modules = experts_modules(model)
    if budget < 0:
        raise ValueError(f"kt_ops.choose_gpu_experts: budget must be >= 0 bytes, got {budget}")
    counts = counts or {}
    unknown = sorted(set(counts) - set(modules))
    if unknown:
        raise ValueError(f"kt_ops.choose_gpu_experts: counts name {unknown[0]!r}, which is no experts module of the "
                         f"model (it has {len(modules)}, e.g. {next(iter(modules), None)!r})")
    ranked = []
    for order, (name, module) in enumerate(modules.items()):
        e = held_packed_experts(module).num_experts
        c = counts.get(name)
        if c is not None and tuple(c.shape) != (e,):
            raise ValueError(f"kt_ops.choose_gpu_experts: counts[{name!r}] has shape {tuple(c.shape)}, the module has "
                             f"{e} experts")
        values = c.tolist() if c is not None else [0] * e
        ranked += [(-v, order, expert, name) for expert, v in enumerate(values)]
    chosen: dict[str, list[int]] = {}
    left = budget
    for _, _, expert, name in sorted(ranked):
        size = expert_bytes(modules[name], dtype)
        if size > left:
            break
        left -= size
        chosen.setdefault(name, []).append(expert)
    return {name: sorted(chosen[name]) for name in modules if name in chosen}


def share_experts(model: nn.Module, selection: dict[str, Sequence[int]], device: torch.device | str,
                  dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> int:
    """Holds the experts of ``selection`` (``{module path: [expert ids]}``, as
    :func:`choose_gpu_experts` returns it) on ``device`` in ``dtype`` and computes their routing
    slots there from now on; the other experts of each layer stay on the CPU's kt kernels. The
    selection is checked before anything changes; the shares it replaces are dropped before the
    new ones are made (so they need not fit beside them), and if making one fails (out of GPU
    memory, say) no layer keeps a share. Returns the bytes the shares hold."""
    from kt_ops.weights import progress_bar

    modules = experts_modules(model)
    for name, ids in selection.items():
        if name not in modules:
            raise ValueError(f"kt_ops.share_experts: {name!r} is no experts module of the model")
        if expert_shard_of(modules[name]) is not None:
            raise ValueError(f"kt_ops.share_experts: {name}'s experts are spread over hosts (shard_experts); a share "
                             "of them on the GPU is not supported with that")
        e = held_packed_experts(modules[name]).num_experts
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < e)]
        if bad or not ids:
            raise ValueError(f"kt_ops.share_experts: {name}: expert ids must be a non-empty list of ints in [0, {e}), "
                             f"got {bad[0] if bad else 'none'}")
    device = torch.device(device)
    for module in modules.values():  # the old shares' memory first, for the new ones to take
        setattr(module, SHARE_ATTRIBUTE, None)
    shares = {}
    try:
        for name in progress_bar(list(selection), "experts to the GPU", "layer", progress):
            shares[name] = GpuExperts(held_packed_experts(modules[name]), selection[name], device, dtype)
    except BaseException:
        shares.clear()  # out of memory, say: no layer keeps a share, none half-made
        raise
    for name, share in shares.items():
        setattr(modules[name], SHARE_ATTRIBUTE, share)
    return sum(share.nbytes for share in shares.values())


def shared_experts(model: nn.Module) -> dict[str, list[int]]:
    """``{module path: [expert ids]}`` of the experts ``model`` holds on the GPU."""
    out = {}
    for name, module in experts_modules(model).items():
        share = shared_experts_of(module)
        if share is not None:
            out[name] = share.ids.tolist()
    return out
