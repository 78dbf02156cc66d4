"""Frozen expert weights held once, packed, in place of an experts module's own parameters.

A transformers experts module keeps its weights as 3-D parameters: ``gate_up_proj`` [E, 2I, H]
(gate rows then up rows, or interleaved gate/up rows, or transposed to [E, H, 2I]) and
``down_proj`` [E, H, I] (or [E, I, H]). Under the "kt" experts implementation each becomes a
:class:`PackedExpertWeight`: a tensor of the same shape and dtype on the CPU whose values live
in kt's packed layout (:class:`kt_ops.PackedExperts`, shared by the module's projections). So:

- PEFT sees the parameter it targets (shape, dtype, device: its LoRA is made on the CPU) and
  ``print_trainable_parameters`` counts the experts;
- the kt op reads the packed weights directly, with no second copy in memory;
- anything else that reads the parameter (the eager implementation, ``state_dict`` written by
  ``save_pretrained``, indexing) gets its true values, unpacked on demand;
- PEFT's LoRA parametrization ``W + s B A`` (``baddbmm``, evaluated on every forward to check
  its shape) is kept as a lazy sum instead of a tensor of the experts' size, and computed only
  if something reads it;
- in-place writes (PEFT's ``merge_and_unload``, ``load_state_dict``) repack the experts;
- ``model.to(device)`` / ``.cuda()`` leave them in CPU memory, where the kt kernels read them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_map

from kt_ops.api import PackedExperts, pack_experts
from kt_ops.expert_parallel import ExpertShard

aten = torch.ops.aten


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module lays out its fused weights (transformers' experts-interface flags):
    ``concatenated`` gate rows then up rows (else interleaved gate, up, gate, ...), and
    ``transposed`` [E, in, out] rather than [E, out, in]."""

    concatenated: bool = True
    transposed: bool = False


def to_canonical(gate_up: torch.Tensor, down: torch.Tensor, layout: ExpertsLayout
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An experts module's ``gate_up_proj`` and ``down_proj`` as ``(w_gate [E, I, H], w_up
    [E, I, H], w_down [E, H, I])``, the inputs of :func:`kt_ops.pack_experts` (views where
    possible)."""
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if layout.concatenated:
        i = gate_up.shape[1] // 2
        return gate_up[:, :i], gate_up[:, i:], down
    return gate_up[:, 0::2], gate_up[:, 1::2], down


def from_canonical(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, layout: ExpertsLayout
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_canonical`: ``(gate_up_proj, down_proj)`` in the module's layout."""
    if layout.concatenated:
        gate_up = torch.cat([w_gate, w_up], dim=1)
    else:
        gate_up = torch.stack([w_gate, w_up], dim=2).reshape(w_gate.shape[0], -1, w_gate.shape[2])
    if layout.transposed:
        return gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    return gate_up, w_down


