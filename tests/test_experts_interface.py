"""The "kt" experts implementation of transformers' experts interface, with expert LoRA as
stock PEFT (``target_parameters``): every family found by introspection against the stock
eager implementation with the same adapter, and the packed stand-ins of the expert weights."""
import copy
import re

import peft
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kt_ops
from hf_families import VOCAB, expert_targets, tiny_model
from kt_ops.models.families import describe_family, interface_model_types
from kt_ops.models.variants import experts_variant, is_interface_experts
from kt_ops.packed_weights import PackedExpertWeight
from kt_ops.reference import TOLERANCES
from moe_case import CountExpertForwards, assert_close, exact_path

pytest.importorskip("transformers.integrations.moe", reason="transformers 4.x has no experts interface")

def families() -> list[str]:
    """Model types with routed experts of their own (vision and audio parts left out)."""
    return [t for t in interface_model_types()
            if (f := describe_family(t)).experts_class is not None or f.problem.startswith("its default config builds no model")]


# Families whose tiny model cannot be made by shrinking the default config's sizes, with why;
# each is checked to still fail, so a family that starts to build leaves this table.
NO_TINY_MODEL = {
    "deepseek_ocr2": "its default config builds no model",
    "diffusion_gemma": "per-layer attention sizes",
    "dots3_note": "per-layer attention sizes",
    "dots3_note_text": "per-layer attention sizes",
    "ernie4_5_vl_moe": "rotary sections sized for the default head size",
    "glm4v_moe": "rotary sections sized for the default head size",
    "glm4v_moe_text": "rotary sections sized for the default head size",
    "inkling_mm_model": "its vision tower keeps its default size",
    "lfm2_moe": "its default config builds no model",
    "minimax_m3_vl": "its vision projector keeps its default size",
    "mistral4": "its rotary share of the head is sized for the default head size",
    "muse_spark": "its vision adapter keeps its default size",
    "qwen3_5_moe": "a multimodal config without a text vocabulary of its own",
    "qwen4_exp": "a multimodal config without a text vocabulary of its own",
    "qwen4_exp_text": "its default config builds no model",
    "unlimited_ocr": "its vision tower keeps its default size",
}


def experts_of(model):
    return [m for m in model.modules() if is_interface_experts(m)]


def with_adapter(model, impl, seed=1):
    """``model`` (a copy) on experts implementation ``impl`` with a stock PEFT LoRA on its
    experts; every other parameter trains too (routers and attention included), so every
    gradient that crosses the experts is compared."""
    model = copy.deepcopy(model)
    model.set_experts_implementation(impl)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_parameters=expert_targets(model),
                                                       init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_" not in name and not name.endswith(("gate_up_proj", "down_proj", "up_proj")):
            p.requires_grad_(True)
    return model


def loss_and_grads(model, ids):
    """Output, loss and gradients: the LM loss, or for a family whose model class has no LM
    head, a loss on its last hidden states."""
    out = model(input_ids=ids, labels=ids) if hasattr(model.get_base_model(), "lm_head") else model(input_ids=ids)
    output = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss = out.loss if getattr(out, "loss", None) is not None else output.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return output.detach(), loss.detach(), grads


def outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_type", families())
def test_family_matches_eager_with_the_same_peft_adapter(model_type, monkeypatch):
    """On the fp32-activation path (AVX2), where the kernels compute what the eager fp32 model
    computes: logits, loss and every gradient. The bf16 paths are the next test's."""
    if model_type in NO_TINY_MODEL:
        with pytest.raises(Exception):
            tiny_model(model_type)(torch.randint(3, VOCAB, (1, 5)))
        pytest.skip(f"no tiny model: {NO_TINY_MODEL[model_type]}")
    monkeypatch.setenv("KT_OPS_MAX_ISA", "avx2")
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    reason = experts_variant(experts_of(model)[0]).unsupported()
    kt = with_adapter(model, "kt")
    if reason is not None:  # a variant the kernels cannot compute: a clear error, never a wrong result
        # The error names the experts' own model type (a multimodal model's text model's).
        family = getattr(getattr(experts_of(model)[0], "config", None), "model_type", model_type)
        with pytest.raises(ValueError, match=f"cannot compute {family}'s .*: {re.escape(reason)}"):
            kt(input_ids=ids)
        return
    eager_logits, eager_loss, eager_grads = loss_and_grads(with_adapter(model, "eager"), ids)
    kt_logits, kt_loss, kt_grads = loss_and_grads(kt, ids)
    assert kt_grads.keys() == eager_grads.keys()
    assert any("lora_" in n for n in kt_grads) and any(".gate." in n or "router" in n for n in kt_grads), kt_grads
    assert_close("logits", kt_logits, eager_logits, torch.float32)
    assert abs(kt_loss - eager_loss) <= 1e-4 * abs(eager_loss)
    for name, grad in eager_grads.items():
        if grad.norm() < 1e-6:  # zero up to rounding (deepseek_v4's hash-routed layers): no scale to judge by
            assert kt_grads[name].norm() < 1e-6, name
            continue
        assert_close(name, kt_grads[name], grad, torch.float32)
    with kt.disable_adapter(), torch.no_grad():  # the base model, with the kt experts
        assert_close("disabled", outputs(kt, ids), outputs(model, ids), torch.float32)


@pytest.mark.parametrize("model_type", [t for t in families() if t not in NO_TINY_MODEL])
def test_patch_model_trains_the_expert_lora_and_the_routers_of_every_family(model_type, monkeypatch):
    """kt_ops.patch_model on every family it can compute: PEFT LoRA on the experts, the
    routers found beside them as modules_to_save; a fresh adapter leaves the function as it
    was, and every expert LoRA B and every router gets a gradient."""
    monkeypatch.setenv("KT_OPS_MAX_ISA", "avx2")
    model = tiny_model(model_type)
    if experts_variant(experts_of(model)[0]).unsupported() is not None:
        pytest.skip("a variant the kernels cannot compute (the test above checks its error)")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = outputs(model, ids)
    kt = kt_ops.patch_model(copy.deepcopy(model), lora_rank=4, lora_alpha=8)
    config = kt.peft_config["default"]
    assert config.modules_to_save and config.target_parameters
    with torch.no_grad():
        assert_close("fresh adapter", outputs(kt, ids), want, torch.float32)
    outputs(kt, ids).float().pow(2).mean().backward()
    trained = {n: p.grad for n, p in kt.named_parameters() if p.requires_grad}
    # Does some tensor of each router get a gradient, as in the eager model? (A bias that only
    # selects experts gets none; phimoe's routing in eval mode passes none.)
    eager = copy.deepcopy(model)
    eager.requires_grad_(True)
    outputs(eager, ids).float().pow(2).mean().backward()
    eager_grads = {n: p.grad for n, p in eager.named_parameters()}
    routers = {}
    for n, g in trained.items():
        if ".modules_to_save." in n:
            router, _, tensor = n.removeprefix("base_model.model.").partition(".modules_to_save.default.")
            got, want = (t is not None and bool(t.abs().sum() > 0) for t in (g, eager_grads[f"{router}.{tensor}"]))
            routers.setdefault(router, [False, False])
            routers[router] = [routers[router][0] or got, routers[router][1] or want]
    assert routers and all(got == want for got, want in routers.values()), routers
    lora_b = {n: g for n, g in trained.items() if "lora_B" in n}
    assert len(lora_b) == 2 * len(experts_of(kt)) and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())


@pytest.mark.skipif(kt_ops.isa() not in ("amx", "avx512"), reason="no bf16 kernel path on this CPU")
@pytest.mark.parametrize("model_type", [t for t in families() if t not in NO_TINY_MODEL])
def test_family_on_bf16_kernels_is_no_further_from_fp32_than_eager_bf16(model_type):
    """With bf16 GEMM inputs, a token's routing can flip where two experts nearly tie, in kt
    as in the eager model run in bf16, so single inputs are no measure: over several, kt's
    median distance from the fp32 result is at most eager bf16's (or within the tolerance)."""
    model = tiny_model(model_type)
    if experts_variant(experts_of(model)[0]).unsupported() is not None:
        pytest.skip("a variant the kernels cannot compute (the previous test checks the error)")
    kt, eager = with_adapter(model, "kt"), with_adapter(model, "eager")
    bf16 = with_adapter(copy.deepcopy(model).bfloat16(), "eager")
    kt_err, bf16_err = [], []
    with torch.no_grad():
        for seed in range(5):
            ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
            want = outputs(eager, ids).float()
            kt_err.append(((outputs(kt, ids).float() - want).norm() / want.norm()).item())
            bf16_err.append(((outputs(bf16, ids).float() - want).norm() / want.norm()).item())
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    assert median(kt_err) <= max(TOLERANCES[torch.bfloat16]["rel"], median(bf16_err)), (kt_err, bf16_err)


