"""The built-in default of ``kt-sft``: a tiny Qwen3-MoE model and a small instruction dataset.

The package ships the model's ``config.json``, its tokenizer, ``data.jsonl`` and the
held-out ``eval.jsonl`` (made by ``make_assets.py``). The weights are drawn from a fixed seed, each tensor from a generator
seeded by its name, so every machine and transformers version gets the same model; they are
written once as a Hugging Face checkpoint (per-expert key names, as real Qwen3-MoE
checkpoints have) under the user's cache directory and loaded from there like any model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib

import torch

ASSETS = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(ASSETS, "data.jsonl")
EVAL_DATA = os.path.join(ASSETS, "eval.jsonl")  # held-out questions: the same facts, asked in other words
_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
SEED = 1234
# Random frozen weights of the usual 0.02 scale give near-uniform next-token probabilities
# that LoRA cannot sharpen enough to learn; a wider spread keeps the logits expressive.
INIT_STD = 0.1


def _config() -> dict:
    with open(os.path.join(ASSETS, "config.json")) as fh:
        return json.load(fh)


def _tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    e, i, d = config["num_experts"], config["moe_intermediate_size"], config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "mlp.gate.weight": (e, h)})
        for x in range(e):
            shapes.update({f"{p}mlp.experts.{x}.gate_proj.weight": (i, h), f"{p}mlp.experts.{x}.up_proj.weight": (i, h),
                           f"{p}mlp.experts.{x}.down_proj.weight": (h, i)})
    return shapes


def _weights(config: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in _tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        gen = torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))
        out[name] = (torch.randn(shape, generator=gen) * INIT_STD).to(torch.bfloat16)
    return out


def _cache_root() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kt_ops")


def model_dir() -> str:
    """The default model's checkpoint directory, written on first use (about 15 MB).

    It lives under ``$XDG_CACHE_HOME/kt_ops`` (``~/.cache/kt_ops``), named by a hash of the
    shipped config and the init, so a changed default never reuses stale weights.
    """
    config = _config()
    key = zlib.crc32(json.dumps([config, SEED, INIT_STD], sort_keys=True).encode())
    path = os.path.join(_cache_root(), f"default-qwen3-moe-{key:08x}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    from safetensors.torch import save_file

    os.makedirs(_cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=_cache_root(), prefix=".tmp-")
    try:
        for f in _FILES:
            shutil.copy(os.path.join(ASSETS, f), tmp)
        save_file(_weights(config), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(tmp, path)  # atomic; another process may have won the race
        except OSError:
            if not os.path.isfile(os.path.join(path, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# Training settings of the built-in default; a user's own flags override them. LoRA on a
# random model needs a higher rate than on a pretrained one, and LoRA on attention lets it
# learn to copy words from the question ("The capital of Peru is Lima.").
TRAIN_DEFAULTS = {"lr": 1e-3, "epochs": 30, "max_tokens_per_step": 1024, "max_seq_len": 256,
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