class PackedExpertWeight(torch.Tensor):
    """One projection (``role`` "gate_up" or "down") of a module's experts, held in ``packed``
    and shown in the module's own layout (``experts_layout``) and ``dtype``. ``deltas`` are pending low-rank
    terms ``alpha * lhs @ rhs`` (a lazy ``baddbmm``)."""

    packed: PackedExperts
    role: str
    experts_layout: ExpertsLayout
    deltas: tuple
    shard: Optional[ExpertShard]  # the layer's experts when ``packed`` holds this host's share of them

    @staticmethod
    def __new__(cls, packed: PackedExperts, role: str, layout: ExpertsLayout, dtype: torch.dtype,
                deltas: tuple = (), shard: Optional[ExpertShard] = None):
        e = shard.total if shard is not None else packed.num_experts
        h, i = packed.hidden_size, packed.intermediate_size
        shape = {"gate_up": (e, 2 * i, h), "down": (e, h, i)}[role]
        if layout.transposed:
            shape = (shape[0], shape[2], shape[1])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=torch.device("cpu"),
                                                   requires_grad=False)

    def __init__(self, packed: PackedExperts, role: str, layout: ExpertsLayout, dtype: torch.dtype,
                 deltas: tuple = (), shard: Optional[ExpertShard] = None):
        self.packed, self.role, self.experts_layout, self.deltas = packed, role, layout, tuple(deltas)
        self.shard = shard
        self._serialized: Optional[torch.Tensor] = None

    # Serialisers (safetensors, transformers' save_pretrained) read a tensor's storage and data
    # pointer. Those are the dense values, made once per tensor object: the parameter in the
    # model is never asked (a state_dict holds aliases of it), so its memory stays packed.
    def _dense_for_serialising(self) -> torch.Tensor:
        if self._serialized is None:
            self._serialized = self.dense().contiguous()
        return self._serialized

    def untyped_storage(self):
        return self._dense_for_serialising().untyped_storage()

    def data_ptr(self) -> int:
        return self._dense_for_serialising().data_ptr()

    def __deepcopy__(self, memo: dict) -> "PackedExpertWeight":
        # A copy of the model holds copies of the packed experts, one shared by its two
        # projections as here (the memo maps the PackedExperts once).
        if id(self) in memo:
            return memo[id(self)]
        out = PackedExpertWeight(copy.deepcopy(self.packed, memo), self.role, self.experts_layout, self.dtype,
                                 copy.deepcopy(self.deltas, memo), self.shard)
        if isinstance(self, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=self.requires_grad)
        memo[id(self)] = out
        return out

    def __repr__(self) -> str:
        terms = f" + {len(self.deltas)} low-rank term(s)" if self.deltas else ""
        return (f"PackedExpertWeight({self.role}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.packed.numa_slices} slice(s){terms})")

    def _like(self, dtype: Optional[torch.dtype] = None, deltas: Optional[tuple] = None) -> "PackedExpertWeight":
        return PackedExpertWeight(self.packed, self.role, self.experts_layout, dtype or self.dtype,
                                  self.deltas if deltas is None else deltas, self.shard)

    def dense(self) -> torch.Tensor:
        """The values as an ordinary tensor (the experts' size in memory)."""
        if self.shard is not None and self.shard.count != self.shard.total:
            raise ValueError(f"kt_ops: this host holds experts [{self.shard.first}, {self.shard.first + self.shard.count}) "
                             f"of this layer's {self.shard.total}; the others' weights are on other hosts")
        gate_up, down = from_canonical(*self.packed.unpack(), self.experts_layout)
        out = (gate_up if self.role == "gate_up" else down).to(self.dtype)
        for lhs, rhs, alpha in self.deltas:
            out = torch.baddbmm(out, lhs.to(out.dtype), rhs.to(out.dtype), alpha=alpha)
        return out

    def _write(self, values: torch.Tensor) -> None:
        """Sets this projection to ``values`` (in the module's layout), repacking in place."""
        gate_up, down = from_canonical(*self.packed.unpack(), self.experts_layout)
        if self.role == "gate_up":
            gate_up = values.to(torch.bfloat16)
        else:
            down = values.to(torch.bfloat16)
        fresh = pack_experts(*(t.contiguous() for t in to_canonical(gate_up, down, self.experts_layout)),
                             numa_nodes=self.packed.numa_slices, format=self.packed.format,
                             group_size=self.packed.group_size)
        with torch.no_grad():
            for kept, new in zip(self.packed.tensors, fresh.tensors):
                kept.copy_(new)
        self._serialized = None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default):
            return first._like()
        if func is aten._to_copy.default:  # device moves are ignored: the kernels read CPU memory
            return first._like(dtype=kwargs.get("dtype") or first.dtype)
        if func is aten.baddbmm.default and isinstance(first, cls) and kwargs.get("beta", 1) == 1:
            lhs, rhs = args[1], args[2]
            return first._like(deltas=first.deltas + ((lhs, rhs, kwargs.get("alpha", 1)),))
        if func is aten.set_.source_Tensor and isinstance(first, cls) and isinstance(args[1], cls):
            src = args[1]  # torch's parametrize sets a parameter to itself when it registers it
            first.packed, first.role, first.experts_layout, first.deltas = src.packed, src.role, src.experts_layout, src.deltas
            first.shard = src.shard
            return first
        if func in (aten.copy_.default, aten.add_.Tensor, aten.sub_.Tensor) and isinstance(first, cls):
            other = args[1].dense() if isinstance(args[1], cls) else args[1]
            if func is aten.copy_.default:
                values = other
            else:
                sign = 1 if func is aten.add_.Tensor else -1
                values = first.dense() + sign * kwargs.get("alpha", 1) * other
            first._write(values)
            return first

        def unwrap(t: Any) -> Any:
            if not isinstance(t, cls):
                return t
            return t._serialized if t._serialized is not None else t.dense()

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def packed_parameters(packed: PackedExperts, layout: ExpertsLayout, dtype: torch.dtype,
                      shard: Optional[ExpertShard] = None) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """Frozen ``(gate_up_proj, down_proj)`` parameters standing for ``packed`` (this host's
    share of the layer's experts, with ``shard``: the parameters show them all)."""
    return tuple(torch.nn.Parameter(PackedExpertWeight(packed, role, layout, dtype, shard=shard), requires_grad=False)
                 for role in ("gate_up", "down"))
