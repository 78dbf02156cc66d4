"""kt_ops.patch_model / load_model / save_adapter / load_adapter on tiny models of the
families kt_ops streams from checkpoints, against the unpatched model with the same LoRA
applied by stock PEFT. On transformers 5.x these are conveniences over the "kt" experts
implementation and PEFT's own LoRA; on 4.x they replace the expert lists with KtExperts."""
import copy
import importlib.util
import json
import os
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import kt_ops
from hf_models import FAMILIES, VOCAB, tiny_model
from kt_ops.adapters import from_peft_layout, lora_state_dict
from kt_ops.models.families import expert_weights, interface_experts, moe_layers
from kt_ops.models.surgery import ExpertLoraConfig
from kt_ops.packed_weights import PackedExpertWeight
from moe_case import assert_close

# transformers 5.x: patch_model gives a PeftModel over the "kt" experts implementation.
PEFT_EXPERTS = importlib.util.find_spec("transformers.integrations.moe") is not None

R, ALPHA = 4, 8.0
# A router weight, also as PEFT's trainable copy of it (modules_to_save: save_adapter saves trained routers).
ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.gate\.(modules_to_save\.default\.)?weight$")
# PEFT LoRA on every routed expert's linears of a transformers 4.x model (per-expert lists).
PER_EXPERT_TARGETS = r".*\.(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)"


def per_expert_layout() -> bool:
    """True for transformers 4.x models: routed experts as nn.ModuleLists of nn.Linear."""
    return not PEFT_EXPERTS


def packed_by_layer(model) -> dict:
    """{layer index: PackedExperts} of a patched model, either kind."""
    if PEFT_EXPERTS:
        found = {n: m.gate_up_proj.packed for n, m in interface_experts(model).items()}
    else:
        found = {n: m.packed for n, m in moe_layers(model).items()}
    return {int(re.search(r"layers\.(\d+)\.", n).group(1)): p for n, p in found.items()}


def expert_lora_grads(kt, ref) -> list:
    """(name, kt gradient, reference gradient) of every expert LoRA tensor; ``ref`` is the
    unpatched model with the same adapter loaded by stock PEFT."""
    ref_params = dict(ref.named_parameters())
    if PEFT_EXPERTS:  # the same PEFT modules on both
        kt_params = dict(kt.named_parameters())
        return [(n, kt_params[n].grad, p.grad) for n, p in ref_params.items() if "lora_" in n and ".experts." in n]
    return [(key, grad, ref_params[key.replace(".weight", ".default.weight")].grad)
            for key, grad in lora_state_dict(kt, gradients=True).items()]


