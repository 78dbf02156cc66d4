"""kt-sft training steps on a full-depth, real-shaped MoE model with random weights, beside the
same model trained with plain transformers + PEFT entirely on the GPU.

    python benchmarks/bench_sft.py --shape deepseek-v2-lite --mode kt
    python benchmarks/bench_sft.py --shape deepseek-v2-lite --mode gpu-peft
    python benchmarks/bench_sft.py --shape qwen3-30b-a3b --mode kt --grad-checkpointing
    python benchmarks/bench_sft.py --shape qwen3-30b-a3b --mode kt --grad-checkpointing --gpu-experts-budget 16GiB

Both modes run kt_ops.train.Trainer's step (same packed rows of random token sequences, the
second half of each sequence labelled; LoRA rank 16 on every routed expert's gate/up/down,
routers trained). ``kt``: the routed experts packed in CPU memory and computed by
torch.ops.kt, everything else on the GPU. ``gpu-peft``: the unpatched transformers model on
the GPU with PEFT's ``target_parameters`` LoRA on the fused experts. The model's MoE shape
comes from ../shared/shapes.json (via kt_ops.shapes); the other config numbers are those of
the published checkpoints. Prints one JSON line: tokens/s over the timed steps (after
warm-up), peak GPU memory (allocated), peak RSS, where the host memory goes after the steps
(packed experts, CPU-resident trainable values and their optimizer state), and
how long building the model took.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn

import kt_ops
from kt_ops.data import IGNORE, Example
from kt_ops import timeline
from kt_ops.experts import experts_modules
from kt_ops.gpu_share import parse_size
from kt_ops.shapes import model_shape
from kt_ops.train import TrainArgs, Trainer, reuse_freed_memory

# Published config numbers beyond the MoE shape (DeepSeek-V2-Lite and Qwen3-30B-A3B config.json).
CONFIGS = {
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, rope_theta=10000.0, max_position_embeddings=163840,
        rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
}


def hf_config(name: str):
    import transformers

    shape = model_shape(name)
    kw = dict(CONFIGS[name])
    model_type = kw.pop("model_type")
    if model_type == "qwen3_moe":
        kw.update(num_experts=shape.experts, num_experts_per_tok=shape.top_k, moe_intermediate_size=shape.intermediate)
    else:
        kw.update(n_routed_experts=shape.experts, num_experts_per_tok=shape.top_k,
                  moe_intermediate_size=shape.intermediate, n_shared_experts=shape.shared_experts)
    cfg = transformers.AutoConfig.for_model(model_type, hidden_size=shape.hidden, **kw)
    moe_layers = cfg.num_hidden_layers - getattr(cfg, "first_k_dense_replace", 0)
    assert moe_layers == shape.moe_layers, (name, moe_layers, shape.moe_layers)
    return cfg, shape


def random_examples(vocab: int, seq_len: int, count: int, seed: int = 0) -> list[Example]:
    """Random token sequences; the second half of each is the "response" the loss sees."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (seq_len,), generator=g).tolist()
        half = seq_len // 2
        out.append(Example(ids, [IGNORE] * half + ids[half:]))
    return out


