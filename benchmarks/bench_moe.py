"""Throughput of kt_ops.moe_sft forward + backward against the eager PyTorch reference.

    python benchmarks/bench_moe.py --shape qwen3-30b-a3b --tokens 4096 --threads 16

Both run in this process on the same layer (random bf16 weights, LoRA rank --rank on
gate/up/down of every expert). The reference is kt_ops.reference in bf16 compute: the
per-expert eager loop a user would write. Effective TFLOP/s counts only the base GEMMs
of forward + backward (2 x 2*T*K*3*H*I, see PERF.md) so figures from different code compare.

Freed memory is reused (--malloc reuse, kt_ops.train.reuse_freed_memory), as in kt-sft: with
glibc's defaults (--malloc default, how layer figures were taken before the fourth sitting of
2026-11-23 in RESULTS.md) every call maps its large tensors afresh and page-faults them, which no
training loop that reuses them pays.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

import kt_ops
from kt_ops.reference import moe_flops, moe_sft_reference
from kt_ops.shapes import model_shape
from kt_ops.testing import random_layer
from kt_ops.train import reuse_freed_memory


def add_malloc_option(p: argparse.ArgumentParser) -> None:
    """--malloc for the layer benchmarks: reuse freed memory as kt-sft does, or glibc's defaults."""
    p.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                   help="reuse: keep freed memory for the next call, as kt-sft does (default); default: glibc's "
                        "defaults, every call page-faults its large tensors afresh")


def apply_malloc_option(args: argparse.Namespace) -> None:
    """Acts on --malloc; call before any large tensor is made."""
    if args.malloc == "reuse" and not reuse_freed_memory():
        print("note: this C library has no mallopt: --malloc reuse has no effect", file=sys.stderr)


def time_forward_backward(layer, forward, repeats: int):
    """Median forward and backward seconds of `forward(x, topk_weights, lora)` and its
    gradients for x, topk_weights and LoRA over `repeats` runs after a warm-up, and the output."""
    x = layer.x.detach().requires_grad_()
    w = layer.topk_weights.detach().requires_grad_()
    lora = [t.detach().requires_grad_() for t in layer.lora] if layer.lora else None
    leaves = [x, w] + (lora or [])
    grad_y = torch.ones_like(x)
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        y = forward(x, w, lora)
        t1 = time.perf_counter()
        torch.autograd.grad(y, leaves, grad_y)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return statistics.median(fwd[1:]), statistics.median(bwd[1:]), y.detach()


# --gate: the gates the kernels compute. SwiGLU takes the vectorised epilogues; every other
# gate (and any gate with biases) the per-element one, which this option measures.
GATES = {"swiglu": kt_ops.Gate(),
         "gpt-oss": kt_ops.Gate(alpha=1.702, limit=7.0, up_offset=1.0),
         "clamped-swiglu": kt_ops.Gate(limit=10.0),
         "gelu": kt_ops.Gate(activation="gelu")}


def time_kt(layer, repeats: int, gate: kt_ops.Gate = kt_ops.Gate(), biases=(None, None), w8a8: bool = False):
    return time_forward_backward(
        layer, lambda x, w, lora: kt_ops.moe_sft(x, layer.topk_ids, w, layer.experts, lora, layer.lora_scaling,
                                                 gate=gate, gate_up_bias=biases[0], down_bias=biases[1], w8a8=w8a8),
        repeats)


