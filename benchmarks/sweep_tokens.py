"""tokens/s of kt_ops and the eager reference over the token count T, on one layer.

    python benchmarks/sweep_tokens.py --shape qwen3-30b-a3b --threads 16 --out benchmarks/sweep.json \
        [--plot benchmarks/tokens_per_s.png] [--kt-kernel]

The layer (random bf16 weights, LoRA rank 16) is built once for the largest T; each T uses
its first T tokens. Forward + backward, median of --repeats runs after a warm-up. With
--kt-kernel, kt-kernel's AMX SFT MoE runs the same layer too, driven as in
bench_vs_kt_kernel.py (its LoRA rounded to bf16, as kt-kernel keeps it).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

import kt_ops
from kt_ops.shapes import model_shape
from kt_ops.testing import random_layer

from bench_moe import add_malloc_option, apply_malloc_option, time_kt, time_reference


def make_kt_kernel_run(full, shape, max_tokens: int, args):
    """A function timing kt-kernel on a slice of `full` (forward + backward seconds), or None
    when kt_kernel does not import."""
    import bench_vs_kt_kernel as vs

    kt_kernel = vs.import_kt_kernel()
    if kt_kernel is None:
        return None
    lora = [t.bfloat16() for t in full.lora]
    wrapper = vs.kt_make_wrapper(kt_kernel, shape, max_tokens, args.rank, full.lora_scaling * args.rank,
                                 args.threads, 1)
    vs.kt_load_weights(wrapper, full)
    grads = vs.kt_init_lora(wrapper, lora)

    def run(layer, repeats: int) -> float:
        grad_y = torch.randn(layer.x.shape, dtype=torch.bfloat16)
        f, b, _ = vs.bench(lambda: vs.kt_kernel_run(wrapper, grads, layer, grad_y), repeats)
        return f + b

    run.keep_alive = (wrapper, lora, grads)  # kt-kernel reads these by pointer
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,16,64,256,1024,4096,8192", help="comma-separated T values")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference-up-to", type=int, default=8192, help="largest T the reference runs at")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--plot", help="PNG plot of tokens/s vs T (needs matplotlib)")
    p.add_argument("--kt-kernel", action="store_true", help="also time kt-kernel, when it imports")
    add_malloc_option(p)
    args = p.parse_args()
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    ts = [int(t) for t in args.tokens.split(",")]
    shape = model_shape(args.shape)
    full = random_layer(shape, max(ts), args.rank)
    kt_kernel_run = make_kt_kernel_run(full, shape, max(ts), args) if args.kt_kernel else None
    rows = []
    for t in ts:
        layer = replace(full, x=full.x[:t], topk_ids=full.topk_ids[:t], topk_weights=full.topk_weights[:t])
        f, b, _ = time_kt(layer, args.repeats)
        row = {"tokens": t, "kt_ops": t / (f + b)}
        if t <= args.reference_up_to:
            rf, rb, _ = time_reference(layer, 1 if t >= 1024 else args.repeats)
            row["reference"] = t / (rf + rb)
        if kt_kernel_run is not None:
            row["kt_kernel"] = t / kt_kernel_run(layer, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"shape": shape.name, "threads": args.threads, "rank": args.rank, "isa": kt_ops.isa(), "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in [("kt_ops", f"kt_ops ({kt_ops.isa()})"), ("kt_kernel", "kt-kernel AMXBF16_SFT"),
                           ("reference", "eager reference (bf16)")]:
            pts = [(r["tokens"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step (T)")
        ax.set_ylabel("tokens/s, forward + backward")
        ax.set_title(f"{shape.name} MoE layer, LoRA r={args.rank}, {args.threads} threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
