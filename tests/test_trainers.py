"""Stock trainers on a tiny kt model, with stock calls only (``experts_implementation="kt"``,
PEFT's ``target_parameters`` LoRA, nothing from kt_ops beyond the import): TRL's SFTTrainer
and DPOTrainer with ``peft_config=``, and transformers' Trainer with activation checkpointing
and its default checkpoints, resumed."""
import copy
import json
from pathlib import Path

import peft
import pytest
import torch

import kt_ops
from hf_families import expert_targets, tiny_model
from kt_ops.models.variants import is_interface_experts
from kt_ops.packed_weights import PackedExpertWeight
from kt_ops.reference import TOLERANCES
from moe_case import CountExpertForwards, assert_close, exact_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="transformers 4.x has no experts interface")

DEFAULT = Path(kt_ops.__file__).parent / "default"  # the built-in job's tokenizer and chat data


def tokenizer_and_model():
    """The built-in job's tokenizer and a tiny Qwen3-MoE on the kt experts implementation."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEFAULT)
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.set_experts_implementation("kt")
    return tokenizer, model


def chat_rows(n: int) -> list[dict]:
    """The first ``n`` conversations of the built-in data (TRL's conversational form)."""
    with open(DEFAULT / "data.jsonl", encoding="utf-8") as f:
        return [row for row in map(json.loads, f) if "messages" in row][:n]


def expert_lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".experts." in n}


def ran_on_kt(model) -> bool:
    """The kt implementation packs each experts module's weights on its first forward."""
    experts = [m for m in model.modules() if is_interface_experts(m)]
    return bool(experts) and all(isinstance(m._parameters["gate_up_proj"], PackedExpertWeight) for m in experts)


def test_sft_trainer_with_peft_config_trains_the_expert_lora(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer, model = tokenizer_and_model()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64,
                         dataloader_num_workers=0, seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=expert_targets(model), task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(chat_rows(16)),
                             processing_class=tokenizer, peft_config=lora)
    before = expert_lora(trainer.model)
    assert before and all(p.requires_grad for n, p in trainer.model.named_parameters() if n in before)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 3 * 0.3, losses  # 0.3 nats a step
    after = expert_lora(trainer.model)
    assert all(not torch.equal(after[n], p) for n, p in before.items())
    assert ran_on_kt(trainer.model)


def preference_rows(n: int) -> list[dict]:
    """Prompt, chosen reply and rejected reply (another conversation's) from the built-in data."""
    rows = chat_rows(n + 1)
    return [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
             "rejected": rows[j + 1]["messages"][1]["content"]} for j, r in enumerate(rows[:n])]


def completion_log_probs(model, batch) -> torch.Tensor:
    """Summed log-probabilities of each sequence's completion tokens under ``model``: chosen
    rows then rejected rows, as DPO's reference log-probs are."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    per_token = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.parametrize("precompute", [False, True], ids=["reference_pass", "precomputed_reference"])
def test_dpo_trainer_takes_its_reference_from_the_base_model(tmp_path, precompute):
    """DPO with peft_config= gets its reference log-probs with the adapter disabled (each step,
    or once before training with precompute_ref_log_probs): they must be the base model's. The
    adapter starts away from zero, so a reference that kept it on would differ."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer, model = tokenizer_and_model()
    base = copy.deepcopy(model)
    base.set_experts_implementation("eager")
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=2e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64,
                         dataloader_num_workers=0, seed=0, beta=0.5, precompute_ref_log_probs=precompute,
                         bf16=False)  # no autocast around the model: the comparisons below are in fp32
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=expert_targets(model), task_type="CAUSAL_LM",
                           init_lora_weights=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(preference_rows(8)),
                             processing_class=tokenizer, peft_config=lora)
    tolerance = torch.float32 if exact_path() else torch.bfloat16
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    want = completion_log_probs(base, batch)
    if precompute:
        precomputed = [trainer.train_dataset[i][key] for key in ("ref_chosen_logps", "ref_rejected_logps")
                       for i in range(4)]
        assert_close("precomputed reference", torch.tensor(precomputed), want, tolerance)
    before = expert_lora(trainer.model)
    trainer.train()

    assert_close("reference", torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), want, tolerance)
    with torch.no_grad():
        adapted = trainer.model(input_ids=batch["input_ids"]).logits
        with trainer.model.disable_adapter():
            disabled = trainer.model(input_ids=batch["input_ids"]).logits
        eager = base(input_ids=batch["input_ids"]).logits
    assert_close("disabled adapter", disabled, eager, tolerance)
    # The adapter is on in training: the logits move by far more than the loosest path's tolerance
    # (a bound of the path's own tolerance would ask 2x the logits' norm on the bf16 paths).
    assert (adapted - eager).norm() > 10 * TOLERANCES[torch.bfloat16]["rel"] * eager.norm()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    after = expert_lora(trainer.model)
    assert all(not torch.equal(after[n], p) for n, p in before.items())
    assert ran_on_kt(trainer.model)


def _trainer(tmp_path, model, tokenizer, max_steps: int):
    """transformers' Trainer with activation checkpointing on and its default save strategy
    (every save_steps steps), on the built-in conversations."""
    fields = transformers.TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, save_steps=3,
                                          per_device_train_batch_size=4, learning_rate=3e-2, logging_steps=1,
                                          report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                                          **{checkpointing: True})
    rows = []
    for row in chat_rows(16):
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)[:64]
        rows.append({"input_ids": ids, "labels": ids})
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)
    return transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)


def _peft(model):
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_parameters=expert_targets(model),
                                                      task_type="CAUSAL_LM"))


def test_trainer_with_activation_checkpointing_resumes_from_its_checkpoint(tmp_path):
    tokenizer, model = tokenizer_and_model()
    whole = _trainer(tmp_path / "whole", _peft(model), tokenizer, max_steps=6)
    with CountExpertForwards() as counter:
        whole.train()
    layers = len([m for m in whole.model.modules() if is_interface_experts(m)])
    assert counter.calls == 6 * layers  # activation checkpointing recomputes no expert forward
    assert (tmp_path / "whole" / "checkpoint-3" / "adapter_model.safetensors").exists()

    _, fresh = tokenizer_and_model()
    resumed = _trainer(tmp_path / "whole", _peft(fresh), tokenizer, max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    want, got = expert_lora(whole.model), expert_lora(resumed.model)
    assert want.keys() == got.keys() and want
    for name, p in want.items():
        assert_close(name, got[name], p, torch.float32 if exact_path() else torch.bfloat16)
    assert ran_on_kt(resumed.model)
