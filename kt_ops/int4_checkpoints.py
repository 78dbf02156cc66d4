"""int4 checkpoints in compressed-tensors' "pack-quantized" format, as Kimi-K2-Thinking ships
its routed experts: symmetric int4 with one scale per group of 32 along each row, written by
the `compressed-tensors` library. Per quantized Linear weight W [N, K] a checkpoint holds

- ``<name>.weight_packed``: int32 [N, ceil(K / 8)], eight codes per word along K, the code of
  column 8j + i in bits 4i..4i+3 of word j, stored as code + 8 (so 0..15 for codes -8..7);
- ``<name>.weight_scale``: [N, K / group] in the weights' dtype (bf16);
- ``<name>.weight_shape``: [N, K];

standing for ``W[n, k] = code[n, k] * scale[n, k // group]``, and its config.json a
``quantization_config`` saying so. kt_ops keeps such experts in its own int4 format with the
same codes and scales (:func:`kt_ops.pack_expert_codes`), without rounding anything.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
_GROUPS = (32, 64, 128)  # the groups kt_ops' int4 format has


def pack_quantized_group(config: Any, where: str) -> Optional[int]:
    """The group size of a config.json's ``quantization_config`` when it is compressed-tensors'
    pack-quantized symmetric int4 in groups (of 32, 64 or 128); None when the config has no
    compressed-tensors quantization. ValueError, naming ``where``, for a compressed-tensors
    config that kt_ops cannot read as int4 (another bit width, asymmetric, another strategy or
    group size)."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        return None
    groups = q.get("config_groups")
    schemes = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    schemes = [s for s in schemes if isinstance(s, dict)]
    if q.get("format") != "pack-quantized" or len(schemes) != 1:
        raise ValueError(f"{where}: kt_ops reads compressed-tensors checkpoints in the pack-quantized format with one "
                         f"weight scheme; this quantization_config has format {q.get('format')!r} and "
                         f"{len(schemes)} weight schemes")
    s = schemes[0]
    wanted = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    if any(s.get(k) != v for k, v in wanted.items()) or s.get("group_size") not in _GROUPS:
        got = {k: s.get(k) for k in (*wanted, "group_size")}
        raise ValueError(f"{where}: kt_ops reads compressed-tensors int4 weights that are symmetric, in groups of 32, "
                         f"64 or 128; this quantization_config's weights are {got}")
    return int(s["group_size"])


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int8 codes [N, k] in [-8, 7] of ``weight_packed`` (int32 [N, ceil(k / 8)])."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [N, k / 8, 8]; the mask undoes the sign fill of >>
    return (nibbles.flatten(-2)[..., :k] - 8).to(torch.int8)
