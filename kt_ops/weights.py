"""Streaming expert weights out of Hugging Face safetensors checkpoints into the packed layout."""
from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import defaultdict
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from kt_ops.api import PackedExperts, check_weight_format, pack_expert_codes, pack_experts
from kt_ops.distributed import host_shared_experts
from kt_ops.expert_parallel import ExpertShard
from kt_ops.files import read_json
from kt_ops.int4_checkpoints import pack_quantized_group, unpack_int4
from kt_ops.models.families import ARCHITECTURES, Family, experts_shape, family_of, interface_experts, moe_layers
from kt_ops.reference import FP8_BLOCK, dequantize_fp8, dequantize_int4



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
        # The group of compressed-tensors int4 weights (kt_ops/int4_checkpoints.py), if any.
        config = os.path.join(checkpoint_dir, "config.json")
        self.int4_group = pack_quantized_group(read_json(config, caller), f"{caller}: {config}")

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

    def is_int4(self, name: str) -> bool:
        """Whether weight ``name`` is stored as compressed-tensors int4 (``name``'s
        ``_packed``, ``_scale`` and ``_shape`` tensors instead of ``name``)."""
        return name not in self and name + "_packed" in self

    def check_weight(self, name: str, shape: tuple[int, ...]) -> None:
        """Raises unless ``name`` is a floating-point weight of ``shape`` (fp8 ones with block
        scales of the matching shape) or compressed-tensors int4 standing for one, naming the
        tensor and its file."""
        if self.is_int4(name):
            self._check_int4(name, shape)
            return
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

    def _check_int4(self, name: str, shape: tuple[int, ...]) -> None:
        n, k = shape
        group = self.int4_group
        if group is None:
            raise ValueError(f"{self.caller}: {self.where(name + '_packed')} is compressed-tensors int4, but "
                             f"{self.directory}/config.json has no compressed-tensors quantization_config")
        for suffix in ("_scale", "_shape"):
            if name + suffix not in self:
                raise KeyError(f"{self.caller}: {name} is int4 but the checkpoint has no {name + suffix}")
        if k % group:
            raise ValueError(f"{self.caller}: {name} is int4 in groups of {group}, which do not divide its "
                             f"{k} columns")
        expected = {"_packed": ((torch.int32,), [n, math.ceil(k / 8)]),
                    "_scale": ((torch.bfloat16, torch.float16, torch.float32), [n, k // group]),
                    "_shape": ((torch.int64, torch.int32), [2])}
        for suffix, (dtypes, want) in expected.items():
            dtype, got = self.info(name + suffix)
            if dtype not in dtypes or list(got) != want:
                raise ValueError(f"{self.caller}: {self.where(name + suffix)} is {_dtype_name(dtype)} {list(got)}; "
                                 f"an int4 weight of shape {list(shape)} needs {' or '.join(map(_dtype_name, dtypes))} "
                                 f"{want}")
        stored = self.read(name + "_shape").tolist()
        if stored != [n, k]:
            raise ValueError(f"{self.caller}: {self.where(name + '_shape')} says {stored}; the model's config needs "
                             f"{[n, k]}")

    def read_int4(self, name: str, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes [N, columns] and the scales [N, columns / group] (as stored) of int4
        weight ``name``, checked (:meth:`check_weight`: its ``_shape`` says ``columns``)."""
        return unpack_int4(self.read(name + "_packed"), columns), self.read(name + "_scale")

    def read_weight(self, name: str, out: torch.Tensor, first: int = 0) -> None:
        """Elements of ``name`` into the bf16 ``out`` (see :meth:`_Shard.read`), converted;
        fp8 weights (whole tensors only) multiplied by their 128x128 block scales, int4 ones by
        their group scales. The caller has checked the tensor (:meth:`check_weight`)."""
        if self.is_int4(name):
            codes, scales = self.read_int4(name, out.shape[-1])
            if first or out.numel() != codes.numel():
                raise ValueError(f"{self.caller}: {name} is int4; int4 expert weights are read whole only")
            out.copy_(dequantize_int4(codes, scales, self.int4_group).view(out.shape))
            return
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


def progress_bar(items: list, desc: str, unit: str, enabled: bool):
    """``items``, shown as a tqdm bar of ``desc`` counted in ``unit`` when ``enabled``."""
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
                 numa_nodes: int = 0, experts_format: Optional[str] = None,
                 progress: bool = True) -> dict[int, PackedExperts]:
    """Packs the routed experts of every MoE layer of a safetensors checkpoint, one layer at a time.

    Args:
        checkpoint_dir: a Hugging Face checkpoint directory: ``config.json`` (its
            ``model_type`` picks the family in :data:`kt_ops.models.families.ARCHITECTURES`) and
            ``model.safetensors`` or shards with ``model.safetensors.index.json``. Expert
            tensors may be per expert (``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``,
            Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``) or fused
            (``model.layers.{l}.mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``), in
            bf16/fp16/fp32, fp8 with 128x128 block scales (``..._scale_inv``) or, per expert,
            compressed-tensors pack-quantized int4 (``..._packed``, ``..._scale``,
            ``..._shape``; :mod:`kt_ops.int4_checkpoints`).
        layers: layer indices to load (default: every MoE layer).
        numa_nodes: passed to :func:`kt_ops.pack_experts`.
        experts_format: the weight format to pack in, one of :func:`kt_ops.experts_formats`;
            None (the default) keeps the checkpoint's own (:func:`checkpoint_experts_format`:
            fp8 and int4 experts stay so, codes and scales as stored). Another format is made
            layer by layer as the layer is read (int4 in groups of 32), from the weights the
            checkpoint holds (quantized ones dequantized first).
        progress: show a progress bar over the layers.

    Returns ``{layer index: PackedExperts}`` for :func:`kt_ops.patch_model`'s ``experts``.

    Every expert tensor of the layers to load is checked against the sizes the config gives
    (experts, hidden and intermediate size) and for a floating-point dtype before anything is
    read; a mismatch, a corrupt file or a missing tensor raises an error naming the file and
    the tensor.

    Memory: each layer's weights are read with plain file reads (no memory map) straight into
    one buffer per projection (bf16, or the codes of a checkpoint kept in its fp8 or int4),
    packed, and freed, so the peak is the packed experts plus one layer of expert weights as
    read (``benchmarks/bench_load_experts.py`` measures it).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    caller = "kt_ops.load_experts"
    if experts_format is not None:
        check_weight_format(experts_format, caller)
    family = _streamed_family(checkpoint_dir, caller)
    shapes = expert_shapes(empty_model(checkpoint_dir, caller))
    ckpt = _Checkpoint(checkpoint_dir, caller)
    return _load_experts(ckpt, family, shapes, layers, numa_nodes, experts_format, progress, caller)


def checkpoint_experts_format(checkpoint_dir: Union[str, os.PathLike]) -> str:
    """The weight format a checkpoint's routed experts are stored in, as
    :func:`kt_ops.weight_formats` names it: ``"fp8"`` when every expert weight is
    ``float8_e4m3fn`` with 128 x 128 block scales (DeepSeek-V3, Kimi-K2, Qwen3-FP8),
    ``"int4"`` when every one is compressed-tensors' pack-quantized int4 with bf16 scales
    (Kimi-K2-Thinking; :mod:`kt_ops.int4_checkpoints`), else ``"bf16"`` (bf16, fp16 or fp32
    weights, which kt_ops keeps in bf16). What
    :func:`load_experts`, :func:`load_model` and ``kt-sft`` pack in by default."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    caller = "kt_ops.checkpoint_experts_format"
    family = _streamed_family(checkpoint_dir, caller)
    ckpt = _Checkpoint(checkpoint_dir, caller)
    per_expert, fused = _expert_keys(family)
    weights = {_weight_name(n) for n in ckpt.names()}
    return _stored_format(ckpt, [n for n in weights if per_expert.match(n) or fused.match(n)])


def _weight_name(name: str) -> str:
    """The weight a checkpoint tensor stores: ``name`` itself, or for one of the tensors of a
    compressed-tensors int4 weight (``x.weight_packed``, ...), that weight's name
    (``x.weight``)."""
    for suffix in ("_packed", "_scale", "_shape"):
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)]
    return name


def _stored_format(ckpt: _Checkpoint, names: list[str]) -> str:
    """The format of the expert weights ``names``: fp8 when every one is e4m3 with block scales,
    int4 when every one is compressed-tensors int4 with bf16 scales (the loader checks the
    shapes), else bf16."""
    if names and all(ckpt.is_int4(n) and ckpt.info(n + "_scale")[0] == torch.bfloat16 for n in names):
        return "int4"
    if names and all(n in ckpt and ckpt.info(n)[0] == torch.float8_e4m3fn and n + "_scale_inv" in ckpt for n in names):
        return "fp8"
    return "bf16"


def _load_experts(ckpt: _Checkpoint, family: Family, shapes: dict[int, tuple[int, int, int]],
                  layers: Optional[list[int]], numa_nodes: int, experts_format: Optional[str], progress: bool,
                  caller: str, keep: Callable[[int, PackedExperts], PackedExperts] = lambda layer, packed: packed,
                  experts_held: Callable[[int], range] = range) -> dict[int, PackedExperts]:
    """The packed experts of ``layers`` (default: all), each layer passed through ``keep`` as
    it is packed (kt_ops.distributed moves it into memory the host's ranks share); of a layer
    of E experts, those of ``experts_held(E)`` (kt_ops.expert_parallel: this host's share)."""
    gate, up, down = family.expert_linears
    per_expert, fused = _expert_keys(family)
    experts_of: dict[int, set[int]] = defaultdict(set)
    fused_layers: set[int] = set()
    for name in ckpt.names():
        if m := per_expert.match(_weight_name(name)):
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
    plans, names_of = {}, {}
    for layer in wanted:
        e, h, i = shapes[layer]
        if layer in fused_layers:
            prefix = f"model.layers.{layer}.{family.experts}."
            for proj, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
                if prefix + proj not in ckpt:
                    raise KeyError(f"{caller}: missing key {prefix + proj}")
                ckpt.check_weight(prefix + proj, shape)
            plans[layer] = ("fused", prefix)
            names_of[layer] = [prefix + "gate_up_proj", prefix + "down_proj"]
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
                    if name not in ckpt and not ckpt.is_int4(name):
                        raise KeyError(f"{caller}: missing key {name}")
                    ckpt.check_weight(name, shape)
            plans[layer] = ("per_expert", prefix)
            names_of[layer] = [f"{prefix}{x}.{proj}.weight" for proj in (gate, up, down) for x in range(e)]
    experts_format = experts_format or _stored_format(ckpt, [n for names in names_of.values() for n in names])

    out: dict[int, PackedExperts] = {}
    for layer in progress_bar(wanted, "packing experts", "layer", progress):
        e, h, i = shapes[layer]
        kind, prefix = plans[layer]
        held = experts_held(e)
        stored = _stored_format(ckpt, names_of[layer]) if kind == "per_expert" else "bf16"
        if experts_format == stored and stored in ("fp8", "int4"):
            out[layer] = keep(layer, _pack_codes_layer(ckpt, prefix, family, held, (h, i), stored, numa_nodes, layer,
                                                       caller))
            continue
        n = len(held)
        w_gate, w_up, w_down = (torch.empty(s, dtype=torch.bfloat16) for s in [(n, i, h), (n, i, h), (n, h, i)])
        for slot, x in enumerate(held):
            if kind == "fused":  # gate_up_proj[x] holds expert x's gate rows, then its up rows
                ckpt.read_weight(prefix + "gate_up_proj", w_gate[slot], first=2 * x * i * h)
                ckpt.read_weight(prefix + "gate_up_proj", w_up[slot], first=(2 * x + 1) * i * h)
                ckpt.read_weight(prefix + "down_proj", w_down[slot], first=x * h * i)
            else:
                for proj, w in ((gate, w_gate), (up, w_up), (down, w_down)):
                    ckpt.read_weight(f"{prefix}{x}.{proj}.weight", w[slot])
        packed = pack_experts(w_gate, w_up, w_down, numa_nodes, format=experts_format)
        del w_gate, w_up, w_down  # before keep, which may copy the packed layer elsewhere
        out[layer] = keep(layer, packed)
    return out


def _pack_codes_layer(ckpt: _Checkpoint, prefix: str, family: Family, held: range, sizes: tuple[int, int],
                      fmt: str, numa_nodes: int, layer: int, caller: str) -> PackedExperts:
    """Experts ``held`` of one layer of per-expert fp8 or int4 weights packed in that format
    from their codes and scales as stored: no bf16 copy, no rounding."""
    e, (h, i) = len(held), sizes
    gate, up, down = family.expert_linears
    matrices = [(i, h), (i, h), (h, i)]
    if fmt == "fp8":
        codes = [torch.empty((e, n, k), dtype=torch.float8_e4m3fn) for n, k in matrices]
        scales = [torch.empty((e, math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))) for n, k in matrices]
    else:
        codes = [torch.empty((e, n, k), dtype=torch.int8) for n, k in matrices]
        scales = [torch.empty((e, n, k // ckpt.int4_group), dtype=torch.bfloat16) for n, k in matrices]
    for slot, x in enumerate(held):
        for proj, c, sc in zip((gate, up, down), codes, scales):
            name = f"{prefix}{x}.{proj}.weight"
            if fmt == "fp8":
                ckpt.read(name, c[slot])
                sc[slot].copy_(ckpt.read(name + "_scale_inv"))
            else:
                c[slot], sc[slot] = ckpt.read_int4(name, c.shape[-1])
    try:
        return pack_expert_codes(*codes, scales, numa_nodes, format=fmt,
                                 group_size=ckpt.int4_group if fmt == "int4" else 0)
    except RuntimeError as err:
        raise ValueError(f"{caller}: layer {layer}'s {fmt} experts in {ckpt.directory} ({prefix}*): {err}") from None


def load_model(checkpoint_dir: Union[str, os.PathLike], lora_rank: Optional[int] = None,
               lora_alpha: Optional[float] = None, *, config: Any = None,
               adapter: Union[str, os.PathLike, None] = None, dtype: torch.dtype = torch.bfloat16,
               device: Union[str, torch.device, None] = None, numa_nodes: int = 0,
               experts_format: Optional[str] = None, progress: bool = True, shard_experts: bool = False) -> nn.Module:
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
    packed in ``experts_format`` (:func:`kt_ops.experts_formats`; None, the default: the
    checkpoint's own, :func:`checkpoint_experts_format`); a format the checkpoint does not hold
    is made layer by layer as it is read, so the bf16 experts are never held whole.

    Under a process group (torchrun), the experts are read and packed once per host and shared
    by the host's ranks (:mod:`kt_ops.distributed`); with ``shard_experts`` each host holds
    only its share of each layer's experts, by id, and tokens cross to their experts' hosts
    (:mod:`kt_ops.expert_parallel`; a family kt_ops streams, on transformers' experts interface).

    Returns what :func:`kt_ops.patch_model` returns (a ``PeftModel`` on transformers 5.x).
    Raises KeyError naming checkpoint tensors the model has no place for, or model tensors
    the checkpoint lacks; ValueError naming a tensor (and its file) of the wrong shape or
    dtype, or a corrupt file.
    """
    from kt_ops.adapters import load_adapter
    from kt_ops.models.surgery import expert_lora_config, patch_model, resolve_lora_config, use_kt_experts

    caller = "kt_ops.load_model"
    if experts_format is not None:
        check_weight_format(experts_format, caller)
    checkpoint_dir = os.fspath(checkpoint_dir)
    device = torch.device(device or "cpu")
    if adapter is not None:
        if config is not None or lora_rank is not None or lora_alpha is not None:
            raise ValueError(f"{caller}: give either adapter or lora_rank/lora_alpha/config, not both")
        config = adapter_lora_config(adapter, caller)
    _, family = _model_type(checkpoint_dir, caller)
    model = empty_model(checkpoint_dir, caller, dtype)
    interface = bool(interface_experts(model))
    if family is None and not interface:
        raise ValueError(f"{caller}: found no routed experts kt_ops can run in {checkpoint_dir}: its model type is "
                         f"none of {', '.join(sorted(ARCHITECTURES))} and its experts do not use transformers' "
                         "experts interface")
    if shard_experts and (family is None or not interface):
        raise ValueError(f"{caller}: shard_experts needs a family kt_ops streams from its checkpoint, on transformers' "
                         f"experts interface; {checkpoint_dir} is not")
    if family is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype)
        experts = None
    else:
        experts = _load_into(model, checkpoint_dir, family, dtype, device, numa_nodes, experts_format, progress, caller,
                             shard_experts)
    # Repacks (an in-place write of the experts' stand-ins) keep the format the experts have.
    experts_format = next(iter(experts.values())).experts_format if experts else (experts_format or "bf16")
    if interface:
        import peft

        lora = expert_lora_config(model, resolve_lora_config(lora_rank, lora_alpha, config))
        use_kt_experts(model, experts=experts, numa_nodes=numa_nodes, experts_format=experts_format,
                       sharded=shard_experts)
        _check_complete(model, caller)
        # PEFT makes each LoRA tensor where its base parameter is: the experts' in CPU memory.
        model = peft.get_peft_model(model.to(device), lora)
    else:
        model = patch_model(model, lora_rank, lora_alpha, config=config, experts=experts, experts_format=experts_format)
        _check_complete(model, caller)
        model = model.to(device)
    return model if adapter is None else load_adapter(model, adapter)


def adapter_lora_config(adapter: Union[str, os.PathLike], caller: str = "kt_ops.adapter_lora_config") -> Any:
    """The LoRA configuration of a saved adapter directory, for the model to load it into
    (``load_model(..., config=adapter_lora_config(dir))`` is the model with the adapter's
    LoRA fresh, which computes what the base model does; :func:`kt_ops.load_adapter` then
    loads the adapter into it):
    PEFT's own LoraConfig of a fused-experts adapter; for a per-expert one (written for a
    transformers 4.x model), its rank, alpha and whether it holds routers (its LoRA on other
    modules is added by :func:`kt_ops.load_adapter` on 4.x models; a 5.x model refuses it,
    naming the keys)."""
    from kt_ops.adapters import read_adapter_config
    from kt_ops.models.surgery import ExpertLoraConfig

    adapter = os.fspath(adapter)
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
               numa_nodes: int, experts_format: Optional[str], progress: bool,
               caller: str, shard_experts: bool = False) -> dict[int, PackedExperts]:
    """Streams the checkpoint's expert tensors into packed experts (returned; with
    ``shard_experts``, this host's share of each layer's) and its other tensors into
    ``model``'s empty parameters, on ``device``."""
    ckpt = _Checkpoint(checkpoint_dir, caller)
    per_expert, fused = _expert_keys(family)
    wanted = {n: t for n, t in model.state_dict().items()}
    # transformers 5.x renames some blocks (Mixtral's block_sparse_moe -> mlp) while its
    # checkpoints keep the 4.x names.
    old_block, new_block = (f".{p.rpartition('.')[0]}." for p in (family.expert_list, family.experts))
    names = [n for n in ckpt.names()
             if not (n.endswith("_scale_inv") or per_expert.match(_weight_name(n)) or fused.match(n))]
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
    shapes = expert_shapes(model)
    # Once per host where a process group runs several ranks on it (kt_ops.distributed).
    held = (lambda e: ExpertShard.of_this_host(e).experts) if shard_experts else range
    experts = host_shared_experts(lambda keep: _load_experts(ckpt, family, shapes, None, numa_nodes, experts_format,
                                                             progress, caller, keep, held))

    state = {}
    for name in progress_bar(names, "loading weights", "tensor", progress):
        t = ckpt.read(name)
        if t.dtype in _FP8:
            t = _dequantize(t, ckpt.read(name + "_scale_inv"))
        state[targets[name]] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return experts
