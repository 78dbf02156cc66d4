"""kt_ops's expert GEMMs against oneDNN's, on one expert's dense MLP.

    python benchmarks/bench_vs_onednn.py --threads 16

Should the kernels call oneDNN (through torch's bf16 matmul, which runs oneDNN's AMX
kernels) instead of their own? This times one expert with every token routed to it
(E = 1, K = 1, routing weight 1, no LoRA), forward and forward + backward for x, both ways:

    kt_ops:  kt_ops.moe_sft(x, ids = 0, weights = 1, packed expert)
    oneDNN:  (silu(x Wg^T) * (x Wu^T)) Wd^T in bf16 through torch autograd

M is the tokens one expert gets in a T = 4096 step (T * K / E): 256 for Qwen3-30B-A3B,
1024 for Mixtral-8x7B. TFLOP/s counts the 3 GEMMs of the forward (2*M*3*H*I) and the 3 of
the backward for dX.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kt_ops
from kt_ops.shapes import model_shape

from bench_moe import add_malloc_option, apply_malloc_option


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default="qwen3-30b-a3b:256,qwen3-30b-a3b:2048,mixtral-8x7b:1024",
                   help="comma-separated shape:M")
    add_malloc_option(p)
    args = p.parse_args()
    apply_malloc_option(args)
    torch.set_num_threads(args.threads)
    print(f"kt_ops path={kt_ops.isa()} threads={args.threads}; torch {torch.__version__} "
          f"mkldnn bf16 matmul={torch.backends.mkldnn.is_available()}")
    print(f"{'shape':>14} {'M':>5} {'H':>5} {'I':>6} | {'fwd TFLOP/s kt_ops':>18} {'oneDNN':>7} | "
          f"{'fwd+dX kt_ops':>13} {'oneDNN':>7}")
    for case in args.cases.split(","):
        name, m = case.split(":")
        shape, m = model_shape(name), int(m)
        h, i = shape.hidden, shape.intermediate
        g = torch.Generator().manual_seed(0)
        wg, wu = (torch.randn(1, i, h, generator=g) * h**-0.5).bfloat16(), (torch.randn(1, i, h, generator=g) * h**-0.5).bfloat16()
        wd = (torch.randn(1, h, i, generator=g) * i**-0.5).bfloat16()
        packed = kt_ops.pack_experts(wg, wu, wd)
        x = torch.randn(m, h, generator=g).bfloat16()
        ids, weights = torch.zeros(m, 1, dtype=torch.long), torch.ones(m, 1)

        def kt_fwd(x=x):
            return kt_ops.moe_sft(x, ids, weights, packed)

        def dense_fwd(x=x):
            return (F.silu(x @ wg[0].T) * (x @ wu[0].T)) @ wd[0].T

        def with_dx(fwd):
            def run():
                xg = x.detach().requires_grad_()
                y = fwd(xg)
                torch.autograd.grad(y, xg, torch.ones_like(y))
            return run

        torch.testing.assert_close(kt_fwd().float(), dense_fwd().float(), rtol=5e-2, atol=5e-2)
        flops_fwd = flops_bwd = 2 * m * 3 * h * i  # dZ = dY Wd, dX = dG Wg + dU Wu
        tf = lambda flops, s: flops / s / 1e12  # noqa: E731
        row = [tf(flops_fwd, median_seconds(kt_fwd, args.repeats)),
               tf(flops_fwd, median_seconds(dense_fwd, args.repeats)),
               tf(flops_fwd + flops_bwd, median_seconds(with_dx(kt_fwd), args.repeats)),
               tf(flops_fwd + flops_bwd, median_seconds(with_dx(dense_fwd), args.repeats))]
        print(f"{name:>14} {m:5d} {h:5d} {i:6d} | {row[0]:18.2f} {row[1]:7.2f} | {row[2]:13.2f} {row[3]:7.2f}")


if __name__ == "__main__":
    main()