@torch.no_grad()
def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Random values for every parameter still on the meta device (norm weights 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for mod_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if "norm" in f"{mod_name}.{name}":
                t = torch.ones(p.shape, device=device, dtype=dtype)
            else:
                t = torch.empty(p.shape, device=device, dtype=dtype).normal_(0, 0.02, generator=g)
            module._parameters[name] = nn.Parameter(t, requires_grad=p.requires_grad)


def build_kt(cfg, shape, rank: int, device: torch.device, experts_format: str = "bf16") -> nn.Module:
    """Non-expert modules on ``device``, routed experts random and packed in CPU memory (in
    ``experts_format``), layer by layer."""
    import peft
    import transformers
    from accelerate import init_empty_weights

    from kt_ops.models.surgery import expert_lora_config, use_kt_experts

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    first = getattr(cfg, "first_k_dense_replace", 0)
    e, i, h = shape.experts, shape.intermediate, shape.hidden
    g = torch.Generator().manual_seed(0)
    w_gate, w_up = (torch.randn(e, i, h, generator=g).mul_(0.02).bfloat16() for _ in range(2))
    w_down = torch.randn(e, h, i, generator=g).mul_(0.02).bfloat16()
    # Drawing every layer's experts (tens of GB) takes minutes; each layer gets its own packed
    # copy of one random draw with the experts rotated (distinct memory, distinct routing).
    experts = {layer: kt_ops.pack_experts(*(w.roll(layer, dims=0) for w in (w_gate, w_up, w_down)),
                                          format=experts_format)
               for layer in range(first, cfg.num_hidden_layers)}
    del w_gate, w_up, w_down
    # kt_ops.patch_model in three steps, so that the attention, router and head weights are
    # drawn in between, on the device (PEFT then makes the experts' LoRA in CPU memory).
    use_kt_experts(model, experts=experts)
    _materialise(model, device, torch.bfloat16, seed=1)
    return peft.get_peft_model(model.to(device), expert_lora_config(model, kt_ops.ExpertLoraConfig(rank, 2 * rank)))


def build_gpu_peft(cfg, rank: int, device: torch.device) -> nn.Module:
    import peft
    import transformers

    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    for name, p in model.named_parameters():  # the routers train, as in kt mode
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(True)
    return model


def _gib(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**30, 2)


def host_memory(trainer: Trainer) -> dict[str, float]:
    """Where the host memory of a step goes, GiB: the resident set now, the packed experts,
    and the trainable values and optimizer state that live in CPU memory (their gradients take
    the trainable values' bytes again from each backward to the optimizer step)."""
    import os

    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    params = [p for g in trainer.optimizer.param_groups for p in g["params"] if p.device.type == "cpu"]
    state = [v for p in params for v in trainer.optimizer.state.get(p, {}).values()
             if isinstance(v, torch.Tensor) and v.numel() > 1]
    packed = sum(e.nbytes for e in kt_ops.experts.packed_experts_in(trainer.model))
    return {"rss_now_gib": round(rss / 2**30, 2), "packed_experts_gib": round(packed / 2**30, 2),
            "cpu_trainable_gib": _gib(params), "cpu_optimizer_state_gib": _gib(state)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--mode", choices=["kt", "gpu-peft"], required=True)
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="two micro-batches in flight (kt-sft's --overlap; default: on with a GPU)")
    parser.add_argument("--gpu-experts-budget", type=parse_size, default=0,
                        help="kt mode: hold the most-routed experts on the GPU within this much memory, e.g. 16GiB "
                        "(kt-sft's --gpu-experts-budget)")
    parser.add_argument("--experts-format", default="bf16", help="kt mode: the packed experts' weight format")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the experts (default: torch's)")
    parser.add_argument("--timeline", metavar="PNG",
                        help="record one extra step and draw when the CPU experts, GPU kernels, copies and optimizer "
                        "ran (kt_ops.timeline), with the GPU's idle share in the JSON line")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step with torch.profiler and print where its time went")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "kt":
        reuse_freed_memory()  # as kt-sft does
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, shape = hf_config(args.shape)

    t0 = time.perf_counter()
    model = (build_kt(cfg, shape, args.rank, device, args.experts_format) if args.mode == "kt"
             else build_gpu_peft(cfg, args.rank, device))
    build_s = time.perf_counter() - t0
    steps = args.warmup + args.steps + args.profile + bool(args.timeline)  # the profiled / drawn steps are untimed
    per_step = args.tokens_per_step // args.seq_len
    examples = random_examples(cfg.vocab_size, args.seq_len, steps * per_step)
    train_args = TrainArgs(out="unused", model="<in memory>", steps=steps, lr=1e-4, rank=args.rank,
                           alpha=2 * args.rank, max_tokens_per_step=args.tokens_per_step,
                           grad_checkpointing=args.grad_checkpointing, progress=False, device=str(device),
                           overlap=args.overlap, gpu_experts_budget=args.gpu_experts_budget)
    trainer = Trainer(train_args, log=lambda m: None, model=model, examples=examples)
    if device.type == "cuda":
        torch.cuda.synchronize()
    def synced_clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    times, optimizer_times, losses = [], [], []
    drawn = None
    for n, rows in enumerate(trainer.planned_steps()):
        if args.timeline and n == args.warmup + args.steps:
            with timeline.record_step(layers=len(experts_modules(trainer.model))) as drawn:
                loss, _ = trainer.loss_and_backward(rows)
                trainer.optimizer_step()
            drawn.plot(args.timeline, f"kt-sft step, {args.shape}, {args.tokens_per_step} tokens")
            losses.append(loss)
            continue
        profiler = None
        if args.profile and n == steps - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.__enter__()
        t0 = synced_clock()
        loss, tokens = trainer.loss_and_backward(rows)
        t1 = synced_clock()
        trainer.optimizer_step()
        t2 = synced_clock()
        if profiler is not None:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if n >= args.warmup and profiler is None:
            times.append(t2 - t0)
            optimizer_times.append(t2 - t1)
        losses.append(loss)
    memory = host_memory(trainer)
    step_s = statistics.median(times)
    result = {"shape": args.shape, "mode": args.mode, "experts_format": args.experts_format,
              "grad_checkpointing": args.grad_checkpointing, "overlap": trainer.lanes is not None,
              "layers": cfg.num_hidden_layers, "tokens_per_step": args.tokens_per_step, "seq_len": args.seq_len,
              "threads": torch.get_num_threads(), "step_s": round(step_s, 3),
              "optimizer_s": round(statistics.median(optimizer_times), 3),
              "tokens_per_s": round(args.tokens_per_step / step_s, 1), "build_s": round(build_s, 1),
              "losses": [round(x, 4) for x in losses],
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "trainable_params": sum(p.numel() for p in trainer.params), **memory}
    if drawn is not None:
        result["timeline"] = {"png": args.timeline, "step_s": round(drawn.seconds, 3),
                              **{f"{lane.replace(' ', '_')}_busy_share": round(drawn.busy(lane) / drawn.seconds, 3)
                                 for lane in timeline.LANES}}
    if trainer.gpu_experts is not None:
        result["gpu_experts"] = {k: v for k, v in trainer.gpu_experts.items() if k != "selection"}
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
