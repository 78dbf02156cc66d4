"""Loaders take all or nothing and name every mismatch: adapters (validated before any value
of the model changes), expert checkpoints (every tensor's shape and dtype against the config,
corrupt files named), JSONL data (every bad line reported, only an unusable file stops)."""
import json
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import kt_ops
from hf_models import tiny_model
from kt_ops import data as sft_data
from kt_ops import default
from kt_ops.cli import main
from kt_ops.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

R, ALPHA = 4, 8.0


# ---------------------------------------------------------------- adapters

@pytest.fixture
def saved(tmp_path):
    """A patched model with random LoRA, its adapter saved, and a second model to load into."""
    source = kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.normal_()
    kt_ops.save_adapter(source, tmp_path)
    target = kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    return tmp_path, target


def trainable_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rewrite(path, edit):
    tensors = load_file(path / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, path / ADAPTER_WEIGHTS)


def last_layer_key(tensors, suffix):
    return max(k for k in tensors if "layers.1." in k and k.endswith(suffix))


@pytest.mark.parametrize("edit, error, message", [
    # a wrong shape in the last layer: layer 0 must not have been overwritten
    (lambda t: t.update({(k := last_layer_key(t, "lora_B.weight")): t[k][:, :3].contiguous()}), ValueError,
     "has shape"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(R, 64)}),
     KeyError, "unexpected keys ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']"),
    (lambda t: t.update({(k := last_layer_key(t, "lora_A.weight")): t[k].clone().index_fill_(0, torch.tensor([0]),
                                                                                              float("nan"))}),
     ValueError, "holds NaN or infinite values"),
    (lambda t: t.update({(k := last_layer_key(t, "lora_A.weight")): torch.full_like(t[k], float("inf"))}),
     ValueError, "holds NaN or infinite values"),
    (lambda t: t.update({(k := last_layer_key(t, "lora_A.weight")): t[k].to(torch.int32)}), ValueError,
     "is int32; adapter tensors must be floating point"),
    (lambda t: t.update({(k := "base_model.model.model.layers.1.mlp.gate.weight"): t[k][:2].contiguous()}),
     ValueError, "mlp.gate.weight has shape"),
])
def test_a_bad_adapter_changes_nothing(saved, edit, error, message):
    path, target = saved
    rewrite(path, edit)
    before = trainable_values(target)
    with pytest.raises(error, match=re.escape(message)):
        kt_ops.load_adapter(target, path)
    after = trainable_values(target)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_good_adapter_loads_after_a_bad_one_was_refused(saved):
    path, target = saved
    good = load_file(path / ADAPTER_WEIGHTS)
    rewrite(path, lambda t: t.update({last_layer_key(t, "lora_B.weight"): torch.zeros(1)}))
    with pytest.raises(ValueError):
        kt_ops.load_adapter(target, path)
    save_file(good, path / ADAPTER_WEIGHTS)
    kt_ops.load_adapter(target, path)
    kt_ops.save_adapter(target, path / "again")
    again = load_file(path / "again" / ADAPTER_WEIGHTS)
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("r"), '"r" must be a positive integer, got null'),
    (lambda c: c.update(r="4"), '"r" must be a positive integer, got "4"'),
    (lambda c: c.update(r=True), '"r" must be a positive integer, got true'),
    (lambda c: c.update(lora_alpha=None), '"lora_alpha" must be a positive number, got null'),
    (lambda c: c.update(target_modules=5), '"target_modules" must be a string, a list of strings or null, got 5'),
    (lambda c: c.update(target_parameters="mlp.experts.gate_up_proj"),
     '"target_parameters" must be a list of strings or null'),
    (lambda c: c.update(modules_to_save=[1]), '"modules_to_save" must be a list of strings or null'),
    (lambda c: c.update(use_dora=True), '"use_dora" is set; kt_ops computes plain LoRA and cannot load DoRA'),
    (lambda c: c.update(rank_pattern={"q_proj": 8}), '"rank_pattern" is set'),
])
def test_a_malformed_adapter_config_names_the_field(saved, edit, message):
    path, target = saved
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    edit(cfg)
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(message)):
        kt_ops.load_adapter(target, path)


