"""Loaders take all or nothing and name every mismatch: adapters (validated before any value
of the model changes), expert checkpoints (every tensor's shape and dtype against the config,
corrupt files named), JSONL data (every bad line reported, only an unusable file stops)."""
import json
import re
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


def _as_fp8_checkpoint(path):
    """The checkpoint's expert weights rewritten as fp8 e4m3 with 128 x 128 block scales, as
    DeepSeek-V3 publishes them (kt_ops.reference.quantize_fp8's codes and scale_inv)."""
    from kt_ops.reference import quantize_fp8

    def to_fp8(tensors):
        for name in [n for n in tensors if ".experts." in n and n.endswith(".weight")]:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name])
    edit_tensors(path, to_fp8)


def _forbid(monkeypatch, *names):
    """Makes the loader's functions ``names`` (its ways to bf16 weights) fail when called."""
    import kt_ops.weights as weights

    def went_through_bf16(*args, **kwargs):
        raise AssertionError("a quantized checkpoint loaded in its own format went through bf16")
    for name in names:
        monkeypatch.setattr(weights, name, went_through_bf16)


def test_an_fp8_checkpoint_loads_as_fp8_with_no_bf16_copy(checkpoint, monkeypatch):
    """By default an fp8 checkpoint's experts stay fp8: packed from the codes and block scales
    as stored (the same tensors as packing the bf16 experts as fp8, which quantizes to those
    codes), never dequantized to bf16 on the way."""
    bf16 = kt_ops.load_experts(checkpoint, progress=False)
    _as_fp8_checkpoint(checkpoint)
    assert kt_ops.checkpoint_experts_format(checkpoint) == "fp8"
    _forbid(monkeypatch, "_dequantize", "pack_experts")
    fp8 = kt_ops.load_experts(checkpoint, progress=False)
    monkeypatch.undo()
    assert fp8.keys() == bf16.keys()
    for layer, packed in fp8.items():
        want = kt_ops.pack_experts(*bf16[layer].unpack(), bf16[layer].numa_slices, format="fp8")
        assert packed.format == "fp8"
        assert all(torch.equal(a, b) for a, b in zip(packed.tensors, want.tensors))
    # Asked for another format, the experts are dequantized and quantized again.
    as_int8 = kt_ops.load_experts(checkpoint, experts_format="int8", progress=False)
    assert all(p.format == "int8" for p in as_int8.values())


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_load_model_keeps_a_quantized_checkpoint_in_its_format(checkpoint, fmt):
    """load_model (and so kt-sft) packs in the checkpoint's own format unless told otherwise."""
    (_as_fp8_checkpoint if fmt == "fp8" else _as_int4_checkpoint)(checkpoint)

    from kt_ops.experts import packed_experts_in

    def formats(model):
        return {p.format for p in packed_experts_in(model)}
    assert formats(kt_ops.load_model(checkpoint, lora_rank=R, lora_alpha=ALPHA, progress=False)) == {fmt}
    assert formats(kt_ops.load_model(checkpoint, lora_rank=R, lora_alpha=ALPHA, experts_format="int8",
                                     progress=False)) == {"int8"}


def test_fp8_codes_that_are_nan_are_named(checkpoint):
    _as_fp8_checkpoint(checkpoint)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"

    def poison(tensors):
        codes = tensors[name].view(torch.uint8).clone()
        codes[3, 5] = 0x7F
        tensors[name] = codes.view(torch.float8_e4m3fn)
    edit_tensors(checkpoint, poison)
    with pytest.raises(ValueError, match=re.escape("kt_ops.load_experts: layer 1's fp8 experts in ")) as err:
        kt_ops.load_experts(checkpoint, progress=False)
    assert "w_down holds the e4m3 NaN code" in str(err.value)


