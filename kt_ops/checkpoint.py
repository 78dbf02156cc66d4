"""Streaming expert weights out of Hugging Face safetensors checkpoints into the packed layout."""
from __future__ import annotations

import json
import os
import re
import struct
from collections import defaultdict
from typing import Any, Optional, Union

import torch
from torch import nn

from kt_ops.api import PackedExperts, pack_experts
from kt_ops.hf import ARCHITECTURES, Family

FP8_BLOCK = 128  # DeepSeek-V3-style fp8 checkpoints scale each 128 x 128 block


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Shard:
    """One safetensors file, read with plain file reads into buffers the caller owns. Unlike a
    memory map, nothing read this way stays resident in the process once the caller drops it,
    so loading costs no more memory than the tensors being built."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries: dict[str, dict] = header

    def info(self, name: str) -> tuple[torch.dtype, list[int]]:
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"kt_ops: {name} in {self.path} has dtype {entry['dtype']}, which kt_ops cannot read")
        return _DTYPES[entry["dtype"]], entry["shape"]

    def read(self, name: str, out: Optional[torch.Tensor] = None, first: int = 0) -> torch.Tensor:
        """Elements ``first .. first + out.numel()`` of tensor ``name`` (flattened) into the
        contiguous ``out`` of the file's dtype; the whole tensor when ``out`` is None."""
        dtype, shape = self.info(name)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        assert out.dtype == dtype and out.is_contiguous()
        begin, end = self.entries[name]["data_offsets"]
        offset = begin + first * out.element_size()
        if offset + out.nbytes > end:
            raise ValueError(f"kt_ops: reading {out.numel()} elements at {first} runs past {name} in {self.path}")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.data_start + offset)
            done = 0
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                n = fh.readinto(view[done:])
                if not n:
                    raise ValueError(f"kt_ops: {self.path} ends inside {name}")
                done += n
        return out


class _Checkpoint:
    """Tensor name -> shard of a Hugging Face checkpoint directory (single file or sharded)."""

    def __init__(self, checkpoint_dir: str, caller: str):
        index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
            paths = {f: os.path.join(checkpoint_dir, f) for f in set(weight_map.values())}
        else:
            single = os.path.join(checkpoint_dir, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{caller}: {checkpoint_dir} has neither model.safetensors nor "
                                        "model.safetensors.index.json")
            weight_map, paths = None, {"model.safetensors": single}
        shards = {f: _Shard(p) for f, p in paths.items()}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in shards["model.safetensors"].entries}
        self.shard_of = {k: shards[f] for k, f in weight_map.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def names(self) -> list[str]:
        return list(self.shard_of)

    def info(self, name: str) -> tuple[torch.dtype, list[int]]:
        return self.shard_of[name].info(name)

    def read(self, name: str, out: Optional[torch.Tensor] = None, first: int = 0) -> torch.Tensor:
        return self.shard_of[name].read(name, out, first)

    def read_weight(self, name: str, out: torch.Tensor, first: int = 0) -> None:
        """Elements of ``name`` into the bf16 ``out`` (see :meth:`_Shard.read`), converted;
        fp8 weights (whole tensors only) multiplied by their 128x128 block scales."""
        dtype, _ = self.info(name)
        if dtype == torch.bfloat16:
            self.read(name, out, first)
            return
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if first or out.numel() != self.info(name)[1][0] * self.info(name)[1][1]:
                raise ValueError(f"kt_ops.load_experts: {name} is fp8 and fused; fp8 expert weights are read "
                                 "per expert only")
            scale = name + "_scale_inv"
            if scale not in self:
                raise KeyError(f"kt_ops.load_experts: {name} is fp8 but the checkpoint has no {scale}")
            out.copy_(_dequantize(self.read(name), self.read(scale)))
            return
        out.copy_(self.read(name, torch.empty(out.shape, dtype=dtype), first))


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """An fp8 weight [out, in] multiplied by its per-128x128-block scales, in bf16."""
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    return (weight.float() * scale).to(torch.bfloat16)


def _expert_keys(family: Family) -> tuple[re.Pattern, re.Pattern]:
    """Patterns of per-expert and fused expert tensor names: groups (layer, expert, projection)
    and (layer, fused parameter)."""
    gate, up, down = family.expert_linears
    per_expert = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(family.expert_list)}\.(\d+)\."
                            rf"({gate}|{up}|{down})\.weight$")
    fused = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(family.experts)}\.(gate_up_proj|down_proj)$")
    return per_expert, fused


