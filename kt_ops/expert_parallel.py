"""Experts sharded by id across hosts, for models whose experts do not fit one host.

Host h of H holds experts ``[bounds[h], bounds[h + 1])`` of every layer (contiguous shares, as
even as the count allows), packed once per host (:mod:`kt_ops.distributed`). A layer's forward
on a rank sends each token to every host that holds one of its routed experts, with only that
host's slots (the others as ``NO_EXPERT``), over the *expert-parallel group*: the ranks of the
same local rank on every host. Each host computes what it received with the kt op on its own
experts and sends the partial outputs back, where they are summed per token. The exchanges are
differentiable: the backward sends the gradients the same ways in reverse. The experts' LoRA
stays whole on every rank (a host's rows of it get gradients where its experts are computed),
so its gradients are summed over all ranks as on one host (:func:`kt_ops.distributed.
sync_expert_gradients`), and the adapter saves as on one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from kt_ops.api import NO_EXPERT, Gate, PackedExperts, moe_sft

_EP_GROUPS: dict[tuple[int, int], dist.ProcessGroup] = {}


def host_count() -> int:
    """Hosts of the job: its ranks over torchrun's LOCAL_WORLD_SIZE (1 outside a process group)."""
    from kt_ops.distributed import local_world_size

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size() // local_world_size()


def host_index() -> int:
    from kt_ops.distributed import local_world_size

    return dist.get_rank() // local_world_size() if host_count() > 1 else 0


def expert_bounds(experts: int, hosts: int) -> tuple[int, ...]:
    """The first expert of each host's share, then ``experts``: shares as even as the count
    allows, the larger ones first."""
    if hosts > experts:
        raise ValueError(f"kt_ops: {hosts} hosts cannot share {experts} experts (each needs at least one)")
    base, extra = divmod(experts, hosts)
    bounds = [0]
    for h in range(hosts):
        bounds.append(bounds[-1] + base + (h < extra))
    return tuple(bounds)


@dataclass(frozen=True)
class ExpertShard:
    """Which experts of a layer this host holds: ``[first, first + count)`` of ``total``, in the
    split ``bounds`` (one share per host)."""

    total: int
    bounds: tuple[int, ...]
    host: int

    @property
    def first(self) -> int:
        return self.bounds[self.host]

    @property
    def count(self) -> int:
        return self.bounds[self.host + 1] - self.first

    @property
    def experts(self) -> range:
        return range(self.first, self.first + self.count)

    @classmethod
    def of_this_host(cls, total: int) -> "ExpertShard":
        return cls(total, expert_bounds(total, host_count()), host_index())


def expert_parallel_group() -> dist.ProcessGroup:
    """The ranks that exchange tokens with this one: the same local rank on every host (gloo:
    the tokens cross in CPU memory, where the kt kernels read them). Every rank must call it
    the first time (it makes every such group)."""
    from kt_ops.distributed import local_world_size

    world, local = dist.get_world_size(), local_world_size()
    key = (world, local)
    if key not in _EP_GROUPS:
        mine = None
        for lane in range(local):  # every rank makes every group, in the same order
            group = dist.new_group(ranks=list(range(lane, world, local)), backend="gloo")
            if dist.get_rank() % local == lane:
                mine = group
        _EP_GROUPS[key] = mine
    return _EP_GROUPS[key]


def _exchange_rows(t: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows of ``t`` [N, ...] sent in consecutive runs of ``send[d]`` rows to member d of
    ``group``, and the runs ``recv[d]`` received from each, as one [sum(recv), ...] tensor. The
    rows cross as bytes, whatever their dtype."""
    row = math.prod(t.shape[1:]) * t.element_size()
    out = torch.empty((sum(recv), *t.shape[1:]), dtype=t.dtype)
    dist.all_to_all_single(out.view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8),
                           output_split_sizes=[n * row for n in recv], input_split_sizes=[n * row for n in send],
                           group=group)
    return out


class _Exchange(torch.autograd.Function):
    """:func:`_exchange_rows`, differentiable: the gradient goes back the reverse way."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange_rows(t, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange_rows(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


def _counts_exchanged(send: list[int], group: dist.ProcessGroup) -> list[int]:
    out = torch.empty(len(send), dtype=torch.int64)
    dist.all_to_all_single(out, torch.tensor(send, dtype=torch.int64), group=group)
    return out.tolist()


def sharded_experts(shard: ExpertShard, packed: PackedExperts, x: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor, lora: Sequence[Optional[torch.Tensor]], scaling: float, gate: Gate,
                    gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The routed experts' output [T, H] for CPU tensors ``x`` [T, H], ``ids`` [T, K] (global ids
    or NO_EXPERT) and ``weights`` [T, K], with the experts spread over the hosts as ``shard``
    says and this host's ``packed``; ``lora`` and the biases hold every expert's rows (as
    :func:`kt_ops.moe_sft` takes them for all E). A collective over the expert-parallel group."""
    group = expert_parallel_group()
    hosts = len(shard.bounds) - 1
    bounds = torch.tensor(shard.bounds[1:-1], dtype=torch.int64)
    owner = torch.where(ids >= 0, torch.bucketize(ids, bounds, right=True), -1)  # [T, K] host of each slot
    tokens, local_ids, send = [], [], []
    for d in range(hosts):
        mine = owner == d
        rows = mine.any(dim=1).nonzero().squeeze(1)
        tokens.append(rows)
        local_ids.append(torch.where(mine[rows], ids[rows] - shard.bounds[d], NO_EXPERT))
        send.append(len(rows))
    tokens = torch.cat(tokens)
    recv = _counts_exchanged(send, group)
    x_in = _Exchange.apply(x.index_select(0, tokens), send, recv, group)
    w_in = _Exchange.apply(weights.index_select(0, tokens), send, recv, group)
    ids_in = _exchange_rows(torch.cat(local_ids), send, recv, group)
    here = slice(shard.first, shard.first + shard.count)
    local_lora = [None if t is None else t[here] for t in lora] if lora else None
    y_in = moe_sft(x_in, ids_in, w_in, packed, local_lora, scaling, gate=gate,
                   gate_up_bias=None if gate_up_bias is None else gate_up_bias[here],
                   down_bias=None if down_bias is None else down_bias[here])
    y_back = _Exchange.apply(y_in, recv, send, group)
    # The hosts' parts of a token's output are summed in fp32 (each came rounded to x's dtype).
    return torch.zeros(x.shape, dtype=torch.float32).index_add(0, tokens, y_back.float()).to(x.dtype)