KIMI_INT4_CONFIG = {  # the quantization_config of Kimi-K2-Thinking's config.json, group size as given
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                  "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                              "group_size": 32, "dynamic": False, "observer": "minmax"}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None}


def _int4_words(codes):
    """compressed-tensors' packing of int4 codes [..., N, K] (K % 8 == 0): eight per int32 along
    K, code + 8 in bits 4i..4i+3 for column 8j + i."""
    nibbles = (codes.to(torch.int32) + 8).unflatten(-1, (-1, 8))
    words = torch.zeros(nibbles.shape[:-1], dtype=torch.int32)
    for i in range(8):
        words |= nibbles[..., i] << (4 * i)
    return words


def _as_int4_checkpoint(path, group_size=32, edit_codes=None):
    """The checkpoint's expert weights rewritten as compressed-tensors pack-quantized int4 (the
    codes and scales of kt_ops.reference.quantize_int4; ``edit_codes`` may change the codes),
    with the quantization_config that says so."""
    from kt_ops.reference import quantize_int4

    def to_int4(tensors):
        for name in [n for n in tensors if ".experts." in n and n.endswith(".weight")]:
            w = tensors.pop(name)
            codes, scale = quantize_int4(w, group_size)
            if edit_codes:
                edit_codes(name, codes)
            tensors[name + "_packed"], tensors[name + "_scale"] = _int4_words(codes), scale
            tensors[name + "_shape"] = torch.tensor(list(w.shape))
    edit_tensors(path, to_int4)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = json.loads(json.dumps(KIMI_INT4_CONFIG))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = group_size
    (path / "config.json").write_text(json.dumps(cfg))


def test_our_int4_words_are_compressed_tensors_own():
    """The checkpoints the int4 tests write are packed as the compressed-tensors library packs them."""
    compressors = pytest.importorskip("compressed_tensors.compressors")
    codes = torch.randint(-8, 8, (3, 64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(_int4_words(codes), compressors.pack_to_int32(codes, 4))
    from kt_ops.int4_checkpoints import unpack_int4
    assert torch.equal(unpack_int4(compressors.pack_to_int32(codes, 4), 96), codes)


@pytest.mark.parametrize("group_size", [32, 128])
def test_a_compressed_tensors_int4_checkpoint_loads_as_int4_with_no_bf16_copy(checkpoint, monkeypatch, group_size):
    """Kimi-K2-Thinking's format: by default the experts stay int4, packed from the codes and
    group scales as stored (the same tensors as packing the bf16 experts as int4 in that group,
    which quantizes to those codes), never dequantized on the way."""
    bf16 = kt_ops.load_experts(checkpoint, progress=False)
    _as_int4_checkpoint(checkpoint, group_size)
    assert kt_ops.checkpoint_experts_format(checkpoint) == "int4"
    _forbid(monkeypatch, "dequantize_int4", "pack_experts")
    int4 = kt_ops.load_experts(checkpoint, progress=False)
    monkeypatch.undo()
    assert int4.keys() == bf16.keys()
    for layer, packed in int4.items():
        want = kt_ops.pack_experts(*bf16[layer].unpack(), bf16[layer].numa_slices, format="int4",
                                   group_size=group_size)
        assert packed.format == "int4" and packed.group_size == group_size
        assert all(torch.equal(a, b) for a, b in zip(packed.tensors, want.tensors))
    # Another format: dequantized (code * scale, in bf16) and packed in it.
    as_bf16 = kt_ops.load_experts(checkpoint, experts_format="bf16", progress=False)
    for layer, packed in as_bf16.items():
        assert all(torch.equal(a, b) for a, b in zip(packed.unpack(), int4[layer].unpack()))


def test_int4_checkpoint_codes_of_minus_8_are_read_as_they_are(checkpoint):
    from kt_ops.reference import dequantize_int4, quantize_int4

    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    original = load_file(checkpoint / "model.safetensors")[name]

    def minus_8(n, codes):
        if n == name:
            codes[0, :4] = -8
    _as_int4_checkpoint(checkpoint, edit_codes=minus_8)
    codes, scale = quantize_int4(original, 32)
    codes[0, :4] = -8
    got = kt_ops.load_experts(checkpoint, progress=False)[1].unpack()[0][2]
    assert torch.equal(got, dequantize_int4(codes, scale, 32).bfloat16())


@pytest.mark.parametrize("edit, message", [
    (lambda t, c: t.update({EXPERT + "_scale": t[EXPERT + "_scale"][:, :3].contiguous()}),
     f"{EXPERT}_scale in "),
    (lambda t, c: t.update({EXPERT + "_shape": torch.tensor([128, 255])}),
     f"{EXPERT}_shape in "),
    (lambda t, c: t.pop(EXPERT + "_scale"), f"{EXPERT} is int4 but the checkpoint has no {EXPERT}_scale"),
    (lambda t, c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8),
     "kt_ops reads compressed-tensors int4 weights that are symmetric, in groups of 32, 64 or 128; this "
     "quantization_config's weights are {'num_bits': 8"),
    (lambda t, c: c.pop("quantization_config"),
     "is compressed-tensors int4, but"),
])
def test_int4_checkpoint_tensors_and_config_are_checked(checkpoint, edit, message):
    _as_int4_checkpoint(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    edit_tensors(checkpoint, lambda t: edit(t, cfg))
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, KeyError), match=re.escape(message)):
        kt_ops.load_experts(checkpoint, progress=False)


@pytest.mark.parametrize("load", [lambda p: kt_ops.load_experts(p, experts_format="int3", progress=False),
                                  lambda p: kt_ops.load_model(p, experts_format="int3", progress=False)])
def test_an_unknown_experts_format_is_named_before_anything_is_read(checkpoint, load):
    with pytest.raises(ValueError, match=re.escape("experts_format must be one of bf16, int8, int4, fp8, w8a8, got 'int3'")):
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
