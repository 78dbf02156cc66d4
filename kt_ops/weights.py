"""Streaming expert weights out of Hugging Face safetensors checkpoints into the packed layout."""
from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import defaultdict
from typing import Any, Optional, Union

import torch
from torch import nn

from kt_ops.api import PackedExperts, check_weight_format, pack_experts
from kt_ops.files import read_json
from kt_ops.models.families import ARCHITECTURES, Family, experts_shape, family_of, interface_experts, moe_layers
from kt_ops.reference import FP8_BLOCK, dequantize_fp8



_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


_MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB


class _Shard:
    """One safetensors file, read with plain file reads into buffers the caller owns. Unlike a
    memory map, nothing read this way stays resident in the process once the caller drops it,
    so loading costs no more memory than the tensors being built. The header is validated
    whole when the file is opened: every error names the file and, where there is one, the
    tensor."""

    def __init__(self, path: str, caller: str):
        self.path = path
        try:
            file_size = os.path.getsize(path)
            with open(path, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise ValueError(f"{caller}: {path} is not a safetensors file ({file_size} bytes, shorter than "
                                     "its 8-byte header length)")
                (size,) = struct.unpack("<Q", prefix)
                if size > min(_MAX_HEADER, file_size - 8):
                    raise ValueError(f"{caller}: {path} is not a safetensors file (header length {size} does not fit "
                                     f"the file's {file_size} bytes)")
                raw = fh.read(size)
        except FileNotFoundError:
            raise FileNotFoundError(f"{caller}: {path}: no such file") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{caller}: {path} has a safetensors header that is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{caller}: {path} has a safetensors header that is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        data_size = file_size - self.data_start
        for name, entry in header.items():
            _check_entry(entry, data_size, f"{caller}: {name} in {path}")
        self.entries: dict[str, dict] = header
        self.caller = caller

    def info(self, name: str) -> tuple[torch.dtype, list[int]]:
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.caller}: {name} in {self.path} has dtype {entry['dtype']}, which kt_ops cannot "
                             "read")
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
            raise ValueError(f"{self.caller}: reading {out.numel()} elements at {first} runs past {name} in "
                             f"{self.path}")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.data_start + offset)
            done = 0
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                n = fh.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.caller}: {self.path} ends inside {name}")
                done += n
        return out


def _check_entry(entry: Any, data_size: int, where: str) -> None:
    """A safetensors header entry: dtype, shape and data offsets that lie inside the file and
    hold exactly the shape's bytes."""
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)):
        raise ValueError(f"{where}: the header entry must have a dtype, a shape and data_offsets, got "
                         f"{json.dumps(entry)[:120]}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape}")
    if not (len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"{where}: data_offsets {offsets} do not lie inside the file's {data_size} data bytes")
    dtype = _DTYPES.get(entry["dtype"])  # others are refused when read
    item = dtype.itemsize if dtype is not None else None
    if item is not None and math.prod(shape) * item != offsets[1] - offsets[0]:
        raise ValueError(f"{where}: {entry['dtype']} {shape} needs {math.prod(shape) * item} bytes, its data_offsets "
                         f"hold {offsets[1] - offsets[0]}")