@pytest.fixture
def qwen3():
    return tiny_model("qwen3_moe")


def tokens():
    return torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))


def test_sentinel_expert_ids_add_nothing(qwen3, monkeypatch):
    """Ids of num_experts (a "no expert" routing slot, or an expert held elsewhere) are
    skipped by the interface's implementations (and by the eager code of the newer
    transformers): the kt experts add nothing for them and pass no gradient to their routing
    weights (the op's NO_EXPERT slots). The reference is the eager experts on the slots that are
    not sentinels (a sentinel slot turned into expert 0 with weight 0 there)."""
    monkeypatch.setenv("KT_OPS_MAX_ISA", "avx2")
    experts = experts_of(qwen3)[0]
    e, h = experts.num_experts, qwen3.config.hidden_size
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, h, generator=g)
    ids = torch.randint(0, e, (6, 2), generator=g)
    ids[1, 0] = ids[4, 1] = e
    sentinel = ids == e
    weights = torch.rand(6, 2, generator=g)
    results = {}
    for impl, impl_ids, impl_weights in (("eager", ids.masked_fill(sentinel, 0), weights.masked_fill(sentinel, 0)),
                                         ("kt", ids, weights)):
        module = copy.deepcopy(experts)
        module.config._experts_implementation = impl
        xi, w = x.clone().requires_grad_(True), impl_weights.clone().requires_grad_(True)
        y = module(xi, impl_ids, w)
        y.pow(2).sum().backward()
        assert isinstance(module.gate_up_proj, PackedExpertWeight) == (impl == "kt")  # the kt experts ran
        results[impl] = (y.detach(), xi.grad, w.grad.masked_fill(sentinel, 0) if impl == "eager" else w.grad)
    for what, got, want in zip(("y", "grad x", "grad weights"), results["kt"], results["eager"]):
        assert_close(what, got, want, torch.float32)
    assert not results["kt"][2][sentinel].any()


def test_experts_are_held_once_packed_and_read_as_their_true_values(qwen3):
    before = {n: p.detach().clone() for n, p in qwen3.named_parameters() if ".experts." in n}
    ids = tokens()
    with torch.no_grad():
        eager = qwen3(ids).logits
        qwen3.set_experts_implementation("kt")
        kt = qwen3(ids).logits
    assert_close("logits", kt, eager, torch.float32 if exact_path() else torch.bfloat16)
    for name, p in qwen3.named_parameters():
        if ".experts." in name:
            assert isinstance(p, PackedExpertWeight) and p.device.type == "cpu", name
            assert torch.equal(p.dense(), before[name]), name  # reading it gives the weights back
    qwen3.set_experts_implementation("eager")  # the eager implementation reads the true values too
    with torch.no_grad():
        torch.testing.assert_close(qwen3(ids).logits, eager)


def test_model_to_keeps_the_packed_experts_in_cpu_memory(qwen3):
    kt = with_adapter(qwen3, "kt")
    cpu_loss, cpu_grads = loss_and_grads(kt, tokens())[1:]
    kt.zero_grad()
    kt.to("cuda" if torch.cuda.is_available() else "meta")
    for name, p in kt.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")):
            assert isinstance(p, PackedExpertWeight) and p.device.type == "cpu", name
    if torch.cuda.is_available():  # the LoRA moved with the model: each forward takes it to the experts
        cuda_loss, cuda_grads = loss_and_grads(kt, tokens().cuda())[1:]
        assert abs(cuda_loss.item() - cpu_loss.item()) < 1e-3 * abs(cpu_loss.item())
        for name, grad in cpu_grads.items():
            if "lora_" in name:
                assert_close(name, cuda_grads[name].cpu(), grad, torch.bfloat16)


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if type(t) is torch.Tensor:
                self.elements = max(self.elements, t.numel())
        return out