@pytest.mark.parametrize("text, message", [("{", "is not valid JSON"), ("[]", "must hold a JSON object, got list"),
                                           ("\udcff", "is not valid JSON")])
def test_an_adapter_config_that_is_not_a_json_object_is_named(saved, text, message):
    path, target = saved
    (path / ADAPTER_CONFIG).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=re.escape(message)):
        kt_ops.load_adapter(target, path)


def test_generate_names_a_malformed_adapter_config(saved, capsys):
    path, _ = saved
    (path / ADAPTER_CONFIG).write_text('{"r": "x"}')
    assert main(["generate", "--adapter", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert '"r" must be a positive integer' in err and "Traceback" not in err


# ---------------------------------------------------------------- expert checkpoints

@pytest.fixture
def checkpoint(tmp_path):
    """The built-in tiny Qwen3-MoE (per-expert tensors) copied to a directory of its own."""
    path = tmp_path / "model"
    shutil.copytree(default.model_dir(), path)
    return path


def edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({EXPERT: torch.cat([t[EXPERT], t[EXPERT]])}), f"{EXPERT} in "),
    (lambda t: t.update({EXPERT: t[EXPERT].to(torch.int8)}), "is int8; expert weights must be bf16, fp16, fp32 or fp8"),
    (lambda t: t.update({EXPERT: t[EXPERT][:, :60].contiguous()}), "has shape [128, 60]; the model's config needs [128, 256]"),
    (lambda t: t.update({"model.layers.1.mlp.experts.99.up_proj.weight": t[EXPERT].clone()}), "beyond the config's"),
])
def test_every_expert_tensor_is_checked_against_the_config(checkpoint, edit, message):
    edit_tensors(checkpoint, edit)
    with pytest.raises((ValueError, KeyError), match=re.escape(message)):
        kt_ops.load_experts(checkpoint, progress=False)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_load_as_pack_experts_makes_them(checkpoint, fmt):
    """Quantized as they are read: the same tensors as packing the bf16 experts in the format
    (int4 in its default groups of 32)."""
    bf16 = kt_ops.load_experts(checkpoint, progress=False)
    quantized = kt_ops.load_experts(checkpoint, experts_format=fmt, progress=False)
    assert bf16.keys() == quantized.keys()
    for layer, packed in quantized.items():
        want = kt_ops.pack_experts(*bf16[layer].unpack(), bf16[layer].numa_slices, format=fmt)
        assert packed.format == fmt and len(packed.tensors) == len(want.tensors)
        assert all(torch.equal(a, b) for a, b in zip(packed.tensors, want.tensors))


@pytest.mark.parametrize("load", [lambda p: kt_ops.load_experts(p, experts_format="int3", progress=False),
                                  lambda p: kt_ops.load_model(p, experts_format="int3", progress=False)])
def test_an_unknown_experts_format_is_named_before_anything_is_read(checkpoint, load):
    with pytest.raises(ValueError, match=re.escape("experts_format must be one of bf16, int8, int4, fp8, got 'int3'")):
        load(checkpoint)