class _Checkpoint:
    """Tensor name -> shard of a Hugging Face checkpoint directory (single file or sharded)."""

    def __init__(self, checkpoint_dir: str, caller: str):
        index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            doc = read_json(index, caller)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not (isinstance(weight_map, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in weight_map.items())):
                raise ValueError(f"{caller}: {index} must hold a \"weight_map\" object of tensor name -> shard file")
            paths = {f: os.path.join(checkpoint_dir, f) for f in set(weight_map.values())}
            for f, path in paths.items():
                if os.path.basename(f) != f or not os.path.isfile(path):
                    raise FileNotFoundError(f"{caller}: {index} names shard {f!r}, which is not a file in "
                                            f"{checkpoint_dir}")
        else:
            single = os.path.join(checkpoint_dir, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{caller}: {checkpoint_dir} has neither model.safetensors nor "
                                        "model.safetensors.index.json")
            weight_map, paths = None, {"model.safetensors": single}
        shards = {f: _Shard(p, caller) for f, p in paths.items()}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in shards["model.safetensors"].entries}
        for name, f in weight_map.items():
            if name not in shards[f].entries:
                raise KeyError(f"{caller}: {index} puts {name} in {f}, which has no such tensor")
        self.shard_of = {k: shards[f] for k, f in weight_map.items()}
        self.directory, self.caller = checkpoint_dir, caller

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def names(self) -> list[str]:
        return list(self.shard_of)

    def where(self, name: str) -> str:
        """``name in <file>``, as error messages name a tensor."""
        return f"{name} in {self.shard_of[name].path}"

    def info(self, name: str) -> tuple[torch.dtype, list[int]]:
        return self.shard_of[name].info(name)

    def read(self, name: str, out: Optional[torch.Tensor] = None, first: int = 0) -> torch.Tensor:
        return self.shard_of[name].read(name, out, first)

    def check_weight(self, name: str, shape: tuple[int, ...]) -> None:
        """Raises unless ``name`` is a floating-point weight of ``shape`` (fp8 ones with block
        scales of the matching shape), naming the tensor and its file."""
        dtype, got = self.info(name)
        if dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"{self.caller}: {self.where(name)} is {_dtype_name(dtype)}; expert weights must be "
                             "bf16, fp16, fp32 or fp8 with 128x128 block scales")
        if tuple(got) != tuple(shape):
            raise ValueError(f"{self.caller}: {self.where(name)} has shape {list(got)}; the model's config needs "
                             f"{list(shape)}")
        if dtype in _FP8:
            scale = name + "_scale_inv"
            if scale not in self:
                raise KeyError(f"{self.caller}: {name} is fp8 but the checkpoint has no {scale}")
            want = [math.ceil(d / FP8_BLOCK) for d in shape[-2:]]
            scale_dtype, scale_shape = self.info(scale)
            if not scale_dtype.is_floating_point or list(scale_shape) != want:
                raise ValueError(f"{self.caller}: {self.where(scale)} is {_dtype_name(scale_dtype)} {list(scale_shape)}; "
                                 f"the block scales of a {list(shape)} fp8 weight are floating point {want}")

    def read_weight(self, name: str, out: torch.Tensor, first: int = 0) -> None:
        """Elements of ``name`` into the bf16 ``out`` (see :meth:`_Shard.read`), converted;
        fp8 weights (whole tensors only) multiplied by their 128x128 block scales. The caller
        has checked the tensor (:meth:`check_weight`)."""
        dtype, shape = self.info(name)
        if dtype == torch.bfloat16:
            self.read(name, out, first)
            return
        if dtype in _FP8:
            if first or out.numel() != shape[0] * shape[1]:
                raise ValueError(f"{self.caller}: {name} is fp8 and fused; fp8 expert weights are read per expert "
                                 "only")
            out.copy_(_dequantize(self.read(name), self.read(name + "_scale_inv")))
            return
        out.copy_(self.read(name, torch.empty(out.shape, dtype=dtype), first))


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, *_FP8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """An fp8 weight [out, in] multiplied by its per-128x128-block scales, in bf16."""
    return dequantize_fp8(weight, scale_inv).to(torch.bfloat16)


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


def _model_type(checkpoint_dir: str, caller: str) -> tuple[str, Optional[Family]]:
    """The checkpoint's model type, and its family when kt_ops reads its expert tensors itself
    (:data:`ARCHITECTURES`); ValueError when config.json names none."""
    path = os.path.join(checkpoint_dir, "config.json")
    doc = read_json(path, caller)
    model_type = doc.get("model_type") if isinstance(doc, dict) else None
    if not isinstance(model_type, str):
        raise ValueError(f"{caller}: {path} has no \"model_type\"")
    return model_type, ARCHITECTURES.get(model_type)


def _streamed_family(checkpoint_dir: str, caller: str) -> Family:
    model_type, family = _model_type(checkpoint_dir, caller)
    if family is None:
        raise ValueError(f"{caller}: kt_ops reads the expert tensors of {', '.join(sorted(ARCHITECTURES))} "
                         f"checkpoints; {os.path.join(checkpoint_dir, 'config.json')} has model_type {model_type!r}")
    return family


