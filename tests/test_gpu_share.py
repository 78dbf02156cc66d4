"""A share of the experts on the GPU (kt_ops.gpu_share): the split computes what the CPU alone
computes (loss and every gradient, on the stock PEFT path, with biases and interleaved
layouts, under checkpointing and with two micro-batches in flight), the choice of experts
within a budget, a share that holds every expert makes no kt call, bad selections are refused
before anything changes, and kt-sft's --gpu-experts-budget (counted, recorded, resumed).

The share's device is the CPU here unless a GPU is present: the split and the grouped
computation are the same code on either device."""
import json
import os

import pytest
import torch

import kt_ops
from hf_families import VOCAB, tiny_model
from kt_ops import gpu_share
from kt_ops.experts import experts_modules, held_packed_experts
from kt_ops.cli import build_parser, main, train_args
from kt_ops.train import TrainArgs, Trainer
from moe_case import assert_close

pytest.importorskip("transformers.integrations.moe", reason="transformers 4.x has no experts interface")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def patched(model_type, seed=0, dtype=torch.float32):
    """A tiny model on the kt experts with a non-zero expert LoRA (every factor gets a
    gradient) and attention LoRA."""
    model = kt_ops.patch_model(tiny_model(model_type, seed).to(dtype), config=kt_ops.ExpertLoraConfig(
        4, 8, target_modules=("o_proj",)))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def tokens(seed=3, shape=(2, 11)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad and p.grad is not None}


def counted(model, ids):
    with gpu_share.count_routing(model) as routing, torch.no_grad():
        model(input_ids=ids)
    return routing.counts


def per_expert_bytes(model, dtype=torch.float32):
    return gpu_share.expert_bytes(next(iter(experts_modules(model).values())), dtype)


def assert_same_training(got, want, dtype=torch.float32):
    (loss, grads), (loss_want, grads_want) = got, want
    assert_close("loss", loss, loss_want, dtype)
    assert grads.keys() == grads_want.keys()
    for name, g in grads_want.items():
        assert_close(name, grads[name], g, dtype)