def _progress(items: list, desc: str, unit: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def _model_type(checkpoint_dir: str, caller: str) -> tuple[str, Family]:
    with open(os.path.join(checkpoint_dir, "config.json")) as fh:
        model_type = json.load(fh).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{caller}: no MoE family for model_type {model_type!r} in "
                         f"{checkpoint_dir}/config.json; supported: {', '.join(sorted(ARCHITECTURES))}")
    return model_type, ARCHITECTURES[model_type]


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

    Memory: each layer's weights are read with plain file reads (no memory map) straight into
    one bf16 buffer per projection, packed, and freed, so the peak is the packed experts plus
    one layer of bf16 expert weights (``benchmarks/bench_load_experts.py`` measures it).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    _, family = _model_type(checkpoint_dir, "kt_ops.load_experts")
    ckpt = _Checkpoint(checkpoint_dir, "kt_ops.load_experts")
    gate, up, down = family.expert_linears
    per_expert, fused = _expert_keys(family)
    experts_of: dict[int, set[int]] = defaultdict(set)
    fused_layers: set[int] = set()
    for name in ckpt.names():
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

    out: dict[int, PackedExperts] = {}
    for layer in _progress(wanted, "packing experts", "layer", progress):
        if layer in fused_layers:
            prefix = f"model.layers.{layer}.{family.experts}."
            _, (e, h, i) = ckpt.info(prefix + "down_proj")
            w_gate, w_up, w_down = (torch.empty(s, dtype=torch.bfloat16) for s in [(e, i, h), (e, i, h), (e, h, i)])
            for x in range(e):  # gate_up_proj[x] holds expert x's gate rows, then its up rows
                ckpt.read_weight(prefix + "gate_up_proj", w_gate[x], first=2 * x * i * h)
                ckpt.read_weight(prefix + "gate_up_proj", w_up[x], first=(2 * x + 1) * i * h)
                ckpt.read_weight(prefix + "down_proj", w_down[x], first=x * h * i)
        else:
            ids = sorted(experts_of[layer])
            if ids != list(range(len(ids))):
                raise KeyError(f"kt_ops.load_experts: layer {layer} has experts {ids[:4]}...; expected 0..{len(ids) - 1}")
            prefix = f"model.layers.{layer}.{family.expert_list}."

            def stack(proj: str) -> torch.Tensor:
                names = [f"{prefix}{e}.{proj}.weight" for e in ids]
                absent = [n for n in names if n not in ckpt]
                if absent:
                    raise KeyError(f"kt_ops.load_experts: missing key {absent[0]}")
                w = torch.empty(len(ids), *ckpt.info(names[0])[1], dtype=torch.bfloat16)
                for x, n in enumerate(names):
                    ckpt.read_weight(n, w[x])
                return w

            w_gate, w_up, w_down = stack(gate), stack(up), stack(down)
        out[layer] = pack_experts(w_gate, w_up, w_down, numa_nodes)
        del w_gate, w_up, w_down
    return out


def load_model(checkpoint_dir: Union[str, os.PathLike], lora_rank: Optional[int] = None,
               lora_alpha: Optional[float] = None, *, config: Any = None, dtype: torch.dtype = torch.bfloat16,
               device: Union[str, torch.device, None] = None, numa_nodes: int = 0,
               progress: bool = True) -> nn.Module:
    """A kt_ops-patched causal LM from a Hugging Face checkpoint directory, built without ever
    holding the bf16 routed experts in full.

    The model is built with empty parameters; the routed experts are streamed and packed by
    :func:`load_experts`; every other tensor is read from the safetensors files (fp8 ones
    dequantised with their block scales) in ``dtype``, straight onto ``device``; then
    :func:`kt_ops.patch_model` puts LoRA (``lora_rank``/``lora_alpha`` or ``config``) on the
    experts. Non-expert modules end on ``device`` (default: the CPU); the experts stay in
    CPU memory whatever the device.

    Raises KeyError naming checkpoint tensors the model has no place for, or model tensors
    the checkpoint lacks.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from kt_ops.hf import patch_model

    checkpoint_dir = os.fspath(checkpoint_dir)
    device = torch.device(device or "cpu")
    _, family = _model_type(checkpoint_dir, "kt_ops.load_model")
    hf_config = AutoConfig.from_pretrained(checkpoint_dir)
    if hasattr(hf_config, "quantization_config"):  # fp8 weights are dequantised here instead
        del hf_config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    experts = load_experts(checkpoint_dir, numa_nodes=numa_nodes, progress=progress)

    ckpt = _Checkpoint(checkpoint_dir, "kt_ops.load_model")
    per_expert, fused = _expert_keys(family)
    wanted = set(model.state_dict())
    # transformers 5.x renames some blocks (Mixtral's block_sparse_moe -> mlp) while its
    # checkpoints keep the 4.x names.
    old_block, new_block = (f".{p.rpartition('.')[0]}." for p in (family.expert_list, family.experts))
    names = [n for n in ckpt.names() if not (n.endswith("_scale_inv") or per_expert.match(n) or fused.match(n))]
    state, unexpected = {}, []
    for name in _progress(names, "loading weights", "tensor", progress):
        target = name if name in wanted else name.replace(old_block, new_block)
        if target not in wanted:
            unexpected.append(name)
            continue
        t = ckpt.read(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if name + "_scale_inv" not in ckpt:
                raise KeyError(f"kt_ops.load_model: {name} is fp8 but the checkpoint has no {name}_scale_inv")
            t = _dequantize(t, ckpt.read(name + "_scale_inv"))
        state[target] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    if unexpected:
        raise KeyError(f"kt_ops.load_model: the model has no place for checkpoint tensor(s) {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    patch_model(model, lora_rank, lora_alpha, config=config, experts=experts)
    absent = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if absent:
        raise KeyError(f"kt_ops.load_model: the checkpoint has no tensor for {absent[:5]}")
    return model.to(device)
