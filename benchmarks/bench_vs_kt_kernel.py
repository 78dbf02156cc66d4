"""kt_ops.moe_sft against kt-kernel's AMX SFT MoE: agreement and forward + backward throughput.

    python benchmarks/bench_vs_kt_kernel.py --shape qwen3-30b-a3b --tokens 4096 --threads 16
    python benchmarks/bench_vs_kt_kernel.py ... --experts-format w8a8     # against kt-kernel's INT8_SFT

Both get one layer from kt_ops.testing.random_layer: the same bf16 expert weights, expert
ids, routing weights and LoRA (rank --rank, alpha --alpha, on gate, up and down of every
expert). kt-kernel keeps LoRA in bf16, so the LoRA values are rounded to bf16 and both
libraries get those. kt-kernel runs through its public SFT wrapper,
KTMoEWrapper(mode="sft", method=...), on its own thread pool of --threads threads; kt_ops
runs on torch's --threads threads, its experts packed in --experts-format. bf16 experts meet
kt-kernel's AMXBF16_SFT; int8 ones (weight-only, or W8A8 with "w8a8") its INT8_SFT, which
quantizes the same bf16 weights itself, in its own scheme: the agreement check then has a
quantized format's tolerance.

The script first runs both in this process and compares y and the gradients of x, of the
routing weights and of the six LoRA tensors (||kt_kernel - kt_ops|| / ||kt_ops||, tolerance
3e-2, bf16 level). It then times forward and backward of each (one warm-up run, then the
median of --repeats) in a fresh process per library, rebuilding the same layer there: in
one process, the idle library's pool threads poll for work and take cores from the other.

kt-kernel is no dependency of kt_ops and this script installs nothing: without it, it says
how to install it and exits 0. A failing kt-kernel call is reported with the step that
failed and exits 2; a disagreement beyond tolerance prints FAIL and exits 1.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

import kt_ops
from kt_ops.shapes import MoeShape, model_shape
from kt_ops.testing import RandomLayer, random_layer

from bench_moe import add_malloc_option, apply_malloc_option

# kt-kernel's method for each kt_ops experts format, and the agreement tolerance: bf16 level,
# or, where each library quantizes the weights (and for W8A8 the activations) in its own
# scheme, that of kt_ops's W8A8 against its weight-only int8 (kt_ops.reference.TOLERANCES).
KT_METHODS = {"bf16": "AMXBF16_SFT", "int8": "INT8_SFT", "w8a8": "INT8_SFT"}
TOLERANCES = {"bf16": 3e-2, "int8": 1e-1, "w8a8": 1e-1}
# The six LoRA tensors in kt_ops.moe_sft's order; kt-kernel's init_lora_weights takes the same
# tensors by these keyword names (kt_kernel/sft/amx.py:350-358).
LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
GRAD_NAMES = ("x", "topk_weights") + LORA_NAMES

INSTALL_HINT = """\
kt_kernel could not be imported ({error}), so there is nothing to compare against.
Install it where kt_ops runs (kt-kernel wheels: CPython 3.10-3.12, torch >=2.10,<2.12):
    pip install kt-kernel
On a host without network access, download the wheel on a machine with it,
    pip download kt-kernel --no-deps -d wheels/
(add --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: when that
machine differs), carry wheels/ over, then
    pip install --no-deps wheels/kt_kernel-*.whl