@pytest.fixture
def exact_kernels(monkeypatch):
    monkeypatch.setenv("KT_OPS_MAX_ISA", "avx2")  # fp32 GEMM inputs: the split is the only difference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("products", ["grouped_mm", "per_expert"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_a_share_of_the_experts_gives_the_cpu_only_loss_and_gradients(model_type, products, device, exact_kernels,
                                                                      monkeypatch):
    """Half the routing slots on the share: qwen3_moe (one LoRA A for gate and up), gpt_oss
    (biases, interleaved and transposed weights, a clamped gate), deepseek_v3 (sigmoid
    routing with shared experts beside the routed ones)."""
    model, ids = patched(model_type), tokens()
    want = loss_and_grads(model, ids)
    counts = counted(model, ids)
    routed = sum(int(c.sum()) for c in counts.values())
    total = sum(len(c) for c in counts.values())
    selection = gpu_share.choose_gpu_experts(model, total // 2 * per_expert_bytes(model), counts, torch.float32)
    covered = sum(int(counts[n][e].sum()) for n, e in selection.items())
    assert 0.3 * routed < covered < routed
    used = []
    fits = gpu_share._grouped_mm_fits
    monkeypatch.setattr(gpu_share, "_grouped_mm_fits",
                        lambda a, w: used.append(fits(a, w)) or (products == "grouped_mm" and fits(a, w)))
    gpu_share.share_experts(model, selection, device, torch.float32)
    assert gpu_share.shared_experts(model) == selection
    assert_same_training(loss_and_grads(model, ids), want)
    if products == "grouped_mm" and device == "cpu":
        assert any(used)  # the tiny sizes align for grouped_mm somewhere


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_with_a_share_is_within_bf16_tolerance_of_the_cpu_alone(device):
    model, ids = patched("qwen3_moe", dtype=torch.bfloat16), tokens()
    want = loss_and_grads(model, ids)
    counts = counted(model, ids)
    gpu_share.share_experts(model, gpu_share.choose_gpu_experts(model, 3 * per_expert_bytes(model, torch.bfloat16),
                                                                counts), device)
    assert_same_training(loss_and_grads(model, ids), want, torch.bfloat16)


def test_a_share_of_every_expert_makes_no_kt_call_and_computes_the_same(exact_kernels, monkeypatch):
    model, ids = patched("qwen3_moe"), tokens()
    want = loss_and_grads(model, ids)
    budget = sum(len(c) for c in counted(model, ids).values()) * per_expert_bytes(model)
    gpu_share.share_experts(model, gpu_share.choose_gpu_experts(model, budget, None, torch.float32), "cpu",
                            torch.float32)

    def no_kt_call(*args, **kwargs):
        raise AssertionError("the CPU's kt op ran with every expert shared")

    monkeypatch.setattr(kt_ops.experts, "moe_sft", no_kt_call)
    assert_same_training(loss_and_grads(model, ids), want)


def test_a_share_no_slot_names_leaves_the_layer_to_the_cpu(exact_kernels):
    model, ids = patched("qwen3_moe"), tokens()
    want = loss_and_grads(model, ids)
    counts = counted(model, ids)
    idle = {name: [int(e) for e in (c == 0).nonzero().flatten()] for name, c in counts.items()}
    idle = {name: e for name, e in idle.items() if e}
    if not idle:
        pytest.skip("every expert is routed to in this batch")
    gpu_share.share_experts(model, idle, "cpu", torch.float32)
    assert_same_training(loss_and_grads(model, ids), want)


def test_checkpointing_with_a_share_gives_the_same_gradients(exact_kernels):
    model, ids = patched("qwen3_moe"), tokens()
    counts = counted(model, ids)
    gpu_share.share_experts(model, gpu_share.choose_gpu_experts(model, 5 * per_expert_bytes(model), counts,
                                                                torch.float32), "cpu", torch.float32)
    want = loss_and_grads(model, ids)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_same_training(loss_and_grads(model, ids), want)


@pytest.mark.parametrize("per_expert", [True, False], ids=["per_expert_lora", "fused_lora"])
def test_kt_experts_modules_take_a_share_too(per_expert, exact_kernels):
    g = torch.Generator().manual_seed(0)
    e, h, i, t = 6, 64, 32, 9
    w = [torch.randn(*s, generator=g).bfloat16() for s in [(e, i, h), (e, i, h), (e, h, i)]]
    holder = torch.nn.Module()
    holder.experts = kt_ops.KtExperts(kt_ops.pack_experts(*w), h, 4, 8, per_expert=per_expert)
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(t, h, generator=g)
    ids = torch.rand(t, e, generator=g).topk(2, dim=1).indices
    weights = torch.rand(t, 2, generator=g)

    def run():
        holder.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = holder.experts(xi, ids, wi)
        y.pow(2).sum().backward()
        return y.detach(), {"x": xi.grad, "weights": wi.grad, **{n: p.grad for n, p in holder.named_parameters()}}

    y_want, grads_want = run()
    gpu_share.share_experts(holder, {"experts": [1, 4]}, "cpu", torch.float32)
    y, grads = run()
    assert_close("y", y, y_want, torch.float32)
    for name, g_want in grads_want.items():
        assert_close(name, grads[name], g_want, torch.float32)


# ---------------------------------------------------------------- choosing, placing, counting

def test_counting_sees_every_routing_slot_and_stops_with_the_block():
    model, ids = patched("qwen3_moe"), tokens(shape=(3, 7))
    counts = counted(model, ids)
    top_k = model.get_base_model().config.num_experts_per_tok
    assert len(counts) == model.get_base_model().config.num_hidden_layers
    assert all(int(c.sum()) == 21 * top_k for c in counts.values())
    before = {n: c.clone() for n, c in counts.items()}
    with torch.no_grad():
        model(input_ids=ids)
    assert all(torch.equal(before[n], c) for n, c in counts.items())


def test_the_most_routed_experts_are_chosen_first_across_layers():
    model = patched("qwen3_moe")
    names = list(experts_modules(model))
    e = len(counted(model, tokens())[names[0]])
    one = per_expert_bytes(model, torch.bfloat16)
    counts = {names[0]: torch.zeros(e, dtype=torch.int64), names[1]: torch.zeros(e, dtype=torch.int64)}
    assert e == 4
    counts[names[0]][[1, 3]] = torch.tensor([5, 9])
    counts[names[1]][[0, 2]] = torch.tensor([9, 7])
    choose = lambda n, c=counts: gpu_share.choose_gpu_experts(model, n * one, c)  # noqa: E731
    assert choose(0) == {}
    assert choose(1) == {names[0]: [3]}  # ties go to the earlier layer
    assert choose(3) == {names[0]: [3], names[1]: [0, 2]}
    assert choose(4) == {names[0]: [1, 3], names[1]: [0, 2]}
    assert choose(5) == {names[0]: [0, 1, 3], names[1]: [0, 2]}  # then uncounted ones, earlier layer and id first
    assert choose(4, {names[1]: counts[names[1]]}) == {names[0]: [0, 1], names[1]: [0, 2]}
    assert gpu_share.choose_gpu_experts(model, 4 * one - 1, counts) == choose(3)


@pytest.mark.parametrize("counts, message", [
    (lambda names: {"model.layers.9.mlp.experts": torch.zeros(4)}, "which is no experts module of the model"),
    (lambda names: {names[0]: torch.zeros(5, dtype=torch.int64)}, "has shape (5,), the module has 4 experts"),
])
def test_choosing_refuses_counts_that_do_not_fit_the_model(counts, message):
    model = patched("qwen3_moe")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpu_share.choose_gpu_experts(model, 10**9, counts(list(experts_modules(model))))
    with pytest.raises(ValueError, match="budget must be >= 0 bytes"):
        gpu_share.choose_gpu_experts(model, -1)


@pytest.mark.parametrize("selection, message", [
    (lambda n: {"nowhere.experts": [0]}, "'nowhere.experts' is no experts module of the model"),
    (lambda n: {n: [0, 4]}, r"expert ids must be a non-empty list of ints in \[0, 4\), got 4"),
    (lambda n: {n: []}, "got none"),
    (lambda n: {n: [1.0]}, "got 1.0"),
])
def test_bad_selections_are_refused_and_change_nothing(selection, message):
    model = patched("qwen3_moe")
    names = list(experts_modules(model))
    gpu_share.share_experts(model, {names[1]: [2, 3]}, "cpu")
    with pytest.raises(ValueError, match=message):
        gpu_share.share_experts(model, selection(names[0]), "cpu")
    assert gpu_share.shared_experts(model) == {names[1]: [2, 3]}


def test_a_new_selection_replaces_the_old_and_holds_the_dequantized_weights():
    model = kt_ops.patch_model(tiny_model("qwen3_moe"), 4, 8, experts_format="int8")
    names = list(experts_modules(model))
    gpu_share.share_experts(model, {names[0]: [1]}, "cpu")
    held = gpu_share.share_experts(model, {names[1]: [3, 0]}, "cpu", torch.bfloat16)
    assert gpu_share.shared_experts(model) == {names[1]: [0, 3]}
    share = gpu_share.shared_experts_of(experts_modules(model)[names[1]])
    assert held == share.nbytes == 2 * per_expert_bytes(model, torch.bfloat16)
    w_gate, w_up, w_down = held_packed_experts(experts_modules(model)[names[1]]).unpack([0, 3])
    assert torch.equal(share.gate_up, torch.cat([w_gate, w_up], dim=1)) and torch.equal(share.down, w_down)


@pytest.mark.parametrize("text, size", [("16GiB", 16 * 2**30), ("500MB", 500 * 10**6), ("1.5g", 1_500_000_000),
                                        ("0", 0), ("64 KiB", 65536), ("7b", 7)])
def test_sizes_are_read_with_their_units(text, size):
    assert gpu_share.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "16 parsecs", "-1GiB", "1e9"])
