"""The resumable state of a kt-sft run, stored as data and replaced atomically.

A run's ``checkpoint/`` directory holds the adapter (PEFT format), ``trainer_state.json``
(settings, step, losses, schedule, the optimizer's hyper-parameters, Python's RNG state) and
``trainer_state.safetensors`` (optimizer moments, fp32 master weights, torch's RNG states).
Nothing in it is unpickled: a checkpoint someone hands you cannot run code, and one that does
not parse is an error naming the file.

Replacing a checkpoint: the new one is written whole into ``checkpoint.tmp`` (every file
flushed, ``trainer_state.json`` last, so its presence means the directory is complete), the
old one is renamed to ``checkpoint.old``, the new one to ``checkpoint``, and the old one is
removed. A kill at any point leaves one complete checkpoint among the three names;
:func:`recover` puts the newest complete one back at ``checkpoint``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Callable

import torch

from kt_ops.files import fsync_dir, read_json, replacing, write_json

CHECKPOINT = "checkpoint"  # the resumable checkpoint's folder inside the output directory
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
_PICKLED_STATE = "trainer_state.pt"  # what kt-sft wrote before it stored the state as data
FORMAT = 2  # of trainer_state.json; 1 was the pickled trainer_state.pt


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


def _paths(out: str) -> tuple[str, str, str]:
    final = os.path.join(out, CHECKPOINT)
    return final, final + ".tmp", final + ".old"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_JSON))


def recover(out: str) -> None:
    """Finishes or undoes a checkpoint swap that a kill interrupted: a complete
    ``checkpoint.tmp`` is the newest state and goes in place; else, with no ``checkpoint``,
    a complete ``checkpoint.old`` goes back. What is left of either is removed."""
    final, tmp, old = _paths(out)
    if is_complete(tmp):
        _swap_in(out, tmp)
    elif not os.path.isdir(final) and is_complete(old):
        os.rename(old, final)
        fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _swap_in(out: str, tmp: str) -> None:
    final, _, old = _paths(out)
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def remove_checkpoint(out: str) -> None:
    """Removes ``out``'s checkpoint and whatever an interrupted swap left of one."""
    for path in _paths(out):
        shutil.rmtree(path, ignore_errors=True)


def write_checkpoint(out: str, write_files: Callable[[str], None], state: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> None:
    """Replaces ``out/checkpoint`` with a new one: ``write_files(dir)`` writes the adapter
    into it, then the state goes in (``tensors`` first, ``state`` last)."""
    from safetensors.torch import save_file

    recover(out)
    _, tmp, _ = _paths(out)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_files(tmp)
    with replacing(os.path.join(tmp, STATE_TENSORS)) as path:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    write_json(os.path.join(tmp, STATE_JSON), {"format": FORMAT, **state})
    fsync_dir(tmp)
    _swap_in(out, tmp)


def find_checkpoint(path: str) -> tuple[str, str]:
    """(output directory, checkpoint directory) for ``--resume path``: ``path`` is the output
    directory or its ``checkpoint/``. An interrupted swap is recovered first."""
    path = os.path.abspath(path)
    out = os.path.dirname(path) if os.path.basename(path) == CHECKPOINT else path
    if os.path.isdir(out):
        recover(out)
    final = os.path.join(out, CHECKPOINT)
    if is_complete(final):
        return out, final
    if os.path.isfile(os.path.join(final, _PICKLED_STATE)):
        raise CheckpointError(f"kt-sft: {final} was written by an older kt-sft, which stored the training state "
                              f"as a pickle ({_PICKLED_STATE}); kt-sft never unpickles files, so this run cannot be "
                              "resumed: start it again")
    raise FileNotFoundError(f"kt-sft: no checkpoint in {path} (expected {os.path.join(final, STATE_JSON)})")


def read_state(checkpoint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON state and the tensors of a checkpoint directory, parsed (not yet checked
    against a run): CheckpointError naming the file if either does not parse."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, STATE_JSON)
    state = read_json(path, "kt-sft", CheckpointError)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"kt-sft: {path} is not a kt-sft trainer state of format {FORMAT}")
    tensors_path = os.path.join(checkpoint, STATE_TENSORS)
    try:
        tensors = load_file(tensors_path)
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"kt-sft: {tensors_path} is not a readable safetensors file ({e})") from None
    return state, tensors


def field(state: dict[str, Any], name: str, kind: Any, where: str) -> Any:
    """``state[name]``, which must be of type ``kind`` (CheckpointError naming it otherwise)."""
    value = state.get(name)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        raise CheckpointError(f"kt-sft: {where}: \"{name}\" is missing or of the wrong type "
                              f"(got {json.dumps(value)[:60]})")
    return value


def tensor(tensors: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"kt-sft: {where}: tensor {key} is missing")
    return tensors[key]


# ---------------------------------------------------------------- optimizer and RNG as data

def optimizer_to_data(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A torch optimizer's ``state_dict()`` as JSON-safe values and named tensors."""
    tensors, per_param = {}, {}
    for index, values in state_dict["state"].items():
        plain = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain[key] = value
        per_param[str(index)] = {"tensors": sorted(k for k, v in values.items() if isinstance(v, torch.Tensor)),
                                 "values": plain}
    return {"state": per_param, "param_groups": state_dict["param_groups"]}, tensors


def optimizer_from_data(data: Any, tensors: dict[str, torch.Tensor], params: list[torch.Tensor],
                        where: str) -> dict[str, Any]:
    """The ``state_dict()`` :func:`optimizer_to_data` stored, checked against the optimized
    tensors ``params`` (every moment of a parameter's shape)."""
    if not (isinstance(data, dict) and isinstance(data.get("state"), dict) and isinstance(data.get("param_groups"), list)):
        raise CheckpointError(f"kt-sft: {where}: \"optimizer\" must hold \"state\" and \"param_groups\"")
    state = {}
    for index, entry in data["state"].items():
        if not (index.isdigit() and int(index) < len(params) and isinstance(entry, dict)
                and isinstance(entry.get("tensors"), list) and isinstance(entry.get("values"), dict)):
            raise CheckpointError(f"kt-sft: {where}: optimizer state {index!r} does not fit the run's "
                                  f"{len(params)} trained tensors")
        values = dict(entry["values"])
        for key in entry["tensors"]:
            t = tensor(tensors, f"optimizer.{index}.{key}", where)
            if t.dim() and tuple(t.shape) != tuple(params[int(index)].shape):
                raise CheckpointError(f"kt-sft: {where}: optimizer.{index}.{key} has shape {tuple(t.shape)}, the "
                                      f"trained tensor {tuple(params[int(index)].shape)}")
            values[key] = t
        state[int(index)] = values
    groups = []
    for group in data["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"kt-sft: {where}: an optimizer param group is malformed")
        # JSON turns tuples (AdamW's betas) into lists.
        groups.append({k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def rng_to_data() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python's and torch's RNG states (CUDA's too, where there is one)."""
    version, internal, gauss = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return {"python": [version, list(internal), gauss]}, tensors


def rng_from_data(data: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Restores what :func:`rng_to_data` stored."""
    try:
        version, internal, gauss = data["python"]
        random.setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"kt-sft: {where}: the Python RNG state is malformed ({e})") from None
    state = tensor(tensors, "rng.torch", where)
    try:
        torch.set_rng_state(state)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"kt-sft: {where}: rng.torch is not a torch RNG state ({e})") from None
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
