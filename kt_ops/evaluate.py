"""Held-out evaluation: the loss on the assistant tokens of conversations a run does not train
on, and generation metrics of replies against reference answers.

:func:`summed_loss` is the one loss of kt-sft (training and evaluation take it alike);
:func:`heldout_loss` is its mean over a set of examples without gradients;
:func:`generation_metrics` scores replies with the maintained implementations of ROUGE-L
(``rouge-score``) and BLEU (``sacrebleu``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kt_ops import data as sft_data

_LOSS_CHUNK = 1024  # label positions whose logits are materialised at once


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``model`` itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross entropy over the labelled positions of one packed row
    (:func:`kt_ops.data.collate`); logits are made only there, a chunk at a time and
    recomputed in the backward, so a large vocabulary never holds [tokens, vocab] activations."""
    base = base_model(model)
    hidden = base.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).last_hidden_state[0, :-1]
    labels = batch["labels"][0, 1:]
    keep = labels != sft_data.IGNORE
    hidden, labels = hidden[keep], labels[keep]
    head = base.get_output_embeddings()

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    return sum(checkpoint(chunk_loss, hidden[i:i + _LOSS_CHUNK], labels[i:i + _LOSS_CHUNK], use_reentrant=False)
               for i in range(0, len(labels), _LOSS_CHUNK))


@dataclass
class HeldOutLoss:
    """Mean cross entropy over the assistant tokens of a set of examples, its perplexity, and
    the number of tokens it is the mean of."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float past ~709

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: list[sft_data.Example], tokens_per_row: int,
                 device: torch.device) -> HeldOutLoss:
    """The mean loss of ``model`` over the assistant tokens of ``examples``, packed into rows of
    at most ``tokens_per_row`` tokens as training packs them; in eval mode, without gradients
    (the model's training mode is restored after)."""
    rows = [row for step in sft_data.plan_epoch([len(e) for e in examples], 0, 0, tokens_per_row) for row in step]
    training = model.training
    model.eval()
    try:
        total, labels = 0.0, 0
        for row in rows:
            batch = {k: v.to(device) for k, v in sft_data.collate(examples, row).items()}
            total += float(summed_loss(model, batch))
            labels += int((batch["labels"][0, 1:] != sft_data.IGNORE).sum())
    finally:
        model.train(training)
    return HeldOutLoss(total / labels, labels)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping surrounding whitespace), mean ROUGE-L F1 (``rouge-score``,
    its default English tokenization with stemming off) and corpus BLEU (``sacrebleu``, its
    default 13a tokenization, on the 0-100 scale) of ``predictions`` against ``references``."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"kt_ops.generation_metrics: {len(predictions)} predictions for {len(references)} references "
                         "(need as many, at least one)")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    exact = [pred.strip() == ref.strip() for pred, ref in zip(predictions, references)]
    return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge),
            "bleu": sacrebleu.corpus_bleu(predictions, [references]).score, "count": len(predictions)}


def evaluate_adapter(model_dir: str, adapter: str, data_path: str, *, device: torch.device,
                     max_seq_len: int = 2048, tokens_per_row: int = 4096, generate: bool = True,
                     max_new_tokens: int = 64, batch_size: int = 8, experts_format: Optional[str] = None,
                     progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """What ``kt-sft eval`` reports: the held-out loss and perplexity of the conversations in
    ``data_path`` (assistant tokens only) for the base model and for it with ``adapter``, and,
    with ``generate``, greedy replies to each conversation's last prompt scored against the
    reply the record holds (:func:`generation_metrics`).

    One model is loaded, with the adapter's LoRA fresh (which computes what the base model
    computes, through the same kt experts); it is evaluated, the adapter is loaded into it
    (:func:`kt_ops.load_adapter`) and it is evaluated again. Bad lines of ``data_path`` (and
    records that end with a user turn, which hold no reply) are reported with their line
    numbers (through ``log``) and left out."""
    import transformers

    from kt_ops.adapters import load_adapter
    from kt_ops.generation import Generator, generate_all
    from kt_ops.weights import adapter_lora_config, load_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    max_len = min(max_seq_len, tokens_per_row)

    def parse(record: Any, line: int) -> tuple[sft_data.Example, sft_data.Prompt]:
        prompt = sft_data.to_prompt(record, line)
        if prompt.reference is None:
            raise ValueError("the conversation ends with a user turn: no reply to measure or score")
        return sft_data.tokenize(sft_data.to_messages(record), tokenizer, max_len), prompt

    records = sft_data.read_jsonl(data_path, parse, warn=lambda m: log(f"warning: {m}"))
    examples = [example for example, _ in records]
    prompts = [prompt for _, prompt in records]
    model = load_model(model_dir, config=adapter_lora_config(adapter, "kt-sft eval"), device=device,
                       experts_format=experts_format, progress=progress)
    generator = Generator(model, tokenizer, device, max_new_tokens=max_new_tokens)
    if generate:  # an over-long prompt stops the command before anything is measured
        generator.check_prompts(prompts, data_path)
    result: dict[str, Any] = {"model": model_dir, "adapter": adapter, "data": data_path, "examples": len(examples)}
    for name in ("base", "adapter"):
        if name == "adapter":
            model = generator.model = load_adapter(model, adapter)
        scores = heldout_loss(model, examples, tokens_per_row, device).as_dict()
        if generate:
            replies = generate_all(generator, [p.messages for p in prompts], batch_size, progress=progress,
                                   desc=f"generating ({name})")
            scores.update(generation_metrics(replies, [p.reference for p in prompts]))
            scores["samples"] = [{"id": p.id, "prediction": r, "reference": p.reference}
                                  for p, r in zip(prompts[:5], replies)]
        result[name] = scores
    return result


def format_table(result: dict[str, Any]) -> str:
    """The short table ``kt-sft eval`` prints: one row per model, one column per metric."""
    columns = [c for c in ("loss", "perplexity", "exact_match", "rouge_l", "bleu") if c in result["base"]]
    rows = [["", *columns]] + [[name, *(f"{result[name][c]:.4f}" for c in columns)] for name in ("base", "adapter")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) + 1)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