def peft_expert_config(model, **kw) -> peft.LoraConfig:
    """PEFT's own LoRA on the routed experts of an unpatched model, in its layout."""
    if per_expert_layout():
        return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PER_EXPERT_TARGETS, **kw)
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], **kw,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def randomize_lora(model, seed=1):
    """LoRA values that change the model's function clearly but do not swamp the weights: with
    much larger ones, bf16 rounding in one layer flips near-tied top-k choices in the next.
    Trainable routers move too, as training moves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ROUTER.search(name) and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def tokens(seed=2, batch=2, length=11):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def pair(request, tmp_path):
    """(kt-patched model, unpatched model with the same adapter loaded by stock PEFT)."""
    ref = tiny_model(request.param)
    kt = kt_ops.patch_model(copy.deepcopy(ref), lora_rank=R, lora_alpha=ALPHA)
    randomize_lora(kt)
    kt_ops.save_adapter(kt, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path, is_trainable=True)
    for name, p in peft_model.named_parameters():
        if ROUTER.search(name):
            p.requires_grad_(True)
    return kt, peft_model


def routers(model):
    return {re.sub(r"^base_model\.model\.|modules_to_save\.default\.", "", n): p
            for n, p in model.named_parameters() if ROUTER.search(n)}


def test_patched_model_matches_peft_lora_logits_loss_and_gradients(pair):
    kt, ref = pair
    ids = tokens()
    out_kt, out_ref = kt(ids, labels=ids), ref(ids, labels=ids)
    assert_close("logits", out_kt.logits, out_ref.logits, torch.bfloat16)
    assert abs(out_kt.loss.item() - out_ref.loss.item()) < 1e-2 * out_ref.loss.item()
    out_kt.loss.backward()
    out_ref.loss.backward()
    grads = expert_lora_grads(kt, ref)
    assert grads
    for key, grad, ref_grad in grads:
        if ref_grad is None:  # transformers 4.x loops over routed experts only: an idle expert's is None
            assert per_expert_layout() and not grad.any(), key
            continue
        assert_close(f"{key} grad", grad, ref_grad, torch.bfloat16)
    kt_routers, ref_routers = routers(kt), routers(ref)
    assert kt_routers and kt_routers.keys() == ref_routers.keys()
    for name, p in kt_routers.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"router {name} got no gradient"
        assert_close(f"router {name} grad", p.grad, ref_routers[name].grad, torch.bfloat16)


def test_generate_runs(pair):
    kt, _ = pair
    kt.eval()
    out = kt.generate(tokens(batch=1, length=5), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_saved_by_peft_loads_into_patched_model(family, tmp_path):
    ref = tiny_model(family)
    kt = kt_ops.patch_model(copy.deepcopy(ref), lora_rank=R, lora_alpha=ALPHA)
    peft_model = peft.get_peft_model(ref, peft_expert_config(ref, init_lora_weights=False))
    randomize_lora(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path)
    kt_ops.load_adapter(kt, tmp_path)
    ids = tokens()
    with torch.no_grad():
        assert_close("logits", kt(ids).logits, peft_model(ids).logits, torch.bfloat16)


def loaded_expert_lora(kt, layer: int, e: int) -> list:
    """(A_g, B_g, A_u, B_u, A_d, B_d) of expert ``e`` of layer ``layer`` in a patched model."""
    if not PEFT_EXPERTS:
        m = next(m for n, m in moe_layers(kt).items() if f"layers.{layer}." in n)
        return [t[e] for t in m.lora_tensors()]
    state = peft.get_peft_model_state_dict(kt)
    prefix = f"base_model.model.model.layers.{layer}.mlp.experts."
    i, experts = kt.config.intermediate_size, kt.config.num_local_experts
    pairs = []
    for stem in (prefix + "base_layer.", prefix):  # gate_up_proj, wrapped first, then down_proj
        a, b = from_peft_layout(state[stem + "lora_A.weight"], state[stem + "lora_B.weight"], experts)
        pairs.append((a[e], b[e]))
    (a_gu, b_gu), (a_d, b_d) = pairs
    return [a_gu, b_gu[:i], a_gu, b_gu[i:], a_d, b_d]


@pytest.mark.parametrize("same_gate_up_a", [True, False])
def test_per_expert_adapter_loads(same_gate_up_a, tmp_path):
    """PEFT LoRA on per-expert nn.Linear modules (transformers 4.x models): keys
    ...experts.{e}.w1.lora_A.weight etc. Fused 5.x experts share one A between gate and up,
    so there the adapter loads only when the two are equal."""
    kt = kt_ops.patch_model(tiny_model("mixtral"), lora_rank=R, lora_alpha=ALPHA)
    cfg = kt.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(3)
    tensors, want = {}, {}
    for layer in range(cfg.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts"
        for e in range(cfg.num_local_experts):
            a = torch.randn(R, h, generator=g)
            vals = {"w1.lora_A": a, "w3.lora_A": a.clone() if same_gate_up_a else torch.randn(R, h, generator=g),
                    "w1.lora_B": torch.randn(i, R, generator=g),
                    "w3.lora_B": torch.randn(i, R, generator=g), "w2.lora_A": torch.randn(R, i, generator=g),
                    "w2.lora_B": torch.randn(h, R, generator=g)}
            for k, v in vals.items():
                tensors[f"{prefix}.{e}.{k}.weight"] = v
            want[(layer, e)] = vals
            if PEFT_EXPERTS:  # PEFT's copy of the router, which patch_model trains
                tensors[f"base_model.model.model.layers.{layer}.mlp.gate.weight"] = torch.randn(
                    cfg.num_local_experts, h, generator=g)
    save_file(tensors, os.path.join(tmp_path, "adapter_model.safetensors"))
    peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["w1", "w2", "w3"]).save_pretrained(tmp_path)
    if not same_gate_up_a and not per_expert_layout():
        with pytest.raises(ValueError, match="model.layers.0.mlp.experts: gate and up have different lora_A"):
            kt_ops.load_adapter(kt, tmp_path)
        return
    kt_ops.load_adapter(kt, tmp_path)
    for (layer, e), vals in want.items():
        a_g, b_g, a_u, b_u, a_d, b_d = loaded_expert_lora(kt, layer, e)
        for got, key in [(a_g, "w1.lora_A"), (b_g, "w1.lora_B"), (a_u, "w3.lora_A"), (b_u, "w3.lora_B"),
                         (a_d, "w2.lora_A"), (b_d, "w2.lora_B")]:
            assert torch.equal(got, vals[key]), (layer, e, key)


def test_user_peft_lora_on_attention_is_saved_with_the_experts(tmp_path):
    ref = tiny_model("qwen3_moe")
    kt = kt_ops.patch_model(copy.deepcopy(ref), config=ExpertLoraConfig(R, ALPHA, target_modules=("q_proj", "v_proj")))
    randomize_lora(kt, seed=7)
    kt_ops.save_adapter(kt, tmp_path)
    loaded = peft.PeftModel.from_pretrained(ref, tmp_path)
    ids = tokens()
    with torch.no_grad():
        assert_close("logits", kt(ids).logits, loaded(ids).logits, torch.bfloat16)


def test_adapter_with_attention_lora_and_trained_routers_round_trips(tmp_path):
    """Expert LoRA, PEFT LoRA on attention and the trained routers all come back, through
    kt_ops.load_adapter into a fresh patched model and through stock PEFT."""
    ref = tiny_model("qwen2_moe")  # its shared_expert_gate must not be taken for the router
    attention = ExpertLoraConfig(R, ALPHA, target_modules=("q_proj", "o_proj"))
    kt = kt_ops.patch_model(copy.deepcopy(ref), config=attention)
    randomize_lora(kt, seed=9)
    kt_ops.save_adapter(kt, tmp_path)
    # Into a model with expert LoRA only: on 4.x load_adapter adds PEFT's LoRA on attention;
    # on 5.x the model's adapter must have the saved one's targets.
    experts_only = ExpertLoraConfig(R, ALPHA)
    fresh = kt_ops.load_adapter(kt_ops.patch_model(copy.deepcopy(ref), config=attention if PEFT_EXPERTS else experts_only),
                                tmp_path)
    assert isinstance(fresh, peft.PeftModel)
    by_peft = peft.PeftModel.from_pretrained(ref, tmp_path)
    ids = tokens()
    with torch.no_grad():
        want = kt(ids).logits
        assert torch.equal(fresh(ids).logits, want)
        assert_close("logits", by_peft(ids).logits, want, torch.bfloat16)
    state = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.mlp.gate.extra"] = torch.zeros(1)
    save_file(state, os.path.join(tmp_path, "adapter_model.safetensors"))
    with pytest.raises(KeyError, match="unexpected keys.*mlp.gate.extra"):
        kt_ops.load_adapter(kt_ops.patch_model(tiny_model("qwen2_moe"), lora_rank=R, lora_alpha=ALPHA), tmp_path)


def test_adapter_tensors_without_a_target_are_named(tmp_path):
    kt = kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    kt_ops.save_adapter(kt, tmp_path)
    state = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(R, 64)
    save_file(state, os.path.join(tmp_path, "adapter_model.safetensors"))
    with pytest.raises(KeyError, match="unexpected keys.*q_proj.lora_A.weight.*(no target_modules|no module of the model)"):
        kt_ops.load_adapter(kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA), tmp_path)


def test_only_lora_and_routers_train_and_lora_is_found_by_name():
    kt = kt_ops.patch_model(tiny_model("deepseek_v3"), lora_rank=R, lora_alpha=ALPHA)
    trainable = {n for n, p in kt.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora" in n}
    if PEFT_EXPERTS:  # PEFT's A and B on both fused parameters of every experts module
        assert len(lora) == 4 * len(interface_experts(kt)) and all(".mlp.experts." in n for n in lora)
    else:
        assert lora == {f"{name}.{p}" for name, m in moe_layers(kt).items() for p in m.lora_names}
    assert trainable - lora == {n for n, _ in kt.named_parameters() if ROUTER.search(n)}
    assert trainable - lora
    no_router = kt_ops.patch_model(tiny_model("deepseek_v3"), config=kt_ops.ExpertLoraConfig(R, ALPHA, train_router=False))
    assert all("lora" in n for n, p in no_router.named_parameters() if p.requires_grad)


def test_fresh_adapter_leaves_the_function_unchanged():
    ref = tiny_model("qwen2_moe")
    kt = kt_ops.patch_model(copy.deepcopy(ref), config=peft.LoraConfig(r=R, lora_alpha=ALPHA))
    ids = tokens()
    with torch.no_grad():
        assert_close("logits", kt(ids).logits, ref(ids).logits, torch.bfloat16)


def test_model_to_never_moves_packed_experts():
    kt = kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    packed = packed_by_layer(kt)
    kt.to(torch.bfloat16)
    if torch.cuda.is_available():
        kt.cuda()
    for layer, p in packed_by_layer(kt).items():
        assert p is packed[layer] and p.gate_up.dtype == torch.bfloat16 and p.gate_up.device.type == "cpu"
    if not PEFT_EXPERTS:  # KtExperts keep their LoRA fp32 in CPU memory (PEFT's LoRA moves as PEFT moves it)
        for m in moe_layers(kt).values():
            assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in m.lora_tensors())
    head = kt.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16
    assert kt(tokens().to(head.device)).logits.dtype == torch.bfloat16
    assert not any(t is p.gate_up for p in packed.values() for t in kt.state_dict().values())


def test_a_deep_copy_of_a_patched_model_is_independent():
    kt = kt_ops.patch_model(tiny_model("qwen2_moe"), lora_rank=R, lora_alpha=ALPHA)
    randomize_lora(kt)
    ids = tokens()
    with torch.no_grad():
        want = kt(ids).logits
    twin = copy.deepcopy(kt)
    packed, copied = packed_by_layer(kt), packed_by_layer(twin)
    assert all(copied[k] is not packed[k] and packed_equal(copied[k], packed[k]) for k in packed)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, want)
        for p in copied.values():  # the copy's experts change; the original's do not
            p.gate_up.zero_()
        assert not torch.equal(twin(ids).logits, want)
        assert torch.equal(kt(ids).logits, want)


def test_bad_inputs_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    kt = kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="already has a PEFT adapter" if PEFT_EXPERTS else
                       "model.layers.0.mlp.experts is already patched"):
        kt_ops.patch_model(kt, lora_rank=R)
    with pytest.raises(ValueError, match="give either config or lora_rank/lora_alpha"):
        kt_ops.patch_model(tiny_model("mixtral"), lora_rank=4, config=peft.LoraConfig(r=4))
    with pytest.raises(ValueError, match="lora_rank must be >= 1, got 0"):
        kt_ops.patch_model(tiny_model("mixtral"), lora_rank=0)
    with pytest.raises(TypeError, match="config must be an ExpertLoraConfig or a peft.LoraConfig, got dict"):
        kt_ops.patch_model(tiny_model("mixtral"), config={"r": 4})
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="no MoE family for model_type 'llama'; supported: deepseek_v2"):
        kt_ops.patch_model(dense)
    if not PEFT_EXPERTS:  # 5.x reads the activation off the experts module (GELU runs there)
        gelu = tiny_model("mixtral")
        gelu.config.hidden_act = "gelu"
        with pytest.raises(ValueError, match="this model's hidden_act is 'gelu'"):
            kt_ops.patch_model(gelu)

    kt_ops.save_adapter(kt, tmp_path)
    other_rank = kt_ops.patch_model(tiny_model("qwen3_moe"), lora_rank=8, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match=r"adapter has r=4, lora_alpha=8.0; .* has r=8"):
        kt_ops.load_adapter(other_rank, tmp_path)
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    key = max(k for k in tensors if "layers.1." in k and k.endswith("lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != key}, os.path.join(tmp_path, "adapter_model.safetensors"))
    with pytest.raises(KeyError, match=re.escape(f"missing key {key}")):
        kt_ops.load_adapter(kt, tmp_path)
    shape = tuple(tensors[key].shape)
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, os.path.join(tmp_path, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{key} has shape ({shape[0]}, 3), expected {shape}")):
        kt_ops.load_adapter(kt, tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    cfg["target_parameters"] = ["mlp.experts.down_proj"]
    with open(os.path.join(tmp_path, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    if not PEFT_EXPERTS:  # on 5.x the tensors decide: the model's adapter takes exactly these
        with pytest.raises(ValueError, match=r"adapter targets \['down_proj'\] only"):
            kt_ops.load_adapter(kt, tmp_path)
    with pytest.raises(ValueError, match="is not patched"):
        kt_ops.save_adapter(tiny_model("qwen3_moe"), tmp_path)


@pytest.mark.skipif(not PEFT_EXPERTS, reason="the PEFT path of transformers 5.x")
def test_peft_path_errors_are_named_and_change_nothing(tmp_path):
    # Two modules beside the experts with one row per expert: which is the router is unclear.
    model = tiny_model("qwen3_moe")
    block = model.model.layers[0].mlp
    block.other = torch.nn.Linear(model.config.hidden_size, model.config.num_experts)
    with pytest.raises(ValueError, match=r"found no router beside model.layers.0.mlp.experts .*train_router=False"):
        kt_ops.patch_model(model, lora_rank=R, lora_alpha=ALPHA)
    assert not any(isinstance(p, PackedExpertWeight) for p in model.parameters())  # nothing was packed
    # A per-expert adapter into a model whose adapter has LoRA on down_proj only.
    source = kt_ops.patch_model(tiny_model("mixtral"), lora_rank=R, lora_alpha=ALPHA)
    tensors = {}
    cfg = source.config
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_local_experts):
            for proj, (rows, cols) in {"w1": (R, cfg.hidden_size), "w3": (R, cfg.hidden_size),
                                       "w2": (R, cfg.intermediate_size)}.items():
                key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.zeros(rows, cols)
                out = cfg.hidden_size if proj == "w2" else cfg.intermediate_size
                tensors[f"{key}.lora_B.weight"] = torch.zeros(out, R)
    save_file(tensors, os.path.join(tmp_path, "adapter_model.safetensors"))
    peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["w1", "w2", "w3"]).save_pretrained(tmp_path)
    down_only = kt_ops.patch_model(tiny_model("mixtral"), config=peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_parameters=["mlp.experts.down_proj"], modules_to_save=[]))
    with pytest.raises(KeyError, match=r"the model has no LoRA on .*mlp.experts.gate_up_proj"):
        kt_ops.load_adapter(down_only, tmp_path)


def test_load_model_errors_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="give either adapter or lora_rank/lora_alpha/config, not both"):
        kt_ops.load_model(tmp_path / "moe", R, adapter=tmp_path / "moe", progress=False)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="found no routed experts kt_ops can run in .*dense: its model type is none of"):
        kt_ops.load_model(tmp_path / "dense", progress=False)


def packed_equal(a, b):
    return torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)


@pytest.mark.parametrize("family,shard", [("mixtral", "60KB"), ("qwen3_moe", None), ("deepseek_v2", "40KB")])
def test_load_experts_from_written_checkpoint_equals_in_memory_weights(family, shard, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert os.path.exists(tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors"))
    loaded = kt_ops.load_experts(tmp_path, progress=False)
    patched = kt_ops.patch_model(copy.deepcopy(model), lora_rank=R, lora_alpha=ALPHA)
    want = packed_by_layer(patched)
    assert sorted(loaded) == sorted(want)
    assert all(packed_equal(loaded[layer], want[layer]) for layer in want)
    # patch_model takes them instead of the model's weights, which may then be on the meta device.
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        skeleton = AutoModelForCausalLM.from_config(model.config)
    skeleton.load_state_dict({k: v for k, v in model.state_dict().items() if ".experts." not in k}, strict=False, assign=True)
    for name, b in model.named_buffers():
        skeleton.get_submodule(name.rpartition(".")[0]).register_buffer(name.rpartition(".")[2], b.clone())
    skeleton = kt_ops.patch_model(skeleton, lora_rank=R, lora_alpha=ALPHA, experts=loaded)
    randomize_lora(skeleton)
    randomize_lora(patched)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, patched(ids).logits)


def test_load_experts_fused_and_fp8_checkpoints(tmp_path):
    """Fused 3-D expert tensors, and fp8 per-expert tensors with 128x128 block scales."""
    model = tiny_model("qwen3_moe")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fp8").mkdir()
    for d in ("fused", "fp8"):
        model.config.save_pretrained(tmp_path / d)
    fused, fp8, want = {}, {}, {}
    g = torch.Generator().manual_seed(4)
    for name, m in moe_layers(model).items():
        w_gate, w_up, w_down = expert_weights(m)
        fused[name + ".gate_up_proj"] = torch.cat([w_gate, w_up], dim=1)
        fused[name + ".down_proj"] = w_down
        e, h, i = w_down.shape
        w = {p: torch.randn(e, *s, generator=g) for p, s in [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))]}
        for p, t in w.items():
            q = t.to(torch.float8_e4m3fn)
            scale = torch.rand((q.shape[1] + 127) // 128, (q.shape[2] + 127) // 128, generator=g) + 0.5
            for x in range(e):
                fp8[f"{name}.{x}.{p}.weight"] = q[x].contiguous()
                fp8[f"{name}.{x}.{p}.weight_scale_inv"] = scale.clone()
            w[p] = (q.float() * scale.repeat_interleave(128, 0)[: q.shape[1]].repeat_interleave(128, 1)[:, : q.shape[2]]).bfloat16()
        want[int(re.search(r"layers\.(\d+)\.", name).group(1))] = kt_ops.pack_experts(w["gate_proj"], w["up_proj"], w["down_proj"])
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    save_file(fp8, tmp_path / "fp8" / "model.safetensors")
    got_fused = kt_ops.load_experts(tmp_path / "fused", progress=False)
    patched = kt_ops.patch_model(model, lora_rank=R, lora_alpha=ALPHA)
    for layer, packed in packed_by_layer(patched).items():
        assert packed_equal(got_fused[layer], packed)
    assert kt_ops.checkpoint_experts_format(tmp_path / "fused") == "bf16"
    assert kt_ops.checkpoint_experts_format(tmp_path / "fp8") == "fp8"
    # As bf16: the dequantized weights. By default, the checkpoint's own fp8, which stands for them.
    got_bf16 = kt_ops.load_experts(tmp_path / "fp8", experts_format="bf16", progress=False)
    assert sorted(got_bf16) == sorted(want) and all(packed_equal(got_bf16[k], want[k]) for k in want)
    got_fp8 = kt_ops.load_experts(tmp_path / "fp8", progress=False)
    assert sorted(got_fp8) == sorted(want)
    for k, packed in got_fp8.items():
        assert packed.format == "fp8"
        assert all(torch.equal(a, b) for a, b in zip(packed.unpack(), want[k].unpack()))


def test_load_experts_errors_name_the_problem(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match=r"no expert weights for layer\(s\) \[5\]"):
        kt_ops.load_experts(tmp_path, layers=[5], progress=False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape("missing key model.layers.1.block_sparse_moe.experts.2.w3.weight")):
        kt_ops.load_experts(tmp_path, progress=False)
    model.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor model.safetensors.index.json"):
        kt_ops.load_experts(tmp_path / "config_only", progress=False)


def test_patch_model_errors_for_missing_or_mismatched_experts(tmp_path):
    dense = tiny_model("qwen3_moe")
    dense.config.mlp_only_layers = [0, 1]
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_config(dense.config)
    with pytest.raises(ValueError, match=r"found no routed experts in the model \(a 'mlp.experts' module with a 3-D gate_up_proj"):
        kt_ops.patch_model(dense)
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = kt_ops.load_experts(tmp_path, layers=[1], progress=False)
    with pytest.raises(KeyError, match=re.escape("experts has no layer 0 (for model.layers.0.mlp.experts); it has [1]")):
        kt_ops.patch_model(copy.deepcopy(model), experts=loaded)
    other = kt_ops.load_experts(tmp_path, progress=False)
    other[0] = kt_ops.pack_experts(torch.zeros(3, 32, 64).bfloat16(), torch.zeros(3, 32, 64).bfloat16(),
                                   torch.zeros(3, 64, 32).bfloat16())
    with pytest.raises(ValueError, match=re.escape("experts[0] holds 3 experts of hidden size 64 and intermediate "
                                                   "size 32; model.layers.0.mlp.experts has 6 of 64 and 32")):
        kt_ops.patch_model(copy.deepcopy(model), experts=other)


def test_fp8_weight_without_scale_is_named(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape(f"{key} is fp8 but the checkpoint has no {key}_scale_inv")):
        kt_ops.load_experts(tmp_path, progress=False)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_load_model_from_checkpoint_equals_patching_the_loaded_model(family, tmp_path):
    """Mixtral: transformers 5.x renames its block (block_sparse_moe -> mlp) but not its
    checkpoint keys; DeepSeek-V3: a persistent buffer (the score correction bias)."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    loaded = kt_ops.load_model(tmp_path, R, ALPHA, dtype=torch.float32, progress=False)
    patched = kt_ops.patch_model(model, lora_rank=R, lora_alpha=ALPHA)
    assert loaded.state_dict().keys() == patched.state_dict().keys()
    randomize_lora(loaded)
    randomize_lora(patched)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, patched(ids).logits)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in patched.named_parameters() if p.requires_grad}


