"""Peak resident memory of kt_ops.load_experts on a generated multi-GB checkpoint.

    python benchmarks/bench_load_experts.py --shape qwen3-30b-a3b --layers 4 --dir /tmp/kt_ckpt

Writes (once; reused when --dir already holds it) a checkpoint of --layers MoE layers of the
shape's routed experts, random bf16, one safetensors shard per layer with per-expert keys
(``--fused`` for transformers 5.x fused keys). Then, in a fresh process, loads every layer
with load_experts and reports the peak RSS (VmHWM) above the process's RSS before loading,
against the bound ``packed bytes + one layer's bf16 experts`` (+10% allowed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from kt_ops.shapes import model_shape


def write_checkpoint(directory: str, shape, layers: int, fused: bool) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    h, i, e = shape.hidden, shape.intermediate, shape.experts
    config = {"model_type": "qwen3_moe", "hidden_size": h, "moe_intermediate_size": i, "num_experts": e,
              "num_experts_per_tok": shape.top_k, "num_hidden_layers": layers}
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        if fused:
            tensors = {prefix + "gate_up_proj": torch.randn(e, 2 * i, h, generator=g).bfloat16(),
                       prefix + "down_proj": torch.randn(e, h, i, generator=g).bfloat16()}
        else:
            tensors = {f"{prefix}{x}.{p}.weight": torch.randn(*s, generator=g).bfloat16()
                       for x in range(e) for p, s in [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))]}
        shard = f"model-{layer:05d}.safetensors"
        save_file(tensors, os.path.join(directory, shard))
        weight_map.update({k: shard for k in tensors})
        print(f"wrote layer {layer + 1}/{layers}", file=sys.stderr)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(directory: str) -> dict:
    """Runs in the child process: load every layer, report RSS figures in GiB."""
    import kt_ops

    before = status_kib("VmRSS")
    experts = kt_ops.load_experts(directory, progress=False)
    peak = status_kib("VmHWM")
    packed = sum(p.nbytes for p in experts.values())
    layer = max(p.nbytes for p in experts.values())  # real shapes pack with no padding: = bf16 bytes
    gib = 1 << 30
    return {"layers": len(experts), "packed_gib": packed / gib, "one_layer_gib": layer / gib,
            "rss_before_gib": before * 1024 / gib, "peak_rss_gib": peak * 1024 / gib,
            "peak_increase_gib": (peak - before) * 1024 / gib,
            "bound_gib": (packed + layer) / gib, "ratio_to_bound": (peak - before) * 1024 / (packed + layer)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/kt_ckpt")
    ap.add_argument("--fused", action="store_true", help="fused gate_up_proj / down_proj keys")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.dir)))
        return
    if not os.path.exists(os.path.join(args.dir, "model.safetensors.index.json")):
        write_checkpoint(args.dir, model_shape(args.shape), args.layers, args.fused)
    out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--child"], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["shape"], result["fused"] = args.shape, args.fused
    print(json.dumps(result, indent=1))
    print(f"peak RSS increase {result['peak_increase_gib']:.2f} GiB = {result['ratio_to_bound']:.3f} x "
          f"(packed {result['packed_gib']:.2f} + one layer {result['one_layer_gib']:.2f} GiB); target <= 1.10")


if __name__ == "__main__":
    main()