def test_expert_lora_never_forms_a_tensor_of_the_experts_size(qwen3):
    kt = with_adapter(qwen3, "kt")
    loss_and_grads(kt, tokens())  # packs the experts
    e, two_i, h = experts_of(qwen3)[0].gate_up_proj.shape
    with _LargestAllocation() as seen:
        loss_and_grads(kt, tokens())
    assert seen.elements < e * two_i * h // 2  # B A of one expert stack would be e * two_i * h


def test_adapter_round_trips_through_stock_peft_into_the_eager_model(qwen3, tmp_path):
    kt = with_adapter(qwen3, "kt")
    ids = tokens()
    with torch.no_grad():
        want = kt(input_ids=ids).logits
    kt.save_pretrained(tmp_path)
    eager = peft.PeftModel.from_pretrained(copy.deepcopy(qwen3), tmp_path)
    with torch.no_grad():
        assert_close("logits", eager(input_ids=ids).logits, want, torch.float32 if exact_path() else torch.bfloat16)


def test_merge_and_unload_and_save_pretrained_give_a_checkpoint_stock_transformers_loads(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    kt = with_adapter(qwen3, "kt")
    ids = tokens()
    with torch.no_grad():
        want = kt(input_ids=ids).logits
    merged = kt.merge_and_unload()  # the LoRA goes into the packed (bf16) experts
    with torch.no_grad():
        assert_close("merged", merged(input_ids=ids).logits, want, torch.bfloat16)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # stock, eager experts
    with torch.no_grad():
        assert_close("reloaded", reloaded(input_ids=ids).logits, merged(input_ids=ids).logits,
                     torch.float32 if exact_path() else torch.bfloat16)


def test_print_trainable_parameters_counts_the_packed_experts(qwen3, capsys):
    total = sum(p.numel() for p in qwen3.parameters())
    kt = with_adapter(qwen3, "kt")
    loss_and_grads(kt, tokens())
    kt.print_trainable_parameters()
    lora = sum(p.numel() for n, p in kt.named_parameters() if "lora_" in n)
    assert f"all params: {total + lora:,}" in capsys.readouterr().out


def test_stock_activation_checkpointing_runs_the_experts_forward_once(qwen3):
    """The defaults of transformers' activation checkpointing (non-reentrant), as Trainer and
    TRL turn it on: the backward recomputes the layers but hands the kt experts' output back."""
    ids = tokens()
    plain = with_adapter(qwen3, "kt")
    plain.train()
    _, want_loss, want = loss_and_grads(plain, ids)
    kt = with_adapter(qwen3, "kt")
    base = kt.get_base_model()
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()
    kt.train()
    with CountExpertForwards() as counter:
        _, loss, grads = loss_and_grads(kt, ids)
    assert counter.calls == len(experts_of(kt))
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want.keys()
    for name, grad in want.items():
        assert torch.equal(grads[name], grad), name


def test_several_active_adapters_are_a_clear_error(qwen3):
    kt = with_adapter(qwen3, "kt")
    kt.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_parameters=expert_targets(qwen3)))
    kt.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="the kt experts take one LoRA adapter at a time"):
        kt(input_ids=tokens())


