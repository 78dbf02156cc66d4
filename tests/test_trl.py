"""TRL's SFTTrainer on a tiny kt model with stock calls only: ``experts_implementation="kt"``
and ``peft_config=``, nothing from kt_ops beyond the import."""
import json
from pathlib import Path

import pytest
import torch

import kt_ops
from hf_families import expert_targets, tiny_config
from kt_ops.models.variants import is_interface_experts
from kt_ops.packed_weights import PackedExpertWeight

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers.integrations.moe", reason="transformers 4.x has no experts interface")

DEFAULT = Path(kt_ops.__file__).parent / "default"  # the built-in job's tokenizer and chat data


def test_sft_trainer_with_peft_config_trains_the_expert_lora(tmp_path):
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(DEFAULT)
    config = tiny_config("qwen3_moe")
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.set_experts_implementation("kt")
    with open(DEFAULT / "data.jsonl", encoding="utf-8") as f:
        rows = [row for row in map(json.loads, f) if "messages" in row][:16]  # TRL's conversational form
    dataset = datasets.Dataset.from_list(rows)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64,
                         dataloader_num_workers=0, seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=expert_targets(model), task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora)
    expert_lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                   if "lora_" in n and ".experts." in n}
    assert expert_lora and all(p.requires_grad for n, p in trainer.model.named_parameters() if n in expert_lora)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 3 * 0.3, losses  # 0.3 nats a step
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before) for n, before in expert_lora.items())
    experts = [m for m in trainer.model.modules() if is_interface_experts(m)]
    # The kt implementation ran: it packs each experts module's weights on its first forward.
    assert experts and all(isinstance(m._parameters["gate_up_proj"], PackedExpertWeight) for m in experts)
