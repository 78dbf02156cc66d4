"""Several ranks (torchrun, torch.distributed): one copy of the packed experts per host, each rank
computing on cores of its own, the experts' LoRA kept beside them and its gradients summed over
the ranks, and the dense modules under stock DDP or FSDP2.

- **One copy per host.** Local rank 0 reads and packs the experts (:func:`kt_ops.load_model`
  does this by itself when the process group is up) and writes each layer's tensors into a file
  in shared memory (``/dev/shm``); every rank of the host maps the files (``MAP_SHARED``) and
  rank 0 drops its private copy. The files are unlinked as soon as every rank has mapped them:
  the pages live as long as a mapping does, and a job that dies leaves nothing behind.
- **Cores.** :func:`use_own_cores` gives each local rank a contiguous share of the CPUs the host
  lets the job use (before the first kt call: the kernels' thread pool pins its workers to the
  cores it finds then), so the ranks' expert calls run side by side instead of contending.
- **DDP and FSDP2.** The packed experts' stand-in parameters and the experts' LoRA live in CPU
  memory, which neither wrapper can mix with GPU parameters: :func:`expert_parameters` names
  them, :func:`ignore_experts_in_ddp` and :func:`fsdp_ignored_params` leave them out through the
  wrappers' own mechanisms, and :func:`sync_expert_gradients` sums the LoRA's gradients over the
  ranks (call it after the backward, before clipping or stepping).
- **The experts' LoRA once per host** (:class:`HostExpertLora`, what kt-sft does): its values in
  shared memory too, each local rank stepping its share of the tensors and keeping only that
  share's optimizer state.
"""
from __future__ import annotations

import datetime
import math
import os
import shutil
import tempfile
import uuid
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from kt_ops.api import PackedExperts

_HOST_GROUPS: dict[tuple[int, int], Optional[dist.ProcessGroup]] = {}  # (world, local world) -> this rank's
_CPU_GROUPS: dict[int, Optional[dist.ProcessGroup]] = {}  # world -> every rank over gloo (None: the default is)
_OWN_CORES: Optional[list[int]] = None  # this process's share of the host's cores, once chosen


def local_world_size() -> int:
    """Ranks on this host: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def host_group() -> Optional[dist.ProcessGroup]:
    """The process group of this host's ranks (torchrun numbers a host's ranks consecutively),
    or None when no process group is up or the host runs one rank. Every rank must call it the
    first time (it creates the groups)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world, local = dist.get_world_size(), local_world_size()
    if local <= 1:
        return None
    if world % local:
        raise ValueError(f"kt_ops.distributed: {world} ranks do not split into hosts of LOCAL_WORLD_SIZE={local}")
    key = (world, local)
    if key not in _HOST_GROUPS:
        # CPU tensors cross in these collectives: gloo, whatever the default group's backend. The
        # host's other ranks wait in one while local rank 0 reads and packs a model's experts.
        _HOST_GROUPS[key] = dist.new_subgroups(group_size=local, backend="gloo",
                                               timeout=datetime.timedelta(hours=6))[0]
    return _HOST_GROUPS[key]


def _cores(cpus: list[int]) -> list[list[int]]:
    """``cpus`` grouped by physical core (a core's hardware threads together), the cores in the
    order of their NUMA node, package and id (from sysfs; each CPU its own core where it says
    nothing)."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}"
        try:
            core = int(open(f"{base}/topology/core_id").read())
            package = int(open(f"{base}/topology/physical_package_id").read())
            node = next((int(n[4:]) for n in os.listdir(base) if n.startswith("node") and n[4:].isdigit()), 0)
        except (OSError, ValueError):
            node, package, core = 0, 0, cpu
        groups.setdefault((node, package, core), []).append(cpu)
    return [groups[key] for key in sorted(groups)]


def cpu_group() -> Optional[dist.ProcessGroup]:
    """Every rank of the job over gloo, for collectives of CPU tensors (the experts' LoRA, host
    values): None where the default group is gloo already. Every rank must call it the first
    time (it creates the group)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.get_world_size()
    if world not in _CPU_GROUPS:
        _CPU_GROUPS[world] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[world]


def use_own_cores(rank: Optional[int] = None, ranks: Optional[int] = None) -> list[int]:
    """Restricts this process to its local rank's share of the cores it may use (whole cores,
    hardware threads included, in consecutive runs by NUMA node, so that a rank's cores share a
    node where the count allows) and sizes torch's threads to them; returns its CPUs. Call it
    before the first kt op: the kernels' thread pool pins its workers to the cores the calling
    thread may use then. ``rank`` / ``ranks`` default to torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE. A second call returns the first one's CPUs."""
    global _OWN_CORES
    if _OWN_CORES is not None:
        return _OWN_CORES
    rank = local_rank() if rank is None else rank
    ranks = local_world_size() if ranks is None else ranks
    cores = _cores(sorted(os.sched_getaffinity(0)))
    if ranks > len(cores):
        raise ValueError(f"kt_ops.use_own_cores: {ranks} ranks on this host, but the job may use {len(cores)} cores")
    share = len(cores) // ranks
    mine = [cpu for core in cores[rank * share:(rank + 1) * share] for cpu in core]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(share)
    _OWN_CORES = mine
    return mine