@pytest.mark.parametrize("model_type", ["olmoe", "gpt_oss"])
def test_load_model_takes_a_family_whose_checkpoints_kt_ops_does_not_stream(model_type, tmp_path):
    """Through transformers' own loading, then packed: the same model as patching the one in
    memory (gpt-oss: biases, interleaved gate/up, its clamped gate)."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    loaded = kt_ops.load_model(tmp_path, 4, 8, dtype=torch.float32, progress=False)
    patched = kt_ops.patch_model(model, 4, 8)
    assert isinstance(loaded, peft.PeftModel) and experts_of(loaded)
    assert ({n for n, p in loaded.named_parameters() if p.requires_grad}
            == {n for n, p in patched.named_parameters() if p.requires_grad})
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close("logits", loaded(input_ids=ids).logits, patched(input_ids=ids).logits, torch.float32)


def test_load_experts_names_the_families_it_streams(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kt_ops reads the expert tensors of deepseek_v2, .* has model_type 'olmoe'"):
        kt_ops.load_experts(tmp_path, progress=False)


def test_kt_sft_trains_a_family_whose_checkpoints_kt_ops_does_not_stream(tmp_path, capsys):
    """kt-sft on an OLMoE checkpoint: loaded by transformers, packed, trained with PEFT's
    LoRA; the adapter loads into the stock eager model with stock PEFT."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kt_ops import default
    from kt_ops.cli import main

    tokenizer = AutoTokenizer.from_pretrained(default.ASSETS)
    checkpoint = tmp_path / "olmoe"
    tiny_model("olmoe", vocab_size=len(tokenizer)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "run"
    assert main(["train", "--model", str(checkpoint), "--data", default.DATA, "--out", str(out), "--steps", "3",
                 "--max-tokens-per-step", "256", "--no-progress"]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["completed"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["modules_to_save"] == ["mlp.gate"]
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert any(".experts." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), out)
    kt = kt_ops.load_model(checkpoint, adapter=out, dtype=torch.float32, progress=False)
    ids = torch.randint(3, len(tokenizer), (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close("logits", kt(input_ids=ids).logits, by_peft(input_ids=ids).logits, torch.bfloat16)


def test_unpack_experts_inverts_pack_experts():
    g = torch.Generator().manual_seed(0)
    for e, i, h, nodes in [(3, 45, 70, 1), (3, 70, 33, 2), (2, 100, 64, 3)]:
        w = [torch.randn(*s, generator=g).bfloat16() for s in [(e, i, h), (e, i, h), (e, h, i)]]
        packed = kt_ops.pack_experts(*w, numa_nodes=nodes)
        assert all(torch.equal(a, b) for a, b in zip(packed.unpack(), w))


@pytest.mark.parametrize("fmt", kt_ops.weight_formats())
def test_unpack_experts_of_chosen_ids_are_those_experts_of_the_whole_unpack(fmt):
    g = torch.Generator().manual_seed(1)
    e, i, h = 5, 64, 128
    w = [torch.randn(*s, generator=g).bfloat16() for s in [(e, i, h), (e, i, h), (e, h, i)]]
    packed = kt_ops.pack_experts(*w, numa_nodes=2, format=fmt)
    whole = packed.unpack()
    for ids in ([3, 0], [4], [], [2, 2, 1]):
        chosen = packed.unpack(ids)
        for part, full in zip(chosen, whole):
            assert part.shape == (len(ids), *full.shape[1:])
            assert torch.equal(part, full[ids])
        meta = torch.ops.kt.unpack_experts([t.to("meta") for t in packed.tensors], h, i, ids)
        assert [tuple(t.shape) for t in meta] == [tuple(t.shape) for t in chosen]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_unpack_experts_refuses_ids_of_no_packed_expert(device):
    w = [torch.zeros(2, 64, 32).bfloat16(), torch.zeros(2, 64, 32).bfloat16(), torch.zeros(2, 32, 64).bfloat16()]
    p = kt_ops.pack_experts(*w, numa_nodes=1)
    with pytest.raises(RuntimeError, match=re.escape("kt.unpack_experts: expert_ids must be in [0, 2) (the packed "
                                                     "experts), got 2 at [1]")):
        torch.ops.kt.unpack_experts([t.to(device) for t in p.tensors], 32, 64, [0, 2])


def test_unpack_experts_checks_its_sizes_against_the_layout():
    w = [torch.zeros(2, 64, 32).bfloat16(), torch.zeros(2, 64, 32).bfloat16(), torch.zeros(2, 32, 64).bfloat16()]
    p = kt_ops.pack_experts(*w, numa_nodes=1)
    with pytest.raises(RuntimeError, match="kt.unpack_experts: layout describes 2 experts of H = 32 and I = 64"):
        torch.ops.kt.unpack_experts(list(p.tensors), 32, 40)
    with pytest.raises(RuntimeError, match="kt.unpack_experts: gate_up must be packed for H = 64"):
        torch.ops.kt.unpack_experts(list(p.tensors), 64, 64)


def test_supported_families_are_found_by_introspection():
    table = kt_ops.supported_families()
    assert "qwen3_moe" in table and "Qwen3MoeExperts" in table["qwen3_moe"]
    assert table["gpt_oss"].endswith("interleaved, transposed, biases, silu_1.702(min(gate, 7)) * (clamp(up, 7) + 1)")
    assert "not supported: non-gated experts" in table["nemotron_h"]
    assert sum("not supported" not in v and not v.startswith("unknown") for v in table.values()) >= 48


class _ProbedExperts(torch.nn.Module):
    """The attributes transformers' experts interface sets, and a gate of the test's choosing."""

    has_gate, has_bias, is_transposed, is_concatenated = True, False, False, True

    def __init__(self, gate, **attrs):
        super().__init__()
        self.gate_fn = gate
        self.__dict__.update(attrs)

    def _apply_gate(self, gate_up):
        return self.gate_fn(self, gate_up)


def _chunked(fn):
    return lambda self, gu: fn(self, *gu.chunk(2, dim=-1))


@pytest.mark.parametrize("gate, attrs, want, concatenated", [
    (_chunked(lambda m, g, u: torch.nn.functional.silu(g.clamp(max=m.swiglu_limit)) * u.clamp(-m.swiglu_limit, m.swiglu_limit)),
     {"swiglu_limit": 5.0}, kt_ops.Gate(limit=5.0), True),
    (lambda m, gu: (gu[..., 1::2].clamp(-m.limit, m.limit) + 1) * gu[..., ::2].clamp(max=m.limit)
     * torch.sigmoid(m.alpha * gu[..., ::2].clamp(max=m.limit)), {"limit": 3.0, "alpha": 1.5},
     kt_ops.Gate(alpha=1.5, limit=3.0, up_offset=1.0), False),
    (_chunked(lambda m, g, u: torch.nn.functional.gelu(g, approximate="tanh") * u), {}, kt_ops.Gate("gelu_tanh"), True),
    # A limit attribute the gate does not use is no clamp.
    (_chunked(lambda m, g, u: torch.nn.functional.silu(g) * u), {"swiglu_limit": 5.0}, kt_ops.Gate(), True),
    (_chunked(lambda m, g, u: torch.nn.functional.silu(g) * torch.tanh(u / 4) * 4), {}, None, True),  # a softcap
])
def test_the_gate_is_found_by_evaluating_it(gate, attrs, want, concatenated):
    variant = experts_variant(_ProbedExperts(gate, **attrs))
    assert variant.kernel_gate == want
    if want is None:
        assert "which is none of the kernels' gates" in variant.unsupported()
    else:
        assert variant.unsupported() is None and variant.concatenated == concatenated


@pytest.mark.parametrize("edit, message", [
    (lambda p: ([p.gate_up, p.down, p.layout], 0, 64), "hidden_size and intermediate_size must be positive, got 0 and 64"),
    (lambda p: ([p.gate_up, p.down[:, :1], p.layout], 32, 64), "down must be the bfloat16 tensor made by kt.pack_experts with gate_up"),
    (lambda p: ([p.gate_up, p.down, p.layout.int()], 32, 64), "layout must be the int64 [6] tensor made by kt.pack_experts"),
    (lambda p: ([p.gate_up, p.down, torch.arange(6)], 32, 64), "layout must be the tensor made by kt.pack_experts with gate_up and down"),
    (lambda p: ([p.gate_up, p.down], 32, 64), "experts must be the tensors kt.pack_experts returned (gate_up, down, layout"),
    (lambda p: ([p.gate_up, p.down, p.layout, p.layout], 32, 64), "experts must be the 3 tensors kt.pack_experts returns for format bf16, got 4"),
])
def test_unpack_experts_argument_checks(edit, message):
    w = [torch.zeros(2, 64, 32).bfloat16(), torch.zeros(2, 64, 32).bfloat16(), torch.zeros(2, 32, 64).bfloat16()]
    with pytest.raises(RuntimeError, match=re.escape("kt.unpack_experts: " + message)):
        torch.ops.kt.unpack_experts(*edit(kt_ops.pack_experts(*w, numa_nodes=1)))