def test_sizes_without_a_number_and_a_unit_are_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        gpu_share.parse_size(text)


def test_sizes_are_written_for_people():
    assert [gpu_share.format_size(n) for n in (512, 4 * 2**20 + 2**19, 16 * 2**30)] == ["512 B", "4.5 MiB",
                                                                                    "16.00 GiB"]


# ---------------------------------------------------------------- kt-sft

def test_the_budget_flag_takes_a_size(tmp_path, capsys):
    ns = build_parser().parse_args(["train", "--out", str(tmp_path / "run"), "--gpu-experts-budget", "16GiB"])
    assert train_args(ns).gpu_experts_budget == 16 * 2**30
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--gpu-experts-budget", "lots"])
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_two_rows_in_flight_with_a_share_give_the_sequential_gradients(tmp_path):
    def step(overlap):
        trainer = Trainer(TrainArgs(out=str(tmp_path / "unused"), steps=1, dtype="float32", progress=False,
                                    device="cpu", overlap=overlap, gpu_experts_budget=2**20), log=lambda m: None)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.params:
                p.add_(torch.randn_like(p) * 0.01)
        loss, _ = trainer.loss_and_backward([[0, 1], [2, 3, 4]])
        return trainer, loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    trainer, loss, grads = step(True)
    assert trainer.lanes is not None and gpu_share.shared_experts(trainer.model)
    _, loss_seq, grads_seq = step(False)
    assert loss == loss_seq
    for name, g in grads_seq.items():
        assert torch.equal(grads[name], g), name


