"""One rank of tests/test_distributed.py's jobs, started by torchrun (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODE OUT [CHECKPOINT]

MODE: ``ddp`` or ``fsdp`` (a tiny Qwen3-MoE on the kt experts, its experts shared on the host,
each rank one row of a batch of a row per rank; writes the loss and every gradient), ``load``
(kt_ops.load_model of CHECKPOINT; writes the packed experts and how many layers this rank
packed), ``sharded`` (load_model of CHECKPOINT with its experts spread over the hosts, then a
row per rank under DDP, as ``ddp``), ``trainer`` (kt-sft's Trainer on the built-in default, one
step: which share of the experts' LoRA this rank steps and holds optimizer state for, and the
LoRA after the step). Every rank writes OUT/rank{r}.json and, where there are tensors,
OUT/rank{r}.safetensors."""
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))

import kt_ops  # noqa: E402
from kt_ops import distributed  # noqa: E402
from kt_ops.experts import experts_modules, held_packed_experts  # noqa: E402

ROWS = torch.randint(3, 96, (4, 9), generator=torch.Generator().manual_seed(1))  # a row per rank, up to 4


def mapping_of(ptr: int) -> dict:
    """The /proc/self/maps line holding address ``ptr``: its device:inode and path."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= ptr < end:
            return {"inode": f"{fields[3]}:{fields[4]}", "path": " ".join(fields[5:]), "shared": fields[1][3] == "s"}
    return {}


def tiny_kt_model():
    from hf_models import tiny_model

    torch.manual_seed(0)
    model = kt_ops.patch_model(tiny_model("qwen3_moe"), config=kt_ops.ExpertLoraConfig(4, 8, target_modules=("o_proj",)))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def train_one_row(mode: str, rank: int, out: dict, tensors: dict) -> None:
    model = tiny_kt_model()
    out["shared_bytes"] = distributed.share_packed_experts(model)
    first = held_packed_experts(next(iter(experts_modules(model).values())))
    out["mapping"] = mapping_of(first.gate_up.data_ptr())
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        out["ignored"] = len(distributed.ignore_experts_in_ddp(model))
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer, ignored_params=distributed.fsdp_ignored_params(layer))
        fully_shard(model, ignored_params=distributed.fsdp_ignored_params(model))
        wrapped = model
    loss = wrapped(input_ids=ROWS[rank:rank + 1], labels=ROWS[rank:rank + 1]).loss
    loss.backward()
    distributed.sync_expert_gradients(model)
    out["loss"] = loss.item()
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            tensors[name] = g.detach().contiguous()


def load(checkpoint: str, out: dict, tensors: dict) -> None:
    import kt_ops.weights

    packed_layers = []
    pack = kt_ops.weights.pack_experts
    kt_ops.weights.pack_experts = lambda *a, **k: packed_layers.append(1) or pack(*a, **k)
    model = kt_ops.load_model(checkpoint, 4, 8, progress=False)
    out["packed_layers"] = len(packed_layers)
    for i, module in enumerate(experts_modules(model).values()):
        p = held_packed_experts(module)
        out.setdefault("mappings", []).append(mapping_of(p.gate_up.data_ptr()))
        for j, t in enumerate(p.tensors):
            tensors[f"{i}.{j}"] = t.contiguous()
    with torch.no_grad():
        out["logits_sum"] = float(model(input_ids=ROWS).logits.double().sum())


def sharded(checkpoint: str, rank: int, out: dict, tensors: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = kt_ops.load_model(checkpoint, config=kt_ops.ExpertLoraConfig(4, 8, target_modules=("o_proj",)),
                              dtype=torch.float32, progress=False, shard_experts=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    out["held"] = [held_packed_experts(m).num_experts for m in experts_modules(model).values()]
    distributed.ignore_experts_in_ddp(model)
    wrapped = DistributedDataParallel(model)
    loss = wrapped(input_ids=ROWS[rank:rank + 1], labels=ROWS[rank:rank + 1]).loss
    loss.backward()
    distributed.sync_expert_gradients(model)
    for name, p in model.named_parameters():
        if p.grad is not None:
            tensors[name] = p.grad.detach().contiguous()


def trainer_step(out_dir: str, out: dict, tensors: dict) -> None:
    from kt_ops.train import TrainArgs, Trainer

    trainer = Trainer(TrainArgs(out=os.path.join(out_dir, "run"), steps=2, max_tokens_per_step=512,
                                micro_batch_tokens=256, device="cpu", progress=False), log=lambda m: None)
    lora = trainer.expert_lora
    out["stepped"] = [k for k, p in enumerate(lora.params) if lora.steps(p)]
    out["lora_mapping"] = mapping_of(lora.params[0].data_ptr())
    trainer.loss_and_backward(next(trainer.planned_steps()))
    trainer.optimizer_step()
    out["with_state"] = [k for k, p in enumerate(lora.params) if trainer.optimizer.state.get(p)]
    tensors.update({f"lora.{k}": p.detach().clone() for k, p in enumerate(lora.params)})
    trainer.close()


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    os.environ["KT_OPS_MAX_ISA"] = "avx2"  # fp32 GEMM inputs: comparisons at fp32 tolerance
    cpus = distributed.use_own_cores()  # before the first kt op, as kt-sft does
    dist.init_process_group("gloo")
    distributed.host_group()
    if mode == "sharded":
        from kt_ops.expert_parallel import expert_parallel_group

        expert_parallel_group()
    rank = dist.get_rank()
    out, tensors = {"rank": rank, "cpus": cpus, "topology": kt_ops.topology()}, {}
    try:
        if mode in ("ddp", "fsdp"):
            train_one_row(mode, rank, out, tensors)
        elif mode == "sharded":
            sharded(sys.argv[3], rank, out, tensors)
        elif mode == "trainer":
            trainer_step(out_dir, out, tensors)
        else:
            load(sys.argv[3], out, tensors)
    except Exception as e:  # noqa: BLE001 - what the test checks
        out["error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if tensors:
        save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    if dist.is_initialized():  # the Trainer leaves it itself
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