kt_kernel imports numpy, safetensors and gguf: carry their wheels too if the host lacks them."""


@dataclass
class Run:
    """One timed forward + backward: seconds, the output and the gradients by GRAD_NAMES."""

    forward_s: float
    backward_s: float
    y: torch.Tensor
    grads: dict[str, Optional[torch.Tensor]]


def import_kt_kernel() -> Optional[ModuleType]:
    """kt_kernel, or None after printing how to install it."""
    try:
        import kt_kernel
    except Exception as exc:  # a missing package, or a wheel built for another Python / torch
        print(INSTALL_HINT.format(error=f"{type(exc).__name__}: {exc}"))
        return None
    return kt_kernel


@contextmanager
def kt_step(name: str) -> Iterator[None]:
    """Turns an exception from a kt-kernel call into a message naming the step, and exit 2."""
    try:
        yield
    except Exception as exc:
        traceback.print_exc()
        print(f"\nkt-kernel step '{name}' failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)


def kt_make_wrapper(kt_kernel: ModuleType, method: str, shape: MoeShape, tokens: int, rank: int, alpha: float,
                    threads: int, pools: int):
    """kt-kernel's SFT MoE wrapper for one layer.

    Based on kt_kernel/experts.py:118-145 (KTMoEWrapper.__new__; gpu_experts_mask, weight_path
    and chunked_prefill_size have no defaults) and :344-391 (mode="sft" builds
    sft/amx.py AMXSFTMoEWrapper). The thread pool is a process-wide singleton sized by the first
    wrapper (experts_base.py:159-198): cpuinfer_threads threads split over threadpool_count
    NUMA sub-pools. chunked_prefill_size caps the tokens of one call (sft/base.py:311) and sizes
    the kernel's buffers (sft/amx.py:173). weight_path is unused: the weights come from tensors.
    """
    with kt_step("construct KTMoEWrapper(mode='sft')"):
        return kt_kernel.KTMoEWrapper(
            layer_idx=0,
            num_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            hidden_size=shape.hidden,
            moe_intermediate_size=shape.intermediate,
            gpu_experts_mask=None,
            cpuinfer_threads=threads,
            threadpool_count=pools,
            weight_path="",
            chunked_prefill_size=tokens,
            method=method,
            mode="sft",
            num_gpu_experts=0,
            lora_rank=rank,
            lora_alpha=alpha,
            max_cache_depth=1,  # one forward per backward here (no activation checkpointing)
        )


def kt_load_weights(wrapper, method: str, layer: RandomLayer) -> None:
    """Hands kt-kernel the bf16 expert weights in kt_ops's unpacked layout.

    Based on kt_kernel/sft/amx.py:497-531 (load_weights_from_tensors) and sft/wrapper.py:304-353,
    which passes the HF layout: gate, up [E, I, H] and down [E, H, I], bf16, contiguous. The
    kernel reads them by pointer and may again when it first builds its backward copies, so
    `layer` must outlive the wrapper (main() keeps it).

    INT8_SFT: load_weights_from_tensors refuses in-memory tensors (amx.py:523, "pre-quantized
    .kt weights only") and reads `.kt` files from its converter instead; its C++ class
    (AMXInt8_SFT_MOE) quantizes bf16 weights itself when given their pointers, as
    load_weights_from_tensors gives them for AMXBF16_SFT. So the same three tensors are set
    where load_weights looks for them (amx.py:362-363: a set gate_proj skips the files;
    :404-406: their pointers go to the C++ config) and load_weights is called.
    """
    ids = torch.arange(layer.w_gate.shape[0], dtype=torch.int64)  # no expert remapping
    weights = dict(gate_proj=layer.w_gate.contiguous(), up_proj=layer.w_up.contiguous(),
                   down_proj=layer.w_down.contiguous())
    if method == "INT8_SFT":
        with kt_step("load_weights (INT8_SFT from bf16 tensors)"):
            for name, tensor in weights.items():
                setattr(wrapper, name, tensor)
            wrapper.load_weights(ids)
        return
    with kt_step("load_weights_from_tensors"):
        wrapper.load_weights_from_tensors(**weights, physical_to_logical_map_cpu=ids)


def kt_init_lora(wrapper, lora: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gives kt-kernel our LoRA and six gradient buffers; returns the buffers.

    Based on kt_kernel/sft/amx.py:350-394 (init_lora_weights): bf16 A [E, r, in] and
    B [E, out, r], PEFT layout as in kt_ops, for gate, up and down, plus one gradient buffer of
    the same shape per tensor; called after the weights are loaded, as sft/wrapper.py and
    sft/lora.py:239-245 do. The kernel keeps raw pointers to all twelve tensors, so they are
    kept alive here, and backward adds into the gradient buffers (kt-kernel's
    operators/amx/sft_moe.hpp, backward_down_amx: `cur += acc * scale`), so kt_kernel_run zeroes them.
    """
    grads = [torch.zeros_like(t) for t in lora]
    with kt_step("init_lora_weights"):
        wrapper.init_lora_weights(**dict(zip(LORA_NAMES, lora)),
                                  **{f"grad_{n}": g for n, g in zip(LORA_NAMES, grads)})
    return grads


def kt_forward(wrapper, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """y [T, H] bf16, caching what backward needs.

    Based on kt_kernel/sft/base.py:361-381 (forward): synchronous submit + sync on the
    kt-kernel pool; x is copied into a bf16 buffer, ids into int64 and weights into fp32
    (sft/base.py:325-335), and the output comes back as a CPU clone.
    """
    with kt_step("forward"):
        return wrapper.forward(x, topk_ids, topk_weights, save_for_backward=True)


def kt_backward(wrapper, grad_y: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad x, grad routing weights or None); the LoRA gradients land in kt_init_lora's buffers.

    Based on kt_kernel/sft/base.py:383-400 (backward returns (grad_input bf16 [T, H],
    grad_weights fp32 [T, K])) and sft/autograd.py:236-241, which also accepts a 3-tuple
    (grad_input, _, grad_weights).
    """
    with kt_step("backward"):
        out = wrapper.backward(grad_y)
    if isinstance(out, tuple) and len(out) in (2, 3):
        return out[0], out[-1]
    if isinstance(out, torch.Tensor):
        return out, None
    print(f"kt-kernel step 'backward' returned a {type(out).__name__}; expected (grad_input, grad_weights)",
          file=sys.stderr)
    sys.exit(2)


def kt_ops_run(layer: RandomLayer, lora: list[torch.Tensor], grad_y: torch.Tensor) -> Run:
    x = layer.x.detach().requires_grad_()
    w = layer.topk_weights.detach().requires_grad_()
    lo = [t.detach().requires_grad_() for t in lora]
    t0 = time.perf_counter()
    y = kt_ops.moe_sft(x, layer.topk_ids, w, layer.experts, lo, layer.lora_scaling)
    t1 = time.perf_counter()
    grads = torch.autograd.grad(y, [x, w, *lo], grad_y)
    t2 = time.perf_counter()
    return Run(t1 - t0, t2 - t1, y.detach(), dict(zip(GRAD_NAMES, grads)))


def kt_kernel_run(wrapper, lora_grads: list[torch.Tensor], layer: RandomLayer, grad_y: torch.Tensor) -> Run:
    for g in lora_grads:  # kt-kernel accumulates into them; zeroing is not timed
        g.zero_()
    t0 = time.perf_counter()
    y = kt_forward(wrapper, layer.x, layer.topk_ids, layer.topk_weights)
    t1 = time.perf_counter()
    grad_x, grad_w = kt_backward(wrapper, grad_y)
    t2 = time.perf_counter()
    grads = {"x": grad_x, "topk_weights": grad_w}
    grads.update({n: g.clone() for n, g in zip(LORA_NAMES, lora_grads)})
    return Run(t1 - t0, t2 - t1, y, grads)


def bench(run: Callable[[], Run], repeats: int) -> tuple[float, float, Run]:
    """Median forward and backward seconds over `repeats` runs after one warm-up, and the last run."""
    last = run()  # warm-up
    fwd, bwd = [], []
    for _ in range(repeats):
        last = run()
        fwd.append(last.forward_s)
        bwd.append(last.backward_s)
    return statistics.median(fwd), statistics.median(bwd), last


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return float("inf")
    ref = b.norm().item()
    diff = (a - b).norm().item()
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))


def compare(kt_k: Run, kt_o: Run) -> dict[str, Optional[float]]:
    """Relative errors of kt-kernel against kt_ops; None where kt-kernel gave no such tensor."""
    errors: dict[str, Optional[float]] = {"y": rel_err(kt_k.y, kt_o.y)}
    for name in GRAD_NAMES:
        got = kt_k.grads.get(name)
        errors[f"grad {name}"] = None if got is None else rel_err(got, kt_o.grads[name])
    return errors


def time_in_child(args: argparse.Namespace, library: str) -> tuple[float, float]:
    """Median forward and backward seconds of `library`, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--time-only", library] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("time_only", "json") and v is not None]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout + out.stderr, file=sys.stderr)
        print(f"timing {library} in a child process failed (exit {out.returncode})", file=sys.stderr)
        sys.exit(2)
    # kt-kernel prints to stdout as its pool shuts down: take the line the child wrote.
    timing = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith('{"forward_s"')))
    return timing["forward_s"], timing["backward_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (kt-kernel's SFT path needs one >= 1)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; scaling is alpha / rank")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    p.add_argument("--kt-numa-pools", type=int, default=1,
                   help="kt-kernel's threadpool_count: NUMA sub-pools sharing the --threads threads")
    p.add_argument("--experts-format", choices=sorted(KT_METHODS), default="bf16",
                   help="kt_ops's experts: bf16 (against kt-kernel's AMXBF16_SFT), int8 or w8a8 (against INT8_SFT)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--time-only", choices=["kt_ops", "kt_kernel"],
                   help="(internal) time one library in this process and print its JSON")
    add_malloc_option(p)
    args = p.parse_args()
    apply_malloc_option(args)
    if args.rank < 1 or args.repeats < 1 or args.tokens < 1:
        p.error("--rank, --repeats and --tokens must be >= 1")

    # The kt_ops timing child never imports kt_kernel: its import alone changes the process.
    kt_kernel = import_kt_kernel() if args.time_only != "kt_ops" else None
    if kt_kernel is None and args.time_only != "kt_ops":
        sys.exit(0)
    faulthandler.enable()  # a crash inside kt-kernel's C++ still shows the Python step it came from
    torch.set_num_threads(args.threads)

    shape = model_shape(args.shape)
    layer = random_layer(shape, args.tokens, args.rank, args.alpha, experts_format=args.experts_format)
    method, tolerance = KT_METHODS[args.experts_format], TOLERANCES[args.experts_format]
    lora = [t.to(torch.bfloat16).contiguous() for t in layer.lora]  # kt-kernel's LoRA dtype
    grad_y = torch.randn(args.tokens, shape.hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    version = getattr(kt_kernel, "__version__", "?")
    variant = getattr(kt_kernel, "__cpu_variant__", "?")
    print(f"{shape.name} T={args.tokens} r={args.rank} alpha={args.alpha:g} threads={args.threads} "
          f"(E={shape.experts} H={shape.hidden} I={shape.intermediate} K={shape.top_k})")
    isa = kt_ops.isa(layer.experts.format, layer.experts.w8a8)
    print(f"kt_ops {args.experts_format} experts, path={isa} on {torch.get_num_threads()} torch threads; kt-kernel "
          f"{version} variant={variant} int8 kernel={getattr(kt_kernel, '__int8_kernel__', '?')} {method} on "
          f"{args.threads} threads in {args.kt_numa_pools} pool(s)", flush=True)

    if args.time_only == "kt_ops":  # no kt-kernel pool exists in this process
        f, b, _ = bench(lambda: kt_ops_run(layer, lora, grad_y), args.repeats)
        print(json.dumps({"forward_s": f, "backward_s": b}))
        return
    wrapper = kt_make_wrapper(kt_kernel, method, shape, args.tokens, args.rank, args.alpha, args.threads,
                              args.kt_numa_pools)
    kt_load_weights(wrapper, method, layer)
    lora_grads = kt_init_lora(wrapper, lora)
    if args.time_only == "kt_kernel":  # kt_ops's pool is never started in this process
        f, b, _ = bench(lambda: kt_kernel_run(wrapper, lora_grads, layer, grad_y), args.repeats)
        print(json.dumps({"forward_s": f, "backward_s": b}))
        return

    errors = compare(kt_kernel_run(wrapper, lora_grads, layer, grad_y), kt_ops_run(layer, lora, grad_y))
    del wrapper  # its pool threads would otherwise stay in this process
    rows = {name: time_in_child(args, name) for name in ("kt_ops", "kt_kernel")}
    bad = [n for n, e in errors.items() if e is not None and not e <= tolerance]  # NaN is bad too
    ok = not bad
    print(f"\nagreement ||kt_kernel - kt_ops|| / ||kt_ops||, tolerance {tolerance:.0e}:")
    for name, err in errors.items():
        shown = "not returned by kt-kernel" if err is None else f"{err:.2e}{'  <-- over' if name in bad else ''}"
        print(f"  {name:<18} {shown}")
    print("PASS" if ok else f"FAIL: {', '.join(bad)} beyond {tolerance:.0e}")

    print(f"\n{'':10} {'fwd s':>8} {'bwd s':>8} {'total s':>8} {'tokens/s':>10}")
    result = {"shape": shape.name, "tokens": args.tokens, "rank": args.rank, "alpha": args.alpha,
              "threads": args.threads, "isa": isa, "experts_format": args.experts_format,
              "kt_kernel_version": version, "kt_kernel_variant": variant, "kt_kernel_method": method,
              "kt_kernel_numa_pools": args.kt_numa_pools}
    for name, (f, b) in rows.items():
        total = f + b
        print(f"{name:10} {f:8.3f} {b:8.3f} {total:8.3f} {args.tokens / total:10,.0f}")
        result[name] = {"forward_s": f, "backward_s": b, "tokens_per_s": args.tokens / total}
    ratio = result["kt_ops"]["tokens_per_s"] / result["kt_kernel"]["tokens_per_s"]
    print(f"kt_ops / kt-kernel tokens/s: {ratio:.2f}x")
    result.update({"ratio": ratio, "rel_err": errors, "tolerance": tolerance, "pass": ok})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
