"""Bit-for-bit comparison of two builds of kt_ops: the outputs and every gradient of
``kt_ops.moe_sft`` on a fixed set of layers, on every kernel path this CPU has.

A refactor of the kernel core that must not change numerics is checked by dumping with the
old build and the new one (each on its own ``PYTHONPATH``) and comparing:

    PYTHONPATH=/path/to/old python benchmarks/compare_outputs.py dump old.safetensors
    PYTHONPATH=/path/to/new python benchmarks/compare_outputs.py dump new.safetensors
    python benchmarks/compare_outputs.py compare old.safetensors new.safetensors

Only the public API is used (``pack_experts``, ``moe_sft``, ``Gate``), so builds whose op
schemas differ compare as long as that API is the same. ``compare`` exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

ISAS = ("amx", "avx512", "avx2", "scalar")

# (name, H, I, E, K, T, LoRA ranks (gate, up, down; None: no LoRA on it), x dtype, gate, biases, numa_nodes)
CASES = [
    ("plain", 64, 96, 8, 2, 37, (8, 8, 8), torch.bfloat16, None, False, 1),
    ("odd_sizes", 70, 45, 5, 3, 7, (4, 4, 4), torch.bfloat16, None, False, 1),
    ("one_token", 64, 64, 4, 2, 1, (8, 8, 8), torch.bfloat16, None, False, 1),
    ("no_tokens", 64, 64, 4, 2, 0, (8, 8, 8), torch.bfloat16, None, False, 1),
    ("long", 128, 256, 16, 4, 513, (16, 16, 16), torch.bfloat16, None, False, 1),
    ("fp32", 64, 96, 8, 2, 37, (8, 8, 8), torch.float32, None, False, 1),
    ("no_lora", 64, 96, 8, 2, 37, None, torch.bfloat16, None, False, 1),
    ("mixed_ranks", 64, 96, 8, 2, 37, (4, None, 12), torch.bfloat16, None, False, 1),
    ("gelu", 64, 96, 8, 2, 37, (8, 8, 8), torch.bfloat16, ("gelu", 1.0, None, 0.0), False, 1),
    ("gelu_tanh", 64, 96, 8, 2, 37, (8, 8, 8), torch.bfloat16, ("gelu_tanh", 1.0, None, 0.0), False, 1),
    ("gpt_oss", 64, 96, 8, 2, 37, (8, 8, 8), torch.bfloat16, ("silu", 1.702, 1.5, 1.0), True, 1),
    ("biases", 64, 96, 8, 2, 37, (8, 8, 8), torch.bfloat16, None, True, 1),
    ("two_slices", 64, 160, 8, 2, 37, (8, 8, 8), torch.bfloat16, None, True, 2),
    ("idle_experts", 64, 96, 32, 2, 9, (8, 8, 8), torch.bfloat16, None, False, 1),
]


def _case_outputs(kt_ops, case, seed: int) -> dict[str, torch.Tensor]:
    name, H, I, E, K, T, ranks, dtype, gate, biases, numa = case
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    w_gate = randn(E, I, H, scale=H**-0.5).bfloat16()
    w_up = randn(E, I, H, scale=H**-0.5).bfloat16()
    w_down = randn(E, H, I, scale=I**-0.5).bfloat16()
    experts = kt_ops.pack_experts(w_gate, w_up, w_down, numa)
    pool = E // 4 if name == "idle_experts" else E
    ids = torch.rand(T, pool, generator=gen).topk(K, dim=1).indices if T else torch.zeros(0, K, dtype=torch.long)
    weights = torch.rand(T, K, generator=gen).requires_grad_()
    x = randn(T, H).to(dtype).requires_grad_()
    leaves = {"x": x, "topk_weights": weights}
    lora = None
    if ranks is not None:
        lora = []
        for proj, (r, (out, inp)) in enumerate(zip(ranks, ((I, H), (I, H), (H, I)))):
            if r is None:
                lora += [None, None]
                continue
            a = randn(E, r, inp, scale=0.5 * inp**-0.5).requires_grad_()
            b = randn(E, out, r, scale=0.5 * r**-0.5).requires_grad_()
            leaves[f"lora{proj}_a"], leaves[f"lora{proj}_b"] = a, b
            lora += [a, b]
    gate_args = {} if gate is None else {"gate": kt_ops.Gate(*gate)}
    bias_args = {}
    if biases:
        bias_args = {"gate_up_bias": randn(E, 2 * I).to(dtype).requires_grad_(),
                     "down_bias": randn(E, H).to(dtype).requires_grad_()}
        leaves.update(bias_args)
    y = kt_ops.moe_sft(x, ids, weights, experts, lora, 1.5, **gate_args, **bias_args)
    y.backward(randn(T, H).to(dtype))
    out = {"y": y.detach()}
    out.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    return out


def dump(path: str) -> None:
    import kt_ops

    torch.manual_seed(0)
    tensors = {}
    best = kt_ops.isa()
    for isa in ISAS[ISAS.index(best):]:
        os.environ["KT_OPS_MAX_ISA"] = isa
        assert kt_ops.isa() == isa
        for seed, case in enumerate(CASES):
            for key, value in _case_outputs(kt_ops, case, seed).items():
                tensors[f"{isa}/{case[0]}/{key}"] = value.contiguous()
    save_file(tensors, path)
    print(f"{path}: {len(tensors)} tensors from kt_ops at {kt_ops.__file__}, paths {ISAS[ISAS.index(best):]}")


def compare(old: str, new: str) -> int:
    a, b = load_file(old), load_file(new)
    if a.keys() != b.keys():
        print("different tensors:", sorted(a.keys() ^ b.keys()))
        return 1
    differ = [k for k in sorted(a) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    for k in differ:
        print(f"differs: {k} max |diff| {(a[k].double() - b[k].double()).abs().max().item():.3g}")
    print(f"{len(a) - len(differ)} of {len(a)} tensors bit-identical")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump", help="write this build's outputs").add_argument("path")
    c = sub.add_parser("compare", help="compare two dumps bit for bit")
    c.add_argument("old")
    c.add_argument("new")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.path)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