def test_experts_of_another_hidden_size_than_the_config_are_refused(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["hidden_size"] = 192  # the tensors hold H = 256
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.experts.0.gate_proj.weight in ")):
        kt_ops.load_experts(checkpoint, progress=False)
    with pytest.raises(ValueError, match=r"is bfloat16 \[1024, 256\]; the model's .* is bfloat16 \[1024, 192\]"):
        kt_ops.load_model(checkpoint, progress=False)


def write_index(path, doc):
    (path / "model.safetensors.index.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: write_index(p, "{"), "model.safetensors.index.json is not valid JSON"),
    (lambda p: write_index(p, {"metadata": {}}), 'model.safetensors.index.json must hold a "weight_map" object'),
    (lambda p: write_index(p, {"weight_map": {"x": 3}}), 'must hold a "weight_map" object'),
    (lambda p: write_index(p, {"weight_map": {"x": "gone.safetensors"}}), "names shard 'gone.safetensors', which is not"),
    (lambda p: write_index(p, {"weight_map": {"x": "../model/model.safetensors"}}), "which is not a file in"),
    (lambda p: write_index(p, {"weight_map": {"x": "model.safetensors"}}), "puts x in model.safetensors, which has no"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x01\x02"), "model.safetensors is not a safetensors file (2 "
                                                                   "bytes, shorter than its 8-byte header length)"),
    (lambda p: _patch_header(p, size=2**60), "header length 1152921504606846976 does not fit"),
    (lambda p: _patch_header(p, text=b"{" + b" " * 7), "has a safetensors header that is not valid JSON"),
    (lambda p: _patch_header(p, edit=lambda h: h.update({EXPERT: {**h[EXPERT], "data_offsets": [0, 2**40]}})),
     f"{EXPERT} in "),
    (lambda p: _patch_header(p, edit=lambda h: h.update({EXPERT: {**h[EXPERT], "shape": [128, 255]}})),
     "needs 65280 bytes, its data_offsets hold 65536"),
    (lambda p: _patch_header(p, edit=lambda h: h.update({EXPERT: {"dtype": "BF16"}})),
     "the header entry must have a dtype, a shape and data_offsets"),
    (lambda p: (p / "config.json").write_text("{"), "config.json is not valid JSON"),
])
def test_a_corrupt_checkpoint_is_named(checkpoint, corrupt, message):
    corrupt(checkpoint)
    for load in (kt_ops.load_experts, kt_ops.load_model):
        with pytest.raises((ValueError, KeyError, FileNotFoundError), match=re.escape(message)):
            load(checkpoint, progress=False)


def _patch_header(path, size=None, text=None, edit=None):
    """Rewrites model.safetensors' header: its length field, its bytes, or its JSON."""
    raw = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = raw[8:8 + n], raw[8 + n:]
    if edit is not None:
        doc = json.loads(header)
        edit(doc)
        header = json.dumps(doc).encode()
    if text is not None:
        header = text
    (path / "model.safetensors").write_bytes(struct.pack("<Q", size if size is not None else len(header)) + header + body)


# ---------------------------------------------------------------- JSONL data

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default.ASSETS)


GOOD = json.dumps({"prompt": "a", "response": "b"}).encode()


@pytest.mark.parametrize("bad_line, reason", [
    (b'{"prompt": "caf\xe9", "response": "b"}', "not UTF-8 (byte 0xe9 at column 16)"),
    (b'{"prompt": "\\ud800", "response": "b"}', '"prompt" holds a lone surrogate (\\ud800), not text'),
    (b'{"messages": [{"role": "user", "content": "x\\udfff"}, {"role": "assistant", "content": "y"}]}',
     "messages[0].content holds a lone surrogate (\\udfff)"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON (nested too deeply)"),
    (b'{"prompt": "a", "response": ' + b"9" * 5000 + b"}", "invalid JSON"),
], ids=["latin-1 byte", "lone surrogate", "lone surrogate in messages", "deep nesting", "huge integer"])
def test_each_bad_line_is_reported_and_left_out(bad_line, reason, tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([GOOD, bad_line, GOOD]) + b"\n")
    warnings = []
    examples = sft_data.load_examples(path, tokenizer, 64, warn=warnings.append)
    assert len(examples) == 2
    assert any(w.startswith(f"{path}:2: ") and reason in w for w in warnings), warnings


def test_a_file_of_bad_lines_stops_with_the_first_named(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xff\xfe\n" + b"[" * 100_000 + b"\n")
    with pytest.raises(sft_data.DataError, match=re.escape(f"{path}: no usable examples (2 bad lines, the first: "
                                                           f"{path}:1: not UTF-8")):
        sft_data.load_examples(path, tokenizer, 64, warn=lambda m: None)