def test_load_model_names_tensors_without_a_place(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape("no place for checkpoint tensor(s) ['model.layers.0.self_attn.extra.weight']")):
        kt_ops.load_model(tmp_path, progress=False)
    del tensors["model.layers.0.self_attn.extra.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape("the checkpoint has no tensor for ['model.norm.weight']")):
        kt_ops.load_model(tmp_path, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_non_expert_modules_on_gpu_match_the_cpu_model(family):
    """model.cuda() moves everything but the packed experts; hidden states cross to the CPU
    experts and back (through pinned buffers), and logits and gradients are the CPU model's."""
    on_cpu = kt_ops.patch_model(tiny_model(family), lora_rank=R, lora_alpha=ALPHA)
    randomize_lora(on_cpu)
    on_gpu = copy.deepcopy(on_cpu).cuda()
    assert all(p.gate_up.device.type == "cpu" for p in packed_by_layer(on_gpu).values())
    ids = tokens()
    out_cpu, out_gpu = on_cpu(ids, labels=ids), on_gpu(ids.cuda(), labels=ids.cuda())
    assert out_gpu.logits.device.type == "cuda"
    assert_close("logits", out_gpu.logits.cpu(), out_cpu.logits, torch.bfloat16)
    out_cpu.loss.backward()
    out_gpu.loss.backward()
    gpu_params = dict(on_gpu.named_parameters())
    trained = [(n, p) for n, p in on_cpu.named_parameters() if p.requires_grad]
    assert any("lora" in n for n, _ in trained) and any(ROUTER.search(n) for n, _ in trained)
    for name, p in trained:  # KtExperts keep their LoRA and its gradients in CPU memory
        kept_on_cpu = ".experts.lora_" in name and not PEFT_EXPERTS
        assert gpu_params[name].grad.device.type == ("cpu" if kept_on_cpu else "cuda")
        assert_close(f"{name} grad", gpu_params[name].grad.cpu(), p.grad, torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_model_onto_gpu_keeps_the_experts_lora_in_cpu_memory(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    model = kt_ops.load_model(tmp_path, R, ALPHA, device="cuda", progress=False)
    lora = {n: p.device.type for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(d == "cpu" for d in lora.values()), lora
    assert model.get_output_embeddings().weight.device.type == "cuda"
    ids = tokens().cuda()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_saved_adapter_loads_with_auto_peft_model(tmp_path):
    """save_adapter names the task and the base model, as AutoPeftModelForCausalLM needs."""
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "base")
    kt = kt_ops.load_model(tmp_path / "base", R, ALPHA, dtype=torch.float32, progress=False)
    randomize_lora(kt)
    kt_ops.save_adapter(kt, tmp_path / "adapter")
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = tokens()
    with torch.no_grad():
        assert_close("logits", auto(ids).logits, kt(ids).logits, torch.bfloat16)
