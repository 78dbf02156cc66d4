"""Streaming expert weights out of Hugging Face safetensors checkpoints into the packed layout."""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Optional, Union

import torch

from kt_ops.api import PackedExperts, pack_experts
from kt_ops.hf import ARCHITECTURES

FP8_BLOCK = 128  # DeepSeek-V3-style fp8 checkpoints scale each 128 x 128 block


def _weight_files(checkpoint_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            return {k: os.path.join(checkpoint_dir, v) for k, v in json.load(fh)["weight_map"].items()}
    single = os.path.join(checkpoint_dir, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"kt_ops.load_experts: {checkpoint_dir} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _dequantize(weight: torch.Tensor, scale_inv: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """bf16 weights; fp8 ones multiplied by their per-block scale."""
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return weight.to(torch.bfloat16)
    if scale_inv is None:
        raise KeyError(f"kt_ops.load_experts: {name} is fp8 but the checkpoint has no {name}_scale_inv")
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    return (weight.float() * scale).to(torch.bfloat16)


class _LayerReader:
    """Reads tensors of one layer, opening each shard once and closing it afterwards, so no
    memory map outlives the layer."""

    def __init__(self, files: dict[str, str]):
        self.files, self.handles = files, {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt")
        return self.handles[path].get_tensor(name)

    def weight(self, name: str) -> torch.Tensor:
        scale = name + "_scale_inv"
        w = self.get(name)
        return _dequantize(w, self.get(scale) if scale in self.files else None, name)

    def close(self) -> None:
        self.handles.clear()


def load_experts(checkpoint_dir: Union[str, os.PathLike], *, layers: Optional[list[int]] = None,
                 numa_nodes: int = 0, progress: bool = True) -> dict[int, PackedExperts]:
    """Packs the routed experts of every MoE layer of a safetensors checkpoint, one layer at a time.

    Args:
        checkpoint_dir: a Hugging Face checkpoint directory: ``config.json`` (its
            ``model_type`` picks the family in :data:`kt_ops.hf.ARCHITECTURES`) and
            ``model.safetensors`` or shards with ``model.safetensors.index.json``. Expert
            tensors may be per expert (``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``,
            Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``) or fused
            (``model.layers.{l}.mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``), in
            bf16/fp16/fp32 or fp8 with 128x128 block scales (``..._scale_inv``).
        layers: layer indices to load (default: every MoE layer).
        numa_nodes: passed to :func:`kt_ops.pack_experts`.
        progress: show a progress bar over the layers.

    Returns ``{layer index: PackedExperts}`` for :func:`kt_ops.patch_model`'s ``experts``.

    Memory: tensors are read through safetensors' memory maps, one layer at a time; a layer's
    bf16 weights are freed once packed, so the peak is the packed experts so far plus about
    one layer of bf16 expert weights.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    with open(os.path.join(checkpoint_dir, "config.json")) as fh:
        model_type = json.load(fh).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"kt_ops.load_experts: no MoE family for model_type {model_type!r} in "
                         f"{checkpoint_dir}/config.json; supported: {', '.join(sorted(ARCHITECTURES))}")
    family = ARCHITECTURES[model_type]
    files = _weight_files(checkpoint_dir)
    gate, up, down = family.expert_linears
    per_expert = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(family.checkpoint_experts)}\.(\d+)\."
                            rf"({gate}|{up}|{down})\.weight$")
    fused = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(family.experts)}\.(gate_up_proj|down_proj)$")
    experts_of: dict[int, set[int]] = defaultdict(set)
    fused_layers: set[int] = set()
    for name in files:
        if m := per_expert.match(name):
            experts_of[int(m.group(1))].add(int(m.group(2)))
        elif m := fused.match(name):
            fused_layers.add(int(m.group(1)))
    found = sorted(set(experts_of) | fused_layers)
    wanted = found if layers is None else list(layers)
    missing = [l for l in wanted if l not in found]
    if missing:
        raise KeyError(f"kt_ops.load_experts: no expert weights for layer(s) {missing} in {checkpoint_dir} "
                       f"(layers with experts: {found})")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(wanted), desc="packing experts", unit="layer")
    out: dict[int, PackedExperts] = {}
    for layer in wanted:
        reader = _LayerReader(files)
        if layer in fused_layers:
            prefix = f"model.layers.{layer}.{family.experts}."
            gate_up, w_down = reader.get(prefix + "gate_up_proj"), reader.get(prefix + "down_proj")
            i = w_down.shape[2]
            w_gate, w_up, w_down = (t.to(torch.bfloat16) for t in (gate_up[:, :i], gate_up[:, i:], w_down))
            del gate_up
        else:
            ids = sorted(experts_of[layer])
            if ids != list(range(len(ids))):
                raise KeyError(f"kt_ops.load_experts: layer {layer} has experts {ids[:4]}...; expected 0..{len(ids) - 1}")
            prefix = f"model.layers.{layer}.{family.checkpoint_experts}."

            def stack(proj: str) -> torch.Tensor:
                names = [f"{prefix}{e}.{proj}.weight" for e in ids]
                absent = [n for n in names if n not in files]
                if absent:
                    raise KeyError(f"kt_ops.load_experts: missing key {absent[0]}")
                return torch.stack([reader.weight(n) for n in names])

            w_gate, w_up, w_down = stack(gate), stack(up), stack(down)
        reader.close()
        out[layer] = pack_experts(w_gate, w_up, w_down, numa_nodes)
        del w_gate, w_up, w_down
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
