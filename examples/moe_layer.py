"""One forward and backward of a Qwen3-30B-A3B-shaped MoE layer through kt_ops, timed.

    python examples/moe_layer.py [--tokens 512] [--rank 16] [--threads N]

Builds the layer's 128 experts with random bf16 weights (1.2 GB), packs them, routes random
tokens top-8, and runs kt_ops.moe_sft forward and backward with LoRA on every expert.
"""
import argparse
import time

import torch

import kt_ops
from kt_ops.shapes import model_shape
from kt_ops.testing import random_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b", help="model shape (kt_ops/shapes.json)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on gate/up/down of every expert")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = model_shape(args.shape)
    print(f"{shape.name}: E={shape.experts} H={shape.hidden} I={shape.intermediate} K={shape.top_k}, "
          f"{args.tokens} tokens, LoRA r={args.rank}, {args.threads} threads, kernel path {kt_ops.isa()}")
    t0 = time.perf_counter()
    layer = random_layer(shape, args.tokens, args.rank)
    print(f"built and packed {layer.experts.nbytes / 2**30:.2f} GiB of experts in {time.perf_counter() - t0:.1f} s")

    x = layer.x.requires_grad_()
    w = layer.topk_weights.requires_grad_()
    lora = [t.requires_grad_() for t in layer.lora]
    t0 = time.perf_counter()
    y = kt_ops.moe_sft(x, layer.topk_ids, w, layer.experts, lora, layer.lora_scaling)
    t1 = time.perf_counter()
    y.float().square().mean().backward()
    t2 = time.perf_counter()
    print(f"forward {1e3 * (t1 - t0):.1f} ms, backward {1e3 * (t2 - t1):.1f} ms, "
          f"{args.tokens / (t2 - t0):,.0f} tokens/s")
    print(f"|y| = {y.float().norm():.3f}, |dx| = {x.grad.float().norm():.3e}, "
          f"|d lora_down_b| = {lora[5].grad.norm():.3e}")


if __name__ == "__main__":
    main()