# ---------------------------------------------------------------- one copy of the experts per host

def _shared_directory() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"kt_ops-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _map(path: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8).view(dtype).view(shape)


class _HostPublisher:
    """Local rank 0's side of :func:`_host_shared`: what it makes written to shared memory as it
    is made, and its private tensors replaced by the mapped ones."""

    def __init__(self, directory: str):
        self.directory = directory
        self.described: dict[int, dict] = {}

    def _files(self, key: int, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        mapped = []
        for i, t in enumerate(tensors):
            path = os.path.join(self.directory, f"{key}.{i}")
            with open(path, "wb") as f:
                f.truncate(t.nbytes)
            mapped.append(_map(path, t.dtype, tuple(t.shape)))
        self.described[key] = {"tensors": [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]}
        return mapped

    def publish(self, key: int, packed: PackedExperts) -> PackedExperts:
        tensors = self._files(key, packed.tensors)
        # Written through the mapping by the op that places each NUMA slice on its node first.
        torch.ops.kt.copy_packed_experts(list(packed.tensors), tensors)
        self.described[key]["experts"] = {
            "format": packed.format, "intermediate_size": packed.intermediate_size, "hidden_size": packed.hidden_size,
            "group_size": packed.group_size, "w8a8": packed.w8a8}
        return PackedExperts(tuple(tensors), packed.format, packed.intermediate_size, packed.hidden_size,
                             packed.group_size, packed.w8a8)

    def publish_tensor(self, key: int, t: torch.Tensor) -> torch.Tensor:
        (mapped,) = self._files(key, (t,))
        return mapped.copy_(t)


def _received(directory: str, key: int, d: dict):
    tensors = [_map(os.path.join(directory, f"{key}.{i}"), getattr(torch, dtype), tuple(shape))
               for i, (dtype, shape) in enumerate(d["tensors"])]
    if "experts" not in d:
        return tensors[0]
    e = d["experts"]
    return PackedExperts(tuple(tensors), e["format"], e["intermediate_size"], e["hidden_size"], e["group_size"],
                         e["w8a8"])


def host_shared_experts(load: Callable[[Callable[[int, PackedExperts], PackedExperts]], dict[int, PackedExperts]]
                        ) -> dict[int, PackedExperts]:
    """``{layer: PackedExperts}`` held once per host. ``load(keep)`` makes the experts, passing
    each layer through ``keep(layer, packed)`` as it is packed and returning what keep returned:
    on one rank per host (or outside a process group) keep returns the layer as it is; with
    several, local rank 0 alone runs ``load`` and keep moves each layer into shared memory, and
    the host's other ranks map what it wrote. An error on local rank 0 (interruptions too) is
    raised on every rank of the host. Every rank of the host must call this at the same point;
    the others wait for local rank 0's loading up to the host group's timeout (hours)."""
    group = host_group()
    if group is None:
        return load(lambda key, packed: packed)
    return _host_shared(lambda publisher: load(publisher.publish), group)


def host_shared_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` (local rank 0's values) in memory every rank of the host maps,
    writable by all (a write is seen by every rank of the host); the tensors themselves outside
    a process group or on one rank per host. A collective over the host's ranks."""
    group = host_group()
    if group is None:
        return list(tensors)
    shared = _host_shared(lambda publisher: {i: publisher.publish_tensor(i, t) for i, t in enumerate(tensors)}, group)
    return [shared[i] for i in range(len(tensors))]


def _host_shared(make: Callable[["_HostPublisher"], dict], group: dist.ProcessGroup) -> dict:
    """What ``make(publisher)`` returns on local rank 0, which publishes it into shared memory,
    and on the host's other ranks the same, mapped from there (see host_shared_experts)."""
    leader = dist.get_rank() == dist.get_global_rank(group, 0)
    directory = [_shared_directory() if leader else None]
    dist.broadcast_object_list(directory, src=dist.get_global_rank(group, 0), group=group)
    directory = directory[0]
    made: dict = {}
    try:
        outcome: list = [None]
        error: Optional[BaseException] = None
        if leader:
            try:
                os.makedirs(directory, mode=0o700)
                publisher = _HostPublisher(directory)
                made = make(publisher)
                outcome = [("ok", publisher.described)]
            except BaseException as e:  # noqa: BLE001 - raised here and, named, on the host's other ranks
                outcome, error = [("error", (type(e).__name__, str(e)))], e
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0), group=group)
        status, payload = outcome[0]
        if error is not None:
            raise error
        if status == "error":
            kind, message = payload
            raise {"KeyError": KeyError, "ValueError": ValueError}.get(kind, RuntimeError)(
                f"{message} (raised on local rank 0, which makes them for this host)")
        failure = None
        if not leader:
            try:
                made = {key: _received(directory, key, d) for key, d in payload.items()}
            except BaseException as e:  # noqa: BLE001 - raised once the leader need not wait for this rank
                failure = e
        dist.barrier(group=group)  # every rank has mapped the files (or failed to): they can go
        if failure is not None:
            raise failure
    finally:
        if leader:
            shutil.rmtree(directory, ignore_errors=True)
    dist.barrier(group=group)  # and they are gone when any rank goes on
    return made


def share_packed_experts(model: nn.Module) -> int:
    """Makes the experts a model already holds (packed on every rank, e.g. by
    :func:`kt_ops.patch_model`) one copy per host: local rank 0's are moved into shared memory
    and every rank of the host computes with them, its own copy released. Returns the bytes
    now shared. A collective over the host's ranks; a no-op on one rank per host."""
    from kt_ops.experts import experts_modules, held_packed_experts, install_packed_experts

    modules = list(experts_modules(model).values())
    if host_group() is None:
        return 0
    shared = host_shared_experts(
        lambda keep: {i: keep(i, held_packed_experts(m)) for i, m in enumerate(modules)})
    for i, module in enumerate(modules):
        install_packed_experts(module, shared[i])
    return sum(p.nbytes for p in shared.values())


# ---------------------------------------------------------------- DDP, FSDP2, the experts' LoRA

def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model``'s kt experts, by name: the packed experts' stand-ins and the
    experts' LoRA (PEFT's ``target_parameters`` LoRA on them, or KtExperts' own). They live in
    CPU memory, beside the packed experts."""
    from kt_ops.experts import experts_modules

    experts = set(map(id, experts_modules(model).values()))

    def innermost(module: nn.Module) -> nn.Module:
        while "base_layer" in module._modules:
            module = module._modules["base_layer"]
        return module

    out = {}
    for name, module in model.named_modules():
        if id(innermost(module)) not in experts:
            continue
        for pname, p in module.named_parameters(recurse=True):
            if not pname.startswith("base_layer.") or id(module) in experts:
                out[f"{name}.{pname}" if name else pname] = p
    return out


def expert_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The experts' trainable LoRA parameters, in model order."""
    return [p for p in expert_parameters(model).values() if p.requires_grad]


def ignore_experts_in_ddp(model: nn.Module) -> list[str]:
    """Leaves ``model``'s kt expert parameters out of a DistributedDataParallel made of it
    afterwards (DDP's parameters-to-ignore list), so DDP neither broadcasts the packed experts
    nor mixes the CPU-resident LoRA into its GPU buckets; returns their names. Sum the LoRA's
    gradients with :func:`sync_expert_gradients`."""
    from torch.nn.parallel import DistributedDataParallel

    names = list(expert_parameters(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """``ignored_params`` for ``torch.distributed.fsdp.fully_shard`` on ``model`` or a module of
    it: the kt expert parameters, which stay whole on every rank, in CPU memory."""
    return set(expert_parameters(model).values())


def sync_expert_gradients(model: nn.Module, group: Optional[dist.ProcessGroup] = None,
                          average: bool = True, bucket_bytes: int = 64 << 20) -> None:
    """Sums (``average``: and divides by the ranks, as DDP does) the gradients of the experts'
    LoRA over ``group``'s ranks (default: all, over gloo: :func:`cpu_group`), in buckets of
    about ``bucket_bytes``; a parameter without a gradient counts as zeros. Call it on every
    rank after the backward and before clipping or the optimizer step."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = group if group is not None else cpu_group()
    world = dist.get_world_size(group)
    if world == 1:
        return
    params = expert_lora_parameters(model)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.flatten().float() for g in bucket])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= world
        start = 0
        for g in bucket:
            g.copy_(flat[start:start + g.numel()].view_as(g))
            start += g.numel()
        bucket.clear()

    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * 4
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


def broadcast_expert_lora(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Gives every rank rank ``src``'s values of the experts' LoRA (which DDP, told to ignore
    them, does not broadcast), over ``group`` (default: all ranks over gloo)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = group if group is not None else cpu_group()
    if dist.get_world_size(group) == 1:
        return
    with torch.no_grad():
        for p in expert_lora_parameters(model):
            dist.broadcast(p.data, src=src, group=group)


# ---------------------------------------------------------------- a job's ranks (kt-sft under torchrun)

class Ranks:
    """This process's place in a job of several ranks, and the few collectives the trainer
    needs on host values (over gloo, whatever carries the GPUs' traffic)."""

    def __init__(self, rank: int, world: int, cpu_group: Optional[dist.ProcessGroup]):
        self.rank, self.world, self.cpu_group = rank, world, cpu_group

    @property
    def main(self) -> bool:
        """Rank 0, which writes the job's files and speaks for it."""
        return self.rank == 0

    def mine(self, items: list) -> list:
        """This rank's share of ``items`` (every world-th, from its rank)."""
        return items[self.rank::self.world]

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks, elementwise (float64)."""
        return self.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

    def largest(self, value: int) -> int:
        """The largest of the ranks' ``value``."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor summed over the ranks, in place."""
        dist.all_reduce(t, group=self.cpu_group)
        return t


def join_job(device: torch.device, timeout_s: float = 1800.0) -> tuple[Optional[Ranks], torch.device]:
    """Under a launcher that starts several ranks (torchrun's ``WORLD_SIZE`` > 1): joins the
    job's process group (NCCL for a CUDA device, gloo otherwise; a rank that dies or stops
    answering fails the others' collectives within ``timeout_s``), gives this rank its own
    cores (:func:`use_own_cores`) and, for a CUDA device, the GPU of its local rank (whatever
    index ``device`` names: torchrun's ranks take a GPU each). Returns
    ``(Ranks, device)``, or ``(None, device)`` for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    use_own_cores()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    from kt_ops.expert_parallel import expert_parallel_group

    # Made now, by every rank, before any rank needs them.
    group, _, _ = cpu_group(), host_group(), expert_parallel_group()
    return Ranks(dist.get_rank(), dist.get_world_size(), group), device


# ---------------------------------------------------------------- the experts' LoRA once per host

def _owners(sizes: list[int], ranks: int) -> list[int]:
    """Consecutive runs of tensors of ``sizes`` elements, one run per rank, as even in elements
    as whole tensors allow: each tensor's rank by where its middle falls."""
    total = sum(sizes) or 1
    owners, before = [], 0
    for n in sizes:
        owners.append(min(ranks - 1, int((before + n / 2) * ranks / total)))
        before += n
    return owners


class HostExpertLora:
    """The experts' LoRA held and stepped once per host.

    Its values move into memory the host's ranks share (local rank 0's; every rank's are equal
    after :func:`broadcast_expert_lora`), and each local rank steps its share of the tensors in
    place, keeping the optimizer state of that share only; the host's ranks meet after a step,
    before a forward reads them. The gradients stay per rank and are summed over all ranks
    before the step (:func:`sync_expert_gradients`), so every host steps alike. A collective of
    the host's ranks to make."""

    def __init__(self, model: nn.Module):
        self.group = host_group()
        self.params = expert_lora_parameters(model)
        shared = host_shared_tensors([p.detach() for p in self.params])
        for p, values in zip(self.params, shared):
            p.data = values
        self.rank = dist.get_rank(self.group)
        self.owner = {id(p): o for p, o in zip(self.params, _owners([p.numel() for p in self.params],
                                                                      dist.get_world_size(self.group)))}

    def steps(self, p: torch.Tensor) -> bool:
        """Whether this rank steps ``p``: its share of the experts' LoRA, and every other tensor."""
        return self.owner.get(id(p), self.rank) == self.rank

    def after_step(self) -> None:
        """Every rank of the host has stepped its share (or written the values it loaded)."""
        dist.barrier(group=self.group)

    def gather_state(self, state: dict[int, dict]) -> dict[int, dict]:
        """The optimizer state of every tensor of the experts' LoRA, by index in :attr:`params`,
        from ``state`` (this rank's, by the same index, for its share): each share's owner sends
        it to the host's other ranks. A collective of the host's ranks."""
        out = {}
        for k, p in enumerate(self.params):
            src = dist.get_global_rank(self.group, self.owner[id(p)])
            mine = self.owner[id(p)] == self.rank
            header = [None]
            if mine:
                entry = state.get(k, {})
                header = [{key: (("tensor", str(v.dtype).removeprefix("torch."), tuple(v.shape))
                                 if isinstance(v, torch.Tensor) else ("value", v)) for key, v in entry.items()}]
            dist.broadcast_object_list(header, src=src, group=self.group)
            entry = {}
            for key, (kind, *rest) in header[0].items():
                if kind == "value":
                    entry[key] = rest[0]
                    continue
                t = state[k][key].contiguous() if mine else torch.empty(rest[1], dtype=getattr(torch, rest[0]))
                dist.broadcast(t, src=src, group=self.group)
                entry[key] = t
            if entry:
                out[k] = entry
        return out