def test_kt_sft_holds_the_counted_experts_records_them_and_resumes_with_them(tmp_path, capsys):
    def train(*extra, name):
        out = str(tmp_path / name)
        assert main(["train", "--out", out, "--steps", "4", "--max-tokens-per-step", "512", "--device", "cpu",
                     "--gpu-experts-budget", "2MiB", "--no-progress", *extra]) == 0
        return out

    straight = train(name="straight")
    err = capsys.readouterr().err
    assert "warning: --gpu-experts-budget on cpu" in err and "experts (" in err and "held on cpu" in err
    metrics = json.load(open(os.path.join(straight, "metrics.json")))
    record = metrics["gpu_experts"]
    assert 0 < record["experts"] < record["of"] and record["bytes"] <= record["budget_bytes"] == 2 * 2**20
    assert 0 < record["routed_share"] <= 1
    with open(os.path.join(straight, "checkpoint", "trainer_state.json")) as fh:
        selection = json.load(fh)["gpu_experts"]
    assert sum(len(v) for v in selection.values()) == record["experts"]

    halves = train("--stop-after", "2", name="halves")
    assert main(["train", "--resume", halves, "--no-progress"]) == 0
    assert "routing slots" not in capsys.readouterr().err.split("resumed")[-1]  # not counted again
    a, b = (json.load(open(os.path.join(d, "metrics.json"))) for d in (straight, halves))
    assert (a["loss_last"], a["gpu_experts"]["experts"]) == (b["loss_last"], b["gpu_experts"]["experts"])
    with open(os.path.join(halves, "checkpoint", "trainer_state.json")) as fh:
        assert json.load(fh)["gpu_experts"] == selection


def test_a_resumed_run_keeps_its_budget(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--steps", "3", "--max-tokens-per-step", "256", "--device", "cpu",
                 "--gpu-experts-budget", "1MiB", "--stop-after", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", out, "--gpu-experts-budget", "2MiB", "--no-progress"]) == 2
    assert "--gpu-experts-budget 1048576 -> 2097152" in capsys.readouterr().err