def empty_model(checkpoint_dir: str, caller: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The checkpoint's causal LM built from its config with every tensor on the meta device
    (no memory), of ``dtype`` (default: transformers' default): its shapes are what the
    checkpoint's tensors must have."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(checkpoint_dir)
        if hasattr(hf_config, "quantization_config"):  # fp8 weights are dequantised here instead
            del hf_config.quantization_config
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(hf_config, **({} if dtype is None else {"dtype": dtype}))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise ValueError(f"{caller}: transformers cannot build a model from {checkpoint_dir}/config.json "
                         f"({type(e).__name__}: {e})") from None


def expert_shapes(model: nn.Module) -> dict[int, tuple[int, int, int]]:
    """``{layer index: (E, H, I)}`` of every MoE layer of an unpatched model (weights may be
    on the meta device)."""
    from kt_ops.models.variants import interface_experts_shape

    layers = interface_experts(model)
    if layers:
        shapes = {name: interface_experts_shape(m) for name, m in layers.items()}
    else:
        _, family = family_of(model)
        shapes = {name: tuple(experts_shape(m, family)) for name, m in moe_layers(model).items()}
    return {int(re.search(r"layers\.(\d+)\.", name).group(1)): shape for name, shape in shapes.items()}


def load_experts(checkpoint_dir: Union[str, os.PathLike], *, layers: Optional[list[int]] = None,
                 numa_nodes: int = 0, experts_format: str = "bf16", progress: bool = True) -> dict[int, PackedExperts]:
    """Packs the routed experts of every MoE layer of a safetensors checkpoint, one layer at a time.

    Args:
        checkpoint_dir: a Hugging Face checkpoint directory: ``config.json`` (its
            ``model_type`` picks the family in :data:`kt_ops.models.families.ARCHITECTURES`) and
            ``model.safetensors`` or shards with ``model.safetensors.index.json``. Expert
            tensors may be per expert (``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``,
            Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``) or fused
            (``model.layers.{l}.mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``), in
            bf16/fp16/fp32 or fp8 with 128x128 block scales (``..._scale_inv``).
        layers: layer indices to load (default: every MoE layer).
        numa_nodes: passed to :func:`kt_ops.pack_experts`.
        experts_format: the weight format to pack in, one of :func:`kt_ops.weight_formats`
            (``"int8"``, ``"int4"``: each layer quantized as it is packed; int4 in groups of 32).
        progress: show a progress bar over the layers.

    Returns ``{layer index: PackedExperts}`` for :func:`kt_ops.patch_model`'s ``experts``.

    Every expert tensor of the layers to load is checked against the sizes the config gives
    (experts, hidden and intermediate size) and for a floating-point dtype before anything is
    read; a mismatch, a corrupt file or a missing tensor raises an error naming the file and
    the tensor.

    Memory: each layer's weights are read with plain file reads (no memory map) straight into
    one bf16 buffer per projection, packed, and freed, so the peak is the packed experts plus
    one layer of bf16 expert weights (``benchmarks/bench_load_experts.py`` measures it).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    caller = "kt_ops.load_experts"
    check_weight_format(experts_format, caller)
    family = _streamed_family(checkpoint_dir, caller)
    shapes = expert_shapes(empty_model(checkpoint_dir, caller))
    ckpt = _Checkpoint(checkpoint_dir, caller)
    return _load_experts(ckpt, family, shapes, layers, numa_nodes, experts_format, progress, caller)


def _load_experts(ckpt: _Checkpoint, family: Family, shapes: dict[int, tuple[int, int, int]],
                  layers: Optional[list[int]], numa_nodes: int, experts_format: str, progress: bool,
                  caller: str) -> dict[int, PackedExperts]:
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
    stray = [l for l in found if l not in shapes]
    if stray:
        raise ValueError(f"{caller}: the checkpoint has expert weights for layer(s) {stray}, which the config has no "
                         f"MoE layer for (MoE layers: {sorted(shapes)})")
    wanted = sorted(shapes) if layers is None else list(layers)
    missing = [l for l in wanted if l not in found]
    if missing:
        raise KeyError(f"{caller}: no expert weights for layer(s) {missing} in {ckpt.directory} "
                       f"(layers with experts: {found})")

    # Every tensor is checked before the first one is read: a bad file fails in seconds.
    plans = {}
    for layer in wanted:
        e, h, i = shapes[layer]
        if layer in fused_layers:
            prefix = f"model.layers.{layer}.{family.experts}."
            for proj, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
                if prefix + proj not in ckpt:
                    raise KeyError(f"{caller}: missing key {prefix + proj}")
                ckpt.check_weight(prefix + proj, shape)
            plans[layer] = ("fused", prefix)
        else:
            ids = sorted(experts_of[layer])
            if ids != list(range(e)):
                extra = sorted(set(ids) - set(range(e)))
                raise KeyError(f"{caller}: layer {layer} has experts " + (f"{extra[:4]} beyond the config's {e}" if extra
                               else f"{sorted(set(range(e)) - set(ids))[:4]} missing (the config has {e})"))
            prefix = f"model.layers.{layer}.{family.expert_list}."
            for proj, shape in ((gate, (i, h)), (up, (i, h)), (down, (h, i))):
                for x in range(e):
                    name = f"{prefix}{x}.{proj}.weight"
                    if name not in ckpt:
                        raise KeyError(f"{caller}: missing key {name}")
                    ckpt.check_weight(name, shape)
            plans[layer] = ("per_expert", prefix)

    out: dict[int, PackedExperts] = {}
    for layer in _progress(wanted, "packing experts", "layer", progress):
        e, h, i = shapes[layer]
        kind, prefix = plans[layer]
        w_gate, w_up, w_down = (torch.empty(s, dtype=torch.bfloat16) for s in [(e, i, h), (e, i, h), (e, h, i)])
        for x in range(e):
            if kind == "fused":  # gate_up_proj[x] holds expert x's gate rows, then its up rows
                ckpt.read_weight(prefix + "gate_up_proj", w_gate[x], first=2 * x * i * h)
                ckpt.read_weight(prefix + "gate_up_proj", w_up[x], first=(2 * x + 1) * i * h)
                ckpt.read_weight(prefix + "down_proj", w_down[x], first=x * h * i)
            else:
                for proj, w in ((gate, w_gate), (up, w_up), (down, w_down)):
                    ckpt.read_weight(f"{prefix}{x}.{proj}.weight", w[x])
        out[layer] = pack_experts(w_gate, w_up, w_down, numa_nodes, format=experts_format)
        del w_gate, w_up, w_down
    return out


def load_model(checkpoint_dir: Union[str, os.PathLike], lora_rank: Optional[int] = None,
               lora_alpha: Optional[float] = None, *, config: Any = None,
               adapter: Union[str, os.PathLike, None] = None, dtype: torch.dtype = torch.bfloat16,
               device: Union[str, torch.device, None] = None, numa_nodes: int = 0,
               experts_format: str = "bf16", progress: bool = True) -> nn.Module:
    """A causal LM from a Hugging Face checkpoint directory with its routed experts on the kt
    kernels and LoRA on them (:func:`kt_ops.patch_model`), built without ever holding the
    bf16 routed experts in full.

    For the families of :data:`~kt_ops.models.families.ARCHITECTURES` the model is built with
    empty parameters; the routed experts are streamed and packed by :func:`load_experts`;
    every other tensor is read from the safetensors files (fp8 ones dequantised with their
    block scales) in ``dtype``, straight onto ``device``. Every tensor's shape and dtype is
    checked against the model the config describes before the experts are read. Other
    families of transformers' experts interface are loaded by transformers
    (``from_pretrained``, so the whole model passes through memory once) and then packed.

    The LoRA is ``lora_rank``/``lora_alpha`` or ``config`` as :func:`kt_ops.patch_model`
    takes them, or that of a saved ``adapter`` directory (its config, then its tensors,
    through :func:`kt_ops.load_adapter`). Non-expert modules end on ``device`` (default: the
    CPU); the experts and their LoRA stay in CPU memory whatever the device. The experts are
    packed in ``experts_format`` (:func:`kt_ops.weight_formats`; ``"int8"`` and ``"int4"``
    quantize each layer as it is read, so the bf16 experts are never held whole).

    Returns what :func:`kt_ops.patch_model` returns (a ``PeftModel`` on transformers 5.x).
    Raises KeyError naming checkpoint tensors the model has no place for, or model tensors
    the checkpoint lacks; ValueError naming a tensor (and its file) of the wrong shape or
    dtype, or a corrupt file.
    """
    from kt_ops.adapters import load_adapter
    from kt_ops.models.surgery import expert_lora_config, patch_model, resolve_lora_config, use_kt_experts

    caller = "kt_ops.load_model"
    check_weight_format(experts_format, caller)
    checkpoint_dir = os.fspath(checkpoint_dir)
    device = torch.device(device or "cpu")
    if adapter is not None:
        if config is not None or lora_rank is not None or lora_alpha is not None:
            raise ValueError(f"{caller}: give either adapter or lora_rank/lora_alpha/config, not both")
        config = _adapter_lora_config(os.fspath(adapter), caller)
    _, family = _model_type(checkpoint_dir, caller)
    model = empty_model(checkpoint_dir, caller, dtype)
    interface = bool(interface_experts(model))
    if family is None and not interface:
        raise ValueError(f"{caller}: found no routed experts kt_ops can run in {checkpoint_dir}: its model type is "
                         f"none of {', '.join(sorted(ARCHITECTURES))} and its experts do not use transformers' "
                         "experts interface")
    if family is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype)
        experts = None
    else:
        experts = _load_into(model, checkpoint_dir, family, dtype, device, numa_nodes, experts_format, progress, caller)
    if interface:
        import peft

        lora = expert_lora_config(model, resolve_lora_config(lora_rank, lora_alpha, config))
        use_kt_experts(model, experts=experts, numa_nodes=numa_nodes, experts_format=experts_format)
        _check_complete(model, caller)
        # PEFT makes each LoRA tensor where its base parameter is: the experts' in CPU memory.
        model = peft.get_peft_model(model.to(device), lora)
    else:
        model = patch_model(model, lora_rank, lora_alpha, config=config, experts=experts, experts_format=experts_format)
        _check_complete(model, caller)
        model = model.to(device)
    return model if adapter is None else load_adapter(model, adapter)


def _adapter_lora_config(adapter: str, caller: str) -> Any:
    """The LoRA configuration of a saved adapter directory, for the model to load it into:
    PEFT's own LoraConfig of a fused-experts adapter; for a per-expert one (written for a
    transformers 4.x model), its rank, alpha and whether it holds routers (its LoRA on other
    modules is added by :func:`kt_ops.load_adapter` on 4.x models; a 5.x model refuses it,
    naming the keys)."""
    from kt_ops.adapters import read_adapter_config
    from kt_ops.models.surgery import ExpertLoraConfig

    cfg = read_adapter_config(adapter, caller)
    if cfg.get("target_parameters"):
        import peft

        return peft.LoraConfig.from_pretrained(adapter)
    return ExpertLoraConfig(cfg["r"], float(cfg["lora_alpha"]), bool(cfg.get("modules_to_save")))


def _check_complete(model: nn.Module, caller: str) -> None:
    absent = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if absent:
        raise KeyError(f"{caller}: the checkpoint has no tensor for {absent[:5]}")


def _load_into(model: nn.Module, checkpoint_dir: str, family: Family, dtype: torch.dtype, device: torch.device,
               numa_nodes: int, experts_format: str, progress: bool, caller: str) -> dict[int, PackedExperts]:
    """Streams the checkpoint's expert tensors into packed experts (returned) and its other
    tensors into ``model``'s empty parameters, on ``device``."""
    ckpt = _Checkpoint(checkpoint_dir, caller)
    per_expert, fused = _expert_keys(family)
    wanted = {n: t for n, t in model.state_dict().items()}
    # transformers 5.x renames some blocks (Mixtral's block_sparse_moe -> mlp) while its
    # checkpoints keep the 4.x names.
    old_block, new_block = (f".{p.rpartition('.')[0]}." for p in (family.expert_list, family.experts))
    names = [n for n in ckpt.names() if not (n.endswith("_scale_inv") or per_expert.match(n) or fused.match(n))]
    targets, unexpected = {}, []
    for name in names:
        target = name if name in wanted else name.replace(old_block, new_block)
        if target not in wanted:
            unexpected.append(name)
            continue
        dtype_in, shape = ckpt.info(name)
        expected = wanted[target]
        if tuple(shape) != tuple(expected.shape) or dtype_in.is_floating_point != expected.dtype.is_floating_point:
            raise ValueError(f"{caller}: {ckpt.where(name)} is {_dtype_name(dtype_in)} {list(shape)}; the model's "
                             f"{target} is {_dtype_name(expected.dtype)} {list(expected.shape)}")
        if dtype_in in _FP8:
            ckpt.check_weight(name, tuple(shape))
        targets[name] = target
    if unexpected:
        raise KeyError(f"{caller}: the model has no place for checkpoint tensor(s) {unexpected[:5]}")
    experts = _load_experts(ckpt, family, expert_shapes(model), None, numa_nodes, experts_format, progress, caller)

    state = {}
    for name in _progress(names, "loading weights", "tensor", progress):
        t = ckpt.read(name)
        if t.dtype in _FP8:
            t = _dequantize(t, ckpt.read(name + "_scale_inv"))
        state[targets[name]] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return experts
