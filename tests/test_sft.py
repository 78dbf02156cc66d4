"""kt-sft: command-line parsing and errors, data formats and masking, packing, a short run that
writes every output, resume == uninterrupted, SIGTERM checkpoints, generate, gradient
checkpointing and accumulation, and the built-in default (shortened)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import peft
import pytest
import torch
from safetensors.torch import load_file

import kt_ops
from kt_ops import data as sft_data
from kt_ops import default
from kt_ops.cli import main
from kt_ops.train import TrainArgs, Trainer
from moe_case import CountExpertForwards, assert_close

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default.ASSETS)


def write_jsonl(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def saved_state(out):
    with open(os.path.join(out, "checkpoint", "trainer_state.json")) as fh:
        return json.load(fh)


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required"),
    (["train", "--epochs", "1", "--steps", "2", "--out", "x"], "not allowed with argument"),
    (["train", "--rank", "0", "--out", "x"], "must be > 0"),
    (["train", "--lr", "fast", "--out", "x"], "invalid"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train"], "--out is required"),
    (["train", "--model", "{tmp}", "--out", "{tmp}/o"], "--data is required"),
    (["train", "--data", "{tmp}/none.jsonl", "--out", "{tmp}/o"], "none.jsonl: no such file"),
    (["train", "--max-tokens-per-step", "64", "--micro-batch-tokens", "128", "--out", "{tmp}/o"],
     "--micro-batch-tokens (128) exceeds --max-tokens-per-step (64)"),
    (["train", "--resume", "{tmp}"], "no checkpoint in"),
    (["generate", "--adapter", "{tmp}", "--prompt", "hi"], "adapter_config.json"),
    (["eval", "--adapter", "{tmp}"], "adapter_config.json"),
    (["eval", "--model", "{tmp}", "--adapter", "{tmp}"], "kt-sft eval: --data is required with --model"),
    (["infer", "--model", "{tmp}", "--out", "{tmp}/p.jsonl"], "kt-sft infer: --data is required with --model"),
    (["chat", "--adapter", "{tmp}"], "adapter_config.json"),
])
def test_errors_are_named_and_exit_2(argv, message, tmp_path, capsys):
    code, _, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_help_of_each_command(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["infer", "--help"], ["chat", "--help"],
                 ["generate", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--max-tokens-per-step", "--eval-fraction", "--keep-best", "--adapter", "--batch-size", "--top-p",
                 "--system", "--no-generate"):
        assert flag in out, flag


def test_python_m_kt_ops_is_the_command():
    out = subprocess.run([sys.executable, "-m", "kt_ops", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout


# ---------------------------------------------------------------- data

def test_three_record_formats_become_conversations():
    assert sft_data.to_messages({"prompt": "p", "response": "r"}) == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    assert sft_data.to_messages({"instruction": "Do", "input": "this", "output": "done"})[0]["content"] == "Do\n\nthis"
    assert sft_data.to_messages({"instruction": "Do", "output": "done"})[0]["content"] == "Do"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert sft_data.to_messages({"messages": chat}) == chat


@pytest.mark.parametrize("record, reason", [
    ([1, 2], "expected a JSON object"),
    ({"text": "x"}, "unknown format"),
    ({"prompt": "p"}, '"response" is empty'),
    ({"prompt": 3, "response": "r"}, '"prompt" must be a string'),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] must be"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with an assistant message"),
])
def test_bad_records_say_why(record, reason):
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        sft_data.to_messages(record)


def test_only_assistant_tokens_carry_labels(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Green."}]
    ex = sft_data.tokenize(messages, tokenizer, 512)
    assert ex.input_ids == tokenizer(sft_data.render_chat(tokenizer, messages, False), add_special_tokens=False)["input_ids"]
    labelled = [t for t in ex.labels if t != sft_data.IGNORE]
    assert tokenizer.decode(labelled) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    assert all(label in (sft_data.IGNORE, tok) for label, tok in zip(ex.labels, ex.input_ids))


def test_plain_template_when_the_tokenizer_has_none(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(default.ASSETS)
    tokenizer.chat_template = None
    ex = sft_data.tokenize([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenizer, 64)
    assert tokenizer.decode(ex.input_ids) == "User:\nHi\n\nAssistant:\nHello<|im_end|>\n\n"
    assert tokenizer.decode([t for t in ex.labels if t != sft_data.IGNORE]).startswith("Hello<|im_end|>")


def test_truncation_keeps_the_prefix_and_drops_examples_with_nothing_to_learn(tokenizer):
    messages = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(ValueError, match="no assistant tokens within the first 16 tokens"):
        sft_data.tokenize(messages, tokenizer, 16)
    ex = sft_data.tokenize([{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 40}],
                           tokenizer, 16)
    assert len(ex) == 16 and ex.trainable_tokens > 0


def test_bad_lines_are_reported_with_line_numbers(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "{not json", "",
                                              {"prompt": "a"}, {"instruction": "i", "output": "o"}])
    warnings = []
    examples = sft_data.load_examples(path, tokenizer, 64, warn=warnings.append)
    assert len(examples) == 2
    assert any(w.startswith(f"{path}:2: invalid JSON") for w in warnings)
    assert any(w.startswith(f"{path}:4: ") and "response" in w for w in warnings)
    assert any("left out 2 bad of 4 lines" in w for w in warnings)


@pytest.mark.parametrize("lines, message", [([], "the file is empty"), (["{", "[]"], "2 bad lines, the first:")])
def test_unusable_file_stops_before_training(lines, message, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(sft_data.DataError, match=message):
        sft_data.load_examples(path, tokenizer, 64, warn=lambda m: None)


def test_unusable_data_exits_before_loading_the_model(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", ["{"])
    code, _, err = run(["train", "--data", path, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "d.jsonl:1: invalid JSON" in err and "no usable examples" in err
    assert not (tmp_path / "o").exists()


def test_packing_covers_each_example_once_within_budgets():
    lengths = [(i * 37) % 200 + 5 for i in range(300)]
    steps = sft_data.plan_epoch(lengths, seed=3, epoch=1, tokens_per_step=1024, tokens_per_row=512)
    rows = [row for step in steps for row in step]
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert all(sum(lengths[i] for row in step for i in row) <= 1024 for step in steps)
    assert sum(lengths) / (len(rows) * 512) > 0.9  # rows are well filled
    assert steps == sft_data.plan_epoch(lengths, seed=3, epoch=1, tokens_per_step=1024, tokens_per_row=512)
    assert steps != sft_data.plan_epoch(lengths, seed=3, epoch=2, tokens_per_step=1024, tokens_per_row=512)


def test_packing_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="tokens per row \\(512\\) exceeds tokens per step \\(256\\)"):
        sft_data.plan_epoch([10], seed=0, epoch=0, tokens_per_step=256, tokens_per_row=512)
    with pytest.raises(ValueError, match="example 1 has 300 tokens, more than a row's 256"):
        sft_data.plan_epoch([10, 300], seed=0, epoch=0, tokens_per_step=256)


def test_packed_row_attends_within_each_conversation():
    """A row of several conversations gives each one the logits it gets alone (transformers
    reads the packing from the position ids when there is no cache and no attention mask)."""
    model = kt_ops.load_model(default.model_dir(), 4, 8, dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(0)
    examples = [sft_data.Example(torch.randint(0, 1000, (n,), generator=g).tolist(), [sft_data.IGNORE] * n)
                for n in (7, 12, 5)]
    row = sft_data.collate(examples, [0, 1, 2])
    assert row["position_ids"][0].tolist() == list(range(7)) + list(range(12)) + list(range(5))
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples])
    assert_close("packed logits", packed, alone, torch.float32)


# ---------------------------------------------------------------- training runs

def trained(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    assert main(["train", "--out", out, "--steps", "6", "--max-tokens-per-step", "512", "--no-progress", *extra]) == 0
    return out


def test_short_run_writes_every_output_and_stock_peft_loads_the_adapter(tmp_path, capsys):
    out = trained(tmp_path)
    printed = json.loads(capsys.readouterr().out)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics == printed
    assert metrics["steps"] == 6 and metrics["completed"]
    for key in ("loss_first", "loss_last", "tokens_per_s", "peak_rss_gib"):
        assert metrics[key] > 0, key
    assert metrics["experts_format"] == ["bf16"]  # the built-in default's own
    with open(os.path.join(out, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "checkpoint", "trainer_state.json"))

    # The adapter: expert LoRA, attention LoRA (the built-in default's) and trained routers.
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    targets = cfg["target_modules"]  # transformers 4.x per-expert layout: one regex, experts included
    assert all(n in targets for n in ATTENTION) if isinstance(targets, str) else sorted(targets) == sorted(ATTENTION)
    assert cfg["modules_to_save"] == ["mlp.gate"]
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any(".experts." in k for k in tensors) and any("q_proj.lora_B" in k for k in tensors)
    trained_b = {}  # per layer and module kind: did some lora_B move? (an expert never routed to stays 0)
    for k, v in tensors.items():
        if "lora_B" in k:
            kind = re.sub(r"\.experts\.\d+\.", ".experts.", re.sub(r"\.lora_B.*", "", k))
            trained_b[kind] = trained_b.get(kind, False) or bool(v.abs().sum() > 0)
    assert trained_b and all(trained_b.values()), trained_b

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 300, 41, 9, 77]])
    # fp32 beside the bf16 experts: in bf16, PEFT's per-expert path (transformers 4.x) rounds
    # differently enough to hide what this checks.
    kt = kt_ops.load_model(default.model_dir(), adapter=out, dtype=torch.float32, progress=False)
    by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default.model_dir(),
                                                                                  dtype=torch.float32), out)
    with torch.no_grad():
        assert_close("logits", kt(ids).logits, by_peft(ids).logits, torch.bfloat16)


def test_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    straight = trained(tmp_path, name="straight")
    halves = trained(tmp_path, "--stop-after", "3", name="halves")
    assert json.load(open(os.path.join(halves, "metrics.json")))["steps"] == 3
    assert main(["train", "--resume", halves, "--no-progress"]) == 0
    capsys.readouterr()
    a = load_file(os.path.join(straight, "adapter_model.safetensors"))
    b = load_file(os.path.join(halves, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (straight, halves))
    assert (ma["steps"], ma["loss_last"], ma["tokens"]) == (mb["steps"], mb["loss_last"], mb["tokens"])
    assert ma["eval"] == mb["eval"] and len(ma["eval"]) == 7  # the built-in held-out set, before and after each step


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out = trained(tmp_path, "--stop-after", "2")
    code, _, err = run(["train", "--resume", out, "--lr", "0.5"], capsys)
    assert code == 2 and "cannot resume with different settings: --lr" in err


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, capsys):
    out = trained(tmp_path)
    before = load_file(os.path.join(out, "adapter_model.safetensors"))
    code, _, err = run(["train", "--out", out, "--steps", "2"], capsys)
    assert code == 2 and "already holds a run; continue it with --resume" in err
    assert all(torch.equal(v, load_file(os.path.join(out, "adapter_model.safetensors"))[k]) for k, v in before.items())
    assert main(["train", "--out", out, "--steps", "2", "--overwrite", "--no-progress"]) == 0
    assert json.load(open(os.path.join(out, "metrics.json")))["steps"] == 2


def test_a_non_finite_loss_stops_with_the_last_good_state_saved(tmp_path, capsys, monkeypatch):
    real = Trainer.loss_and_backward

    def diverging(self, rows):
        loss, tokens = real(self, rows)
        return (float("nan") if self.step == 2 else loss), tokens

    monkeypatch.setattr(Trainer, "loss_and_backward", diverging)
    out = str(tmp_path / "run")
    code, _, err = run(["train", "--out", out, "--steps", "6", "--max-tokens-per-step", "512", "--no-progress"],
                       capsys)
    assert code == 2 and "loss is nan at step 3" in err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 2 and not metrics["completed"]
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(out, "adapter_model.safetensors")).values())
    assert saved_state(out)["step"] == 2


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "kt_ops", "train", "--out", out, "--steps", "100000",
                             "--max-tokens-per-step", "256", "--no-progress"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training has started
        if "steps of <=" in line:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume with: kt-sft train --resume" in err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert not metrics["completed"] and 0 < metrics["steps"] < 100000
    assert saved_state(out)["step"] == metrics["steps"]


def test_generate_with_the_saved_adapter(tmp_path, capsys):
    out = trained(tmp_path)
    capsys.readouterr()
    args = ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args + ["--adapter", out]) == 0
    tuned = capsys.readouterr().out
    assert main(args) == 0
    base = capsys.readouterr().out
    assert tuned.strip() and tuned != base  # the adapter changes the reply


# ---------------------------------------------------------------- gradients

def step_gradients(tmp_path, rows, **kw):
    args = TrainArgs(out=str(tmp_path / "unused"), steps=1, dtype="float32", progress=False,
                     target_modules=ATTENTION, **kw)
    trainer = Trainer(args, log=lambda m: None)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B everywhere, so every LoRA tensor gets a gradient
        for p in trainer.params:
            p.add_(torch.randn_like(p) * 0.01)
    loss, _ = trainer.loss_and_backward(rows)
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_gradient_checkpointing_and_accumulation_give_the_same_gradients(device, tmp_path):
    whole = step_gradients(tmp_path, [[0, 1, 2, 3, 4, 5]], device=device)
    checkpointed = step_gradients(tmp_path, [[0, 1, 2, 3, 4, 5]], grad_checkpointing=True, device=device)
    accumulated = step_gradients(tmp_path, [[0, 1], [2, 3, 4], [5]], device=device)
    # On the GPU, attention over one packed row and over shorter rows takes different kernels.
    tolerance = torch.float32 if device == "cpu" else torch.bfloat16
    for other in (checkpointed, accumulated):
        assert abs(other[0] - whole[0]) < 1e-4 * whole[0]
        assert other[1].keys() == whole[1].keys()
        for name, grad in whole[1].items():
            assert grad.abs().sum() > 0, name
            assert_close(name, other[1][name], grad, tolerance)


def test_checkpointing_does_not_run_the_experts_twice(tmp_path):
    """kt-sft --grad-checkpointing: the backward recomputes attention, not the kt experts."""
    layers = json.load(open(os.path.join(default.ASSETS, "config.json")))["num_hidden_layers"]
    for checkpointing in (False, True):
        trainer = Trainer(TrainArgs(out=str(tmp_path), steps=1, grad_checkpointing=checkpointing, progress=False,
                                    device="cpu"), log=lambda m: None)
        with CountExpertForwards() as counter:
            trainer.loss_and_backward([[0, 1, 2]])
        assert counter.calls == layers, (checkpointing, counter.calls)


def test_built_in_default_halves_the_loss(tmp_path, capsys):
    """The README's main job, shortened to 6 of its 30 epochs."""
    out = str(tmp_path / "default")
    assert main(["train", "--out", out, "--epochs", "6", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss_last"] <= metrics["loss_first"] / 2, metrics


def test_int8_experts_train_to_within_5_percent_of_bf16(tmp_path, capsys):
    """The built-in default (its first 8 steps) with int8 experts, weight-only and W8A8: each
    final loss lies within 5% of the bf16 run's, and metrics.json names the format."""
    losses = {}
    for fmt in ("bf16", "int8", "w8a8"):
        out = str(tmp_path / fmt)
        assert main(["train", "--out", out, "--steps", "8", "--no-progress", "--experts-format", fmt]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["experts_format"] == [fmt]
        losses[fmt] = metrics["loss_last"]
    assert losses["int8"] != losses["w8a8"]  # W8A8 computed differently
    for fmt in ("int8", "w8a8"):
        assert abs(losses[fmt] - losses["bf16"]) <= 0.05 * losses["bf16"], losses


def test_hf_trainer_example_trains_a_patched_model(tmp_path, cache_home):
    """examples/hf_trainer.py: transformers' Trainer, gradient accumulation and checkpointing
    on, no special casing for kt_ops."""
    out = str(tmp_path / "hf")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_trainer.py")
    proc = subprocess.run([sys.executable, example, "--out", out, "--max-steps", "20", "--grad-checkpointing"],
                          capture_output=True, text=True, env={**os.environ, "XDG_CACHE_HOME": cache_home})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["loss_last_logged"] < summary["loss_first_logged"]
    kt_ops.load_model(default.model_dir(), adapter=out, progress=False)


_STEP_FAULTS = """
import resource, sys, torch
from kt_ops.train import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def step():  # a training step's shape: large tensors (over glibc's mmap threshold) made and freed
    tensors = [torch.ones(64 * 2**20 // 4) for _ in range(4)]
    small = [object() for _ in range(1000)]
    return sum(float(t[0]) for t in tensors)
for _ in range(10):  # the heap settles into the steps' pattern
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_reuse_freed_memory_stops_page_faults_in_later_steps():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 3 * 4 * 64 * 2**20 // 4096  # touched by the three measured steps
    assert faults("reuse") < pages // 256  # freed blocks are reused, already mapped
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp_always = "[always]" in f.read()
    if not thp_always:  # otherwise each fresh mmap faults once per 4 KiB page
        assert faults("default") > pages // 2
