"""The kt-sft fine-tune through transformers' own Trainer: kt_ops.load_model gives an ordinary
PEFT model over the "kt" experts implementation, so Trainer needs no special casing.

    python examples/hf_trainer.py --out runs/hf_trainer          # the built-in tiny Qwen3-MoE
    python examples/hf_trainer.py --model DIR --data FILE.jsonl --out DIR

The routed experts stay in CPU memory (torch.ops.kt); the rest goes where Trainer puts it
(the GPU when there is one). The adapter is written with kt_ops.save_adapter (PEFT's
save_pretrained, each file written whole).
"""
import argparse
import json
import os

import torch
import transformers

import kt_ops
from kt_ops import data, default
from kt_ops.train import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face checkpoint directory (default: the built-in tiny Qwen3-MoE)")
    parser.add_argument("--data", help="JSONL instruction data (default: the built-in dataset)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--grad-checkpointing", action="store_true")
    args = parser.parse_args()
    reuse_freed_memory()  # this script owns the process: let glibc reuse the steps' large tensors

    model_dir = args.model or default.model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    examples = data.load_examples(args.data or default.DATA, tokenizer, max_seq_len=256)
    train_set = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    model = kt_ops.load_model(model_dir, lora_rank=16, lora_alpha=32)  # experts on the CPU, PEFT LoRA on each
    training = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=5, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.grad_checkpointing,
        # Non-reentrant, transformers 5.x's default (with the embeddings frozen, 4.x's default
        # reentrant checkpointing sees no input that needs a gradient and drops the backward).
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=train_set,
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE))
    result = trainer.train()
    kt_ops.save_adapter(model, args.out)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {"steps": result.global_step, "loss_first_logged": losses[0] if losses else None,
               "loss_last_logged": losses[-1] if losses else None, "train_loss": result.training_loss}
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