def time_reference(layer, repeats: int):
    return time_forward_backward(
        layer, lambda x, w, lora: moe_sft_reference(x, layer.topk_ids, w, layer.w_gate, layer.w_up, layer.w_down,
                                                    lora, layer.lora_scaling, compute_dtype=torch.bfloat16),
        repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (0: no LoRA)")
    p.add_argument("--repeats", type=int, default=3, help="timed kt_ops runs (median)")
    p.add_argument("--ref-repeats", type=int, default=1, help="timed reference runs; 0 skips the reference")
    p.add_argument("--peak-tflops", type=float, default=15.7,
                   help="AMX bf16 peak for the %%-of-peak column (PERF.md: 15.7 on the 16-core host)")
    p.add_argument("--numa-nodes", type=int, default=0,
                   help="intermediate slices of the packed experts (0: one per NUMA node of this machine)")
    p.add_argument("--gate", choices=sorted(GATES), default="swiglu",
                   help="the experts' gated activation (the reference column stays SwiGLU: use --ref-repeats 0)")
    p.add_argument("--bias", action="store_true", help="give the experts gate/up and down biases")
    p.add_argument("--experts-format", default="bf16",
                   help="weight format of the packed experts (kt_ops.weight_formats(); the reference column "
                   "computes with the bf16 weights)")
    p.add_argument("--w8a8", action="store_true", help="int8 experts with W8A8 numerics (kt_ops.moe_sft's w8a8)")
    p.add_argument("--json", help="also write the figures to this file")
    add_malloc_option(p)
    args = p.parse_args()
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)

    shape = model_shape(args.shape)
    layer = random_layer(shape, args.tokens, args.rank or None, numa_nodes=args.numa_nodes,
                         experts_format=args.experts_format)
    flops = moe_flops(args.tokens, shape.top_k, shape.hidden, shape.intermediate)
    if args.ref_repeats and (args.gate != "swiglu" or args.bias):
        p.error("the reference column computes SwiGLU without biases: pass --ref-repeats 0 with --gate / --bias")
    e, i, h = shape.experts, shape.intermediate, shape.hidden
    biases = (torch.randn(e, 2 * i) * 0.1, torch.randn(e, h) * 0.1) if args.bias else (None, None)
    if args.w8a8 and args.experts_format != "int8":
        p.error("--w8a8 needs --experts-format int8")
    rows = {"kt_ops": time_kt(layer, args.repeats, GATES[args.gate], biases, args.w8a8)}
    if args.ref_repeats:
        rows["reference"] = time_reference(layer, args.ref_repeats)

    print(f"{shape.name} T={args.tokens} r={args.rank} threads={args.threads} "
          f"format={args.experts_format}{' w8a8' if args.w8a8 else ''} path={kt_ops.isa(args.experts_format, args.w8a8)} "
          f"slices={layer.experts.numa_slices} malloc={args.malloc} gate={args.gate} bias={args.bias} "
          f"(E={shape.experts} H={shape.hidden} I={shape.intermediate} K={shape.top_k})")
    print(f"{'':10} {'fwd s':>8} {'bwd s':>8} {'total s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'% peak':>7}")
    result = {"shape": shape.name, "tokens": args.tokens, "rank": args.rank, "threads": args.threads,
              "isa": kt_ops.isa(args.experts_format, args.w8a8), "experts_format": args.experts_format,
              "w8a8": args.w8a8, "malloc": args.malloc, "gate": args.gate, "bias": args.bias}
    for name, (f, b, _) in rows.items():
        total = f + b
        tflops = flops / total / 1e12
        print(f"{name:10} {f:8.3f} {b:8.3f} {total:8.3f} {args.tokens / total:10,.0f} {tflops:8.3f} "
              f"{100 * tflops / args.peak_tflops:6.1f}%")
        result[name] = {"forward_s": f, "backward_s": b, "tokens_per_s": args.tokens / total, "tflops": tflops}
    if "reference" in rows:
        y_kt, y_ref = rows["kt_ops"][2].float(), rows["reference"][2].float()
        rel = ((y_kt - y_ref).norm() / y_ref.norm()).item()
        speedup = result["kt_ops"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
        print(f"kt_ops / reference: {speedup:.1f}x  (forward outputs agree to {rel:.1e} relative)")
        result["speedup"] = speedup
    # The forward and the backward each read every active expert's packed weights once: at small T,
    # where they dominate, this against the machine's read bandwidth is the figure to plan with.
    active = layer.topk_ids.unique().numel()
    read = 2 * layer.experts.nbytes * active / shape.experts
    read_gbps = read / (result["kt_ops"]["forward_s"] + result["kt_ops"]["backward_s"]) / 1e9
    print(f"weights read: {read / 2**30:.2f} GiB per step ({active} of {shape.experts} experts active), "
          f"{read_gbps:.1f} GB/s")
    result["weights_read_gbps"] = read_gbps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB (packed experts {layer.experts.nbytes / 2**30:.2f} GiB)")
    result["peak_rss_gib"] = rss
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
